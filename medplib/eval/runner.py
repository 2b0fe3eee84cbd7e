"""Evaluate a model as MedPLIB does (REFERENCE §5), per task and modality, on the validation, test and zero-shot
splits. The headline metrics are the tasks' summaries on test (reported) and the same metrics on validation (what
the promotion gate and any selection read: test is never used to choose)."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from medplib.data.images import read_image, read_mask
from medplib.data.schema import IMAGE_TOKEN, Record
from medplib.data.torch_dataset import context_pairs, read_records, strip_paths
from medplib.model.family import generate_takes
from medplib import tasks as registry
from medplib.model import MedPLIB
from medplib.progress import StepProgress

log = logging.getLogger(__name__)
EVAL_SEED = 0  # what derived tasks' records (in-context examples) are drawn with: every model sees the same prompts


@dataclass
class EvalReport:
    rows: list[dict]  # one per sample: id, split, task, modality, question, prediction, reference, metric values
    tables: dict[str, dict[str, dict[str, float]]]  # "<split>/<task>" -> {modality: {metric: mean, n}}
    summary: dict[str, float] = field(default_factory=dict)  # headline metrics on test (and zero-shot): reported
    val_summary: dict[str, float] = field(default_factory=dict)  # the same on validation: what the gate reads
    masks: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)  # id -> image, pred, gt

    def per_modality(self, table: str, metric: str) -> dict[str, float]:
        return {m: v[metric] for m, v in self.tables.get(table, {}).items() if m != "all" and metric in v}


def _question(rec: Record) -> tuple[str, str, list[str], list[str]]:
    turns, regions, masks = strip_paths(rec.conversations)
    human = next(t["value"] for t in turns if t["from"] == "human")
    gpt = next(t["value"] for t in turns if t["from"] == "gpt")
    return human, gpt, regions, masks


def shown_context(rec: Record, pairs: Sequence[tuple], question: str) -> list[np.ndarray]:
    """The images `rec`'s question shows before its query image (its task's `show_context` of its context `pairs`,
    as `context_pairs` reads them); none when the question has a single `<image>`."""
    if question.count(IMAGE_TOKEN) <= 1 or not pairs:
        return []
    return registry.get(rec.task).show_context(list(pairs))


def score_sample(rec: Record, prediction: str, pred_masks: Sequence[np.ndarray], reference: str,
                 target: np.ndarray | None) -> dict:
    """The metric values of one sample, as its task scores them."""
    return registry.get(rec.task).score(prediction, reference, pred_masks, target)


def aggregate(rows: Sequence[dict], splits: Sequence[str]) -> dict[str, dict]:
    """"<split>/<task>" → {modality: {metric: value, "n": count}}: each task's `Cumulative` over its rows."""
    tables: dict[str, dict] = {}
    for split in splits:
        for task in sorted({r["task"] for r in rows if r["split"] == split}):
            metric = registry.get(task).metric()
            for r in rows:
                if r["split"] == split and r["task"] == task:
                    metric.append({k: v for k, v in r.items() if k not in ("id", "split", "task")})
            tables[f"{split}/{task}"] = metric.aggregate()
    return tables


def generation_length(task: str, max_new_tokens: int | Mapping[str, int] | None = None) -> int:
    """How many tokens a record of `task` may generate: `max_new_tokens` when a number, its entry for the task when a
    mapping (the config's `eval.max_new_tokens`), else the task's own `max_new_tokens`."""
    if isinstance(max_new_tokens, int):
        return max_new_tokens
    return (max_new_tokens or {}).get(task, registry.get(task).max_new_tokens)


