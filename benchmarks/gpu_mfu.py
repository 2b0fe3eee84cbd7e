"""Model FLOPs utilisation (MFU) of a training stage on one GPU: achieved model FLOPs/s ÷ the GPU's peak bf16 FLOPs/s.

Model FLOPs = 6 × parameters × tokens, the usual dense-transformer estimate (PaLM appendix B), with all
parameters and the LLM's sequence tokens (image-patch tokens included): an approximation, since frozen parts
need no weight gradients and the vision and SAM encoders see their own patch counts. The stage runs in-process
with bf16 autocast, the same recipe the Ray worker runs. Not measured here: this machine has no GPU.

    .venv/bin/python benchmarks/gpu_mfu.py [--preset tiny|full] [--stage 3] [--steps 20] [--peak-tflops 312]

Without a CUDA GPU it prints why and exits 0. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Dense bf16 peak TFLOP/s by device-name fragment (vendor data sheets); --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0, "V100": 125.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0, "T4": 65.0}


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "full"])
    ap.add_argument("--stage", type=int, default=3, choices=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--config", type=Path, default=None, help="YAML overrides (full: the local weight folders)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's bf16 peak, if not in the table")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_mfu: no CUDA GPU on this machine; MFU is measured on a GPU only. Nothing to measure.")
        print(json.dumps({"benchmark": "gpu_mfu", "ran": False, "reason": "no CUDA GPU"}))
        return 0

    from medplib.config import load_config, to_dict
    from medplib.data.ingest import build_dataset
    from medplib.data.synth import generate
    from medplib.train.recipe import StageRecipe
    from medplib.train.runner import build_init_model
    from medplib.config.stages import stage_spec

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops(name, args.peak_tflops)
    cfg = load_config(args.preset, args.config)
    spec = stage_spec(args.preset, args.stage)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "src", n=64, seed=0, image_size=cfg.data.image_size)
        build_dataset(tmp / "src", tmp / "data", "synth", [], cfg.data.max_image_pixels)
        build_init_model(cfg, tmp / "data", tmp / "init")
        recipe = StageRecipe({"spec": to_dict(spec), "data_dir": str(tmp / "data"), "base": str(tmp / "init"),
                              "grounding": None})
        model = recipe.build_model().to(device)
        loader = torch.utils.data.DataLoader(recipe.train_dataset(), batch_size=spec.micro_batch, shuffle=True,
                                             collate_fn=recipe.collate, drop_last=True)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, fused=True)
        n_params = sum(p.numel() for p in model.parameters())
        done, tokens, t0 = 0, 0, None
        while done < args.steps + args.warmup:
            for batch in loader:
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                if done == args.warmup:
                    torch.cuda.synchronize()
                    t0, tokens = time.perf_counter(), 0
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss, _ = recipe.loss(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                # tokens the transformer stacks see: the LLM's sequence (image patches included) per sample
                tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
                done += 1
                if done == args.steps + args.warmup:
                    break
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    achieved = 6 * n_params * tokens / seconds / 1e12
    mfu = achieved / peak if peak else None
    print(f"{name}: {achieved:.2f} model TFLOP/s over {args.steps} steps; peak {peak or 'unknown'} TFLOP/s")
    print(json.dumps({"benchmark": "gpu_mfu", "ran": True, "device": name, "preset": args.preset,
                      "stage": args.stage, "params": n_params, "model_tflops_per_s": round(achieved, 3),
                      "peak_bf16_tflops": peak, "mfu": None if mfu is None else round(mfu, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
