"""MedPLIB's four training stages as data (REFERENCE §3): what each starts from, trains, reads and optimises.

They are part of the config (`train.stage1` … `train.stage4`), so a YAML file overrides any stage key
(`train: {stage3: {lr: 0.0005}}`) and the lineage digest covers them.

`full` keeps MedPLIB's values. `tiny` scales epochs and batches to CPU minutes and differs where a randomly
initialised model must: there is no pre-trained CLIP / LLaMA / LLaVA / SAM, so the vision tower is pretrained
contrastively on the captions before stage I and then frozen (`model.vision.pretrain_epochs`; it stands in for
CLIP), stage I trains the projector and the LLM on captions and the VQA text (for Vicuna and LLaVA-1.5 training),
and the SAM image encoder trains in stage III. Tiny stage III leaves the focal term at 0: its measured numbers
(below and in the README) predate the term.
Bugs of the public code are not copied: the region adapter trains in stage II, booleans are real booleans.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from medplib.config.base import ConfigError, merge

LLM_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FFN = ("gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = FFN

    def validate(self, prefix: str = "") -> None:
        if self.r < 1 or self.alpha < 1:
            raise ConfigError(f"Config key '{prefix}r' / '{prefix}alpha' = {self.r} / {self.alpha} must be >= 1")
        bad = [t for t in self.targets if t not in LLM_ALL]
        if bad:
            raise ConfigError(f"Config key '{prefix}targets' has {bad[0]!r}; LoRA targets are {list(LLM_ALL)}")


@dataclass
class LossSpec:
    """Weights of the loss terms (medplib.model.LossWeights): answer tokens, mask BCE, soft Dice, sigmoid focal."""

    ce: float = 1.0
    bce: float = 1.0
    dice: float = 1.0
    focal: float = 0.0  # on the mask logits, alpha 0.25, gamma 2 (MedPLIB's stage III: 1)

    def validate(self, prefix: str = "") -> None:
        for key, weight in vars(self).items():
            if weight < 0:
                raise ConfigError(f"Config key '{prefix}{key}' = {weight} must be >= 0 (a loss weight)")


@dataclass
class StageSpec:
    stage: int
    name: str
    tasks: tuple[str, ...]  # the data mix: task groups (vl, grounding, caption, …) or task names, train split
    train: tuple[str, ...]  # parameter-name patterns trained fully (fnmatch on MedPLIB.named_parameters())
    lora: Optional[LoraSpec] = None
    loss: LossSpec = field(default_factory=LossSpec)
    lr: float = 1e-4
    epochs: int = 1
    # positions the LLM sees a sample: text tokens with <image> expanded to its patches (as LLaVA's model_max_length
    # after expansion), plus TISR's pseudo-words; a longer conversation loses context, never an answer (encode_within)
    max_len: int = 2048
    warmup_ratio: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch: int = 4
    grad_accum: int = 8
    zero_stage: int = 2
    gradient_checkpointing: bool = False
    seed: int = 42
    checkpoint_every: int = 100
    max_steps: int = 0  # a cap on optimiser steps (smoke runs, tests); 0 = the epochs decide

    def validate(self, prefix: str = "") -> None:
        if self.stage not in (1, 2, 3, 4):
            raise ConfigError(f"Config key '{prefix}stage' = {self.stage} must be 1, 2, 3 or 4")
        if self.lr <= 0 or self.epochs < 1:
            raise ConfigError(f"Config key '{prefix}lr' / '{prefix}epochs' = {self.lr} / {self.epochs} must be > 0")
        if self.max_len < 1:
            raise ConfigError(f"Config key '{prefix}max_len' = {self.max_len} must be >= 1 (positions a sample)")
        if self.max_steps < 0:
            raise ConfigError(f"Config key '{prefix}max_steps' = {self.max_steps} must be >= 0 (0 = no cap)")
        if not self.train and self.lora is None:
            raise ConfigError(f"Stage {self.stage} trains nothing: set '{prefix}train' or '{prefix}lora'")
        from medplib import tasks  # the registry: a task module may add a group

        try:
            tasks.resolve(self.tasks)
        except ValueError as e:
            raise ConfigError(f"Config key '{prefix}tasks' = {list(self.tasks)}: {e}") from None


NORMS = "llm.*norm*"
EMBED = ("llm.model.embed_tokens.*", "llm.lm_head.*")
GROUNDING = ("sam.mask_decoder.*", "text_hidden_fcs.*", "example_prompt.*")  # the last: with model.sam.example_prompt
TISR = "tisr.*"  # TISR's plug-in, when the model has it (config model.tisr): trains with the VL data


def full_stages() -> dict[int, StageSpec]:
    """MedPLIB's values: 4 GPUs, effective batch 128 (4 × micro 4 × accumulation 8), bf16, ZeRO-2."""
    return {
        1: StageSpec(1, "align", tasks=("alignment",), train=("projector.*",), lr=1e-3, epochs=1, max_len=2048),
        2: StageSpec(2, "vl_expert", tasks=("vl",),
                     train=("projector.*", "region_encoder.*", NORMS, *EMBED, TISR),
                     lora=LoraSpec(16, 32, 0.05, LLM_ALL),
                     lr=1e-4, epochs=3, max_len=2048, gradient_checkpointing=True),
        3: StageSpec(3, "grounding_expert", tasks=("pixel",), train=GROUNDING, lora=LoraSpec(8, 16, 0.05, FFN),
                     loss=LossSpec(ce=1.0, bce=1.0, dice=5.0, focal=1.0), lr=3e-4, epochs=10, max_len=2048,
                     gradient_checkpointing=True),
        4: StageSpec(4, "moe", tasks=("vl", "pixel"),
                     train=("*.router.*", *EMBED, *GROUNDING, "region_encoder.*", TISR),
                     lora=LoraSpec(8, 16, 0.05, ("gate_proj", "up_proj", "down_proj", "q_proj", "v_proj")),
                     loss=LossSpec(ce=1.0, bce=2.0, dice=0.5), lr=3e-4, epochs=3, max_len=1024,
                     gradient_checkpointing=True),
    }


