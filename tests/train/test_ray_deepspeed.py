"""The Ray Train + DeepSpeed worker loop for real: 2 CPU workers, gloo, ZeRO-2, checkpoints (fault resume:
tests/reliability/test_worker_death.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medplib.train.deepspeed_config import deepspeed_config
from medplib.train.launcher import run_stage
from medplib.train.worker import LoopConfig

from tests.train.toy_recipe import TOY_BASE



def test_deepspeed_config_cpu_and_gpu():
    cpu = deepspeed_config(micro_batch=4, grad_accum=8, world_size=4, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0,
                           warmup_steps=10, total_steps=1000, grad_clip=1.0, zero_stage=2, use_gpu=False)
    assert cpu["train_batch_size"] == 128 and cpu["optimizer"]["params"]["torch_adam"] is True
    assert cpu["bf16"]["enabled"] is False
    gpu = deepspeed_config(micro_batch=4, grad_accum=8, world_size=4, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0,
                           warmup_steps=10, total_steps=1000, grad_clip=1.0, zero_stage=3, use_gpu=True)
    assert gpu["bf16"]["enabled"] is True and gpu["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert "fused" not in cpu["optimizer"]["params"]
    assert gpu["optimizer"]["params"]["torch_adam"] is True and gpu["optimizer"]["params"]["fused"] is True
    with pytest.raises(ValueError, match="zero_stage = 4"):
        deepspeed_config(micro_batch=1, grad_accum=1, world_size=1, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0,
                         warmup_steps=0, total_steps=1, grad_clip=1.0, zero_stage=4, use_gpu=False)


def test_the_gpu_optimizer_needs_no_jit_build():
    """The CUDA image has no nvcc (infra/Dockerfile), so DeepSpeed must not build FusedAdam: given the GPU config,
    DeepSpeed's own choice (the engine's get_optimizer_configuration, called without an engine: its torch_adam path
    reads no engine state) is torch's AdamW, fused, and the config's parameters construct it."""
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    gpu = deepspeed_config(micro_batch=4, grad_accum=1, world_size=1, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                           warmup_steps=1, total_steps=10, grad_clip=1.0, zero_stage=2, use_gpu=True)
    params = dict(gpu["optimizer"]["params"])
    optimizer_class, extra = DeepSpeedEngine.get_optimizer_configuration(None, params, adam_w_mode=True)
    assert optimizer_class is torch.optim.AdamW
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = optimizer_class([weight], **params, **extra)  # what DeepSpeed then calls
    assert optimizer.defaults["fused"] is True and optimizer.defaults["weight_decay"] == 0.1



@pytest.mark.integration
def test_two_workers_learn(toy_clean_run):
    # Resuming after a failure is tests/reliability/test_worker_death.py: a worker killed mid-stage, the group
    # restarted from its last checkpoint, ending on the undisturbed run's weights.
    clean_dir, result = toy_clean_run  # the session's undisturbed toy stage (TOY_BASE) on 2 workers
    hist = json.loads((clean_dir / "history.json").read_text())
    steps = 6 * 512 // (16 * 2 * 2)
    assert hist[-1]["step"] == steps
    first, last = hist[0]["loss"], hist[-1]["loss"]
    assert last < 0.1 * first, (first, last)
    assert (clean_dir / "model.safetensors").is_file() and result.checkpoint is not None


def test_progress_line_shows_where_the_job_is_and_its_eta():
    from medplib.train.worker import progress_line

    line = progress_line("stage 3 (grounding_expert)", step=500, total=2000, first_step=0, loss=1.23456,
                         samples_per_s=150.0, elapsed=100.0)
    assert line == ("stage 3 (grounding_expert): step 500/2000 (25%), loss 1.2346, 150.0 samples/s, "
                    "elapsed 1:40, ETA 5:00")
    # resumed at step 400: the ETA comes from the 100 steps this attempt ran, not from the 500 of the job
    resumed = progress_line("s", step=500, total=2000, first_step=400, loss=1.0, samples_per_s=1.0, elapsed=100.0)
    assert resumed.endswith("elapsed 1:40, ETA 25:00")
    assert progress_line("s", 1, 10, 0, 1.0, 1.0, 4000.0).endswith("ETA 10:00:00")
