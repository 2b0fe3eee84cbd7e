"""The registry steps (register, gate, promote, rollback) against a real `mlflow server` whose store is a real
PostgreSQL (Debian's package, installed by `make test`), both started by the test on 127.0.0.1."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import mlflow
import pytest

from medplib.config import TrackingConfig
from medplib.registry import EvalMetrics, Registry, use_tracking
from tests.stand_in_model import register_stand_in

BIN = Path(sys.executable).parent
DATA = "e" * 32 + ".dir"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        pytest.fail(f"PostgreSQL's {name} is not installed: `make test` installs Debian's postgresql")
    return found[-1]


@pytest.fixture
def postgres():
    """A PostgreSQL cluster in a temp folder on 127.0.0.1:<port>, user `mlflow`, database `mlflow`."""
    root = Path(tempfile.mkdtemp(prefix="medplib-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as Debian's `postgres` user
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = root / "data"
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True,  # noqa: E731
                                      timeout=120)
    run(_pg_bin("initdb"), "-D", str(data), "-U", "mlflow", "-A", "trust", "--no-sync")
    run(_pg_bin("pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
    try:
        subprocess.run([_pg_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "-d", "postgres", "-c",
                        "CREATE DATABASE mlflow"], check=True, capture_output=True, timeout=60)
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow", port
    finally:
        subprocess.run([*as_user, _pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mlflow_server(postgres, tmp_path: Path):
    uri, pg_port = postgres
    port = _free_port()
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", uri, "--serve-artifacts", "--artifacts-destination",
         str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail("mlflow server did not start:\n" + (server.stdout.read() if server.stdout else ""))
            time.sleep(1)
        yield url, pg_port
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def _register(registry: Registry, dice: float) -> str:
    v = register_stand_in(registry, DATA)
    registry.record_eval(v, EvalMetrics(DATA, {"all": {"grounding_mdice": dice}, "ct": {"grounding_mdice": dice}}))
    return v


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_register_gate_promote_rollback_on_mlflow_server_with_postgres(mlflow_server):
    url, pg_port = mlflow_server
    registry = Registry(TrackingConfig(tracking_uri=url, registry_uri=url, artifact_location="mlflow-artifacts:/t"))
    registry.check_reachable(tries=1)

    v1 = _register(registry, 0.50)
    assert registry.promote_if_better(v1).promote
    v2 = _register(registry, 0.40)
    worse = registry.promote_if_better(v2)
    assert not worse.promote and registry.champion_version() == v1  # the gate holds
    v3 = _register(registry, 0.60)
    assert registry.promote_if_better(v3).promote
    assert registry.aliases() == {"champion": v3, "challenger": v3, "previous-champion": v1}
    assert registry.rollback("test rollback") == v1
    assert registry.champion_version() == v1
    with use_tracking(registry.cfg):  # sets and restores MLflow's process-wide URIs exactly
        loaded = mlflow.pyfunc.load_model(f"models:/{registry.name}@champion")  # artifacts proxied by the server
    assert loaded.predict(["x"]) == ["x"]

    # the versions and aliases live in PostgreSQL
    q = subprocess.run([glob.glob("/usr/lib/postgresql/*/bin/psql")[-1], "-h", "127.0.0.1", "-p", str(pg_port),
                        "-U", "mlflow", "-d", "mlflow", "-At", "-c",
                        "SELECT count(*) FROM model_versions; SELECT alias, version FROM registered_model_aliases "
                        "ORDER BY alias"], check=True, capture_output=True, text=True, timeout=60).stdout.split()
    assert q[0] == "3" and f"champion|{v1}" in q
