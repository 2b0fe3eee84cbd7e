"""The MedPLIB stage recipe the Ray worker loop runs: which model a stage starts from, what trains, its data."""
from __future__ import annotations

from pathlib import Path

import torch

from medplib.config import from_dict
from medplib.config.model import TISRConfig
from medplib.device import model_device, to_device
from medplib.tasks import resolve
from medplib.data.torch_dataset import MedDataset, collate as collate_samples
from medplib.model import LossWeights, MedPLIB
from medplib.train.lora import apply_lora, merge_lora, set_trainable
from medplib.config.stages import StageSpec


def build_stage_model(spec: StageSpec, base: Path, grounding: Path | None = None,
                      tisr: TISRConfig | None = None, dtype: torch.dtype | None = None,
                      example_prompt: bool = False) -> MedPLIB:
    """Stage I–III: the previous stage's folder (LoRA already merged). Stage IV: MedPLIB's upcycling, expert 0 =
    the grounding model's FFNs (stage III), expert 1 = the VL model's (stage II), grounding path from stage III,
    streamed from stage III's file (its model is never built). `tisr` enabled (the config's `model.tisr`) and a base
    without TISR's plug-in: the plug-in is attached; so is the example prompt with `example_prompt` (the config's
    `model.sam.example_prompt`). `dtype`: the weights' dtype in memory (bf16 on a GPU)."""
    model = MedPLIB.from_pretrained(base, dtype)
    if tisr is not None and tisr.enabled and model.tisr is None:
        model.attach_tisr(tisr)
    if example_prompt and model.example_prompt is None:
        model.attach_example_prompt()
    if spec.stage == 4:
        if grounding is None:
            raise ValueError("Stage 4 needs the grounding expert (stage 3 output) as well as stage 2's model")
        model.upcycle_from_saved(grounding)
    if spec.lora is not None:
        apply_lora(model.llm, spec.lora)
    set_trainable(model, spec.train)
    if spec.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable()
    return model


def _dtype(name: str | None) -> torch.dtype | None:
    """"bfloat16" → torch.bfloat16; None stays None (the saved weights' dtype)."""
    if name is None:
        return None
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"recipe config dtype {name!r}: not a floating-point torch dtype (e.g. bfloat16, float32)")
    return dtype


class StageRecipe:
    """config: {"spec": StageSpec as dict, "data_dir": str, "base": str, "grounding": str | None, "dtype": the
    weights' dtype in memory, e.g. "bfloat16" (what the worker loop sets on a GPU: see `worker.weights_dtype`)}."""

    def __init__(self, config: dict):
        self.spec = from_dict(StageSpec, config["spec"])
        self.data_dir = Path(config["data_dir"])
        self.base = Path(config["base"])
        self.grounding = Path(config["grounding"]) if config.get("grounding") else None
        tisr = (config.get("model") or {}).get("tisr")
        self.tisr = from_dict(TISRConfig, tisr, "model.tisr.") if tisr else None
        self.example_prompt = bool(((config.get("model") or {}).get("sam") or {}).get("example_prompt"))
        self.dtype = _dtype(config.get("dtype"))
        self.model: MedPLIB | None = None

    def build_model(self) -> MedPLIB:
        self.model = build_stage_model(self.spec, self.base, self.grounding, self.tisr, self.dtype,
                                       self.example_prompt)
        return self.model

    def train_dataset(self) -> MedDataset:
        if self.model is None:
            raise RuntimeError("build_model() first: the dataset uses the model's tokenizer")
        cfg = self.model.config
        pseudo_words = cfg.tisr.num_pseudo_words if self.model.tisr is not None else 0  # TISR's, before the prompt
        ds = MedDataset(self.data_dir, self.model.tokenizer, cfg.vision.image_size, cfg.sam.image_size,
                        split="train", tasks=self.spec.tasks, max_len=self.spec.max_len - pseudo_words,
                        seed=self.spec.seed)
        if len(ds) == 0:
            raise ValueError(f"Stage {self.spec.stage} ({self.spec.name}) has no train records of tasks "
                             f"{list(self.spec.tasks)} ({', '.join(resolve(self.spec.tasks))}) in {self.data_dir}")
        return ds

    def collate(self, items: list) -> dict:
        return collate_samples(items, self.model.tokenizer.pad_token_id)

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        module = getattr(engine, "module", engine)  # a DeepSpeed engine, or the plain model (benchmarks)
        # the collated batch is on the CPU in fp32: onto the engine's GPU, pixels in the dtypes of their encoders
        batch = to_device(batch, model_device(engine), module.input_dtypes())
        out = engine(**batch, loss_weights=LossWeights(**vars(self.spec.loss)))
        # A batch without <region> or <SEG> leaves the region adapter or mask decoder without gradients; ZeRO's
        # gradient buckets must hold the same parameters on every rank, so give every trainable one a (zero) grad.
        anchor = sum(p.view(-1)[0] for p in module.parameters() if p.requires_grad)
        loss = out.loss + 0.0 * anchor
        parts = {"ce": float(out.ce_loss.detach())}
        if out.mask_bce is not None:
            parts |= {"bce": float(out.mask_bce.detach()), "dice_loss": float(out.mask_dice.detach()),
                      "focal": float(out.mask_focal.detach())}
        if out.tisr_loss is not None:
            parts["tisr"] = float(out.tisr_loss.detach())
        if out.moe_drop_rate is not None:
            parts["moe_drop_rate"] = float(out.moe_drop_rate)
        return loss, parts

    def save(self, module: MedPLIB, out_dir: Path) -> None:
        merge_lora(module)
        module.llm.gradient_checkpointing_disable()
        for p in module.parameters():
            p.requires_grad = True
            p.data = p.data.clone()  # DeepSpeed leaves params as views of flat buffers; safetensors refuses those
        module.save_pretrained(out_dir)
