"""Samples/s of a stage on the Ray Train + DeepSpeed path ÷ a plain single-process torch loop.

Same model (the tiny preset's stage-III grounding recipe), same data, same global batch, same 2 cores:
Ray runs 2 workers with 1 CPU each (ZeRO-2, gloo); the plain loop runs 1 process with 2 threads and torch AdamW.
Both measure samples/s inside the loop, after `WARMUP` steps, so start-up (Ray, DeepSpeed) is not counted.
Last line: one JSON object with the ratio, the goal (>= 0.90) and the 1-minute load average before and after.
The cores are shared: a plain loop with 2 OpenMP threads slows far more than two 1-thread workers when another
process takes CPU (its threads wait for each other at every op), so a ratio is comparable only at a similar load.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medplib.config import load_config, resolve_home, to_dict  # noqa: E402
from medplib.data.ingest import build_dataset  # noqa: E402
from medplib.data.synth import generate  # noqa: E402
from medplib.train.launcher import run_stage  # noqa: E402
from medplib.train.recipe import StageRecipe  # noqa: E402
from medplib.train.runner import build_init_model  # noqa: E402
from medplib.config.stages import stage_spec  # noqa: E402
from medplib.train.worker import LoopConfig  # noqa: E402

STEPS, WARMUP, GLOBAL_BATCH = 30, 5, 32


def plain_loop(recipe_config: dict, lr: float) -> float:
    torch.set_num_threads(2)
    recipe = StageRecipe(recipe_config)
    model = recipe.build_model()
    ds = recipe.train_dataset()
    loader = torch.utils.data.DataLoader(ds, batch_size=GLOBAL_BATCH, shuffle=True, collate_fn=recipe.collate,
                                         drop_last=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95))
    done, t0 = 0, None
    while done < STEPS:
        for batch in loader:
            if done == WARMUP:
                t0 = time.perf_counter()
            loss, _ = recipe.loss(model, batch)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            done += 1
            if done == STEPS:
                break
    return (STEPS - WARMUP) * GLOBAL_BATCH / (time.perf_counter() - t0)


def ray_loop(recipe_config: dict, lr: float, home, out: Path) -> float:
    loop = LoopConfig(recipe="medplib.train.recipe:StageRecipe", recipe_config=recipe_config, out_dir=str(out),
                      epochs=100, micro_batch=GLOBAL_BATCH // 2, grad_accum=1, lr=lr, zero_stage=2,
                      checkpoint_every=0, log_every=1, max_steps=STEPS)
    run_stage(loop, home, "bench", workers=2)
    hist = json.loads((out / "history.json").read_text())
    t = {h["step"]: h["time"] for h in hist}
    return (STEPS - WARMUP) * GLOBAL_BATCH / (t[STEPS] - t[WARMUP])


def main() -> None:
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = load_config("tiny")
        generate(tmp / "src", n=160, seed=0)
        build_dataset(tmp / "src", tmp / "data", "synth", [], cfg.data.max_image_pixels)
        build_init_model(cfg, tmp / "data", tmp / "init")
        spec = stage_spec("tiny", 3)
        rc = {"spec": to_dict(spec), "data_dir": str(tmp / "data"), "base": str(tmp / "init"), "grounding": None}
        home = resolve_home(tmp / "home").ensure()
        ray_sps = ray_loop(rc, spec.lr, home, tmp / "out")
        import ray

        ray.shutdown()
        plain_sps = plain_loop(rc, spec.lr)
    ratio = ray_sps / plain_sps
    print(f"Ray Train + DeepSpeed (2 workers x 1 CPU): {ray_sps:.1f} samples/s")
    print(f"plain torch loop (1 process, 2 threads):  {plain_sps:.1f} samples/s")
    print(json.dumps({"benchmark": "train_throughput", "ray_deepspeed_samples_per_s": round(ray_sps, 2),
                      "plain_torch_samples_per_s": round(plain_sps, 2), "ratio": round(ratio, 3),
                      "load_1min_before": round(load_before, 2), "load_1min_after": round(os.getloadavg()[0], 2),
                      "goal": ">= 0.90", "met": ratio >= 0.90}))


if __name__ == "__main__":
    main()
