"""Side-by-side segmentation of one task by models of any family (RecLMIS, RecLMIS without reconstruction, MedPLIB's
`<SEG>` path): Dice and IoU on the same records, parameters, forward FLOPs of one request, and the chance rows (an
all-foreground and an empty mask) on the same targets."""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from medplib.data.images import read_image, read_mask
from medplib.data.torch_dataset import read_records, strip_paths
from medplib.eval.metrics import dice_iou
from medplib.eval.runner import evaluate, generation_length


def inference_parameters(model: torch.nn.Module) -> int:
    """Parameters a request uses: a model's own count when it drops training-only parts (`inference_parameters()`,
    RecLMIS's reconstruction heads), else its active ones (`parameter_counts`: one expert per MoE layer)."""
    own = getattr(model, "inference_parameters", None)
    if callable(own):
        return int(own())
    from medplib.model import parameter_counts

    return int(parameter_counts(model)["active"])


def forward_flops(model: torch.nn.Module, image: np.ndarray, question: str, max_new_tokens: int) -> int:
    """FLOPs (2 per multiply-add, torch's FlopCounterMode) to answer one request with `generate`: one forward pass
    for RecLMIS, the prompt plus every generated token and the mask decoder for MedPLIB."""
    # FlopCounterMode's module tracker hooks every module output that requires grad, and trips on a parameter a
    # module returns as is (SAM's positional embedding): count with the weights frozen, then restore them
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter:
            model.generate([image], [question], [[]], max_new_tokens=max_new_tokens)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return int(counter.get_total_flops())


def chance_rows(data_dir, split: str, task: str) -> dict[str, dict[str, float]]:
    """Mean Dice and IoU of an all-foreground and of an empty mask on the targets of `task`'s `split` records."""
    full, empty = [], []
    for rec in read_records(data_dir):
        if rec.split != split or rec.task != task:
            continue
        target = read_mask(data_dir / strip_paths(rec.conversations)[2][0])
        full.append(dice_iou(np.ones_like(target), target))
        empty.append(dice_iou(np.zeros_like(target), target))
    if not full:
        raise ValueError(f"No {task} records in split {split!r} of {data_dir}")
    def mean(rows: list[tuple[float, float]]) -> dict[str, float]:
        return {"dice": float(np.mean([d for d, _ in rows])), "iou": float(np.mean([i for _, i in rows])),
                "n": float(len(rows))}

    return {"all-foreground mask": mean(full), "empty mask": mean(empty)}


def other_note_dice(model: torch.nn.Module, data_dir, split: str, task: str, batch_size: int = 16) -> float:
    """Mean Dice when each image is asked with the next record's question (another image's note): a model that reads
    the note drops here, one that segments whatever is there does not (the language-blind control)."""
    recs = sorted((r for r in read_records(data_dir) if r.split == split and r.task == task), key=lambda r: r.id)
    questions = [next(t["value"] for t in strip_paths(r.conversations)[0] if t["from"] == "human") for r in recs]
    questions = questions[1:] + questions[:1]
    scores = []
    for start in range(0, len(recs), batch_size):
        batch = recs[start:start + batch_size]
        images = [read_image(data_dir / r.image) for r in batch]
        outs = model.generate(images, questions[start:start + batch_size], [[] for _ in batch],
                              max_new_tokens=generation_length(task))
        for r, out in zip(batch, outs):
            target = read_mask(data_dir / strip_paths(r.conversations)[2][0])
            scores.append(dice_iou(out.masks[0] if out.masks else np.zeros_like(target), target)[0])
    return float(np.mean(scores))


def compare_segmenters(models: Mapping[str, torch.nn.Module], data_dir, split: str = "test", task: str = "textseg",
                       batch_size: int = 16) -> list[dict]:
    """One row per model (name, dice, iou, n, Dice with another image's note, parameters, inference parameters,
    forward FLOPs of the first record's request) and the two chance rows, all on the same records of `split`."""
    first = next((r for r in read_records(data_dir) if r.split == split and r.task == task), None)
    if first is None:
        raise ValueError(f"No {task} records in split {split!r} of {data_dir}")
    image = read_image(data_dir / first.image)
    question = next(t["value"] for t in strip_paths(first.conversations)[0] if t["from"] == "human")
    length = generation_length(task)
    rows = []
    for name, model in models.items():
        report = evaluate(model.eval(), data_dir, splits=(split,), tasks=(task,), batch_size=batch_size)
        scores = report.tables[f"{split}/{task}"]["all"]
        rows.append({"model": name, "dice": float(scores["dice"]), "iou": float(scores["iou"]), "n": float(scores["n"]),
                     "dice_other_note": other_note_dice(model, data_dir, split, task, batch_size),
                     "parameters": float(sum(p.numel() for p in model.parameters())),
                     "inference_parameters": float(inference_parameters(model)),
                     "forward_gflops": forward_flops(model, image, question, length) / 1e9})
    for name, scores in chance_rows(data_dir, split, task).items():
        rows.append({"model": name, **scores, "dice_other_note": scores["dice"], "parameters": 0.0,
                     "inference_parameters": 0.0, "forward_gflops": 0.0})
    return rows


def comparison_markdown(rows: Sequence[dict], split: str, task: str) -> str:
    lines = [f"Text-guided segmentation ({task}), split {split}, n = {int(rows[0]['n'])} each", "",
             "| model | Dice | IoU | Dice, another image's note | parameters | inference parameters | forward GFLOPs |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['dice']:.4f} | {r['iou']:.4f} | {r['dice_other_note']:.4f} | "
              f"{int(r['parameters']):,} | {int(r['inference_parameters']):,} | {r['forward_gflops']:.4f} |"
              for r in rows]
    return "\n".join(lines) + "\n"



@contextmanager
def comparison_run(registry, name: str, tags: Mapping[str, str]) -> Iterator[str]:
    """An MLflow run of kind `comparison` (a benchmark's side-by-side table), FINISHED when the block ends cleanly,
    FAILED when it raises."""
    client = registry.client
    run_id = client.create_run(registry.experiment_id(), run_name=name,
                               tags={"medplib.kind": "comparison", **tags}).info.run_id
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status=status)


def log_comparison(client, run_id: str, rows: Sequence[dict], name: str, text: str, key: str) -> None:
    """A comparison's rows as an MLflow table (`NAME.json`), its markdown (`NAME.md`) and one metric per numeric cell,
    named `<the row's KEY value>.<column>` (cleaned to MLflow's metric-name characters)."""
    import pandas as pd
    from mlflow.entities import Metric

    client.log_table(run_id, pd.DataFrame(list(rows)), f"{name}.json")
    client.log_text(run_id, text, f"{name}.md")
    label = lambda r: re.sub(r"[^A-Za-z0-9_. -]+", "_", str(r[key])).strip("_")  # noqa: E731
    client.log_batch(run_id, metrics=[Metric(f"{label(r)}.{k}", float(v), 0, 0) for r in rows for k, v in r.items()
                                      if k != key and isinstance(v, (int, float)) and not isinstance(v, bool)])
