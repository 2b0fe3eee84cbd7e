"""Faults (issue 9): a Ray worker process is SIGKILLed mid-stage. Ray Train restarts the group, the stage resumes
from its last checkpoint and ends where an undisturbed run ends: same step count, final weights within 1e-4 and
final loss within 1% of the undisturbed run's (the resumed run replays the same batches)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medplib.train.launcher import run_stage
from medplib.train.worker import LoopConfig

from tests.train.toy_recipe import TOY_BASE

WEIGHT_ATOL, LOSS_RTOL = 1e-4, 0.01



@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_killed_worker_resumes_and_matches_the_undisturbed_run(toy_clean_run, ray_home, tmp_path: Path):
    clean_dir, _ = toy_clean_run  # the session's undisturbed run of the same stage
    marker = tmp_path / "killed"
    run_stage(LoopConfig(**TOY_BASE, out_dir=str(tmp_path / "killed-run"),
                         extra={"fail_once_at_step": 25, "fail_marker": str(marker), "fail_rank": 1}),
              ray_home, "worker-killed", workers=2, max_failures=1)
    assert marker.read_text() == "25"  # rank 1 did die at step 25

    clean = json.loads((clean_dir / "history.json").read_text())
    resumed = json.loads((tmp_path / "killed-run/history.json").read_text())
    # the retried group starts after the last checkpoint Ray had committed when the worker died: step 10 or 20
    # (a SIGKILLed worker's last report can be lost with it), never from scratch
    assert resumed[0]["step"] in (11, 21), resumed[0]
    assert resumed[-1]["step"] == clean[-1]["step"] == 6 * 512 // (16 * 2 * 2)
    assert resumed[-1]["loss"] == pytest.approx(clean[-1]["loss"], rel=LOSS_RTOL)
    a, b = load_file(clean_dir / "model.safetensors"), load_file(tmp_path / "killed-run/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=WEIGHT_ATOL, rtol=0)
