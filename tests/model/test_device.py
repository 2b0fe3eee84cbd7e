"""Where a model runs (medplib.device): `--device` resolved to a device and dtype, batches moved to the engine's
device with pixels in their encoders' dtypes, and the tiny model trained and generating in bf16 as on a GPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medplib.config import to_dict
from medplib.config.stages import stage_spec
from medplib.device import resolve_device, to_device
from medplib.model import MedPLIB
from medplib.train.recipe import StageRecipe

from .test_model import A_SEG, Q_REGION, Q_SEG, _encode, _force_next_token


def test_auto_is_the_gpu_in_bf16_when_one_is_visible_else_the_cpu_in_fp32(monkeypatch: pytest.MonkeyPatch):
    cpu = resolve_device("auto")
    assert (cpu.device, cpu.dtype) == (torch.device("cpu"), torch.float32)  # this machine has no GPU
    with pytest.raises(ValueError, match="--device cuda: no CUDA GPU is visible"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="device 'tpu': use auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpu = resolve_device("auto")
    assert (gpu.device, gpu.dtype) == (torch.device("cuda", 0), torch.bfloat16)
    assert resolve_device(" CUDA:1 ").device == torch.device("cuda", 1)
    assert resolve_device("cpu").dtype == torch.float32  # asked for, the CPU beside a GPU
    with pytest.raises(ValueError, match="sees 2 CUDA GPU"):
        resolve_device("cuda:2")


def _batch(tokenizer) -> dict:
    """A collated-like batch: a grounding sample (<SEG>, target mask) and a region sample, fp32 pixels on the CPU."""
    ids, labels, mask = _encode(tokenizer, [(Q_SEG, A_SEG), (Q_REGION, "It is the kidney.")])
    region = torch.zeros(1, 64, 64, dtype=torch.bool)
    region[0, 8:24, 8:24] = True
    target = torch.zeros(1, 64, 64)
    target[0, 20:40, 20:40] = 1
    g = torch.Generator().manual_seed(0)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "pixel_values": torch.randn(2, 3, 64, 64, generator=g),
            "sam_pixel_values": torch.randn(2, 3, 64, 64, generator=g), "region_masks": region,
            "region_batch_index": torch.tensor([1]), "seg_masks": target, "records": ["r0", "r1"]}


def test_to_device_moves_every_tensor_and_casts_only_the_named_floating_inputs(tokenizer):
    batch = _batch(tokenizer)
    moved = to_device(batch, "meta", {"pixel_values": torch.bfloat16, "sam_pixel_values": torch.float16,
                                      "input_ids": torch.bfloat16})
    assert all(v.device.type == "meta" for v in moved.values() if torch.is_tensor(v))
    assert (moved["pixel_values"].dtype, moved["sam_pixel_values"].dtype) == (torch.bfloat16, torch.float16)
    assert moved["input_ids"].dtype == torch.long  # ids stay integers whatever a mapping says
    assert moved["seg_masks"].dtype == torch.float32 and moved["region_masks"].dtype == torch.bool  # targets, masks
    assert moved["records"] is batch["records"]
    x, y = to_device((torch.ones(2), torch.zeros(2, dtype=torch.long)), "meta")  # the toy recipe's tuples
    assert (x.device.type, y.dtype) == ("meta", torch.long)


def test_the_stage_recipe_trains_a_bf16_model_from_a_cpu_fp32_batch(tiny_model: MedPLIB, tokenizer):
    """What a GPU worker sees after DeepSpeed's bf16 cast: the whole model in bf16, the collated batch in fp32.
    Unmoved, SAM's encoder refuses the fp32 pixels; through the recipe, the loss and gradients come out."""
    model = tiny_model.to(torch.bfloat16).train()
    assert model.input_dtypes() == {"pixel_values": torch.bfloat16, "context_pixel_values": torch.bfloat16,
                                    "sam_pixel_values": torch.bfloat16, "example_pixel_values": torch.bfloat16}
    batch = _batch(tokenizer)
    with pytest.raises(RuntimeError, match="BFloat16"):
        model(**batch)
    recipe = StageRecipe({"spec": to_dict(stage_spec("tiny", 3)), "data_dir": "unused", "base": "unused"})
    loss, parts = recipe.loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and {"ce", "bce", "dice_loss"} <= set(parts)
    weight = model.sam.vision_encoder.patch_embed.projection.weight
    assert weight.dtype == torch.bfloat16 and weight.grad is not None and weight.grad.abs().sum() > 0


def test_a_bf16_model_generates_masks(tiny_model: MedPLIB, tokenizer):
    """Evaluation and serving on a GPU run the model in bf16: generate casts SAM's pixels and returns fp32 logits."""
    model = tiny_model.to(torch.bfloat16).eval()
    _force_next_token(model, tokenizer.seg_token_id)
    [result] = model.generate([np.zeros((48, 64), np.uint8)], ["Segment the liver."], max_new_tokens=2)
    assert result.text == "<SEG><SEG>" and len(result.masks) == 2 and result.masks[0].shape == (48, 64)
    assert result.mask_logits[0].dtype == torch.float32


def test_a_gpu_worker_builds_the_stage_model_in_bf16_and_a_cpu_worker_as_saved(tiny_model: MedPLIB, tmp_path):
    """The worker loop names bf16 to the recipe on a GPU (DeepSpeed's dtype there), so the weights are read into bf16,
    stage IV's experts streamed straight into bf16; on the CPU the saved fp32 stays. A bad dtype names the value."""
    from medplib.train.worker import LoopConfig, weights_dtype

    tiny_model.save_pretrained(tmp_path / "saved")
    base = {"spec": to_dict(stage_spec("tiny", 4)), "data_dir": "unused", "base": str(tmp_path / "saved"),
            "grounding": str(tmp_path / "saved")}
    gpu = LoopConfig(recipe="medplib.train.recipe:StageRecipe", recipe_config=base, out_dir="x", use_gpu=True)
    cpu = LoopConfig(recipe="medplib.train.recipe:StageRecipe", recipe_config=base, out_dir="x", use_gpu=False)
    assert weights_dtype(gpu)["dtype"] == "bfloat16" and "dtype" not in weights_dtype(cpu)
    assert weights_dtype(LoopConfig(**{**gpu.__dict__, "recipe_config": {**base, "dtype": "float32"}}))["dtype"] == \
        "float32"  # a recipe config that names its dtype keeps it
    on_gpu = StageRecipe(weights_dtype(gpu)).build_model()
    dtypes = {p.dtype for p in on_gpu.parameters()}
    assert dtypes == {torch.bfloat16}, dtypes
    assert on_gpu.moe_layers(), "stage IV's model is the upcycled MoE"
    assert {p.dtype for p in StageRecipe(weights_dtype(cpu)).build_model().parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="dtype 'int8'"):
        StageRecipe({**base, "dtype": "int8"})
