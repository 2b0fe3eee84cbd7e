"""Scheduled retraining: the pipeline as a deployment on a cron, served from this process (no work pool needed).

Data-triggered (`only_if_data_changed=True`): each run ingests the watched source (a cache hit when it did not
change) and retrains only on a dataset version this registered model was never trained on; the cron polls the source,
and a deployment trigger also starts a run on each `medplib.data.ingested` event of the project (flows.events), which
`medplib data ingest` emits when it lands a new version. A run with `force=True` retrains anyway.
"""
from __future__ import annotations

from typing import Any

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.types.entrypoint import EntrypointType

from flows.events import ingest_trigger
from flows.pipeline import pipeline


def retraining_deployment(name: str, cron: str, parameters: dict[str, Any]) -> RunnerDeployment:
    """The pipeline deployment `medplib-pipeline/<name>` on `cron` with fixed parameters; data-triggered, it is also
    run by the project's ingest events."""
    data_triggered = parameters.get("only_if_data_changed", False)
    return pipeline.to_deployment(
        # by module path: the runner imports flows.pipeline wherever it runs, whatever its working directory
        name=name, cron=cron, parameters=parameters, entrypoint_type=EntrypointType.MODULE_PATH,
        tags=["medplib", "retrain"] + (["on-data-change"] if data_triggered else []),
        triggers=[ingest_trigger(parameters["project"])] if data_triggered else None,
        description="medplib retraining: ingest → validate → train I-IV → evaluate → register → promote"
                    + (", only on a data version not trained yet (cron poll + ingest events)" if data_triggered
                       else ""))


def serve_deployments(*deployments: RunnerDeployment) -> None:
    """Register the deployments and execute their runs here, one at a time (training takes every core); blocks until
    interrupted, then pauses their schedules."""
    serve(*deployments, limit=1)
