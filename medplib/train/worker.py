"""The Ray Train worker loop: DeepSpeed engine, distributed sampler, gradient accumulation, checkpoints, resume.

What is trained comes from a *recipe* (import path + its config), so the same loop runs every stage:
`build_model()`, `train_dataset()`, `collate(items)`, `loss(engine, batch) -> (loss, parts)`, `save(module, dir)`.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import signal
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from medplib.progress import progress_line

PROGRESS_FILE = "progress.json"  # rank 0's latest position, shown by the driver (launcher.show_progress)


class Recipe(Protocol):
    def build_model(self) -> torch.nn.Module: ...
    def train_dataset(self) -> Dataset: ...
    def collate(self, items: list) -> Any: ...
    def loss(self, engine: Any, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...
    def save(self, module: torch.nn.Module, out_dir: Path) -> None: ...


@dataclass
class LoopConfig:
    """Everything one stage's worker loop needs; plain data so Ray can ship it to workers."""

    recipe: str  # "package.module:Class"
    recipe_config: dict
    out_dir: str
    epochs: int = 1
    micro_batch: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.01
    grad_clip: float = 1.0
    zero_stage: int = 2
    use_gpu: bool = False
    seed: int = 42
    checkpoint_every: int = 50  # optimizer steps; each report costs Ray's poll interval
    log_every: int = 10
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    progress_every_s: float = 10.0  # rank 0 logs a progress line (step, %, loss, samples/s, ETA) this often
    name: str = "stage"  # how progress lines name the job
    extra: dict = field(default_factory=dict)


