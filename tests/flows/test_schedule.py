"""Data-triggered retraining against a real Prefect server on loopback, one server for every scenario: `medplib
schedule --on-data-change` serves the deployment (a daily cron and a trigger on the project's ingest events) over a
watched MeCoVQA folder, and each new data version is trained once. `medplib data ingest` of new data emits the
event, the trigger runs the deployment: one retrain, which the gate rejects (a one-step model is below the first
champion's floor); the next cron tick does not retrain; `medplib retrain --force`: a retrain of the same version. The
retrains are as small as the pipeline goes (16 images, stage I, one step, one worker, on the session's Ray). That a
tick over newer data retrains is the same decision as the triggered run's (a version not trained yet), tested with the
pipeline's steps stubbed in tests/flows/test_retrain_trigger.py; that changed files in the folder are ingested
again, in tests/flows/test_flow_parts.py (the source's fingerprint follows its content).
The test does not wait for midnight: a tick is a backfill of the cron over one past midnight (the server schedules
the same auto-scheduled run its scheduler service would, due at once); each tick takes another day."""
from __future__ import annotations

import json
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
from medplib.data.synth import generate
from medplib.registry import TAG_DATA_VERSION, TAG_DECISION, TAG_TRAINED_DATA_VERSION, Registry

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, **extra: str) -> dict:
    # PYTHONPATH: `flows` importable even from an editable install made before flows/ existed.
    return {**os.environ, "MEDPLIB_HOME": str(home), "PYTHONPATH": str(REPO_ROOT), **extra}


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGINT, grace: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("command", [["schedule", "--cron", "* * * * *"], ["retrain", "--force"]])
def test_schedule_and_retrain_need_a_reachable_server(tmp_path: Path, command: list[str]):
    api = f"http://127.0.0.1:{_free_port()}/api"
    p = subprocess.run([str(BIN / "medplib"), *command], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env=_env(tmp_path / "home", PREFECT_API_URL=api))
    assert p.returncode == 2, p.stderr
    assert f"No Prefect server answers at {api}" in p.stderr and "medplib ui" in p.stderr
    assert "Traceback" not in p.stderr


