"""Faults (issue 9): two pipelines run at once against the same state folder (one MLflow database, one DVC remote,
one Prefect home), each on its own project. One-stage pipelines: the race is in the shared stores, not in how long
each trains. Both train on the session's Ray (`MEDPLIB_RAY_ADDRESS`) and report to the session's Prefect server, as
a team's pipelines share a cluster: neither starts its own. Both finish; they register distinct versions, each with
its own lineage and its own stage folders; the shared stores stay readable and consistent."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medplib.config import load_tracking_config
from medplib.config.home import REPO_ROOT
from medplib.data.versioning import data_status
from medplib.model import MedPLIB
from medplib.registry import TAG_DATA_VERSION, TAG_PARENT_RUN, Registry

BIN = Path(sys.executable).parent


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_two_pipelines_at_once_on_one_home(ray_home, prefect_harness, tmp_path: Path):
    import ray
    from prefect.settings import PREFECT_API_URL

    home = ray_home
    env = {**os.environ, "MEDPLIB_HOME": str(home.root), "PYTHONPATH": str(REPO_ROOT),
           "MEDPLIB_RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PREFECT_API_URL": PREFECT_API_URL.value()}
    procs = {}
    for name, seed in (("a", 1), ("b", 2)):
        project = tmp_path / name
        project.mkdir()
        small = tmp_path / f"{name}.yaml"
        small.write_text(f"data:\n  synth_n: 16\n  synth_seed: {seed}\n")  # different data: different versions
        procs[name] = (project, subprocess.Popen(
            [str(BIN / "medplib"), "pipeline", "--json", "--config", str(small), "--stages", "1", "--epochs", "1",
             "--retries", "0", "--workers", "1", "--project", str(project)],
            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    summaries = {}
    for name, (project, p) in procs.items():
        out, err = p.communicate(timeout=800)
        assert p.returncode == 0, f"pipeline {name} failed:\n{err[-4000:]}"
        try:
            summaries[name] = json.loads(out)  # --json: stdout holds the summary and nothing else
        except json.JSONDecodeError:
            pytest.fail(f"pipeline {name}: stdout is not one JSON summary:\n{out[:3000]}")

    a, b = summaries["a"], summaries["b"]
    assert a["data_version"] != b["data_version"]
    assert {a["evaluation"]["version"], b["evaluation"]["version"]} == {"1", "2"}
    assert a["workspace"] != b["workspace"]
    registry = Registry(load_tracking_config().resolved(home))
    for name, s in summaries.items():
        assert [st["stage"] for st in s["stages"]] == [1]
        tags = registry.version_tags(s["evaluation"]["version"])
        assert tags[TAG_DATA_VERSION] == s["data_version"] and tags[TAG_PARENT_RUN] == s["pipeline_run_id"]
        assert all(Path(st["out_dir"]).is_relative_to(home.root / "models" / s["workspace"]) for st in s["stages"])
        MedPLIB.from_pretrained(s["stages"][-1]["out_dir"])  # checksums hold: neither run overwrote the other
        status = data_status(procs[name][0], home)
        assert status["in_sync"] is True and status["pushed"] is True
    # stage I only (one epoch) does not ground: neither model reaches the first champion's floor
    assert "champion" not in registry.aliases()
    assert all("below the first champion's floor" in s["evaluation"]["reason"] for s in summaries.values())
