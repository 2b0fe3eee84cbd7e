"""The MedPLIB model, composed from transformers parts (REFERENCE §2), read top to bottom:

CLIP vision tower → `mlp2x_gelu` projector → image features scattered into the LLaMA input at `<image>`;
pixel prompts → patch-grid pooling → region adapter → one embedding per `<region>`;
LLaMA (every MLP optionally a top-1 MoE) → answer tokens; a `<SEG>`'s last hidden state (`seg_state`: the one that
emits it, as LISA / MedPLIB read it, or the one at it) → `text_hidden_fcs` → SAM sparse prompt → SAM mask decoder
(single mask) on the SAM image encoder's embedding; with `model.sam.example_prompt`, in-context examples prompt the
mask decoder too (medplib/model/examples.py).
Optional: TISR's plug-in (`model.tisr`, medplib/model/tisr.py) puts pseudo-words from the image before the prompt.
"""
from __future__ import annotations

import collections
import copy
import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_model
from transformers import (
    CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, SamConfig as HFSamConfig, SamMaskDecoderConfig,
    SamModel, SamPromptEncoderConfig, SamVisionConfig,
)
from transformers.initialization import no_init_weights

from medplib.config.base import from_dict, to_dict
from medplib.config.model import ModelConfig, TISRConfig
from medplib.data.torch_dataset import (
    CLIP_MEAN, CLIP_STD, SAM_MEAN, SAM_STD, example_tensors, preprocess_image, preprocess_mask, unsquare,
)
from medplib.model.examples import ExamplePrompt
from medplib.model.losses import (
    IGNORE_INDEX, LossWeights, answer_cross_entropy, mask_bce, sigmoid_focal_loss, soft_dice_loss,
)
from medplib.model.moe import MoEFeedForward, upcycle
from medplib.model.prompts import PromptError, freeform_prompt_mask
from medplib.model.tisr import TextualInversion, prepend, refine_rows, refinement_loss, text_embedding
from medplib.model.sam_adapter import attach_adapters
from medplib.model.tokenizer import IMAGE_TOKEN, REGION_TOKEN, MedTokenizer

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR = "config.json", "model.safetensors", "tokenizer"
log = logging.getLogger(__name__)
CHECKSUMS_FILE = "checksums.json"  # SHA-256 of the config and weights, checked before a load uses them


# --- transformers configs from ours ------------------------------------------------------------------------------
def clip_vision_config(cfg: ModelConfig) -> CLIPVisionConfig:
    v = cfg.vision
    return CLIPVisionConfig(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
                            intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
                            num_attention_heads=v.num_heads, hidden_act="quick_gelu", attn_implementation="sdpa")


def llama_config(cfg: ModelConfig, vocab_size: int) -> LlamaConfig:
    m = cfg.llm
    return LlamaConfig(vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                       num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                       num_key_value_heads=m.num_kv_heads, max_position_embeddings=m.max_position_embeddings,
                       rms_norm_eps=m.rms_norm_eps, initializer_range=m.initializer_range,
                       tie_word_embeddings=False, attn_implementation="sdpa")


def sam_config(cfg: ModelConfig) -> HFSamConfig:
    s = cfg.sam
    vision = SamVisionConfig(hidden_size=s.vision_hidden_size, output_channels=s.hidden_size,
                             num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
                             image_size=s.image_size, patch_size=s.patch_size, window_size=s.window_size,
                             global_attn_indexes=list(s.global_attn_indexes), num_pos_feats=s.hidden_size // 2,
                             initializer_range=s.initializer_range)
    prompt = SamPromptEncoderConfig(hidden_size=s.hidden_size, image_size=s.image_size, patch_size=s.patch_size)
    decoder = SamMaskDecoderConfig(hidden_size=s.hidden_size, mlp_dim=s.decoder_mlp_dim,
                                   num_attention_heads=s.decoder_heads, iou_head_hidden_dim=s.hidden_size)
    return HFSamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder,
                       initializer_range=s.initializer_range, attn_implementation="sdpa")


# --- parts -------------------------------------------------------------------------------------------------------
class VisionTower(nn.Module):
    """CLIP ViT patch features from `select_layer` (-2 = second-to-last, as LLaVA), CLS dropped: (B, N, C).

    Only the blocks up to the selected one run; the later ones (and the post-norm) are kept for checkpoint
    compatibility but frozen, so no distributed wrapper sees parameters without gradients.
    """

    def __init__(self, clip: CLIPVisionModel, select_layer: int = -2):
        super().__init__()
        self.clip = clip
        n_layers = len(clip.encoder.layers)
        # hidden_states[k] is the output of block k (0 = embeddings), as transformers counts them
        self.num_blocks = select_layer % (n_layers + 1)
        for block in clip.encoder.layers[self.num_blocks:]:
            block.requires_grad_(False)
        clip.post_layernorm.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.clip.pre_layrnorm(self.clip.embeddings(pixel_values.to(self.clip.dtype)))
        for block in self.clip.encoder.layers[: self.num_blocks]:
            hidden = block(hidden, None)
        return hidden[:, 1:]


