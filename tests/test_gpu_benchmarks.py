"""The GPU benchmarks on a machine without a GPU: `benchmarks/gpu_smoke.py` exits 0 saying so, and on a GPU it (and
`benchmarks/gpu_mfu.py`) trains through `medplib.train.runner.train_stage`, the Ray Train + DeepSpeed worker loop
`medplib train` runs, not a loop of its own."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

from medplib.config.home import REPO_ROOT
from medplib.train import runner


class Launched(Exception):
    """Raised by the stand-in for train_stage: the benchmark reached the worker loop's entry."""


@pytest.fixture
def launch(monkeypatch: pytest.MonkeyPatch) -> list:
    """The calls of a stand-in for `medplib.train.runner.train_stage`; the benchmarks importable as their scripts see
    each other (gpu_mfu imports gpu_smoke); `torch` reporting a GPU."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stand-in GPU")
    calls = []

    def launch(stage, ctx, **kwargs):
        calls.append((stage, ctx, kwargs, (ctx.data_dir / "records.jsonl").is_file()))
        raise Launched

    monkeypatch.setattr(runner, "train_stage", launch)  # both import it from the runner when they run
    return calls


def test_gpu_smoke_without_a_gpu_exits_0_saying_so():
    p = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_smoke.py")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines() == ["gpu_smoke: no CUDA GPU on this machine; the GPU path runs on a GPU only. "
                                             "Nothing to run."]


def test_on_a_gpu_both_benchmarks_train_through_the_worker_loop_of_medplib_train(launch, monkeypatch):
    with pytest.raises(Launched):
        importlib.import_module("gpu_smoke").main(["--images", "4", "--steps", "2"])
    [(stage, ctx, kwargs, data_ready)] = launch
    assert stage == 1 and kwargs == {"workers": 1, "max_steps": 2, "max_failures": 0}
    assert ctx.device == "cuda" and data_ready

    monkeypatch.setattr(runner, "build_init_model", lambda cfg, data_dir, out, seed=42: out)
    with pytest.raises(Launched):
        importlib.import_module("gpu_mfu").main(["--images", "4", "--stage", "3", "--steps", "5", "--warmup", "2"])
    stage, ctx, kwargs, data_ready = launch[-1]
    assert stage == 3 and kwargs["max_steps"] == 7 and kwargs["workers"] == 1 and kwargs["base"].name == "init"
    assert data_ready
