"""Data-triggered retraining, the decision alone (the pipeline's body with its steps stubbed; no Prefect server):
a data version is trained once, whatever the gate decides; `force` retrains; a run that fails before its training
finished leaves its version untrained, one that fails after does not. Prefect's side (cron ticks, the ingest event's
trigger) runs for real in tests/flows/test_schedule.py; the MLflow side of `trained_on` in tests/registry."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prefect.events.schemas.events import Resource

import flows.pipeline as pipeline_module
from flows.events import DATA_INGESTED, emit_data_ingested, ingest_trigger


class TrainedRecord:
    """Registry stand-in: what `trained_on` / `mark_trained` keep in MLflow, kept in a dict."""

    name = "medplib"

    def __init__(self):
        self.trained: dict[str, str] = {}

    def check_reachable(self):
        pass

    def experiment_id(self):
        return "1"

    def trained_on(self, data_version: str) -> str | None:
        return self.trained.get(data_version)

    def mark_trained(self, run_id: str, data_version: str) -> None:
        self.trained.setdefault(data_version, f"pipeline run {run_id}")


@pytest.fixture
def stubbed(home, project, monkeypatch: pytest.MonkeyPatch):
    """Run the pipeline's body on stubbed steps; returns (run(version, **kw) -> summary, the calls, the record)."""
    record, calls, fail = TrainedRecord(), [], {}
    runs = iter(range(1, 100))

    def step(name, value):
        def fn(*args, **kwargs):
            calls.append(name)
            if fail.get(name):
                raise RuntimeError(f"{name} broke")
            return value() if callable(value) else value
        return fn

    ev = {"version": "1", "champion_version": None, "metrics": {}, "promoted": False, "reason": "below the floor"}
    stage = {"stage": 1, "name": "align", "out_dir": "/m/stage1", "first_loss": 2.0, "last_loss": 1.0}
    for name, value in (("validate_flow", step("validate", {})), ("train_flow", step("train", [stage])),
                        ("evaluate_flow", step("evaluate", ev)), ("Registry", lambda tracking: record),
                        ("get_run_logger", lambda: logging.getLogger("test")),
                        ("_publish_artifact", lambda summary: None),
                        ("trained_before", pipeline_module.trained_before.fn),
                        ("mark_trained", pipeline_module.mark_trained.fn)):
        monkeypatch.setattr(pipeline_module, name, value)
    monkeypatch.setattr(pipeline_module.record, "start_run", lambda *a, **kw: f"run-{next(runs)}")
    monkeypatch.setattr(pipeline_module.record, "finish_run", lambda *a, **kw: None)

    def run(version: str, *, fail_at: str | None = None, **kw) -> dict:
        fail.clear()
        if fail_at:
            fail[fail_at] = True
        monkeypatch.setattr(pipeline_module, "ingest_flow", step("ingest", {"version": version, "source": "mecovqa",
                                                                            "valid": 1, "quarantined": 0}))
        calls.clear()
        return pipeline_module.pipeline.fn(home=home.root, project=project, stages=[1], only_if_data_changed=True,
                                           **kw)

    return run, calls, record


def test_a_data_version_is_trained_once_whatever_the_gate_said(stubbed):
    run, calls, record = stubbed
    first = run("a.dir")
    assert first["skipped"] is False and calls == ["ingest", "validate", "train", "evaluate"]
    assert first["evaluation"]["promoted"] is False  # rejected by the gate, and still trained
    again = run("a.dir")
    assert again["skipped"] is True and again["trained_by"] == "pipeline run run-1" and calls == ["ingest"]
    assert "**Not retrained**: this data version was already trained (pipeline run run-1" in \
        pipeline_module.report_markdown(again)
    newer = run("b.dir")
    assert newer["skipped"] is False and "train" in calls
    forced = run("b.dir", force=True)
    assert forced["skipped"] is False and calls == ["ingest", "validate", "train", "evaluate"]


def test_a_run_that_fails_before_training_finished_leaves_its_version_untrained(stubbed):
    run, calls, record = stubbed
    with pytest.raises(RuntimeError, match="train broke"):
        run("c.dir", fail_at="train")
    assert record.trained_on("c.dir") is None
    with pytest.raises(RuntimeError, match="validate broke"):
        run("c.dir", fail_at="validate")
    assert record.trained_on("c.dir") is None
    # training finished, evaluation failed: that version was trained (the model exists; retraining would repeat it)
    with pytest.raises(RuntimeError, match="evaluate broke"):
        run("c.dir", fail_at="evaluate")
    assert record.trained_on("c.dir") == "pipeline run run-3"
    assert run("c.dir")["skipped"] is True


def test_without_the_data_trigger_every_run_trains(stubbed, home, project):
    run, calls, record = stubbed
    run("d.dir")
    summary = pipeline_module.pipeline.fn(home=home.root, project=project, stages=[1])  # a plain `medplib pipeline`
    assert summary["skipped"] is False and "train" in calls
    assert record.trained_on("d.dir") == "pipeline run run-1"  # it records what it trained all the same


def test_the_ingest_event_reaches_its_project_s_trigger_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import flows.events as events

    folder = tmp_path / "incoming"
    folder.mkdir()
    project, elsewhere = tmp_path / "project", tmp_path / "other"
    sent = []
    monkeypatch.setattr(events, "emit_event", lambda name, **kw: sent.append((name, kw)))
    monkeypatch.setattr(events.EventsWorker, "drain_all", lambda **kw: None)
    result = {"version": "e.dir", "total": 5, "valid": 4, "quarantined": 1}
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert emit_data_ingested(result, project, f"mecovqa:{folder}", previous="e.dir") is None  # no new version
        emit_data_ingested(result, project, f"mecovqa:{folder}", previous="d.dir")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        emit_data_ingested(result, project, f"mecovqa:{folder}", previous="d.dir")  # no server: nothing to tell
    assert len(sent) == 1
    name, event = sent[0]
    assert name == DATA_INGESTED
    assert event["payload"] == {"version": "e.dir", "previous_version": "d.dir", "source": f"mecovqa:{folder}",
                                "total": 5, "valid": 4, "quarantined": 1}
    resource = Resource(event["resource"])
    trigger = ingest_trigger(project)
    assert trigger.match.matches(resource) and DATA_INGESTED in trigger.expect
    assert not ingest_trigger(elsewhere).match.matches(resource)
    assert trigger.parameters == {"source": "{{ event.payload.source }}"}  # the run ingests what was ingested
