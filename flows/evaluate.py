"""The evaluate step: measure the trained model, log it, register a version with lineage, and promote it only if
the gate says it beats the champion (medplib.eval.publish; registry operations stay in medplib.registry)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.settings import StepInputs, resolve
from medplib.config import with_stage_overrides
from medplib.data.versioning import read_version
from medplib.eval.publish import config_digest, publish


@task(name="evaluate-register-promote", cache_policy=NONE)
def publish_model(model_dir: Path, inputs: StepInputs, data_version: str, parent_run_id: str | None,
                  stage_overrides: dict[int, dict[str, Any]] | None = None) -> dict:
    """Evaluate `model_dir` on the test and zero-shot splits, log and register it, run the promotion gate. The
    version's config digest covers the stage overrides the model was trained with."""
    digest = config_digest(with_stage_overrides(inputs.cfg, stage_overrides))
    return publish(model_dir, inputs.data_dir, data_version, inputs.home, config_digest=digest,
                   parent_run_id=parent_run_id)


@flow(name="evaluate")
def evaluate_flow(model_dir: Path, preset: str = "tiny", config: Path | None = None, home: Path | None = None,
                  project: Path | None = None, data_version: str | None = None,
                  parent_run_id: str | None = None,
                  stage_overrides: dict[int, dict[str, Any]] | None = None) -> dict:
    """Evaluate, register and gate the model in `model_dir` on `<project>/data` (`data_version`: the DVC version it
    holds, read from `data.dvc` by default). Not retried: a retry after registration would register twice."""
    inputs = resolve(preset, config, home, project)
    version = data_version or read_version(inputs.project)
    if version is None:
        raise FileNotFoundError(f"No data.dvc in {inputs.project}: ingest a dataset before evaluating")
    out = publish_model(Path(model_dir), inputs, version, parent_run_id, stage_overrides)
    get_run_logger().info("Version %s %s: %s (MLflow eval run %s)", out["version"],
                          "promoted to champion" if out["promoted"] else "not promoted", out["reason"],
                          out["eval_run_id"])
    return out