def evaluate(model: MedPLIB, data_dir: Path, splits: Sequence[str] = ("val", "test", "zeroshot"),
             tasks: Sequence[str] | None = None, batch_size: int = 16,
             max_new_tokens: int | Mapping[str, int] | None = None, limit: int | None = None) -> EvalReport:
    """Generate an answer (and masks) for every record of `splits`, score it, and aggregate per modality. `model` is
    a loaded model of any family (MedPLIB, RecLMIS, …): what evaluation needs of it is `generate`.

    `tasks` takes task names or groups (default: the tasks of the model's family, every task for MedPLIB);
    `max_new_tokens` (one length for all, or task → length over the tasks' own) sets how long a batch generates: the
    longest length among its records' tasks.
    """
    from medplib.model.family import family_of_model

    data_dir = Path(data_dir)
    if tasks is None:
        tasks = family_of_model(model).tasks
    chosen = None if tasks is None else registry.resolve(tasks)
    pool = [r for r in read_records(data_dir) if r.split in splits]
    records = registry.with_derived([r for r in pool if chosen is None or r.task in chosen], chosen, "eval",
                                    EVAL_SEED, pool=pool)  # in-context prompts, made from the splits' grounding
    records.sort(key=lambda r: (r.split, r.task, r.id))
    if limit:  # the first `limit` records of each split
        taken: Counter[str] = Counter()
        cut = []
        for r in records:
            if taken[r.split] < limit:
                taken[r.split] += 1
                cut.append(r)
        records = cut
    if not records:
        raise ValueError(f"No records of splits {list(splits)} in {data_dir}")
    model.eval()
    rows: list[dict] = []
    kept: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    bar = StepProgress("evaluate", len(records), "samples", disable=len(records) < 64)
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        images, questions, regions, refs, targets, contexts, examples = [], [], [], [], [], [], []
        for rec in batch:
            human, gpt, region_paths, mask_paths = _question(rec)
            image = read_image(data_dir / rec.image)
            prompts = [read_mask(data_dir / p) for p in region_paths]
            form = registry.get(rec.task).pixel_form([{"from": "human", "value": human}], prompts, [],
                                                     *image.shape[:2])
            if form is not None:  # the question as the model was taught it (a box in text as a box prompt)
                (turn,), prompts, _ = form
                human = turn["value"]
            images.append(image)
            pairs = context_pairs(rec, data_dir) if rec.context else []  # read once: shown, and maybe examples
            contexts.append(shown_context(rec, pairs, human))
            examples.append(pairs if registry.get(rec.task).mask_examples else [])
            questions.append(human)
            regions.append(prompts)
            refs.append(gpt.replace("<SEG>", "").strip())
            targets.append(read_mask(data_dir / mask_paths[0]) if mask_paths else None)
        length = max(generation_length(rec.task, max_new_tokens) for rec in batch)
        given = {"contexts": contexts} if any(contexts) else {}
        if any(examples) and generate_takes(model, "examples"):
            given["examples"] = examples  # the pairs themselves, for a mask decoder that reads them
        outputs = model.generate(images, questions, regions, max_new_tokens=length, **given)
        for rec, question, out, ref, target, image in zip(batch, questions, outputs, refs, targets, images):
            answered = registry.get(rec.task).answer(out.text, out.masks)  # what its masks stand for, in the text
            prediction = answered.replace("<SEG>", "").strip()
            row = {"id": rec.id, "split": rec.split, "task": rec.task, "modality": rec.modality,
                   "question": question, "prediction": answered, "reference": ref,
                   **({"context": len(rec.context)} if rec.context else {}),
                   **score_sample(rec, prediction, out.masks, ref, target)}
            rows.append(row)
            if target is not None:  # a segmentation sample: keep it for the overlays
                pred = out.masks[0] if out.masks else np.zeros_like(target, dtype=bool)
                kept[rec.id] = (image, pred, target)
        bar.update(len(batch))
    bar.close()

    tables = aggregate(rows, splits)
    summary, val_summary = summarise(tables), summarise(tables, "val")
    log.info("evaluated %d samples: test %s, val %s", len(rows), {k: round(v, 3) for k, v in summary.items()},
             {k: round(v, 3) for k, v in val_summary.items()})
    return EvalReport(rows=rows, tables=tables, summary=summary, val_summary=val_summary, masks=kept)


def summarise(tables: dict[str, dict], split: str = "test") -> dict[str, float]:
    """Headline metrics (over all modalities) of the evaluation tables that exist; with split "val", the test
    headlines measured on validation (zero-shot ones left out)."""
    out = {}
    for name, (table, metric) in registry.headline_tables(split).items():
        value = tables.get(table, {}).get("all", {}).get(metric)
        if value is not None:
            out[name] = float(value)
    return out