def tiny_stages() -> dict[int, StageSpec]:
    """CPU minutes on the synthetic dataset; the same stages with full-size steps scaled down.

    Steps are spent where the tiny model learns slowest (measured in-process, single thread, batch 16): stage II's
    closed VQA goes 0.63 → 0.79 from 300 to 2000 steps. Stage III's grounding needs many images more than many
    epochs: 1600 steps reach Dice 0.66 on 480 synthetic images (36 epochs; the mask decoder segments every
    structure instead of the named one) and 0.87 on 1920 images (10 epochs), so the tiny preset's dataset has
    1920 images and stages I, II and IV run about as many steps as they did on 480, in fewer epochs. Stage III
    counts optimiser steps more than samples: through Ray with 2 workers, 830 steps of 32 reach Dice 0.69 and
    2300 steps of 16 (micro-batch 8 per worker, 14 epochs) 0.86, in 223 s.
    The vision tower is pretrained (contrastive, on the captions) and frozen, not trained in stages I and II through
    the LM loss, which taught it the modality but not which structures an image shows. Measured on the default data
    through the whole pipeline (validation/test, 718766e → with the pretrained tower): closed VQA 0.55/0.56 →
    0.67/0.66, region recall 0.93/0.95 → 0.96/0.97, Med-GRIT RO accuracy 0.85/0.88 → 0.97/0.96, grounding mDice
    0.82/0.82 → 0.88/0.90, zero-shot 0.27 → 0.37. Stage II then learns presence slowly: 12 epochs instead of 4 (3696
    steps of 32, 421 s) took closed VQA to 0.92/0.90 and open-VQA F1 0.84 → 0.89, at a cost to visual grounding
    (VG recall 0.84/0.78 → 0.74/0.70) and zero-shot grounding (0.37 → 0.32). On the data whose every structure can be
    seen (the MR ventricle and ultrasound cyst made visible), 12 epochs gave closed VQA 0.79/0.75 and 20 epochs (6140
    steps, 567 s) 0.91/0.90, grounding 0.90/0.90 → 0.88/0.88: closed VQA after stage II is not stable against the
    data at 12 epochs (README, "Where the tiny preset stands"). Stage IV, whose router starts untrained, took closed VQA
    from stage II's 0.93/0.93 to 0.91/0.90 in 1 epoch; in 2 (870 steps, ~50 s more) 0.92/0.91, and grounding
    0.88/0.88 → 0.93/0.92, zero-shot 0.36 → 0.47 (stage IV retrained from the same stage II and III; at lr 3e-4 instead
    of 1e-3 grounding fell to 0.71/0.67: the router needs the steps). With the tower pretrained on shifted images
    (`model.vision.pretrain_shift: 4`, the tiny default) the same stages give closed VQA 1.00/0.99 after stage II and
    1.00/0.98 after stage IV, grounding 0.87/0.86. Stages III and IV train on in-context records too (group
    `incontext`), which the tiny model's example prompt (`model.sam.example_prompt`) reads: held-out Dice then rises
    from K = 0 to K >= 1 examples (README, "In-context training, measured"); `full` keeps MedPLIB's mixes.
    """
    cpu = dict(micro_batch=16, grad_accum=1, max_len=512, warmup_ratio=0.05, checkpoint_every=50)
    return {
        1: StageSpec(1, "align", tasks=("alignment", "vqa"),
                     train=("projector.*", "llm.*", TISR), lr=2e-3, epochs=1, **cpu),
        2: StageSpec(2, "vl_expert", tasks=("vl",),
                     train=("projector.*", "region_encoder.*", NORMS, *EMBED, TISR),
                     lora=LoraSpec(16, 32, 0.0, LLM_ALL), lr=2e-3, epochs=20, **cpu),
        3: StageSpec(3, "grounding_expert", tasks=("pixel", "incontext"), train=(*GROUNDING, "sam.*"),
                     lora=LoraSpec(8, 16, 0.0, FFN), loss=LossSpec(ce=1.0, bce=1.0, dice=5.0), lr=1e-3, epochs=14,
                     **{**cpu, "micro_batch": 8}),
        4: StageSpec(4, "moe", tasks=("vl", "pixel", "incontext"),
                     train=("*.router.*", *EMBED, *GROUNDING, "region_encoder.*", TISR),
                     lora=LoraSpec(8, 16, 0.0, ("gate_proj", "up_proj", "down_proj", "q_proj", "v_proj")),
                     loss=LossSpec(ce=1.0, bce=2.0, dice=0.5), lr=1e-3, epochs=2, **cpu),
    }


