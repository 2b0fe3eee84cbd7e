"""Model FLOPs utilisation (MFU) of a training stage on one GPU: achieved model FLOPs/s ÷ the GPU's peak bf16 FLOPs/s.

Model FLOPs = 6 × parameters × tokens, the usual dense-transformer estimate (PaLM appendix B), with all
parameters and the LLM's sequence tokens (image-patch tokens included): an approximation, since frozen parts
need no weight gradients and the vision and SAM encoders see their own patch counts. The stage runs through the
same Ray Train + DeepSpeed worker loop `medplib train` runs (medplib.train.runner.train_stage, one worker: bf16,
ZeRO, torch's fused AdamW), on the dataset of benchmarks/gpu_smoke.py, starting from the initial model; the time
is the worker's own step clock between the end of the warm-up and the last step. Not measured here: this machine
has no GPU.

    .venv/bin/python benchmarks/gpu_mfu.py [--preset tiny|full] [--stage 3] [--steps 20] [--peak-tflops 312]

Without a CUDA GPU it prints why and exits 0. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
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


def parameters(model_dir: Path) -> int:
    """Parameters of a saved model, from its safetensors header (no weights are read)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "full"])
    ap.add_argument("--stage", type=int, default=3, choices=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--config", type=Path, default=None, help="YAML overrides (full: the local weight folders)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's bf16 peak, if not in the table")
    ap.add_argument("--images", type=int, default=64, help="synthetic phantoms in the dataset (default: 64)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_mfu: no CUDA GPU on this machine; MFU is measured on a GPU only. Nothing to measure.")
        print(json.dumps({"benchmark": "gpu_mfu", "ran": False, "reason": "no CUDA GPU"}))
        return 0

    from gpu_smoke import small_project

    from medplib.config import family_stage_spec
    from medplib.data.torch_dataset import MedDataset
    from medplib.model import MedTokenizer
    from medplib.train.runner import build_init_model, train_stage

    name = torch.cuda.get_device_name(0)
    peak = peak_tflops(name, args.peak_tflops)
    with tempfile.TemporaryDirectory(prefix="gpu-mfu-") as tmp:
        ctx = small_project(Path(tmp), args.images, args.preset, args.config)
        spec = family_stage_spec(ctx.cfg, ctx.family, args.stage)
        init = build_init_model(ctx.cfg, ctx.data_dir, Path(tmp) / "init")
        result = train_stage(args.stage, ctx, workers=1, base=None if args.stage == 1 else init,
                             max_steps=args.warmup + args.steps, max_failures=0)
        clock = {h["step"]: h["time"] for h in result.history}
        last = max(clock)
        seconds = clock[last] - clock[args.warmup]
        # tokens the transformer stacks see: the LLM's sequence (image patches included) per sample
        m = ctx.cfg.model
        data = MedDataset(ctx.data_dir, MedTokenizer.from_pretrained(init / "tokenizer"), m.vision.image_size,
                          m.sam.image_size, split="train", tasks=spec.tasks)
        per_sample = statistics.fmean(len(data[i].input_ids) for i in range(len(data)))
        n_params = parameters(init)
    tokens = (last - args.warmup) * spec.micro_batch * spec.grad_accum * per_sample
    peak_memory = max((h.get("gpu_peak_gb", 0.0) for h in result.history), default=None)
    achieved = 6 * n_params * tokens / seconds / 1e12
    mfu = achieved / peak if peak else None
    print(f"{name}: {achieved:.2f} model TFLOP/s over {last - args.warmup} steps; peak {peak or 'unknown'} TFLOP/s")
    print(json.dumps({"benchmark": "gpu_mfu", "ran": True, "device": name, "preset": args.preset,
                      "stage": args.stage, "params": n_params, "steps": last - args.warmup,
                      "tokens_per_sample": round(per_sample, 1), "model_tflops_per_s": round(achieved, 3),
                      "peak_bf16_tflops": peak, "mfu": None if mfu is None else round(mfu, 4),
                      "peak_gpu_gb": peak_memory, "loop": "ray-train+deepspeed worker (medplib train)"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
