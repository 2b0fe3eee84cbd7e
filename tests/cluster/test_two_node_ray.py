"""A two-node Ray cluster on loopback: `ray start --head`, then a second node joins it; a tiny stage trains with one
Ray Train worker per node (placement SPREAD), through the same runner the pipeline uses, on data the job pulled from
the S3 remote into a working folder that had none (what the RayJobs do: infra/k8s/rayjobs.yaml)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from medplib.config import RunContext, load_config
from medplib.data.ingest import ingest

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_job_pulls_its_data_version_from_s3_then_trains_on_two_nodes(s3, home, project, tmp_path: Path, capsys,
                                                                        monkeypatch: pytest.MonkeyPatch):
    import ray

    from medplib.config.profile import load_profile
    from medplib.data.versioning import read_version
    from medplib.train.runner import train_stage
    from medplib_cli.main import main

    ray.shutdown()  # the session's local Ray, if an earlier test started it: this test connects to its own cluster
    port = _free_port()
    address = f"127.0.0.1:{port}"
    temp = Path("/tmp") / f"mp-ray2-{port}"  # short: Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                        "--temp-dir", str(temp), *common], check=True, env=env, capture_output=True, timeout=120)
        subprocess.run([RAY, "start", "--address", address, *common], check=True, env=env, capture_output=True,
                       timeout=120)
        ray.init(address=address)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        # two nodes joined through the head's 127.0.0.1 address (Ray itself reports each node under the
        # machine's address: it turns a loopback node IP into a reachable one)
        assert len(nodes) == 2

        # the data was ingested elsewhere and pushed to the cluster's S3 remote; the job's working folder is empty
        cfg = load_config("tiny", {"data": {"synth_n": 12}})
        version = ingest("synth", project, home, cfg, remote=load_profile("cluster").dvc).version
        job = tmp_path / "job"
        job.mkdir()
        monkeypatch.chdir(job)
        assert main(["data", "pull", "--profile", "cluster", "--home", str(home.root), "--version", version,
                     "--json"]) == 0
        pulled = json.loads(capsys.readouterr().out)
        assert pulled["version"] == version == read_version(job) and pulled["files"] > 0
        assert (job / "data" / "records.jsonl").read_bytes() == (project / "data" / "records.jsonl").read_bytes()
        assert main(["data", "pull", "--profile", "cluster", "--home", str(home.root), "--version", "0" * 32]) == 2
        assert "a dataset version is a DVC hash" in capsys.readouterr().err

        ctx = RunContext.resolve(config=cfg, home=home, project=job)
        result = train_stage(1, ctx, workers=2, overrides={"epochs": 2}, max_steps=3, track=False, address=address,
                             placement="SPREAD")
        assert result.history and result.history[-1]["step"] == 3
        topology = json.loads((Path(result.out_dir) / "topology.json").read_text())
        assert topology["world_size"] == 2
        assert len({w["ray_node_id"] for w in topology["workers"]}) == 2  # one worker on each node
        assert {w["ray_node_id"] for w in topology["workers"]} == {n["NodeID"] for n in nodes}
    finally:
        ray.shutdown()
        _stop_cluster(temp, port)


def _stop_cluster(temp: Path, port: int) -> None:
    """Kill this cluster's processes only (`ray stop` would stop every Ray on the machine)."""
    import psutil

    mine = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(temp) in cmd or f"127.0.0.1:{port}" in cmd:
            mine.append(p)
    for p in mine:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(mine, timeout=30)
