"""Publish a trained model: evaluate it, log it as a pyfunc, register it with its lineage, gate it against the champion.

Tracking calls happen here, where the work is; registry operations stay in `medplib.registry`, the register →
record → gate sequence included (`Registry.register_and_gate`): this module evaluates and hands over the metrics. The gate only compares metrics measured on the same data version and split, so when the
champion was last measured on other data it is re-evaluated here first, on the same records as the challenger.
"""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import yaml

from medplib import tasks
from medplib.config import Config, TrackingConfig, to_dict
from medplib.config.home import REPO_ROOT
from medplib.eval.card import model_card
from medplib.eval.runner import EvalReport, evaluate, log_report, summarise
from medplib.registry import TAG_DECISION_RUN, TAG_EVAL_RUN, EvalMetrics, Registry, log_dataset, use_tracking

log = logging.getLogger(__name__)

ARTIFACT_PATH = "medplib"  # the pyfunc's name in its run; `models:/<model id>` and `runs:/<run>/medplib`
TAG_GIT_DIRTY = "medplib.git_dirty"


GATE_SPLIT = "val"  # the promotion gate reads validation; test is reported, never used to choose


def eval_split(limit: int | None = None) -> str:
    """The split label recorded with the gate's metrics: "val", or "val[:N]" for a run cut to the first N records of
    each split, so that the gate never compares a partial evaluation with a full one."""
    return f"{GATE_SPLIT}[:{limit}]" if limit else GATE_SPLIT


def split_of(label: str) -> str:
    """The split of an eval-split label ("val[:50]" → "val")."""
    return label.split("[", 1)[0]


def gate_table(primary: str, split: str = GATE_SPLIT) -> str:
    """The evaluation table the gate's primary metric comes from on `split` ("val/<task>"), as the tasks' summaries
    say."""
    keys = tasks.headline_tables(split)
    if primary not in keys:
        raise ValueError(f"Primary metric {primary!r} is no task's summary metric on split {split!r}; known: "
                         f"{sorted(keys)}")
    return keys[primary][0]


def report_metrics(report: EvalReport, data_version: str, split: str, primary: str) -> EvalMetrics:
    """The registry's view of a report on one split (the label's: "val" for the gate): headline metrics over all
    modalities (`all`) and per modality, named as the tasks' summaries name them (`grounding_mdice` = metric "dice"
    of table "<split>/grounding"); `n` counts the samples the primary metric averages."""
    on = split_of(split)
    rows: dict[str, dict[str, float]] = {"all": summarise(report.tables, on)}
    for name, (table, metric) in tasks.headline_tables(on).items():
        for modality, values in report.tables.get(table, {}).items():
            if modality != "all" and metric in values:
                rows.setdefault(modality, {})[name] = float(values[metric])
    for modality, values in report.tables.get(gate_table(primary, on), {}).items():
        rows.setdefault(modality, {})["n"] = float(values["n"])
    return EvalMetrics(data_version=data_version, metrics=rows, split=split)


def current_git_commit() -> tuple[str, bool]:
    """(HEAD commit of the repository, whether the working tree has changes); ("unknown", True) outside git."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown", True
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    return head.stdout.strip(), bool(status.stdout.strip())


def config_digest(cfg: Config) -> str:
    """16 hex digits of SHA-256 over the resolved config as sorted YAML: same config, same digest."""
    return hashlib.sha256(yaml.safe_dump(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def _resumed_run(tracking: TrackingConfig, run_id: str) -> Iterator[None]:
    """Make `run_id` the active fluent run (mlflow.pyfunc.log_model logs into the active run), against our
    tracking URI; the process's global URI is restored afterwards."""
    import mlflow

    with use_tracking(tracking), mlflow.start_run(run_id=run_id, nested=True):
        yield


