"""ZeRO-3 (the full preset's option for the largest stages) runs the same worker loop on CPU: weights partitioned
across the 2 workers, gathered for saving, and it learns what ZeRO-2 learns from the same data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medplib.train.launcher import run_stage
from medplib.train.worker import LoopConfig

from tests.train.toy_recipe import TOY_BASE



@pytest.mark.integration
@pytest.mark.timeout(600)
def test_zero3_trains_saves_full_weights_and_matches_zero2(toy_clean_run, ray_home, tmp_path: Path):
    zero2_dir, _ = toy_clean_run  # the session's toy stage under ZeRO-2
    run_stage(LoopConfig(**{**TOY_BASE, "zero_stage": 3}, out_dir=str(tmp_path / "zero3")), ray_home, "zero3",
              workers=2)
    z2, z3 = load_file(zero2_dir / "model.safetensors"), load_file(tmp_path / "zero3/model.safetensors")
    assert z3["weight"].shape == (1, 8) and z3["bias"].shape == (1,)  # gathered, not a rank's empty partition
    for k in z2:
        torch.testing.assert_close(z3[k], z2[k], atol=1e-3, rtol=1e-3)
    hist = json.loads((tmp_path / "zero3/history.json").read_text())
    assert hist[-1]["loss"] < 0.1 * hist[0]["loss"]
