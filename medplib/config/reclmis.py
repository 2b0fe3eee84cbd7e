"""RecLMIS's configuration (REFERENCE §6): the model (U-Net image branch, frozen text encoder, conditioned interaction,
masked mutual reconstruction, loss weights) and its two stages, as data.

It lives in the config under `families.reclmis` (YAML: `families: {reclmis: {model: {...}, train: {stage2: {...}}}}`),
over the preset's defaults below; `medplib config show --model reclmis` prints the resolved values.

`tiny`: 64 px, a 4-level U-Net of width 8-64 (8×8 bottleneck patches) and a 2-layer CLIP-style text transformer
(hidden 64) over a BPE trained on the notes; stage 1 trains that text encoder on the notes (next-token prediction),
stage 2 segments with it frozen.
`full`: 224 px (LViT's and RecLMIS's size), a U-Net of width 64-512 and the frozen CLIP text encoder (ViT-B's, hidden
512) with its tokenizer from the local folder `model.text.weights`; stage 1 is not needed there (train `--stages 2`,
which then starts from the model built from the config).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from medplib.config.base import ConfigError
from medplib.config.stages import LossSpec, StageSpec

TASKS = ("textseg",)  # what RecLMIS reads and is evaluated on: a note → a mask


@dataclass
class TextEncoderConfig:
    """A CLIP text transformer: random init and trained in stage 1 (tiny), or loaded from `weights` (full)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_length: int = 48  # tokens of a note (CLIP's own limit is 77)
    vocab_size: int = 512  # the BPE trained on the notes (tiny)
    weights: Optional[str] = None  # local folder of a CLIPTextModel or CLIPModel checkpoint with its tokenizer

    def validate(self, prefix: str = "") -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"Config key '{prefix}hidden_size' = {self.hidden_size} does not divide by "
                              f"'{prefix}num_heads' = {self.num_heads}")
        if self.max_length < 4:
            raise ConfigError(f"Config key '{prefix}max_length' = {self.max_length} must be >= 4")


@dataclass
class RecLMISLossWeights:
    """RecLMIS's weights: segmentation 5, contrastive 0.2, text reconstruction 1, image reconstruction 1."""

    seg: float = 5.0
    contrastive: float = 0.2
    text_rec: float = 1.0
    image_rec: float = 1.0

    def validate(self, prefix: str = "") -> None:
        for key in ("seg", "contrastive", "text_rec", "image_rec"):
            if getattr(self, key) < 0:
                raise ConfigError(f"Config key '{prefix}{key}' = {getattr(self, key)} must be >= 0")


@dataclass
class RecLMISConfig:
    image_size: int = 64
    channels: tuple[int, ...] = (8, 16, 32, 64)  # U-Net widths, one level each; the last is the bottleneck
    interaction_dim: int = 64  # width of the conditioned interaction (patches and words)
    interaction_heads: int = 4
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    mask_ratio: float = 0.3  # share of patches / words masked for the mutual reconstruction
    reconstruction: bool = True  # false: no reconstruction heads, no reconstruction losses (the paper's ablation)
    temperature: float = 0.07  # of the contrastive alignment
    loss: RecLMISLossWeights = field(default_factory=RecLMISLossWeights)

    @property
    def grid(self) -> int:
        """Side of the bottleneck's patch grid."""
        return self.image_size // 2 ** (len(self.channels) - 1)

    def validate(self, prefix: str = "") -> None:
        if len(self.channels) < 2:
            raise ConfigError(f"Config key '{prefix}channels' = {list(self.channels)} needs at least 2 levels")
        if self.image_size % 2 ** (len(self.channels) - 1):
            raise ConfigError(f"Config key '{prefix}image_size' = {self.image_size} must divide by "
                              f"{2 ** (len(self.channels) - 1)} ({len(self.channels)} U-Net levels)")
        if self.interaction_dim % self.interaction_heads:
            raise ConfigError(f"Config key '{prefix}interaction_dim' = {self.interaction_dim} does not divide by "
                              f"'{prefix}interaction_heads' = {self.interaction_heads}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"Config key '{prefix}mask_ratio' = {self.mask_ratio} must be in (0, 1)")
        if self.temperature <= 0:
            raise ConfigError(f"Config key '{prefix}temperature' = {self.temperature} must be > 0")

    @classmethod
    def tiny(cls) -> "RecLMISConfig":
        return cls()

    @classmethod
    def full(cls) -> "RecLMISConfig":
        return cls(image_size=224, channels=(64, 128, 256, 512), interaction_dim=512, interaction_heads=8,
                   text=TextEncoderConfig(hidden_size=512, intermediate_size=2048, num_layers=12, num_heads=8,
                                          max_length=77, vocab_size=49408))


TEXT_ENCODER = ("text_encoder.*",)
SEGMENTER = ("image_encoder.*", "text_proj.*", "interaction.*", "decoder.*", "head.*", "image_rec.*", "text_rec.*",
             "contrast.*", "film.*")


def tiny_stages() -> dict[int, StageSpec]:
    """Stage 1 trains the text encoder on the notes alone (a few hundred steps; the notes are short and formulaic);
    stage 2 trains everything else with the text encoder frozen. AdamW 1e-3, 5% warm-up then linear decay."""
    cpu = dict(micro_batch=16, grad_accum=1, max_len=48, warmup_ratio=0.05, checkpoint_every=100, loss=LossSpec())
    return {1: StageSpec(1, "text_pretrain", tasks=TASKS, train=TEXT_ENCODER, lr=1e-3, epochs=2, **cpu),
            2: StageSpec(2, "segmentation", tasks=TASKS, train=SEGMENTER, lr=1e-3, epochs=10, **cpu)}


def full_stages() -> dict[int, StageSpec]:
    """RecLMIS's setting on LViT data: Adam 3e-4 (as LViT), batch 16 (4 GPUs × 4), frozen CLIP text encoder."""
    gpu = dict(micro_batch=4, grad_accum=1, max_len=77, loss=LossSpec())
    return {1: StageSpec(1, "text_pretrain", tasks=TASKS, train=TEXT_ENCODER, lr=1e-4, epochs=1, **gpu),
            2: StageSpec(2, "segmentation", tasks=TASKS, train=SEGMENTER, lr=3e-4, epochs=100, **gpu)}


@dataclass
class RecLMISTrain:
    stage1: StageSpec = field(default_factory=lambda: tiny_stages()[1])
    stage2: StageSpec = field(default_factory=lambda: tiny_stages()[2])

    def stages(self) -> dict[int, StageSpec]:
        return {1: self.stage1, 2: self.stage2}

    def validate(self, prefix: str = "") -> None:
        for n, spec in self.stages().items():
            if spec.stage != n:
                raise ConfigError(f"Config key '{prefix}stage{n}.stage' = {spec.stage} must be {n}")


@dataclass
class RecLMISSettings:
    """`families.reclmis` of the config: the model and its stage plan."""

    model: RecLMISConfig = field(default_factory=RecLMISConfig.tiny)
    train: RecLMISTrain = field(default_factory=RecLMISTrain)

    @classmethod
    def preset(cls, name: str) -> "RecLMISSettings":
        if name == "full":
            stages = full_stages()
            return cls(model=RecLMISConfig.full(), train=RecLMISTrain(stages[1], stages[2]))
        return cls()
