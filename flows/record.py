"""The pipeline's parent MLflow run: what was asked (request), the resolved config and the DVC pointer of the data,
so that `medplib reproduce` can restore and re-run exactly that. Stage runs and the eval run are its children."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param

from medplib.config import Config, TrackingConfig, to_dict
from medplib.registry import Registry, log_dataset

KIND_TAG = "medplib.kind"
REQUEST_ARTIFACT = "pipeline/request.json"
CONFIG_ARTIFACT = "pipeline/config.yaml"
POINTER_ARTIFACT = "pipeline/data.dvc"


@dataclass
class PipelineRequest:
    """The parameters of a pipeline run that decide what it trains (not where it runs)."""

    source: str
    preset: str
    stages: list[int]
    stage_overrides: dict[int, dict[str, Any]]
    workers: int
    seed: int | None = None
    model: str = "medplib"  # the model family (requests recorded before families carry none: MedPLIB)

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "stage_overrides": {str(k): v for k, v in self.stage_overrides.items()}},
                          indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PipelineRequest":
        d = json.loads(text)
        return cls(**{**d, "stage_overrides": {int(k): v for k, v in d["stage_overrides"].items()}})


def start_run(registry: Registry, name: str, kind: str, request: PipelineRequest, cfg: Config, data_version: str,
              project: Path, tags: dict[str, str] | None = None, dataset: dict | None = None) -> str:
    """Create the parent run (RUNNING) with the request, config and `data.dvc` as artifacts, and the data version as
    its dataset input (`dataset`: `RunContext.dataset()`); returns its id."""
    client = registry.client
    run = client.create_run(registry.experiment_id(), run_name=name, tags={
        KIND_TAG: kind, "medplib.data_version": data_version, "medplib.source": request.source,
        "medplib.preset": request.preset, **(tags or {})})
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in (
        ("source", request.source), ("preset", request.preset), ("stages", request.stages),
        ("stage_overrides", json.dumps(request.stage_overrides, sort_keys=True)), ("workers", request.workers),
        ("seed", request.seed), ("model", request.model), ("data_version", data_version))])
    client.log_text(run_id, request.to_json(), REQUEST_ARTIFACT)
    client.log_text(run_id, yaml.safe_dump(to_dict(cfg), sort_keys=False), CONFIG_ARTIFACT)
    client.log_text(run_id, (Path(project) / "data.dvc").read_text(encoding="utf-8"), POINTER_ARTIFACT)
    log_dataset(client, run_id, dataset, "training")
    return run_id


def finish_run(registry: Registry, run_id: str, status: str, metrics: dict[str, float] | None = None,
               tags: dict[str, str] | None = None) -> None:
    client = registry.client
    now = int(time.time() * 1000)
    if metrics:
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    for k, v in (tags or {}).items():
        client.set_tag(run_id, k, v)
    client.set_terminated(run_id, status=status)


@dataclass
class RecordedRun:
    """What a finished pipeline run recorded: enough to restore its data and config and run it again."""

    run_id: str
    request: PipelineRequest
    config: dict
    data_pointer: str  # the text of data.dvc at the time

    @property
    def data_version(self) -> str:
        return yaml.safe_load(self.data_pointer)["outs"][0]["md5"]


def load_run(tracking: TrackingConfig, run_id: str) -> RecordedRun:
    """Read a parent run's request, config and data pointer back from MLflow."""
    import tempfile

    from mlflow.exceptions import MlflowException

    client = Registry(tracking).client
    texts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in (REQUEST_ARTIFACT, CONFIG_ARTIFACT, POINTER_ARTIFACT):
            try:
                texts[name] = Path(client.download_artifacts(run_id, name, tmp)).read_text(encoding="utf-8")
            except (MlflowException, OSError) as e:
                raise FileNotFoundError(f"Run {run_id} has no '{name}': it is not a medplib pipeline run that "
                                        f"recorded its request, config and data pointer ({e})") from None
    return RecordedRun(run_id, PipelineRequest.from_json(texts[REQUEST_ARTIFACT]),
                       yaml.safe_load(texts[CONFIG_ARTIFACT]), texts[POINTER_ARTIFACT])
