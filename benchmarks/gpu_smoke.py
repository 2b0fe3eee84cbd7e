"""The GPU path end to end on one GPU, a few steps each: MedPLIB's four stages through the Ray Train + DeepSpeed worker
loop that `medplib train` runs (medplib.train.runner.train_stage → launcher.run_stage → worker.train_loop_per_worker:
NCCL, bf16, ZeRO, torch's fused AdamW), then evaluation of stage IV on the GPU in bf16 and one prediction served by
`mlflow models serve` on the GPU. A smoke run: it shows the path works and what it costs, not that the model learns.

    .venv/bin/python benchmarks/gpu_smoke.py [--steps 3] [--images 24] [--preset tiny|full] [--config FILE.yaml]

Without a CUDA GPU it prints one line saying so and exits 0. Last line: one JSON object (per stage: steps, first and
last loss, seconds, peak GPU memory of the worker; evaluation and serving: seconds, peak memory, the answer).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

if TYPE_CHECKING:
    from medplib.config import RunContext

GIB = 2 ** 30


def small_project(root: Path, images: int, preset: str = "tiny", config: Path | None = None,
                  device: str = "cuda") -> RunContext:
    """A synthetic MeCoVQA dataset of `images` phantoms normalised into `<root>/project/data` (as ingest writes it,
    without DVC) and the run context of a fresh state folder `<root>/home`, models on `device`."""
    from medplib.config import RunContext, load_config
    from medplib.data.ingest import build_dataset
    from medplib.data.synth import generate

    cfg = load_config(preset, config)
    generate(root / "source", n=images, seed=0, image_size=cfg.data.image_size)
    build_dataset(root / "source", root / "project" / "data", "synth", [], cfg.data.max_image_pixels,
                  val_fraction=cfg.data.val_fraction)
    return RunContext.resolve(preset, cfg, root / "home", root / "project", device=device)


def train_stages(ctx: RunContext, steps: int) -> list[dict]:
    """Each stage of the family's plan for `steps` optimiser steps on one Ray worker: what `medplib train` runs."""
    from medplib.train.runner import train_stage

    rows = []
    for stage in ctx.family.stages:
        result = train_stage(stage, ctx, workers=1, max_steps=steps, max_failures=0)
        peaks = [h["gpu_peak_gb"] for h in result.history if "gpu_peak_gb" in h]
        rows.append({**{k: result.to_dict()[k] for k in ("stage", "name", "steps", "seconds", "first_loss",
                                                             "last_loss", "skipped")},
                     "peak_gpu_gb": round(max(peaks), 3) if peaks else None})
    return rows


def evaluate_and_serve(ctx: RunContext, limit: int) -> dict:
    """Stage IV evaluated on the test split on `ctx.device` (logged with its pyfunc in one MLflow run), then that
    pyfunc served by `mlflow models serve` on the GPU and asked one question about a point."""
    from medplib.data.images import read_image
    from medplib.data.torch_dataset import read_records
    from medplib.eval.publish import ARTIFACT_PATH, evaluate_and_log
    from medplib.registry import Registry
    from medplib.serve import DEVICE_ENV, encode_png, invoke, load_model, served
    from medplib.train.runner import stage_dir

    model_dir = stage_dir(ctx.home, ctx.family.stages[-1])
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = load_model(model_dir, device=ctx.device)
    report, run_id = evaluate_and_log(model, ctx.data_dir, None, Registry(ctx.tracking), run_name="gpu-smoke",
                                      model_ref=str(model_dir), splits=("test",), limit=limit, batch_size=8,
                                      log_model_dir=model_dir)
    evaluation = {"samples": len(report.rows), "seconds": round(time.perf_counter() - t0, 1),
                  "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / GIB, 3),
                  "dtype": str(next(model.parameters()).dtype), "metrics": report.summary}
    del model
    record = next(r for r in read_records(ctx.data_dir) if r.split == "test")
    image = read_image(ctx.data_dir / record.image)
    h, w = image.shape[:2]
    row = {"image": encode_png(image), "question": "What is in <region>?", "point": f"{w // 2},{h // 2}"}
    t0 = time.perf_counter()
    with served(f"runs:/{run_id}/{ARTIFACT_PATH}", ctx.tracking, env={DEVICE_ENV: ctx.device}) as url:
        started = time.perf_counter()
        [answer] = invoke(url, [row])
    serving = {"start_seconds": round(started - t0, 1), "request_seconds": round(time.perf_counter() - started, 2),
               "answer": answer["answer"], "masks": len(answer["masks"])}
    return {"evaluation": evaluation, "serving": serving}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="optimiser steps per stage (default: 3)")
    ap.add_argument("--images", type=int, default=24, help="synthetic phantoms in the dataset (default: 24)")
    ap.add_argument("--limit", type=int, default=16, help="test records evaluated (default: 16)")
    ap.add_argument("--preset", default="tiny", choices=["tiny", "full"])
    ap.add_argument("--config", type=Path, default=None, help="YAML overrides (full: the local weight folders)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA GPU on this machine; the GPU path runs on a GPU only. Nothing to run.")
        return 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        ctx = small_project(Path(tmp), args.images, args.preset, args.config)
        stages = train_stages(ctx, args.steps)
        after = evaluate_and_serve(ctx, args.limit)
    out = {"benchmark": "gpu_smoke", "ran": True, "device": torch.cuda.get_device_name(0), "preset": args.preset,
           "images": args.images, "steps_per_stage": args.steps, "stages": stages, **after,
           "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
