"""The Prefect event `medplib data ingest` emits when a new dataset version lands in a project, and the deployment
trigger that runs the data-triggered retraining on it.

The event: `medplib.data.ingested`, resource `medplib.dataset.<version>` labelled with the project folder
(`medplib.project`) and the source spec (`medplib.source`, its folder made absolute); the payload holds the version,
the previous one and the record counts. The trigger matches the events of one project and runs the deployment with
the event's source, so the run re-ingests (a no-op: same files, same version) and trains what was ingested, once:
the pipeline's `only_if_data_changed` check skips a version already trained, whether a cron tick or an event
started the run.
"""
from __future__ import annotations

from pathlib import Path

from prefect.events import emit_event
from prefect.events.worker import EventsWorker
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.settings import PREFECT_API_URL

from medplib.data import readers

DATA_INGESTED = "medplib.data.ingested"


def source_spec(spec: str) -> str:
    """`spec` with its folder made absolute (`mecovqa:data/in` → `mecovqa:/abs/data/in`): what a run elsewhere in
    the file system can ingest again."""
    reader, path = readers.parse_source(spec)
    return reader.kind if path is None else f"{reader.kind}:{path}"


def emit_data_ingested(result: dict, project: Path, source: str, previous: str | None) -> str | None:
    """Emit `medplib.data.ingested` for an ingest `result` (IngestResult.to_dict) that changed the project's dataset
    version from `previous`; the event's id, or None when the version did not change or no Prefect server is
    configured (PREFECT_API_URL unset: an ephemeral API would start just to drop the event)."""
    if result["version"] == previous or not PREFECT_API_URL.value():
        return None
    source = source_spec(source)
    event = emit_event(
        DATA_INGESTED,
        resource={"prefect.resource.id": f"medplib.dataset.{result['version']}",
                  "prefect.resource.name": f"dataset {result['version']}",
                  "medplib.project": str(Path(project).resolve()), "medplib.source": source},
        payload={"version": result["version"], "previous_version": previous, "source": source,
                 **{k: result[k] for k in ("total", "valid", "quarantined")}})
    EventsWorker.drain_all(timeout=30, at_exit=False)  # sent before the command returns, not at interpreter exit
    return None if event is None else str(event.id)


def ingest_trigger(project: Path) -> DeploymentEventTrigger:
    """Run the deployment on each `medplib.data.ingested` event of `project`, on the event's source."""
    where = str(Path(project).resolve())
    return DeploymentEventTrigger(
        name=f"medplib retrain on new data in {where}", expect={DATA_INGESTED},
        match={"prefect.resource.id": "medplib.dataset.*", "medplib.project": where},
        parameters={"source": "{{ event.payload.source }}"})
