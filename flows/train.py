"""The train step: the model family's stages in order (MedPLIB's I → IV), each a task that launches one Ray Train job.

Ray workers write to Ray's session logs, not to the console nor to Prefect's logs, so each task logs what matters
(steps, loss, time, the MLflow run) itself; the driver shows each stage's progress (medplib.train.launcher).
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from medplib.train.runner import train_stage
from medplib.config import Config, RunContext, family_stage_spec
from medplib.model.family import get_family


@contextmanager
def _own_sigint() -> Iterator[None]:
    # trainer.fit() on the main thread installs a SIGINT handler it never removes; Ctrl-C must stay ours.
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: fit() could not have installed one either
            pass


@task(name="train-stage", task_run_name="train-stage-{stage}", cache_policy=NONE)
def train_stage_task(stage: int, ctx: RunContext, workers: int, overrides: dict[str, Any] | None,
                     parent_run_id: str | None, workspace: str | None = None) -> dict:
    """One stage as a Ray Train job (medplib.train.runner.train_stage); its summary for the flow."""
    with _own_sigint():
        result = train_stage(stage, ctx, workers=workers, overrides=overrides, parent_run_id=parent_run_id,
                             workspace=workspace)
    summary = result.to_dict()
    if result.skipped:
        get_run_logger().warning("Stage %d (%s) skipped: %s; MLflow run %s", stage, summary["name"], result.skipped,
                                 summary["mlflow_run_id"])
        return summary
    get_run_logger().info("Stage %d (%s): %d steps in %.0f s, loss %.3f → %.3f; model %s; MLflow run %s", stage,
                          summary["name"], summary["steps"], summary["seconds"], summary["first_loss"],
                          summary["last_loss"], summary["out_dir"], summary["mlflow_run_id"])
    return summary


def check_training(stages: list[int], cfg: Config | str, stage_overrides: dict[int, dict[str, Any]] | None,
                   workers: int, model: str = "medplib") -> None:
    """Fail before any training on an unknown family or stage, a wrong order, a bad override key or no workers."""
    if workers < 1:
        raise ValueError(f"workers = {workers}: need at least 1 Ray Train worker")
    family = get_family(model)
    overrides = stage_overrides or {}
    plan = family.stages
    unknown = sorted(set(stages) - set(plan)) + sorted(set(overrides) - set(plan))
    if unknown:
        raise ValueError(f"Stage {unknown[0]} does not exist; model family {family.name!r} has stages {list(plan)}")
    if list(stages) != sorted(set(stages)):
        raise ValueError(f"Stages {list(stages)} must be distinct and in order: each starts from the one before")
    for s in stages:
        family_stage_spec(cfg, family, s, overrides.get(s))  # raises ConfigError naming a bad key or value
    if family.settings is None and 1 in stages and isinstance(cfg, Config) and cfg.preset == "full":
        cfg.model.require_weights()  # MedPLIB's stage I builds the initial model from them (a preset name: in stage I)


@flow(name="train")
def train_flow(stages: list[int] | None = None, preset: str = "tiny", config: Path | None = None,
               home: Path | None = None, project: Path | None = None, workers: int = 2,
               stage_overrides: dict[int, dict[str, Any]] | None = None, parent_run_id: str | None = None,
               retries: int = 0, retry_delay_seconds: float = 10.0, workspace: str | None = None,
               model: str = "medplib", profile: str = "local", context: RunContext | None = None) -> list[dict]:
    """Train `stages` (default: the family's plan) in order on `<project>/data`; outputs under
    `<home>/models/[<workspace>/]stage<N>`, one MLflow run each (children of `parent_run_id`). Starts a local Ray if
    none is running and stops it at the end. A `context` (the pipeline's) is used as given, its family included;
    without one, it is resolved here."""
    import ray

    ctx = context or RunContext.resolve(preset, config, home, project, profile, model)
    stages = list(ctx.family.stages) if stages is None else list(stages)  # default: the family's whole plan
    check_training(stages, ctx.cfg, stage_overrides, workers, ctx.model)
    started_ray = not ray.is_initialized()
    run = train_stage_task.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    results = []
    try:
        for stage in stages:
            results.append(run(stage, ctx, workers, (stage_overrides or {}).get(stage), parent_run_id, workspace))
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    return results