@dataclass
class TrainConfig:
    """The stage plan: one StageSpec per stage, keyed `stage<N>` as in YAML."""
    stage1: StageSpec = field(default_factory=lambda: tiny_stages()[1])
    stage2: StageSpec = field(default_factory=lambda: tiny_stages()[2])
    stage3: StageSpec = field(default_factory=lambda: tiny_stages()[3])
    stage4: StageSpec = field(default_factory=lambda: tiny_stages()[4])

    @classmethod
    def of(cls, specs: dict[int, StageSpec]) -> "TrainConfig":
        return cls(**{f"stage{n}": spec for n, spec in specs.items()})

    def stages(self) -> dict[int, StageSpec]:
        return {n: getattr(self, f"stage{n}") for n in STAGES}

    def validate(self, prefix: str = "") -> None:
        for n, spec in self.stages().items():
            if spec.stage != n:
                raise ConfigError(f"Config key '{prefix}stage{n}.stage' = {spec.stage} must be {n}")


STAGES = (1, 2, 3, 4)


def stage_overrides_config(overrides: dict[int, dict] | None) -> dict:
    """Per-stage overrides ({3: {"lr": 5e-4}}) as the config mapping they stand for ({"train": {"stage3": …}})."""
    return {"train": {f"stage{n}": dict(keys) for n, keys in (overrides or {}).items()}} if overrides else {}


def stage_spec(cfg, stage: int, overrides: dict | None = None) -> StageSpec:
    """Stage `stage` of the config `cfg` (a Config, or a preset name), with optional overrides validated key by key."""
    if isinstance(cfg, str):
        from medplib.config.presets import load_config

        cfg = load_config(cfg)
    if stage not in STAGES:
        raise ConfigError(f"Stage {stage} does not exist; MedPLIB has stages 1 (align), 2 (VL expert), "
                          "3 (grounding expert) and 4 (MoE)")
    return merge(getattr(cfg.train, f"stage{stage}"), overrides or {}, prefix=f"train.stage{stage}.")
