"""Scheduled retraining against a real Prefect server on loopback: `medplib schedule` creates the cron deployment,
serves it, and a scheduled run executes (data-triggered: the data did not change, so it does not retrain).
The test does not wait for the next minute: it asks the server to schedule the deployment's cron over the last
minute (a backfill), which creates the same auto-scheduled run the scheduler service would, due at once."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from medplib.config import load_config, load_tracking_config
from medplib.config.home import REPO_ROOT
from medplib.data.ingest import ingest
from medplib.registry import EvalMetrics, Registry
from tests.stand_in_model import register_stand_in

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, **extra: str) -> dict:
    # PYTHONPATH: `flows` importable even from an editable install made before flows/ existed.
    return {**os.environ, "MEDPLIB_HOME": str(home), "PYTHONPATH": str(REPO_ROOT), **extra}


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGINT) -> str:
    if proc is None:
        return ""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.stdout.read() if proc.stdout else ""


def test_schedule_needs_a_reachable_server(tmp_path: Path):
    api = f"http://127.0.0.1:{_free_port()}/api"
    p = subprocess.run([str(BIN / "medplib"), "schedule", "--cron", "* * * * *"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env=_env(tmp_path / "home", PREFECT_API_URL=api))
    assert p.returncode == 2, p.stderr
    assert f"No Prefect server answers at {api}" in p.stderr and "medplib ui" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_cron_deployment_runs_on_schedule(home, project, tmp_path: Path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    # the server starts (10-20 s) while the test prepares its data and champion
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=_env(home.root, PREFECT_HOME=str(tmp_path / "prefect-server")),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    schedule = None
    try:
        small = tmp_path / "small.yaml"
        small.write_text("data:\n  synth_n: 12\n")
        version = ingest("synth", project, home, load_config("tiny", small)).version
        # A champion trained on exactly this data version (a stand-in model: the trigger reads only its lineage).
        registry = Registry(load_tracking_config().resolved(home))
        v = register_stand_in(registry, version)
        assert registry.promote_if_better(v, EvalMetrics(version, {"all": {"grounding_mdice": 0.5}})).promote

        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "Prefect server did not start"
            time.sleep(1)

        schedule = subprocess.Popen(
            [str(BIN / "medplib"), "schedule", "--cron", "* * * * *", "--on-data-change", "--config", str(small),
             "--epochs", "1", "--name", "retrain-test"],
            cwd=project, env=_env(home.root, PREFECT_API_URL=api), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        deadline = time.monotonic() + 300
        deployment_id = None
        while deployment_id is None:  # `medplib schedule` registers the deployment, then serves it
            assert schedule.poll() is None, "medplib schedule exited:\n" + _stop(schedule)
            assert time.monotonic() < deadline, "the deployment was not created in time:\n" + _stop(schedule)
            found = httpx.post(f"{api}/deployments/filter", timeout=10, json={
                "deployments": {"name": {"any_": ["retrain-test"]}}}).json()
            deployment_id = found[0]["id"] if found else None
            time.sleep(1)
        now = datetime.now(timezone.utc)
        for _ in range(10):  # the server answers 503 while its sqlite database is locked by its own services
            r = httpx.post(f"{api}/deployments/{deployment_id}/schedule", timeout=30, json={
                "start_time": (now - timedelta(seconds=61)).isoformat(), "end_time": now.isoformat(), "max_runs": 1})
            if r.status_code != 503:
                break
            time.sleep(2)
        assert r.status_code < 300, r.text
        done = None
        while done is None:
            assert schedule.poll() is None, "medplib schedule exited:\n" + _stop(schedule)
            assert time.monotonic() < deadline, "no scheduled run completed in time:\n" + _stop(schedule)
            runs = httpx.post(f"{api}/flow_runs/filter", timeout=10, json={
                "deployments": {"name": {"any_": ["retrain-test"]}}}).json()
            failed = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
            assert not failed, f"scheduled run {failed[0]['name']} {failed[0]['state_type']}:\n" + _stop(schedule)
            done = next((r for r in runs if r["state_type"] == "COMPLETED"), None)
            time.sleep(3)
        assert done["auto_scheduled"] is True  # created by the cron schedule, not by hand
        assert done["parameters"]["only_if_data_changed"] is True
        deployment = httpx.get(f"{api}/deployments/{done['deployment_id']}", timeout=10).json()
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["* * * * *"]
        artifacts = httpx.post(f"{api}/artifacts/filter", timeout=10, json={
            "artifacts": {"flow_run_id": {"any_": [done["id"]]}}}).json()
        report = next(a["data"] for a in artifacts if a["key"] == "medplib-pipeline")
        assert f"`{version}`" in report and f"**Not retrained**: champion version {v}" in report
        assert registry.aliases() == {"champion": v, "challenger": v}  # nothing new was registered
    finally:
        log = _stop(schedule)
        _stop(server, signal.SIGTERM)
    assert "retrain-test" in log
