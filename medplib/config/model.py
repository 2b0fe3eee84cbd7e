"""Model configuration: sub-configs for the vision tower, LLM, SAM grounding path and MoE (REFERENCE §2)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from medplib.config.base import ConfigError

VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@dataclass
class VisionConfig:
    """CLIP vision tower; features from `select_layer` (-2 = second-to-last), CLS dropped."""

    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    select_layer: int = -2
    freeze: bool = False
    weights: Optional[str] = None  # local folder of a CLIPVisionModel checkpoint (full preset)
    # Contrastive image-caption pretraining of a randomly initialised tower on the train split's captions before
    # stage I (medplib/train/vision_pretrain.py): the tiny preset's stand-in for a pre-trained CLIP. 0 = none; a
    # tower loaded from `weights` (or LLaVA's) is pre-trained already and skips it.
    pretrain_epochs: int = 0
    pretrain_batch: int = 128
    pretrain_lr: float = 1e-3
    # each pretraining image moved by a random whole-pixel offset of up to this many pixels each way (edges
    # replicated). The tiny preset moves by 4: on the default data the tower then retrieves the exact caption of
    # held-out images 0.998 of the time instead of 0.78 (each structure's presence 0.999 instead of 0.90), and the
    # whole pipeline answers closed VQA 0.985 on test instead of 0.907 (README, "Where the tiny preset stands")
    pretrain_shift: int = 0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self, prefix: str = "") -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"Config key '{prefix}image_size' = {self.image_size} is not a multiple of "
                              f"'{prefix}patch_size' = {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"Config key '{prefix}hidden_size' = {self.hidden_size} does not divide by "
                              f"'{prefix}num_heads' = {self.num_heads}")
        for key, low in (("pretrain_epochs", 0), ("pretrain_batch", 2), ("pretrain_shift", 0)):
            if getattr(self, key) < low:
                raise ConfigError(f"Config key '{prefix}{key}' = {getattr(self, key)} must be >= {low}")
        if self.pretrain_lr <= 0:
            raise ConfigError(f"Config key '{prefix}pretrain_lr' = {self.pretrain_lr} must be > 0")
        if self.pretrain_shift >= self.image_size // 2:
            raise ConfigError(f"Config key '{prefix}pretrain_shift' = {self.pretrain_shift} must be below half of "
                              f"'{prefix}image_size' = {self.image_size} (pixels an image moves while pretraining)")


@dataclass
class LLMConfig:
    """LLaMA causal LM (LLaVA-1.5 / Vicuna in the full preset)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-5
    # Random init only (loaded weights ignore it). With transformers' 0.02 a tiny model's token embeddings are
    # small beside the projected image features, the <SEG> state barely depends on the question, and the
    # grounding head sat through 400 overfitting steps on "segment every object"; with 0.1 it learns to choose.
    initializer_range: float = 0.1
    vocab_size: int = 2048  # tokenizer size for the tiny preset's locally trained BPE
    weights: Optional[str] = None  # local folder of a LlavaForConditionalGeneration / LlamaForCausalLM checkpoint
    tokenizer: Optional[str] = None  # local tokenizer folder (full preset)

    def validate(self, prefix: str = "") -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"Config key '{prefix}hidden_size' = {self.hidden_size} does not divide by "
                              f"'{prefix}num_heads' = {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"Config key '{prefix}num_kv_heads' = {self.num_kv_heads} must divide "
                              f"'{prefix}num_heads' = {self.num_heads}")


