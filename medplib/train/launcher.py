"""Launch one training stage as a Ray Train `TorchTrainer` (local Ray by default, a cluster by address).

Ray's processes (workers, the Ray Train controller, DeepSpeed in the workers) write to Ray's session logs, not to
the driver's console; the driver shows the job's progress from the file rank 0 keeps up to date.
"""
from __future__ import annotations

import logging
import os
import threading
import uuid
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

from medplib.config import Home
from medplib.progress import StepProgress, training_detail
from medplib.run_log import adopt_library_loggers, note_ray_session
from medplib.train.worker import PROGRESS_FILE, LoopConfig, read_progress, train_loop_per_worker

log = logging.getLogger(__name__)


def ensure_ray(home: Home, address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to `address` (the profile's `ray_address`, passed down by the caller) or, with None, start a local
    Ray with its temp files under the state folder. Either way the
    workers' output stays in Ray's session logs (`log_to_driver=False`), which the command's run log names."""
    import ray

    adopt_library_loggers()  # Ray's driver messages into the run log, not straight to stderr
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Each ray.train.report blocks for this poll interval (2 s by default): keep reports cheap on small jobs.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if address:
        ctx = ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        home.ray_tmp.mkdir(parents=True, exist_ok=True)
        ctx = ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                       object_store_memory=512 * 1024 ** 2, _temp_dir=str(_short_tmp(home)), log_to_driver=False,
                       configure_logging=False)
    session = getattr(ctx, "address_info", {}).get("session_dir")  # absent through a ray:// client
    if session:
        log.info("Ray session logs (training workers, Ray Train, DeepSpeed): %s", note_ray_session(Path(session)))


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
    with show_progress(Path(loop.out_dir), loop.name):
        return trainer.fit()


@contextmanager
def show_progress(out_dir: Path, name: str, poll_s: float = 1.0) -> Iterator[None]:
    """While the job runs, show rank 0's progress file (worker.publish_progress) as one StepProgress display."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PROGRESS_FILE).unlink(missing_ok=True)  # an earlier run's, in a reused stage folder
    display: StepProgress | None = None
    stop = threading.Event()

    def show() -> None:
        nonlocal display
        p = read_progress(out_dir)
        if p is None:
            return
        if display is None:
            display = StepProgress(name, p["total"], unit="step")
        display.set(p["step"], p["total"], training_detail(p["step"], p["total"], p["first_step"], p["loss"],
                                                           p["samples_per_s"], p["elapsed"]))

    def poll() -> None:
        while not stop.wait(poll_s):
            show()

    thread = threading.Thread(target=poll, name=f"progress of {name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        show()
        if display is not None:
            display.close()
        (out_dir / PROGRESS_FILE).unlink(missing_ok=True)  # not part of the saved model
