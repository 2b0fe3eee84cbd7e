"""RecLMIS's stages: the driver's plan (what each stage starts from) and the Ray worker recipe.

Stage 1 (`text_pretrain`) starts from a new model (tiny: a BPE trained on the train notes and a random text encoder)
and trains the text encoder alone on the notes, by next-token prediction. Stage 2 (`segmentation`) starts from
stage 1's folder, freezes the text encoder and trains the rest with RecLMIS's loss. The full preset's CLIP text
encoder needs no stage 1: stage 2 alone starts from the model built from the config.
The model's training options (loss weights, mask ratio, temperature, the reconstruction switch) are applied from the
config as resolved for the stage, so a YAML change reaches stage 2 without rebuilding stage 1.
"""
from __future__ import annotations

from pathlib import Path

import torch

from medplib.config import RunContext, family_settings, from_dict
from medplib.config.reclmis import RecLMISConfig
from medplib.config.stages import StageSpec
from medplib.device import model_device, to_device
from medplib.data.torch_dataset import SegmentationDataset, read_records, strip_paths
from medplib.model.reclmis import IMAGE_MEAN, IMAGE_STD, RecLMIS, note_of
from medplib.tasks import resolve
from medplib.train.lora import set_trainable
from medplib.train.runner import stage_dir

OBJECTIVES = {1: "text", 2: "segment"}


def train_notes(data_dir: Path, tasks: tuple[str, ...]) -> list[str]:
    """The notes of the train split's records of `tasks` (what the tiny tokenizer is trained on)."""
    chosen = resolve(tasks)
    return [note_of(next(t["value"] for t in strip_paths(r.conversations)[0] if t["from"] == "human"))
            for r in read_records(data_dir) if r.split == "train" and r.task in chosen]


class RecLMISPlan:
    """Stage 1 from a new model (built here, under `init`), stage 2 from stage 1 (or, with CLIP's text encoder from
    the config, from a new model when stage 1 was not run)."""

    def prepare(self, stage: int, spec: StageSpec, ctx: RunContext, base: Path | None,
                workspace: str | None) -> dict[str, str | None]:
        model_cfg: RecLMISConfig = family_settings(ctx.cfg, ctx.family).model
        no_stage1 = not (stage_dir(ctx.home, 1, workspace) / "config.json").exists()
        if base is not None:
            start = Path(base)
        elif stage == 1 or (model_cfg.text.weights and no_stage1):
            start = stage_dir(ctx.home, "init", workspace)
            notes = None if model_cfg.text.weights else train_notes(ctx.data_dir, spec.tasks)
            if notes is not None and not notes:
                raise ValueError(f"No train records of tasks {list(spec.tasks)} in {ctx.data_dir}: RecLMIS trains on "
                                 "notes with masks (ingest a source with text-guided segmentation, e.g. lvit:DIR)")
            torch.manual_seed(spec.seed)
            RecLMIS.build(model_cfg, notes).save_pretrained(start)
        else:
            start = stage_dir(ctx.home, stage - 1, workspace)
        if not (start / "config.json").exists():
            raise FileNotFoundError(f"Stage {stage} starts from {start}, which holds no saved model: run the earlier "
                                    f"stage first (medplib train --model reclmis --stage {stage - 1})")
        return {"base": str(start)}

    def skip(self, stage: int, spec: StageSpec, ctx: RunContext, base: Path | None,
             workspace: str | None) -> str | None:
        """RecLMIS trains every stage it is asked for (a stage without records fails in its recipe, naming them)."""
        return None


class RecLMISRecipe:
    """config: {"spec": StageSpec as dict, "data_dir": str, "base": str, "model": RecLMISConfig as dict}."""

    def __init__(self, config: dict):
        self.spec = from_dict(StageSpec, config["spec"])
        self.data_dir, self.base = Path(config["data_dir"]), Path(config["base"])
        self.options = from_dict(RecLMISConfig, config["model"]) if config.get("model") else None
        if self.spec.stage not in OBJECTIVES:
            raise ValueError(f"RecLMIS has stages {sorted(OBJECTIVES)}, not {self.spec.stage}")
        self.objective = OBJECTIVES[self.spec.stage]
        self.model: RecLMIS | None = None

    def build_model(self) -> RecLMIS:
        model = RecLMIS.from_pretrained(self.base)
        if self.options is not None:
            model.configure_training(self.options)
        set_trainable(model, self.spec.train)
        self.model = model.train()
        return model

    def train_dataset(self) -> SegmentationDataset:
        if self.model is None:
            raise RuntimeError("build_model() first: the dataset uses the model's image size")
        ds = SegmentationDataset(self.data_dir, self.model.config.image_size, IMAGE_MEAN, IMAGE_STD, split="train",
                                 tasks=self.spec.tasks)
        if len(ds) == 0:
            raise ValueError(f"Stage {self.spec.stage} ({self.spec.name}) has no train records of tasks "
                             f"{list(self.spec.tasks)} in {self.data_dir}")
        return ds

    def collate(self, items: list) -> dict:
        ids, attn = self.model.encode_notes([note_of(s.question) for s in items])
        return {"pixel_values": torch.stack([s.pixel_values for s in items]), "input_ids": ids,
                "attention_mask": attn, "masks": torch.stack([s.mask for s in items])}

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        module = getattr(engine, "module", engine)
        out = engine(**to_device(batch, model_device(engine), module.input_dtypes()), objective=self.objective)
        # ZeRO's gradient buckets must hold the same parameters on every rank: give every trainable one a (zero)
        # grad, whatever this batch left unused
        anchor = sum(p.view(-1)[0] for p in module.parameters() if p.requires_grad)
        return out.loss + 0.0 * anchor, out.parts()

    def save(self, module: RecLMIS, out_dir: Path) -> None:
        for p in module.parameters():
            p.requires_grad = True
            p.data = p.data.clone()  # DeepSpeed leaves params as views of flat buffers; safetensors refuses those
        module.save_pretrained(out_dir)