def build_projector(kind: str, vision_hidden: int, llm_hidden: int) -> nn.Module:
    """LLaVA's projector: `linear` or `mlp2x_gelu` (Linear, GELU, Linear)."""
    if kind == "linear":
        return nn.Linear(vision_hidden, llm_hidden)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_hidden, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))
    raise ValueError(f"Projector {kind!r} is not 'linear' or 'mlp2x_gelu'")


class RegionEncoder(nn.Module):
    """Mean of the vision patch features inside a prompt mask (at most `max_points` patches) → region adapter.

    A patch counts when the mask covers at least half of it; a prompt smaller than that takes its best-covered
    patch(es). Sampling at patch centres makes the pooled feature exactly the mean of those patches.
    """

    def __init__(self, vision_hidden: int, llm_hidden: int, patch_size: int, max_points: int = 512):
        super().__init__()
        self.patch_size, self.max_points = patch_size, max_points
        self.region_fea_adapter = nn.Linear(vision_hidden, llm_hidden)

    def patch_weights(self, masks: torch.Tensor) -> torch.Tensor:
        """Prompt masks (R, S, S) → pooling weights (R, N) over the (S/patch)² patch grid, each row summing to 1."""
        if masks.ndim != 3 or masks.shape[-1] != masks.shape[-2] or masks.shape[-1] % self.patch_size:
            raise PromptError(f"Region masks must be (R, S, S) with S a multiple of the patch size "
                              f"{self.patch_size}, got {tuple(masks.shape)}")
        cover = F.avg_pool2d(masks.float()[:, None], self.patch_size)[:, 0].flatten(1)  # (R, N) fraction covered
        best = cover.amax(dim=1, keepdim=True)
        empty = (best[:, 0] == 0).nonzero().flatten().tolist()
        if empty:
            raise PromptError(f"Region prompt {empty[0]} is empty after resizing to {masks.shape[-1]} px: "
                              "draw a larger point, box or mask")
        chosen = (cover >= 0.5) | (cover == best)
        count = chosen.sum(dim=1, keepdim=True)
        stride = torch.div(count + self.max_points - 1, self.max_points, rounding_mode="floor")
        rank = chosen.cumsum(dim=1) - 1
        chosen = chosen & (rank % stride == 0)  # evenly thinned to at most max_points patches
        return chosen.float() / chosen.sum(dim=1, keepdim=True)

    def forward(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Patch features (R, N, C) of each region's image and its mask (R, S, S) → region embeddings (R, H)."""
        weights = self.patch_weights(masks).to(features.dtype)
        if weights.shape[1] != features.shape[1]:
            raise PromptError(f"Region masks give a grid of {weights.shape[1]} patches but the vision tower gives "
                              f"{features.shape[1]}: masks must be at the vision input size")
        pooled = torch.einsum("rn,rnc->rc", weights, features)
        return self.region_fea_adapter(pooled)


@dataclass
class MedPLIBOutput:
    loss: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    mask_bce: torch.Tensor | None = None
    mask_dice: torch.Tensor | None = None
    mask_focal: torch.Tensor | None = None  # sigmoid focal loss (alpha 0.25, gamma 2), reported at any weight
    aux_loss: torch.Tensor | None = None
    moe_drop_rate: torch.Tensor | None = None  # with MoE layers: the mean over them of the tokens past capacity
    tisr_loss: torch.Tensor | None = None  # TISR's refinement loss (with the plug-in, on a batch with 2+ reports)
    logits: torch.Tensor | None = None  # (B, L, V), only without labels
    mask_logits: torch.Tensor | None = None  # (S, Ss, Ss), one per <SEG> in row-major order
    seg_batch_index: torch.Tensor | None = None  # (S,) sample of each mask


@dataclass
class Generation:
    text: str
    masks: list[np.ndarray] = field(default_factory=list)  # one bool (H, W) mask per generated <SEG>
    mask_logits: list[torch.Tensor] = field(default_factory=list)


# --- the composed model ------------------------------------------------------------------------------------------
class MedPLIB(nn.Module):
    """One class for the tiny (random init) and full (local weights, see loaders.py) presets."""

    def __init__(self, config: ModelConfig, tokenizer: MedTokenizer, *, clip: CLIPVisionModel | None = None,
                 llm: LlamaForCausalLM | None = None, sam: SamModel | None = None):
        super().__init__()
        if tokenizer.num_image_tokens != config.vision.num_patches:
            raise ValueError(f"The tokenizer expands {IMAGE_TOKEN} to {tokenizer.num_image_tokens} tokens but the "
                             f"vision tower gives {config.vision.num_patches} patches")
        self.config, self.tokenizer = copy.deepcopy(config), tokenizer
        self.vision_tower = VisionTower(clip or CLIPVisionModel(clip_vision_config(config)), config.vision.select_layer)
        self.projector = build_projector(config.projector, config.vision.hidden_size, config.llm.hidden_size)
        self.region_encoder = RegionEncoder(config.vision.hidden_size, config.llm.hidden_size,
                                            config.vision.patch_size, config.region_max_points)
        self.llm = llm or LlamaForCausalLM(llama_config(config, len(tokenizer)))
        if self.llm.get_input_embeddings().num_embeddings != len(tokenizer):
            self.llm.resize_token_embeddings(len(tokenizer))  # LLaVA's 32000 + MedPLIB's special tokens
        self.text_hidden_fcs = nn.Sequential(nn.Linear(config.llm.hidden_size, config.llm.hidden_size), nn.ReLU(),
                                             nn.Linear(config.llm.hidden_size, config.sam.hidden_size))
        self.sam = sam or SamModel(sam_config(config))
        if config.sam.adapters:
            attach_adapters(self.sam)  # SAM-Med2D's (a loaded SAM that has them keeps them)
        self.example_prompt = ExamplePrompt(config.sam.hidden_size) if config.sam.example_prompt else None
        self.tisr: TextualInversion | None = None
        if config.tisr.enabled:
            self.attach_tisr(config.tisr)
        if config.moe.num_experts > 1:  # a fresh or loaded MoE model: experts start as copies of the dense FFN
            self._to_moe([[layer.mlp for layer in self.layers]] * config.moe.num_experts)
        if config.vision.freeze:
            self.vision_tower.requires_grad_(False)
        if config.sam.freeze_image_encoder:
            self.sam.vision_encoder.requires_grad_(False)

    @property
    def layers(self) -> nn.ModuleList:
        return self.llm.model.layers

    def get_input_embeddings(self) -> nn.Embedding:
        return self.llm.get_input_embeddings()

    def input_dtypes(self) -> dict[str, torch.dtype]:
        """The dtype each floating input of `forward` must arrive in: that of the module reading it (a bf16 SAM
        encoder refuses fp32 pixels). Masks and targets are not listed: the losses read them in fp32."""
        clip = next(self.vision_tower.parameters()).dtype
        sam = next(self.sam.vision_encoder.parameters()).dtype
        return {"pixel_values": clip, "context_pixel_values": clip, "sam_pixel_values": sam,
                "example_pixel_values": sam}

    def attach_example_prompt(self) -> None:
        """Give the mask decoder the example prompt (`model.sam.example_prompt`; zero-initialised: the model's masks
        are unchanged until it trains); it is saved with the model."""
        if self.example_prompt is not None:
            raise ValueError("The model already has the example prompt")
        ref = self.text_hidden_fcs[0].weight
        # Its layers' default init draws from the global generator before they are zeroed: fork it, so a stage's
        # random stream (batches' order is the sampler's own; dropout, augmentation) is the same whether the prompt
        # was attached here or came with the model (the pipeline's stage II saves it; `train --stage 3` from a stage
        # II saved without it attaches it here).
        with torch.random.fork_rng(devices=[]):
            self.example_prompt = ExamplePrompt(self.config.sam.hidden_size).to(device=ref.device, dtype=ref.dtype)
        self.config.sam.example_prompt = True

    def attach_tisr(self, config: TISRConfig) -> None:
        """Add TISR's plug-in (a new, seeded textual-inversion module) to this model; it is saved with it."""
        if self.tisr is not None:
            raise ValueError("The model already has TISR's plug-in")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.tisr = TextualInversion(self.config.vision.hidden_size, self.config.llm.hidden_size,
                                         config.num_pseudo_words)
        self.tisr.to(next(self.projector.parameters()).dtype)
        self.config.tisr = copy.deepcopy(config)
        self.config.tisr.enabled = True

    def _with_pseudo_words(self, patch_features: torch.Tensor, embeds: torch.Tensor,
                           attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """With TISR's plug-in: the pseudo-words before the prompt (embeddings, mask, the pseudo-words)."""
        if self.tisr is None:
            return embeds, attention_mask, None
        pseudo = self.tisr(patch_features)
        return *prepend(pseudo, embeds, attention_mask), pseudo

    # --- inputs ----------------------------------------------------------------------------------------------
    def embed_inputs(self, input_ids: torch.Tensor, patch_features: torch.Tensor,
                     region_masks: torch.Tensor | None = None,
                     region_batch_index: torch.Tensor | None = None,
                     context_features: torch.Tensor | None = None,
                     context_counts: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with projected patches at `<image>` and region embeddings at `<region>`.

        With context images (`context_features` (C, N, D) of all samples' context images in batch order,
        `context_counts` (B,) how many each sample shows), a sample's `<image>` placeholders take, in text order, its
        context images, then its query image (in-context examples before the question; region prompts and the
        `<SEG>` masks are always about the query)."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        image_positions = input_ids == self.tokenizer.image_token_id
        shown = patch_features
        counts = torch.zeros(len(input_ids), dtype=torch.long)
        if context_features is not None and len(context_features):
            counts = context_counts.cpu().long()
            if int(counts.sum()) != context_features.shape[0] or len(counts) != len(input_ids):
                raise ValueError(f"Context images per sample {counts.tolist()} do not add up to the "
                                 f"{context_features.shape[0]} context images given for {len(input_ids)} samples")
            parts, start = [], 0
            for b, k in enumerate(counts.tolist()):
                parts += [context_features[start: start + k], patch_features[b: b + 1]]
                start += k
            shown = torch.cat(parts)
        n_tokens, n_features = int(image_positions.sum()), shown.shape[0] * shown.shape[1]
        per_sample = image_positions.sum(dim=1).cpu()
        if n_tokens != n_features or not torch.equal(per_sample, (counts + 1) * shown.shape[1]):
            raise ValueError(f"Image features and {IMAGE_TOKEN} tokens do not match: tokens: {n_tokens}, features: "
                             f"{n_features} ({shown.shape[0]} images x {shown.shape[1]} patches); per sample, tokens "
                             f"for {(per_sample / shown.shape[1]).tolist()} images, images: context images per "
                             f"sample {counts.tolist()}, then the query")
        image_embeds = self.projector(shown).to(embeds.dtype)
        embeds = embeds.masked_scatter(image_positions[..., None].expand_as(embeds), image_embeds)

        region_positions = input_ids == self.tokenizer.region_token_id
        per_sample = region_positions.sum(dim=1)
        n_masks = 0 if region_masks is None else region_masks.shape[0]
        if int(per_sample.sum()) != n_masks:
            raise ValueError(f"Region prompts and {REGION_TOKEN} tokens do not match: tokens: {int(per_sample.sum())}, "
                             f"prompt masks: {n_masks}")
        if n_masks:
            if region_batch_index is None:
                region_batch_index = torch.repeat_interleave(torch.arange(len(per_sample)), per_sample)
            counts = torch.bincount(region_batch_index, minlength=len(per_sample))
            if not torch.equal(counts.cpu(), per_sample.cpu()):
                raise ValueError(f"Region prompts per sample {counts.tolist()} do not match the {REGION_TOKEN} "
                                 f"tokens per sample {per_sample.tolist()}")
            region_embeds = self.region_encoder(patch_features[region_batch_index], region_masks).to(embeds.dtype)
            embeds = embeds.masked_scatter(region_positions[..., None].expand_as(embeds), region_embeds)
        return embeds

    # --- grounding -------------------------------------------------------------------------------------------
    def seg_state_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: the positions whose hidden state the grounding head reads, one per `<SEG>` (`seg_state`).

        "emitting": the token before each `<SEG>`, as LISA and MedPLIB read `hidden[input_ids[:, 1:] == seg]` (the
        state whose LM head predicts `<SEG>`), so released grounding heads fit; "token": the `<SEG>` token itself.
        """
        real = attention_mask.bool()
        seg = (input_ids == self.tokenizer.seg_token_id) & real
        if self.config.seg_state == "token":
            return seg
        orphan = seg[:, 0] | (seg[:, 1:] & ~real[:, :-1]).any(dim=1)
        if orphan.any():
            raise ValueError(f"Sample(s) {orphan.nonzero().flatten().tolist()} have a <SEG> with no real token "
                             "before it (at position 0 or after padding): its mask is read from the state that "
                             "emits it, so a <SEG> must follow a prompt")
        emitting = torch.zeros_like(seg)
        emitting[:, :-1] = seg[:, 1:]
        return emitting

    def segment(self, sam_pixel_values: torch.Tensor, seg_hidden: torch.Tensor,
                seg_batch_index: torch.Tensor, examples: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        """States that emit `<SEG>` (S, H) and their images → mask logits (S, Ss, Ss) at the SAM input size.

        `examples` (with the example prompt): the batch's in-context examples as (pixels (E, 3, Ss, Ss), masks
        (E, Ss, Ss), examples per sample (B,)), in batch order; a sample with none is segmented as without them."""
        used, inverse = torch.unique(seg_batch_index, return_inverse=True)
        image_embeddings = self.sam.vision_encoder(sam_pixel_values[used]).last_hidden_state[inverse]
        n = seg_hidden.shape[0]
        sparse = self.text_hidden_fcs(seg_hidden).to(image_embeddings.dtype)  # (S, C)
        _, dense = self.sam.prompt_encoder(None, None, None, None)
        dense = dense.expand(n, -1, -1, -1)
        if self.example_prompt is not None and examples is not None and len(examples[0]):
            pixels, masks, counts = examples
            found = self.example_prompt.prototypes(self.sam.vision_encoder(pixels).last_hidden_state, masks)
            prototypes, has = self.example_prompt.per_sample(found, counts)
            extra_sparse, extra_dense = self.example_prompt(image_embeddings, prototypes[seg_batch_index])
            keep = has[seg_batch_index].to(sparse.dtype)  # no examples: no prompt (a zero prototype is not "none")
            sparse = sparse + keep[:, None] * extra_sparse
            dense = dense + keep[:, None, None, None] * extra_dense
        positional = self.sam.get_image_wide_positional_embeddings().repeat(n, 1, 1, 1)
        low_res, _ = self.sam.mask_decoder(image_embeddings=image_embeddings, image_positional_embeddings=positional,
                                           sparse_prompt_embeddings=sparse[:, None, None, :],  # (S, 1, 1, C)
                                           dense_prompt_embeddings=dense, multimask_output=False)
        size = self.config.sam.image_size
        return F.interpolate(low_res[:, 0], size=(size, size), mode="bilinear", align_corners=False)[:, 0]

    # --- training forward ------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, sam_pixel_values: torch.Tensor | None = None,
                region_masks: torch.Tensor | None = None, region_batch_index: torch.Tensor | None = None,
                seg_masks: torch.Tensor | None = None, loss_weights: LossWeights = LossWeights(),
                records: Sequence | None = None, context_pixel_values: torch.Tensor | None = None,
                context_counts: torch.Tensor | None = None, example_pixel_values: torch.Tensor | None = None,
                example_masks: torch.Tensor | None = None,
                example_counts: torch.Tensor | None = None) -> MedPLIBOutput:
        """Teacher-forced pass; with `labels` (and `seg_masks` for `<SEG>` tokens) it returns the weighted loss.

        `records` (a collated batch's) name each sample's task: TISR's refinement reads the reports among them.
        `context_pixel_values` (C, 3, S, S) and `context_counts` (B,): the context images the prompts show before
        their query image (see `embed_inputs`). `example_pixel_values` (E, 3, Ss, Ss), `example_masks` (E, Ss, Ss) and
        `example_counts` (B,): the in-context examples the example prompt gives the mask decoder (see `segment`).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        patch_features = self.vision_tower(pixel_values)
        context = (self.vision_tower(context_pixel_values)
                   if context_pixel_values is not None and len(context_pixel_values) else None)
        embeds = self.embed_inputs(input_ids, patch_features, region_masks, region_batch_index, context,
                                   context_counts)
        embeds, full_mask, pseudo = self._with_pseudo_words(patch_features, embeds, attention_mask)
        hidden = self.llm.model(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state
        hidden = hidden[:, embeds.shape[1] - input_ids.shape[1]:]  # the prompt's positions (after any pseudo-words)
        out = MedPLIBOutput()
        moe = self.moe_layers()
        if moe:
            out.moe_drop_rate = torch.stack([m.last_drop_rate for m in moe]).mean()

        emitting = self.seg_state_positions(input_ids, attention_mask)
        if emitting.any():
            if sam_pixel_values is None:
                raise ValueError(f"The input has {int(emitting.sum())} <SEG> token(s) but no sam_pixel_values")
            out.seg_batch_index = emitting.nonzero()[:, 0]
            examples = ((example_pixel_values, example_masks, example_counts)
                        if example_pixel_values is not None else None)
            out.mask_logits = self.segment(sam_pixel_values, hidden[emitting], out.seg_batch_index, examples)

        if labels is None:
            out.logits = self.llm.lm_head(hidden)
            return out
        targets = labels[:, 1:]
        answer = targets != IGNORE_INDEX
        out.ce_loss = answer_cross_entropy(self.llm.lm_head(hidden[:, :-1][answer]), targets[answer])
        loss = loss_weights.ce * out.ce_loss
        n_seg = 0 if out.mask_logits is None else out.mask_logits.shape[0]
        n_targets = 0 if seg_masks is None else seg_masks.shape[0]
        if n_seg != n_targets:
            raise ValueError(f"<SEG> tokens and target masks do not match: tokens: {n_seg}, masks: {n_targets}")
        if n_seg:
            if seg_masks.shape[-2:] != out.mask_logits.shape[-2:]:
                raise ValueError(f"Target masks are {tuple(seg_masks.shape[-2:])} but predicted masks are "
                                 f"{tuple(out.mask_logits.shape[-2:])} (the SAM input size)")
            out.mask_bce = mask_bce(out.mask_logits, seg_masks)
            out.mask_dice = soft_dice_loss(out.mask_logits, seg_masks)
            out.mask_focal = sigmoid_focal_loss(out.mask_logits, seg_masks)
            loss = loss + loss_weights.bce * out.mask_bce + loss_weights.dice * out.mask_dice
            if loss_weights.focal:  # weight 0 leaves the loss as it was, to the bit
                loss = loss + loss_weights.focal * out.mask_focal
        if pseudo is not None and self.config.tisr.refine_weight > 0:
            rows = refine_rows(records, self.config.tisr, len(input_ids)).to(pseudo.device)
            out.tisr_loss = refinement_loss(pseudo[rows], text_embedding(self, labels[rows]),
                                            self.config.tisr.temperature)
            if out.tisr_loss is not None:
                loss = loss + self.config.tisr.refine_weight * out.tisr_loss
        if moe and self.config.moe.aux_loss_weight > 0:
            out.aux_loss = torch.stack([m.aux_loss for m in moe]).mean()
            loss = loss + self.config.moe.aux_loss_weight * out.aux_loss
        out.loss = loss
        return out

    # --- generation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, images: Sequence[np.ndarray], questions: Sequence[str],
                 regions: Sequence[Sequence[np.ndarray]] | None = None, max_new_tokens: int = 32,
                 mask_threshold: float = 0.0,
                 contexts: Sequence[Sequence[np.ndarray]] | None = None,
                 examples: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]] | None = None) -> list[Generation]:
        """Greedy answers for a batch of (image, question[, region masks][, context images]); one mask per generated
        `<SEG>`, about the query image.

        A question holds one `<region>` (or `<region></region>`) per prompt mask; `<image>` is added if absent. With
        context images (e.g. in-context examples, as the task shows them), the question holds one `<image>` per
        context image and one more for the query, which comes last. `examples`: each sample's in-context (image, mask)
        pairs, which a model with the example prompt gives its mask decoder (the prompt shows them through
        `contexts`); a model without it ignores them.
        """
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        regions = list(regions) if regions is not None else [[] for _ in images]
        if len(regions) != len(images):
            raise ValueError(f"{len(images)} images but {len(regions)} region lists")
        contexts = [list(c) for c in contexts] if contexts is not None else [[] for _ in images]
        if len(contexts) != len(images):
            raise ValueError(f"{len(images)} images but {len(contexts)} context lists")
        device = next(self.parameters()).device
        v, s = self.config.vision.image_size, self.config.sam.image_size
        prompts, region_masks, region_index = [], [], []
        for b, (image, question, masks) in enumerate(zip(images, questions, regions)):
            if IMAGE_TOKEN not in question and not contexts[b]:
                question = f"{IMAGE_TOKEN}\n{question}"
            if question.count(IMAGE_TOKEN) != len(contexts[b]) + 1:
                raise PromptError(f"Question {b} has {question.count(IMAGE_TOKEN)} {IMAGE_TOKEN} placeholder(s) for "
                                  f"{len(contexts[b])} context image(s) and the query image")
            question = question.replace(f"{REGION_TOKEN}</region>", REGION_TOKEN).replace(
                REGION_TOKEN, f"{REGION_TOKEN}</region>")
            n_tokens = question.count(REGION_TOKEN)
            if n_tokens != len(masks):
                raise PromptError(f"Question {b} has {n_tokens} {REGION_TOKEN} placeholder(s) but {len(masks)} "
                                  "region prompt mask(s)")
            h, w = image.shape[:2]
            for m in masks:
                region_masks.append(preprocess_mask(freeform_prompt_mask(m, h, w), v, keep_any=True))
                region_index.append(b)
            prompts.append(self.tokenizer.encode_prompt(question))

        pixel_values = torch.stack([preprocess_image(im, v, CLIP_MEAN, CLIP_STD) for im in images]).to(device)
        length = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompts], device=device)  # left padding
        attention_mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device)
        patch_features = self.vision_tower(pixel_values)
        shown = [preprocess_image(im, v, CLIP_MEAN, CLIP_STD) for c in contexts for im in c]
        context = self.vision_tower(torch.stack(shown).to(device, pixel_values.dtype)) if shown else None
        embeds = self.embed_inputs(
            input_ids, patch_features,
            torch.stack(region_masks).to(device) if region_masks else None,
            torch.tensor(region_index, device=device) if region_masks else None,
            context, torch.tensor([len(c) for c in contexts]) if shown else None)
        embeds, attention_mask, _ = self._with_pseudo_words(patch_features, embeds, attention_mask)

        batch = len(images)
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self.llm.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                             use_cache=True)
        cache, hidden = out.past_key_values, out.last_hidden_state[:, -1]
        next_position = positions[:, -1] + 1
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        generated: list[list[int]] = [[] for _ in range(batch)]
        seg_hidden: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        for step in range(max_new_tokens):
            token = self.llm.lm_head(hidden).argmax(dim=-1)
            token = torch.where(finished, torch.full_like(token, pad), token)
            for b in (~finished).nonzero().flatten().tolist():
                generated[b].append(int(token[b]))
            # the grounding state of a <SEG>, as in training (seg_state_positions): the state that emitted it, or
            # (seg_state "token") its own, after it is fed
            emitted = ((token == self.tokenizer.seg_token_id) & ~finished).nonzero().flatten().tolist()
            at_token = self.config.seg_state == "token"
            if not at_token:
                for b in emitted:
                    seg_hidden[b].append(hidden[b])
            was_finished = finished
            finished = finished | (token == self.tokenizer.eos_token_id)
            last = bool(finished.all()) or step == max_new_tokens - 1
            if last and not (at_token and emitted):
                break
            attention_mask = torch.cat([attention_mask, (~was_finished).long()[:, None]], dim=1)
            out = self.llm.model(inputs_embeds=self.llm.get_input_embeddings()(token[:, None]),
                                 attention_mask=attention_mask, position_ids=next_position[:, None],
                                 past_key_values=cache, use_cache=True)
            cache, hidden, next_position = out.past_key_values, out.last_hidden_state[:, -1], next_position + 1
            if at_token:
                for b in emitted:
                    seg_hidden[b].append(hidden[b])
            if last:
                break

        results = [Generation(text=self.tokenizer.decode(ids)) for ids in generated]
        seg_index = [b for b in range(batch) for _ in seg_hidden[b]]
        if seg_index:
            sam_pixels = torch.stack([preprocess_image(im, s, SAM_MEAN, SAM_STD) for im in images]).to(
                device, self.input_dtypes()["sam_pixel_values"])
            logits = self.segment(sam_pixels, torch.stack([h for hs in seg_hidden for h in hs]),
                                  torch.tensor(seg_index, device=device), self._example_batch(examples, batch))
            for b, lg in zip(seg_index, logits):
                full = unsquare(lg.cpu(), *images[b].shape[:2])
                results[b].mask_logits.append(full)
                results[b].masks.append((full > mask_threshold).numpy())
        return results

    def _example_batch(self, examples: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]] | None,
                       batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """`generate`'s example pairs as `segment` takes them; None without the example prompt or any example."""
        if self.example_prompt is None or not examples or not any(examples):
            return None
        if len(examples) != batch:
            raise ValueError(f"{batch} images but {len(examples)} example lists")
        device = next(self.parameters()).device
        pixels, masks = example_tensors([pair for sample in examples for pair in sample], self.config.sam.image_size)
        return (pixels.to(device, self.input_dtypes()["example_pixel_values"]), masks.to(device),
                torch.tensor([len(sample) for sample in examples], device=device))

    # --- mixture of experts ----------------------------------------------------------------------------------
    def moe_layers(self) -> list[MoEFeedForward]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoEFeedForward)]

    def _to_moe(self, sources: Sequence[Sequence[nn.Module]]) -> None:
        m = self.config.moe
        upcycle(self.layers, sources, self.config.llm.hidden_size, m.capacity_factor_train, m.capacity_factor_eval,
                m.straight_through)

    def upcycle(self, experts: Sequence["MedPLIB"]) -> None:
        """Turn every dense LLaMA MLP into an MoE whose expert k copies that layer's FFN of `experts[k]`.

        MedPLIB's stage IV: expert 0 = the grounding model's FFNs (stage III), expert 1 = the VL model's (stage II).
        """
        if self.moe_layers():
            raise ValueError(f"The model already has {self.config.moe.num_experts} experts per layer")
        for k, e in enumerate(experts):
            if e.moe_layers():
                raise ValueError(f"Expert source {k} is itself an MoE model; upcycle from dense models")
        self._to_moe([[layer.mlp for layer in e.layers] for e in experts])
        self.config.moe.num_experts = len(experts)

    # --- save / load -----------------------------------------------------------------------------------------
    def save_pretrained(self, path: Path | str) -> Path:
        """A folder with config.json, model.safetensors and tokenizer/ (no pickles)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps({"format": "medplib", "version": 1,
                                                    "model": to_dict(self.config)}, indent=1) + "\n",
                                        encoding="utf-8")
        save_model(self, str(path / WEIGHTS_FILE))
        self.tokenizer.save_pretrained(path / TOKENIZER_DIR)
        _write_checksums(path)
        return path

    @classmethod
    def from_pretrained(cls, path: Path | str, dtype: torch.dtype | None = None) -> "MedPLIB":
        """Load a folder written by `save_pretrained`; every weight must be present. Weights are read one tensor at a
        time into the model's own (uninitialised) parameters, so loading holds one copy of the model, not two; with
        `dtype` (bf16 on a GPU) the model is built in it and each tensor is cast as it is read."""
        path = Path(path)
        config = _read_config(path)
        tokenizer = MedTokenizer.from_pretrained(path / TOKENIZER_DIR)
        with no_init_weights(), _default_dtype(dtype):  # every weight is overwritten below
            model = cls(config, tokenizer)
        model.sam.tie_weights()  # no_init_weights skips tying; SAM shares its positional embedding
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
            _stream_into(model, f, "", path / WEIGHTS_FILE, strict=True)
        return model

    def upcycle_from_saved(self, grounding: Path | str) -> None:
        """MedPLIB's stage IV from this dense model (stage II's: expert 1) and the saved grounding model (stage III's:
        expert 0, and its SAM and `text_hidden_fcs`), streamed: the grounding model is never built. Its FFNs are read
        layer by layer from its safetensors file; this model's own FFNs become expert 1. The same weights as
        `upcycle([grounding_model, copy.deepcopy(self)])` plus loading its grounding path, in about a third of the
        memory (benchmarks/stage4_memory.py)."""
        grounding = Path(grounding)
        theirs = _read_config(grounding)
        if to_dict(theirs.llm) != to_dict(self.config.llm):
            raise ValueError(f"The grounding model {grounding} has another LLM config than this model's: "
                             f"{to_dict(theirs.llm)} vs {to_dict(self.config.llm)}")
        if self.moe_layers():
            raise ValueError(f"The model already has {self.config.moe.num_experts} experts per layer")
        names = {id(m): n for n, m in self.named_modules()}
        with safe_open(str(grounding / WEIGHTS_FILE), framework="pt") as f:
            for layer in self.layers:
                ffn = copy.deepcopy(layer.mlp)  # one layer's FFN at a time, filled with the grounding model's
                _stream_into(ffn, f, names[id(layer.mlp)] + ".", grounding / WEIGHTS_FILE, strict=True)
                m = self.config.moe
                upcycle([layer], [[ffn], [layer.mlp]], self.config.llm.hidden_size, m.capacity_factor_train,
                        m.capacity_factor_eval, m.straight_through)
            _stream_into(self.sam, f, "sam.", grounding / WEIGHTS_FILE, strict=True)
            _stream_into(self.text_hidden_fcs, f, "text_hidden_fcs.", grounding / WEIGHTS_FILE, strict=True)
            if theirs.sam.example_prompt:
                if self.example_prompt is None:
                    self.attach_example_prompt()
                _stream_into(self.example_prompt, f, "example_prompt.", grounding / WEIGHTS_FILE, strict=True)
        self.config.moe.num_experts = 2


def _read_config(path: Path) -> ModelConfig:
    """The model config of a saved folder, after its checksums are verified."""
    if not (path / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{path / CONFIG_FILE} does not exist: not a saved MedPLIB model folder")
    _verify_checksums(path)
    meta = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    if meta.get("format") != "medplib":
        raise ValueError(f"{path / CONFIG_FILE} is not a MedPLIB config (format = {meta.get('format')!r})")
    return from_dict(ModelConfig, meta["model"])


@contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    before = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@torch.no_grad()
def _stream_into(module: nn.Module, f, prefix: str, file: Path, strict: bool) -> None:
    """Copy the tensors `prefix + name` of an open safetensors file into `module`'s parameters and buffers, one at a
    time (cast to each one's dtype). A tensor that shares its storage with another one is written once, as
    safetensors saves it; with `strict`, a missing name or, for a whole model (`prefix` ""), an extra one is an
    error."""
    state = module.state_dict(keep_vars=True)
    owners = collections.Counter(t.data_ptr() for t in state.values())
    in_file = set(f.keys())
    absent, done = [], set()
    for name, target in state.items():
        key = prefix + name
        if key not in in_file:
            absent.append(name)
            continue
        source = f.get_tensor(key)
        if source.shape != target.shape:
            raise ValueError(f"{file}: '{key}' is {tuple(source.shape)} but the model's is {tuple(target.shape)}")
        target.data.copy_(source)
        done.add(target.data_ptr())
    # a shared tensor is saved under one of its names only: absent under another is fine once it was written
    missing = [prefix + n for n in absent if owners[state[n].data_ptr()] < 2 or state[n].data_ptr() not in done]
    unexpected = sorted(in_file - {prefix + n for n in state}) if prefix == "" else []
    if strict and (missing or unexpected):
        raise ValueError(f"{file} does not fit the config: missing {sorted(missing)[:3]}, unexpected "
                         f"{unexpected[:3]}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_checksums(path: Path) -> None:
    """Record the SHA-256 of a saved folder's config and weights (`_verify_checksums` checks them before a load)."""
    sums = {name: _sha256(path / name) for name in (CONFIG_FILE, WEIGHTS_FILE)}
    (path / CHECKSUMS_FILE).write_text(json.dumps(sums, indent=1) + "\n", encoding="utf-8")


def _verify_checksums(path: Path) -> None:
    """A saved folder's files must match the SHA-256 recorded at save time (folders saved without it are read as is)."""
    sums_path = path / CHECKSUMS_FILE
    if not sums_path.is_file():
        log.warning("%s has no %s: its weights cannot be checked for corruption", path, CHECKSUMS_FILE)
        return
    for name, expected in json.loads(sums_path.read_text(encoding="utf-8")).items():
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing (listed in {sums_path})")
        actual = _sha256(path / name)
        if actual != expected:
            raise ValueError(f"{path / name} is corrupted: its SHA-256 is {actual[:16]}… but {sums_path} recorded "
                             f"{expected[:16]}…; re-fetch the model or re-run the stage that wrote it")


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters and those active per token (the router plus one expert in each MoE layer)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoEFeedForward):
            per_expert = [sum(p.numel() for p in e.parameters()) for e in m.experts]
            inactive += sum(per_expert) - max(per_expert)
    return {"total": total, "active": total - inactive}


def _register() -> None:
    from medplib.model.family import ModelFamily, register_family

    register_family(ModelFamily(name="medplib", model_class=MedPLIB, format="medplib", stages=(1, 2, 3, 4),
                                recipe="medplib.train.recipe:StageRecipe", registered_model="medplib",
                                gate_metric="grounding_mdice"))


_register()