def overlay(image: np.ndarray, pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """RGB picture: ground truth in green, prediction in red, overlap in yellow, over the grey image."""
    grey = image if image.ndim == 2 else image.mean(axis=2)
    rgb = np.repeat((grey.astype(np.float32) * 0.6)[..., None], 3, axis=2)
    rgb[..., 0] = np.where(pred, 255, rgb[..., 0])
    rgb[..., 1] = np.where(target, 255, rgb[..., 1])
    return rgb.clip(0, 255).astype(np.uint8)


def overlay_grid(report: EvalReport, split: str = "test", per_side: int = 3) -> dict[str, np.ndarray]:
    """Per modality, one strip: its `per_side` best then worst segmentation samples by Dice."""
    grids = {}
    rows = [r for r in report.rows if r["split"] == split and r["id"] in report.masks and "dice" in r]
    for modality in sorted({r["modality"] for r in rows}):
        ranked = sorted((r for r in rows if r["modality"] == modality), key=lambda r: -r["dice"])
        chosen = ranked[:per_side] + ranked[-per_side:] if len(ranked) > 2 * per_side else ranked
        tiles = [overlay(*report.masks[r["id"]]) for r in chosen]
        size = max(t.shape[0] for t in tiles)
        tiles = [np.pad(t, ((0, size - t.shape[0]), (0, size - t.shape[1]), (0, 0))) for t in tiles]
        grids[modality] = np.concatenate(tiles, axis=1)
    return grids


def report_figures(report: EvalReport) -> dict:
    """Every task's figures of the report's tables (`Task.figures`), by name."""
    out = {}
    for task in registry.all_tasks():
        out.update(task.figures(report.tables))
    return out


def table_markdown(table: dict[str, dict[str, float]], metrics: Sequence[str]) -> str:
    lines = ["| modality | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for modality, values in table.items():
        cells = [f"{values[m]:.3f}" if m in values else "" for m in metrics]
        lines.append(f"| {modality} | {int(values['n'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(report: EvalReport) -> str:
    """Every "<split>/<task>" table of a report as a markdown section, one row per modality."""
    md = []
    for table, by_mod in report.tables.items():
        cols = [m for m in next(iter(by_mod.values())) if m != "n"]
        md.append(f"### {table}\n\n{table_markdown(by_mod, cols)}\n")
    return "\n".join(md)


def log_report(report: EvalReport, client, run_id: str, data_version: str | None) -> None:
    """Metrics, per-modality tables (JSON + markdown), per-sample rows and overlay grids into an MLflow run."""
    import json

    import pandas as pd
    from mlflow.entities import Metric

    ts = int(__import__("time").time() * 1000)
    metrics = [Metric(k, v, ts, 0) for k, v in report.summary.items()]
    metrics += [Metric(f"val.{k}", v, ts, 0) for k, v in report.val_summary.items()]
    for table, by_mod in report.tables.items():
        key = table.replace("/", "_")
        for modality, values in by_mod.items():
            metrics += [Metric(f"{key}.{modality}.{m}", float(v), ts, 0) for m, v in values.items() if m != "n"]
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i:i + 500])
    client.set_tag(run_id, "medplib.eval_data_version", data_version or "unversioned")
    client.log_text(run_id, report_markdown(report), "eval/tables.md")
    client.log_dict(run_id, report.tables, "eval/tables.json")
    client.log_table(run_id, pd.DataFrame(report.rows), "eval/samples.json")
    for modality, grid in overlay_grid(report).items():
        client.log_image(run_id, grid, f"eval/overlays/{modality}_best_worst.png")
    for name, figure in report_figures(report).items():
        client.log_figure(run_id, figure, f"eval/{name}.png")
    client.log_text(run_id, json.dumps({**report.summary, **{f"val.{k}": v for k, v in report.val_summary.items()}},
                                       indent=1), "eval/summary.json")
