"""DeepSpeed configs from a stage's hyper-parameters: one function for CPU (gloo) and GPU (NCCL, bf16)."""
from __future__ import annotations


def deepspeed_config(*, micro_batch: int, grad_accum: int, world_size: int, lr: float, betas: tuple[float, float],
                     weight_decay: float, warmup_steps: int, total_steps: int, grad_clip: float, zero_stage: int,
                     use_gpu: bool, bf16: bool | None = None) -> dict:
    """ZeRO stage, AdamW, warm-up then linear decay (MedPLIB: 1% warm-up), clipping; bf16 on GPU by default.

    The optimizer is torch's AdamW (`torch_adam`) on CPU and GPU alike, fused into one kernel per step on a GPU
    (`fused`): DeepSpeed's own FusedAdam is JIT-compiled at start-up, and the CUDA image (infra/Dockerfile, a CUDA
    runtime without nvcc) cannot compile it.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage = {zero_stage}: DeepSpeed ZeRO stages are 0, 1, 2 or 3")
    if micro_batch < 1 or grad_accum < 1 or world_size < 1:
        raise ValueError(f"micro_batch={micro_batch}, grad_accum={grad_accum}, world_size={world_size} must be >= 1")
    bf16 = use_gpu if bf16 is None else bf16
    total_steps = max(2, total_steps)
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(betas), "weight_decay": weight_decay,
                                                  "torch_adam": True, **({"fused": True} if use_gpu else {})}},
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": max(1, min(warmup_steps, total_steps - 1)),  # DeepSpeed needs >= 1
            "total_num_steps": total_steps, "warmup_type": "linear"}},
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if zero_stage >= 2 and use_gpu:
        cfg["zero_optimization"].update({"overlap_comm": True, "contiguous_gradients": True,
                                         "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8})
    if zero_stage == 3:
        cfg["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": True})
    return cfg
