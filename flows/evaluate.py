"""The evaluate step: measure the trained model, log it, register a version with lineage, and promote it only if
the gate says it beats the champion (medplib.eval.publish; registry operations stay in medplib.registry)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from medplib.config import RunContext
from medplib.data.versioning import read_version
from medplib.eval.publish import config_digest, publish


@task(name="evaluate-register-promote", cache_policy=NONE)
def publish_model(model_dir: Path, ctx: RunContext, parent_run_id: str | None,
                  stage_overrides: dict[int, dict[str, Any]] | None = None) -> dict:
    """Evaluate `model_dir` on the test and zero-shot splits of the context's data version, log and register it
    under the family's registered model, run the family's promotion gate. The version's config digest covers the
    stage overrides the model was trained with."""
    digest = config_digest(ctx.with_stage_overrides(stage_overrides).cfg)
    return publish(model_dir, ctx.data_dir, ctx.data_version, ctx.tracking, config_digest=digest,
                   parent_run_id=parent_run_id, max_new_tokens=ctx.cfg.eval.max_new_tokens, dataset=ctx.dataset(),
                   preset=ctx.cfg.preset, device=ctx.device)


@flow(name="evaluate")
def evaluate_flow(model_dir: Path, preset: str = "tiny", config: Path | None = None, home: Path | None = None,
                  project: Path | None = None, data_version: str | None = None,
                  parent_run_id: str | None = None,
                  stage_overrides: dict[int, dict[str, Any]] | None = None, model: str = "medplib",
                  profile: str = "local", context: RunContext | None = None) -> dict:
    """Evaluate, register and gate the model in `model_dir` on `<project>/data` (`data_version`: the DVC version it
    holds, the context's or read from `data.dvc` by default). Not retried: a retry after registration would register
    twice. A `context` (the pipeline's) is used as given; without one, it is resolved here."""
    ctx = context or RunContext.resolve(preset, config, home, project, profile, model)
    version = data_version or ctx.data_version or read_version(ctx.project)
    if version is None:
        raise FileNotFoundError(f"No data.dvc in {ctx.project}: ingest a dataset before evaluating")
    out = publish_model(Path(model_dir), ctx.with_data_version(version), parent_run_id, stage_overrides)
    get_run_logger().info("Version %s %s: %s (MLflow eval run %s)", out["version"],
                          "promoted to champion" if out["promoted"] else "not promoted", out["reason"],
                          out["eval_run_id"])
    return out