def evaluate_and_log(model, data_dir: Path, data_version: str | None, registry: Registry, *, run_name: str,
                     model_ref: str, parent_run_id: str | None = None, splits: Sequence[str] = ("val", "test", "zeroshot"),
                     limit: int | None = None, batch_size: int = 16, tags: dict[str, str] | None = None,
                     log_model_dir: Path | None = None, max_new_tokens: Mapping[str, int] | None = None,
                     dataset: dict | None = None) -> tuple[EvalReport, str]:
    """Evaluate a loaded model into a new MLflow run (child of `parent_run_id`); with `log_model_dir`, also log
    that folder as the pyfunc `medplib` in the run; `max_new_tokens` (task → generation length, the config's
    `eval.max_new_tokens`) over the tasks' own; `dataset` (`RunContext.dataset()`) is the run's dataset input. Returns
    (report, run id); the run is FAILED on an error."""
    from mlflow.entities import Param

    client = registry.client
    run_tags = {"medplib.kind": "evaluation", "medplib.model": model_ref,
                "medplib.data_version": data_version or "unversioned", **(tags or {})}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run_id = client.create_run(registry.experiment_id(), run_name=run_name, tags=run_tags).info.run_id
    status = "FAILED"
    try:
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in (
            ("model", model_ref[:6000]), ("data_dir", str(data_dir)), ("splits", ",".join(splits)),
            ("limit", limit), ("batch_size", batch_size),
            *((("max_new_tokens", json.dumps(dict(max_new_tokens), sort_keys=True)),) if max_new_tokens else ()))])
        log_dataset(client, run_id, dataset, "evaluation")
        report = evaluate(model, data_dir, splits=splits, limit=limit, batch_size=batch_size,
                          max_new_tokens=max_new_tokens)
        log_report(report, client, run_id, data_version)
        if log_model_dir is not None:
            from medplib.serve import log_pyfunc

            with _resumed_run(registry.cfg, run_id):
                log_pyfunc(Path(log_model_dir), ARTIFACT_PATH)
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status=status)
    return report, run_id


def reevaluate_champion(registry: Registry, data_dir: Path, data_version: str, *, limit: int | None = None,
                        batch_size: int = 16, parent_run_id: str | None = None,
                        skip_version: str | None = None, max_new_tokens: Mapping[str, int] | None = None,
                        dataset: dict | None = None, device: str = "auto") -> str | None:
    """If the champion's recorded metrics are not on (`data_version`, `eval_split(limit)`), evaluate it there (on
    `device`) and record them, so the gate can compare. Returns the evaluation run id, or None when nothing had to
    be done."""
    from medplib.serve import load_model

    champion = registry.champion_version()
    split = eval_split(limit)
    if champion is None or champion == skip_version:
        return None
    recorded = registry.eval_metrics(champion)
    if recorded is not None and (recorded.data_version, recorded.split) == (data_version, split):
        return None
    log.info("Champion version %s was measured on %s; re-evaluating it on data %s split '%s'", champion,
             f"data {recorded.data_version} split '{recorded.split}'" if recorded else "nothing", data_version, split)
    ref = f"models:/{registry.name}/{champion}"
    model = load_model(ref, registry.cfg, device=device)
    report, run_id = evaluate_and_log(model, data_dir, data_version, registry,
                                      run_name=f"evaluate-champion-v{champion}", model_ref=ref,
                                      parent_run_id=parent_run_id, limit=limit, batch_size=batch_size,
                                      tags={"medplib.evaluated_version": champion}, max_new_tokens=max_new_tokens,
                                      dataset=dataset)
    registry.record_eval(champion, report_metrics(report, data_version, split, registry.cfg.gate.primary_metric),
                         eval_run_id=run_id)
    return run_id