@dataclass
class SamConfig:
    """SAM(-Med2D) image encoder + prompt encoder + mask decoder."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    global_attn_indexes: tuple[int, ...] = (1,)
    window_size: int = 4  # windowed attention in the other blocks (14 in SAM ViT-B)
    hidden_size: int = 64  # prompt encoder / mask decoder width (256 in SAM)
    decoder_mlp_dim: int = 256
    decoder_heads: int = 4
    initializer_range: float = 0.02  # transformers defaults SAM vision to 1e-10, which does not learn
    freeze_image_encoder: bool = False
    weights: Optional[str] = None  # local folder of a SamModel checkpoint (SAM-Med2D converted)
    # SAM-Med2D's adapter beside every image-encoder block's MLP (medplib/model/sam_adapter.py); set by itself when
    # the `weights` folder carries adapter weights
    adapters: bool = False
    # In-context examples given to the mask decoder as well as shown to the LLM: their SAM embeddings pooled under
    # and outside their masks, compared with the query's (medplib/model/examples.py). Off: the decoder reads the
    # `<SEG>` state alone (MedPLIB's; a checkpoint saved without it loads as it was).
    example_prompt: bool = False

    def validate(self, prefix: str = "") -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"Config key '{prefix}image_size' = {self.image_size} is not a multiple of "
                              f"'{prefix}patch_size' = {self.patch_size}")
        if self.hidden_size % 2 or (self.hidden_size // 2) % self.decoder_heads:
            raise ConfigError(f"Config key '{prefix}hidden_size' = {self.hidden_size}: half of it must divide by "
                              f"'{prefix}decoder_heads' = {self.decoder_heads} (SAM's cross-attention downsamples 2x)")
        if self.vision_hidden_size % self.vision_heads:
            raise ConfigError(f"Config key '{prefix}vision_hidden_size' = {self.vision_hidden_size} does not divide "
                              f"by '{prefix}vision_heads' = {self.vision_heads}")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.vision_layers]
        if bad:
            raise ConfigError(f"Config key '{prefix}global_attn_indexes' has {bad[0]}, not a block index below "
                              f"'{prefix}vision_layers' = {self.vision_layers}")


@dataclass
class MoEConfig:
    """Top-1 mixture of FFN experts in every LLM layer; 1 expert = the dense model."""

    num_experts: int = 1
    top_k: int = 1
    capacity_factor_train: float = 1.5
    capacity_factor_eval: float = 2.0
    aux_loss_weight: float = 0.0
    # The chosen expert's output is scaled by a gate of value 1 that passes p's gradient to the router (moe.py);
    # false = scale by p as Switch / DeepSpeed top-1 do.
    straight_through: bool = True

    def validate(self, prefix: str = "") -> None:
        if self.num_experts < 1:
            raise ConfigError(f"Config key '{prefix}num_experts' = {self.num_experts} must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"Config key '{prefix}top_k' = {self.top_k} must be between 1 and num_experts")
        if self.top_k != 1:
            raise ConfigError(f"Config key '{prefix}top_k' = {self.top_k}: only top-1 routing is implemented "
                              "(MedPLIB's choice: inference cost of one expert)")
        for key in ("capacity_factor_train", "capacity_factor_eval"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"Config key '{prefix}{key}' = {getattr(self, key)} must be > 0")


@dataclass
class TISRConfig:
    """TISR's plug-in (REFERENCE §6): textual inversion maps the image to `num_pseudo_words` embeddings in the LLM's
    input space, put before the prompt; self-supervised refinement pulls them toward the answer text's embedding
    with an image–text contrastive loss (weight `refine_weight`, temperature `temperature`) on the samples of
    `refine_tasks` (task names or groups; the reports by default). Off by default; a model that has it keeps it (it
    is saved with the weights)."""

    enabled: bool = False
    num_pseudo_words: int = 4
    refine_weight: float = 0.1
    temperature: float = 0.07
    refine_tasks: tuple[str, ...] = ("reports",)  # task names or groups: the report tasks declare group `reports`
    seed: int = 0  # the plug-in's init when it is attached to a model that was trained without it

    def validate(self, prefix: str = "") -> None:
        if self.num_pseudo_words < 1:
            raise ConfigError(f"Config key '{prefix}num_pseudo_words' = {self.num_pseudo_words} must be >= 1")
        if self.refine_weight < 0:
            raise ConfigError(f"Config key '{prefix}refine_weight' = {self.refine_weight} must be >= 0")
        if self.temperature <= 0:
            raise ConfigError(f"Config key '{prefix}temperature' = {self.temperature} must be > 0")
        from medplib import tasks  # the registry: a task module may add a group

        try:
            tasks.resolve(self.refine_tasks)
        except ValueError as e:
            raise ConfigError(f"Config key '{prefix}refine_tasks' = {list(self.refine_tasks)}: {e}") from None


@dataclass
class ModelConfig:
    """The composed MedPLIB model: CLIP tower, projector, LLaMA (+MoE), region adapter, SAM grounding path."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    tisr: TISRConfig = field(default_factory=TISRConfig)  # the report plug-in (off unless enabled)
    projector: str = "mlp2x_gelu"
    region_max_points: int = 512
    point_prompt_size: int = 41  # side of the square a point prompt becomes, at 336 px
    system_prompt: str = ""  # the one conversation template's system line (Vicuna's in the full preset)
    # Which hidden state the grounding head reads: "emitting", the one whose LM head predicts <SEG> (LISA and MedPLIB,
    # so their released heads fit: the full preset), or "token", the state at the <SEG> token itself. The tiny LM (2
    # layers, width 64) grounds far better from its own <SEG> position: the whole pipeline gave validation grounding
    # mDice 0.840 reading "token" and 0.590 reading "emitting" (2026-12-03), whose state must also predict <SEG>.
    seg_state: str = "token"

    def validate(self, prefix: str = "") -> None:
        if self.seg_state not in ("emitting", "token"):
            raise ConfigError(f"Config key '{prefix}seg_state' = {self.seg_state!r} is not 'emitting' or 'token'")
        if self.projector not in ("linear", "mlp2x_gelu"):
            raise ConfigError(f"Config key '{prefix}projector' = {self.projector!r} is not 'linear' or 'mlp2x_gelu'")
        if self.region_max_points < 1:
            raise ConfigError(f"Config key '{prefix}region_max_points' = {self.region_max_points} must be >= 1")
        if self.point_prompt_size < 1:
            raise ConfigError(f"Config key '{prefix}point_prompt_size' = {self.point_prompt_size} must be >= 1")

    def require_weights(self, prefix: str = "model.") -> None:
        """The full preset loads CLIP, LLaVA and SAM(-Med2D) from local folders and never random-initialises them: a
        ConfigError names every weight key left unset."""
        missing = [f"{prefix}{part}.weights" for part in ("vision", "llm", "sam") if not getattr(self, part).weights]
        if missing:
            raise ConfigError(f"The full preset needs local weight folders (no download is possible, and a randomly "
                              f"initialised 7B model is of no use): set {', '.join(missing)} in a --config file "
                              "(README: Configuration and state, Presets)")

    @classmethod
    def tiny(cls) -> "ModelConfig":
        # the tower is pretrained contrastively on the captions, each image moved by up to 4 pixels each time it is
        # drawn, then frozen as MedPLIB freezes its CLIP (120 passes over the default data's 1,030 training captions:
        # 966 steps of 128, 94 s on 2 cores)
        # in-context examples prompt the mask decoder too (medplib/model/examples.py; README, "In-context training,
        # measured")
        return cls(vision=VisionConfig(freeze=True, pretrain_epochs=120, pretrain_shift=4),
                   sam=SamConfig(example_prompt=True))

    @classmethod
    def full(cls) -> "ModelConfig":
        return cls(
            vision=VisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                num_layers=24, num_heads=16, freeze=True),
            llm=LLMConfig(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                          max_position_embeddings=4096, vocab_size=32000, initializer_range=0.02),
            sam=SamConfig(image_size=256, patch_size=16, vision_hidden_size=768, vision_layers=12, vision_heads=12,
                          global_attn_indexes=(2, 5, 8, 11), hidden_size=256, decoder_mlp_dim=2048, decoder_heads=8,
                          window_size=14, freeze_image_encoder=True),
            system_prompt=VICUNA_SYSTEM, seg_state="emitting",
        )