def publish_progress(out_dir: Path, **fields: float) -> None:
    """Replace the progress file in one step (write, then rename), so the driver never reads half of it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{PROGRESS_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(fields))
    os.replace(tmp, out_dir / PROGRESS_FILE)


def read_progress(out_dir: Path) -> dict | None:
    """The fields of the last `publish_progress` in `out_dir`, or None before the first."""
    try:
        return json.loads((out_dir / PROGRESS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def load_recipe(path: str, config: dict) -> Recipe:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)(config)


def weights_dtype(cfg: LoopConfig) -> dict:
    """The recipe's config, with the dtype the model is built in: on a GPU bf16 (DeepSpeed trains in bf16 there, see
    deepspeed_config), so stage IV's MoE is streamed into bf16 (half the host memory of fp32) instead of being built
    in fp32 and cast by DeepSpeed; on the CPU the saved weights' own dtype. A recipe config that names a dtype keeps
    it."""
    if not cfg.use_gpu or "dtype" in cfg.recipe_config:
        return cfg.recipe_config
    return {**cfg.recipe_config, "dtype": "bfloat16"}


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray worker; rank 0 writes the final weights to `out_dir`."""
    import deepspeed  # inside the worker: importing it on the driver costs seconds for nothing
    import ray.train

    from medplib.train.deepspeed_config import deepspeed_config

    cfg = LoopConfig(**config)
    if not isinstance(warnings.showwarning, _ShowOnce):
        warnings.showwarning = _ShowOnce(warnings.showwarning)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    recipe = load_recipe(cfg.recipe, weights_dtype(cfg))
    model = recipe.build_model()
    dataset = recipe.train_dataset()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=False)
    loader = DataLoader(dataset, batch_size=cfg.micro_batch, sampler=sampler, collate_fn=recipe.collate)
    steps_per_epoch = max(1, math.ceil(len(loader) / cfg.grad_accum))
    total_steps = cfg.epochs * steps_per_epoch
    ds_cfg = deepspeed_config(micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum, world_size=world, lr=cfg.lr,
                              betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                              warmup_steps=round(cfg.warmup_ratio * total_steps), total_steps=total_steps,
                              grad_clip=cfg.grad_clip, zero_stage=cfg.zero_stage, use_gpu=cfg.use_gpu)
    params = [p for p in model.parameters() if p.requires_grad]
    if not cfg.use_gpu:
        _no_shm_comm(deepspeed)
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=params, config=ds_cfg)

    start_epoch, skip_batches = 0, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag="state")
        start_epoch, skip_batches = client["epoch"], client["batches_done"]

    def checkpoint(epoch: int, batches_done: int, metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag="state", client_state={"epoch": epoch, "batches_done": batches_done})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    history: list[dict] = []
    t0, samples = time.perf_counter(), 0
    planned = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    first_step, last_print, last_publish = engine.global_steps, t0, t0
    out = Path(cfg.out_dir)
    tracker = _RankZeroTracker(cfg.extra) if rank == 0 else None
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if epoch == start_epoch and i < skip_batches:
                continue  # resumed mid-epoch: these batches were trained before the failure
            loss, parts = recipe.loss(engine, batch)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()  # ask before step() moves the micro-step on
            engine.step()
            samples += cfg.micro_batch * world
            if not boundary:
                continue
            step, loss_value = engine.global_steps, float(loss.detach())
            if rank == 0 and (step % cfg.log_every == 0 or step == 1):
                elapsed = time.perf_counter() - t0
                history.append({"step": step, "epoch": epoch, "loss": loss_value, **parts,
                                "lr": scheduler.get_last_lr()[0] if scheduler else cfg.lr,
                                "samples_per_s": samples / max(elapsed, 1e-9), "time": elapsed,
                                **({"gpu_peak_gb": torch.cuda.max_memory_allocated() / 2 ** 30} if cfg.use_gpu
                                   else {})})
                if tracker:
                    tracker.log(history[-1])
            now = time.perf_counter()
            if rank == 0 and (now - last_publish >= 1.0 or step == planned):
                last_publish = now
                publish_progress(out, step=step, total=planned, first_step=first_step, loss=loss_value,
                                 samples_per_s=samples / max(now - t0, 1e-9), elapsed=now - t0)
            if rank == 0 and (now - last_print >= cfg.progress_every_s or step == planned):
                last_print = now
                # for the worker's log in Ray's session folder; written, not print()ed: Ray Train patches print to
                # log *and* echo it, so each line showed twice
                sys.stderr.write(progress_line(cfg.name, step, planned, first_step, loss_value,
                                               samples / max(now - t0, 1e-9), now - t0) + "\n")
                sys.stderr.flush()
            _maybe_fail(cfg, step, rank)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint(epoch, i + 1, {"step": step, "loss": loss_value})
            if cfg.max_steps and step >= cfg.max_steps:
                break
        if cfg.max_steps and engine.global_steps >= cfg.max_steps:
            break
    # where each rank ran (provenance: which nodes trained this stage)
    here = {"rank": rank, "node_id": ctx.get_node_rank() if hasattr(ctx, "get_node_rank") else None,
            "ray_node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname()}
    topology = [None] * world
    torch.distributed.all_gather_object(topology, here)
    # ZeRO-3 partitions the weights across ranks: gather them (a collective: every rank enters) for rank 0 to save
    gathered = (deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
                if cfg.zero_stage == 3 else contextlib.nullcontext())
    with gathered:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            recipe.save(engine.module, out)
    if rank == 0:
        (out / "history.json").write_text(json.dumps(history, indent=1))
        (out / "topology.json").write_text(json.dumps({"world_size": world, "workers": topology}, indent=1))
    checkpoint(cfg.epochs, 0, {"step": engine.global_steps, "done": 1})


def _no_shm_comm(deepspeed) -> None:
    """On CPU, DeepSpeed's communication backend JIT-compiles its shared-memory all-reduce op (about 45 s with 2
    cores, again whenever the environment's path changes: every fresh clone) after probing every op builder with
    compiler subprocesses, in each new worker process. gloo's all-reduce does the same job for CPU training, so the
    op list is set to "none compatible" before `deepspeed.initialize` reads it (deepspeed.ops caches it in the module
    the first time it is read). GPU workers keep DeepSpeed's ops."""
    vars(deepspeed.ops).setdefault("__compatible_ops__", {})


class _ShowOnce:
    """`warnings.showwarning` that shows each distinct warning once per worker. A filter cannot: every
    catch_warnings() block (one per image read) resets Python's memory of what it showed, so a deprecation DeepSpeed
    triggers each step (torch's all_gather_into_tensor) would fill the worker's log."""

    def __init__(self, show):
        self.show, self.seen = show, set()

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:
        key = (str(message), category, filename, lineno)
        if key not in self.seen:
            self.seen.add(key)
            self.show(message, category, filename, lineno, file, line)


class _RankZeroTracker:
    """Per-step metrics to the stage's MLflow run (created by the driver), from rank 0 only."""

    def __init__(self, extra: dict):
        self.run_id, self.client = extra.get("mlflow_run_id"), None
        if self.run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=extra["mlflow_tracking_uri"])

    def log(self, row: dict) -> None:
        if not self.client:
            return
        from mlflow.entities import Metric

        ts, step = int(time.time() * 1000), int(row["step"])
        metrics = [Metric(k, float(v), ts, step) for k, v in row.items() if k not in ("step", "epoch")]
        self.client.log_batch(self.run_id, metrics=metrics)


def _maybe_fail(cfg: LoopConfig, step: int, rank: int) -> None:
    """Fault injection for tests: the worker process dies (SIGKILL) once at a step, remembered by a marker file;
    `fail_rank` limits it to one rank."""
    fail_at, marker = cfg.extra.get("fail_once_at_step"), cfg.extra.get("fail_marker")
    only = cfg.extra.get("fail_rank")
    if fail_at is None or step != fail_at or not marker or os.path.exists(marker) or only not in (None, rank):
        return
    Path(marker).write_text(str(step))
    os.kill(os.getpid(), signal.SIGKILL)


def loop_config_dict(cfg: LoopConfig) -> dict:
    return asdict(cfg)