def publish(model_dir: Path, data_dir: Path, data_version: str, tracking: TrackingConfig, *,
            config_digest: str, git_commit: str | None = None, parent_run_id: str | None = None,
            limit: int | None = None, batch_size: int = 16, tags: dict[str, str] | None = None,
            max_new_tokens: Mapping[str, int] | None = None, dataset: dict | None = None,
            preset: str = "unknown", device: str = "auto") -> dict:
    """Evaluate the saved model in `model_dir` on the validation, test and zero-shot splits of `data_dir` (DVC version
    `data_version`; generation lengths `max_new_tokens`, task → tokens, over the tasks' own, the champion's
    re-evaluation alike), log the report and the pyfunc in one run (child of `parent_run_id`), register the version with
    its lineage as `challenger` of `tracking`'s registered model (a RunContext's: the family's), record its metrics,
    re-evaluate the champion if it was measured on other data, and run the promotion gate. `dataset`
    (`RunContext.dataset()`) is the evaluation runs' dataset input. The version's description is its model card
    (`medplib.eval.card`; `preset` names what trained it). Both models are evaluated on `device` (auto, cpu,
    cuda[:N]; `medplib.device`). Returns a JSON-able summary of what happened."""
    from medplib.serve import load_model

    if not data_version:
        raise ValueError("data_version is empty: publish needs the DVC version of the evaluation data "
                         "(medplib.data.versioning.read_version)")
    registry = Registry(tracking)
    registry.check_reachable()  # a dead server fails here, before a run or a version is half made
    model_dir = Path(model_dir)
    primary, split = registry.cfg.gate.primary_metric, eval_split(limit)
    dirty = None
    if git_commit is None:
        git_commit, dirty = current_git_commit()

    model = load_model(model_dir, device=device)
    report, run_id = evaluate_and_log(model, data_dir, data_version, registry, run_name="evaluate-register",
                                      model_ref=str(model_dir), parent_run_id=parent_run_id, limit=limit,
                                      batch_size=batch_size, log_model_dir=model_dir, max_new_tokens=max_new_tokens,
                                      dataset=dataset)
    metrics = report_metrics(report, data_version, split, primary)
    table = gate_table(primary)
    if metrics.primary(primary) is None:
        raise ValueError(f"The evaluation of {model_dir} gave no '{primary}' on the validation split (no {table} "
                         f"samples among the {len(report.rows)} evaluated{f' with limit {limit}' if limit else ''}): "
                         f"the gate reads validation, never test. Ingest with data.val_fraction > 0 so that data "
                         f"has {table} records (MLflow run {run_id}).")
    version_tags = {TAG_EVAL_RUN: run_id, **(tags or {})}
    if dirty is not None:
        version_tags[TAG_GIT_DIRTY] = str(dirty).lower()
    previous = registry.champion_version()
    champion_runs: list[str | None] = []

    def remeasure_champion(version: str) -> None:
        champion_runs.append(reevaluate_champion(registry, data_dir, data_version, limit=limit,
                                                 batch_size=batch_size, parent_run_id=parent_run_id,
                                                 skip_version=version, max_new_tokens=max_new_tokens,
                                                 dataset=dataset, device=device))

    version, decision = registry.register_and_gate(
        run_id, ARTIFACT_PATH, metrics, git_commit=git_commit, data_version=data_version, config_digest=config_digest,
        parent_run_id=parent_run_id, tags=version_tags, before_gate=remeasure_champion)
    champion_run = champion_runs[0] if champion_runs else None
    out = {
        "version": version, "model_uri": f"models:/{registry.name}/{version}", "promoted": decision.promote,
        "decision": "promoted" if decision.promote else "rejected", "reason": decision.reason,
        "primary_metric": primary, "challenger_metric": decision.challenger, "champion_metric": decision.champion,
        "delta": decision.delta, "modality_deltas": decision.modality_deltas, "interval": decision.interval,
        "confidence": decision.confidence, "paired_samples": decision.paired_samples,
        "guard_deltas": decision.guard_deltas,
        "metrics": dict(report.summary), "val_metrics": dict(report.val_summary),
        "per_modality": report.per_modality(table, tasks.summary_keys()[primary][1]),
        "data_version": data_version, "eval_split": split,
        "previous_champion_version": previous, "champion_version": registry.champion_version(),
        "eval_run_id": run_id, "champion_eval_run_id": champion_run,
        "decision_run_id": registry.version_tags(version).get(TAG_DECISION_RUN),
    }
    registry.client.update_model_version(registry.name, version, description=model_card(
        name=registry.name, version=version, preset=preset, data_version=data_version,
        stages=stage_rows(registry, parent_run_id), val=report.val_summary, test=report.summary,
        per_modality=headline_per_modality(report), decision=out))
    return out


def stage_rows(registry: Registry, parent_run_id: str | None) -> list[dict]:
    """The stage runs under a pipeline run, in stage order: {stage, name, first_loss, last_loss, steps}."""
    if not parent_run_id:
        return []
    client = registry.client
    runs = client.search_runs([registry.experiment_id()],
                              f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`medplib.stage` != ''")
    rows = []
    for run in sorted(runs, key=lambda r: int(r.data.tags["medplib.stage"])):
        history = client.get_metric_history(run.info.run_id, "loss")
        if history:
            history.sort(key=lambda m: m.step)
            rows.append({"stage": run.data.tags["medplib.stage"], "name": run.data.tags.get("medplib.stage_name", ""),
                         "first_loss": history[0].value, "last_loss": history[-1].value, "steps": history[-1].step})
    return rows


def headline_per_modality(report: EvalReport) -> dict[str, dict[str, float]]:
    """Each task's first headline metric on test, per modality (what the model card shows)."""
    out: dict[str, dict[str, float]] = {}
    seen: set[str] = set()
    for key, (table, metric) in tasks.summary_keys().items():
        if table.startswith("test/") and table not in seen and key in report.summary:
            seen.add(table)
            values = report.per_modality(table, metric)
            if values:
                out[key] = values
    return out
