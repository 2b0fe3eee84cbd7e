"""Launch one training stage as a Ray Train `TorchTrainer` (local Ray by default, a cluster by address)."""
from __future__ import annotations

import logging
import os
import uuid
from dataclasses import asdict, replace
from pathlib import Path

from medplib.config import Home
from medplib.train.worker import LoopConfig, train_loop_per_worker

log = logging.getLogger(__name__)


def ensure_ray(home: Home, address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to `address` or start a local Ray with its temp files under the state folder."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Each ray.train.report blocks for this poll interval (2 s by default): keep reports cheap on small jobs.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if address is None:
        from medplib.config.profile import load_profile

        address = load_profile().ray_address  # None in the local profile: start a local Ray below
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    home.ray_tmp.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, object_store_memory=512 * 1024 ** 2,
             _temp_dir=str(_short_tmp(home)), log_to_driver=True, configure_logging=False)


def _short_tmp(home: Home) -> Path:
    # Ray's unix sockets live under its temp dir and their paths must stay under 107 bytes.
    p = home.ray_tmp
    if len(str(p)) > 40:
        p = Path("/tmp") / f"medplib-ray-{uuid.uuid5(uuid.NAMESPACE_URL, str(home.root)).hex[:8]}"
    p.mkdir(parents=True, exist_ok=True)
    return p


def run_stage(loop: LoopConfig, home: Home, name: str, workers: int = 2, cpus_per_worker: int = 1,
              max_failures: int = 1, address: str | None = None, placement: str = "PACK"):
    """Run the worker loop on `workers` Ray workers; returns the Ray Train Result (raises on failure)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray(home, address)
    import ray

    if not loop.use_gpu and ray.cluster_resources().get("GPU", 0) >= workers:
        # a driver without a GPU (a KubeRay head pod) on a cluster with GPU workers: train on the GPUs
        loop = replace(loop, use_gpu=True)
    resources = {"CPU": cpus_per_worker} | ({"GPU": 1} if loop.use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(loop),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=loop.use_gpu, resources_per_worker=resources,
                                     placement_strategy=placement),  # SPREAD: one worker per node
        run_config=RunConfig(
            name=f"{name}-{uuid.uuid4().hex[:8]}",  # unique: Ray refuses to reuse a run folder
            storage_path=str(home.root / "ray_results"),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()