class Served:
    """The deployment `medplib schedule` serves, seen through the server's REST API."""

    def __init__(self, api: str, name: str, log: Path, process: subprocess.Popen, home: Path):
        self.api, self.name, self.log, self.process, self.home = api, name, log, process, home
        self.seen: set[str] = set()
        self.id: str | None = None

    def why(self) -> str:
        logs = sorted(self.home.glob("logs/*.log"), key=lambda f: f.stat().st_mtime)
        tail = logs[-1].read_text(errors="replace")[-6000:] if logs else ""
        return f"{self.log.read_text(errors='replace')[-3000:]}\n--- {logs[-1] if logs else ''}\n{tail}"

    def post(self, path: str, body: dict) -> httpx.Response:
        for _ in range(10):  # the server answers 503 while its sqlite database is locked by its own services
            r = httpx.post(f"{self.api}{path}", timeout=30, json=body)
            if r.status_code != 503:
                break
            time.sleep(2)
        assert r.status_code < 300, r.text
        return r

    def runs(self) -> list[dict]:
        """The deployment's runs so far: not the future midnights the server's scheduler has already planned."""
        now = datetime.now(timezone.utc)
        runs = self.post("/flow_runs/filter", {"deployments": {"name": {"any_": [self.name]}}}).json()
        return [r for r in runs if r["state_type"] != "SCHEDULED"
                or datetime.fromisoformat(r["expected_start_time"]) <= now]

    def next_run(self, deadline: float) -> tuple[dict, str]:
        """The one run since the last call, once it completed, and its `medplib-pipeline` report."""
        while True:
            assert self.process.poll() is None, "medplib schedule exited:\n" + self.why()
            assert time.monotonic() < deadline, "no run completed in time:\n" + self.why()
            new = [r for r in self.runs() if r["id"] not in self.seen]
            failed = [r for r in new if r["state_type"] in ("FAILED", "CRASHED")]
            assert not failed, f"run {failed[0]['name']} {failed[0]['state_type']}:\n" + self.why()
            if new and all(r["state_type"] == "COMPLETED" for r in new):
                assert len(new) == 1, [(r["name"], r["parameters"]) for r in new]
                self.seen.add(new[0]["id"])
                artifacts = self.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [new[0]["id"]]}}})
                return new[0], next(a["data"] for a in artifacts.json() if a["key"] == "medplib-pipeline")
            time.sleep(2)

    def tick(self, days_ago: int) -> None:
        """The cron's run of `days_ago` days ago at midnight, created by the server's scheduling (a backfill)."""
        midnight = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        at = midnight - timedelta(days=days_ago)
        self.post(f"/deployments/{self.id}/schedule", {"start_time": (at - timedelta(seconds=1)).isoformat(),
                                                       "end_time": (at + timedelta(seconds=1)).isoformat(),
                                                       "max_runs": 1})


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_data_triggered_deployment_trains_each_new_version_once(ray_home, project, tmp_path: Path):
    import ray

    home = ray_home
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    # the server starts (10-20 s) while the test writes its data
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=_env(home.root, PREFECT_HOME=str(tmp_path / "prefect-server")),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    schedule = None
    try:
        small = tmp_path / "small.yaml"
        small.write_text("data:\n  synth_n: 16\n")
        data = load_config("tiny", small).data
        incoming = tmp_path / "incoming"  # the watched folder, in the MeCoVQA layout

        generate(incoming, n=16, seed=1, image_size=data.image_size, zeroshot_modalities=data.zeroshot_modalities,
                 test_fraction=data.test_fraction)
        registry = Registry(load_tracking_config().resolved(home))
        # the runs train on the session's Ray (as on a cluster's): none starts its own
        env = _env(home.root, PREFECT_API_URL=api, MEDPLIB_RAY_ADDRESS=ray.get_runtime_context().gcs_address)
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "Prefect server did not start"
            time.sleep(1)

        log = tmp_path / "schedule.log"
        with open(log, "w") as out:
            schedule = subprocess.Popen(
                [str(BIN / "medplib"), "schedule", "--cron", "0 0 * * *", "--on-data-change", "--source",
                 f"mecovqa:{incoming}", "--config", str(small), "--stages", "1", "--max-steps", "1", "--workers", "1",
                 "--retries", "0", "--name", "retrain-test"],
                # the runner looks for due runs every 2 s, not every 10 s
                cwd=project, env={**env, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}, stdout=out, stderr=subprocess.STDOUT)
        served = Served(api, "retrain-test", log, schedule, home.root)
        deadline = time.monotonic() + 600
        while served.id is None:  # `medplib schedule` registers the deployment and its trigger, then serves it
            assert schedule.poll() is None, "medplib schedule exited:\n" + served.why()
            assert time.monotonic() < deadline, "the deployment was not created in time:\n" + served.why()
            found = served.post("/deployments/filter", {"deployments": {"name": {"any_": ["retrain-test"]}}}).json()
            if found and httpx.get(f"{api}/automations/related-to/prefect.deployment.{found[0]['id']}",
                                   timeout=10).json():
                served.id = found[0]["id"]
            time.sleep(1)
        deployment = httpx.get(f"{api}/deployments/{served.id}", timeout=10).json()
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 0 * * *"]
        assert deployment["parameters"]["only_if_data_changed"] is True
        assert deployment["parameters"]["source"] == f"mecovqa:{incoming.resolve()}"  # the watched folder

        # 1. New data lands: `medplib data ingest` emits medplib.data.ingested, the trigger runs the deployment once.
        p = subprocess.run([str(BIN / "medplib"), "data", "ingest", "--json", "--source", f"mecovqa:{incoming}",
                            "--config", str(small)], cwd=project, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        ingested = json.loads(p.stdout)
        v1 = ingested["version"]
        assert ingested["event_id"], p.stderr
        run, report = served.next_run(deadline)
        assert run["auto_scheduled"] is False and (run.get("created_by") or {}).get("type") == "AUTOMATION", run
        assert run["parameters"]["source"] == f"mecovqa:{incoming.resolve()}"  # the event's, the folder ingested
        assert f"`{v1}`" in report and "Not retrained" not in report
        assert {str(v.version): v.tags[TAG_DATA_VERSION] for v in registry.client.search_model_versions(
            f"name = '{registry.name}'")} == {"1": v1}
        assert registry.version_tags("1")[TAG_DECISION] == "rejected" and registry.champion_version() is None

        # 2. The gate rejected it; the next tick (same folder, same version) does not retrain.
        served.tick(days_ago=1)
        run, report = served.next_run(deadline)
        assert run["auto_scheduled"] is True  # created by the cron schedule, not by hand
        assert f"`{v1}`" in report and "**Not retrained**: this data version was already trained (version 1;" in report

        # 3. `medplib retrain --force`: a retrain of the version already trained.
        p = subprocess.run([str(BIN / "medplib"), "retrain", "--name", "retrain-test", "--force", "--json"],
                           cwd=project, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        run, report = served.next_run(deadline)
        assert run["id"] == json.loads(p.stdout)["flow_run_id"] and run["parameters"]["force"] is True
        assert f"`{v1}`" in report and "Not retrained" not in report
        assert registry.version_tags("2")[TAG_DATA_VERSION] == v1

        assert len(served.runs()) == 3  # one run per scenario, nothing else
        assert len(registry.client.search_model_versions(f"name = '{registry.name}'")) == 2  # two retrains
        trained = registry.client.search_runs([registry.experiment_id()], f"tags.`{TAG_TRAINED_DATA_VERSION}` != ''")
        assert sorted(r.data.tags[TAG_TRAINED_DATA_VERSION] for r in trained) == [v1, v1]
        assert {r.data.tags["medplib.kind"] for r in trained} == {"pipeline"}  # marked on the pipeline runs
    finally:
        _stop(schedule, grace=3)  # its runs are over: nothing to wind down (a graceful stop of the runner takes ~20 s)
        _stop(server, signal.SIGTERM)
