"""Scheduled retraining: the pipeline as a deployment on a cron, served from this process (no work pool needed).

With `only_if_data_changed=True` each scheduled run ingests the source (a cache hit when it did not change) and
retrains only when the dataset version differs from the one the champion was trained on.
"""
from __future__ import annotations

from typing import Any

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.types.entrypoint import EntrypointType

from flows.pipeline import pipeline


def retraining_deployment(name: str, cron: str, parameters: dict[str, Any]) -> RunnerDeployment:
    """The pipeline deployment `medplib-pipeline/<name>` on `cron` with fixed parameters."""
    data_triggered = parameters.get("only_if_data_changed", False)
    return pipeline.to_deployment(
        # by module path: the runner imports flows.pipeline wherever it runs, whatever its working directory
        name=name, cron=cron, parameters=parameters, entrypoint_type=EntrypointType.MODULE_PATH,
        tags=["medplib", "retrain"] + (["on-data-change"] if data_triggered else []),
        description="medplib retraining: ingest → validate → train I-IV → evaluate → register → promote"
                    + (", only when the data changed" if data_triggered else ""))


def serve_deployments(*deployments: RunnerDeployment) -> None:
    """Register the deployments and execute their scheduled runs here, one at a time (training takes every core);
    blocks until interrupted, then pauses their schedules."""
    serve(*deployments, limit=1)
