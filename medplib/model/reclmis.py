"""RecLMIS (REFERENCE §6), language-guided segmentation by cross-modal conditioned reconstruction, read top to bottom:

U-Net encoder → bottleneck patches; frozen text encoder (CLIP's text transformer) → words;
conditioned interaction: patches attend to words and words to patches, and each side scores what is of interest
(a patch given the note, a word given the image);
training only: masked mutual reconstruction (30% of patches rebuilt from the words, 30% of words rebuilt from the
patches, MSE on stop-gradient targets) and contrastive alignment of the interest-weighted image and note vectors;
U-Net decoder on the conditioned bottleneck, each level modulated by the note (FiLM) → mask logits.
Loss = seg 5 · (BCE + Dice)/2 + contrastive 0.2 + text reconstruction 1 + image reconstruction 1 (configurable;
`reconstruction: false` drops the reconstruction heads and their losses, the paper's ablation).

The text encoder is a `CLIPTextModel`: in the tiny preset a small random one over a BPE trained on the notes, trained
by next-token prediction in stage 1 and then frozen; in the full preset CLIP's, loaded from a local folder.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerBase

from medplib.config.base import from_dict, to_dict
from medplib.config.reclmis import RecLMISConfig, TextEncoderConfig
from medplib.data.torch_dataset import SAM_MEAN, SAM_STD, preprocess_image, unsquare
from medplib.model.losses import mask_bce, soft_dice_loss
from medplib.model.model import CONFIG_FILE, TOKENIZER_DIR, WEIGHTS_FILE, Generation, _verify_checksums, \
    _write_checksums
from medplib.model.prompts import PromptError
from medplib.model.tokenizer import IMAGE_TOKEN, SEG_TOKEN, MedTokenizer

FORMAT = "reclmis"
IMAGE_MEAN, IMAGE_STD = SAM_MEAN, SAM_STD  # ImageNet statistics, as U-Nets on LViT data use
_PROMPT_RE = re.compile(r"^\s*segment\s*:\s*", re.IGNORECASE)
TRAINING_ONLY = ("image_rec", "text_rec", "contrast")  # dropped at inference: not in its parameters or FLOPs


def note_of(question: str) -> str:
    """The clinical note in a question: without `<image>` and a leading "Segment:" (the textseg prompt)."""
    return _PROMPT_RE.sub("", question.replace(IMAGE_TOKEN, " ")).strip()


def clip_text_config(cfg: TextEncoderConfig, vocab_size: int, pad_id: int, bos_id: int | None,
                     eos_id: int | None) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                          num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                          max_position_embeddings=cfg.max_length, projection_dim=cfg.hidden_size,
                          pad_token_id=pad_id, bos_token_id=bos_id if bos_id is not None else pad_id,
                          eos_token_id=eos_id if eos_id is not None else pad_id, attn_implementation="sdpa")


def train_note_tokenizer(notes: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE trained on the notes (tiny preset), as MedPLIB's tokenizer is trained on its texts."""
    return MedTokenizer.train(notes, vocab_size, num_image_tokens=1).hf


def load_clip_text(path: str | Path, cfg: TextEncoderConfig) -> tuple[CLIPTextModel, PreTrainedTokenizerBase]:
    """CLIP's text encoder and its tokenizer from a local folder (a CLIPTextModel or a whole CLIPModel checkpoint,
    safetensors only), checked against `cfg`."""
    from medplib.model.loaders import _check, _folder

    folder = _folder(path, "CLIP text")
    model = CLIPTextModel.from_pretrained(str(folder), attn_implementation="sdpa", use_safetensors=True)
    c = model.config
    _check("CLIP text", [("hidden_size", cfg.hidden_size, c.hidden_size),
                         ("num_hidden_layers", cfg.num_layers, c.num_hidden_layers)])
    if c.max_position_embeddings < cfg.max_length:
        raise ValueError(f"The CLIP text checkpoint has {c.max_position_embeddings} positions but the model config's "
                         f"text.max_length is {cfg.max_length}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"CLIP text checkpoint folder {folder} has no tokenizer files ({e}): save the "
                                "tokenizer with the model") from None
    return model, tokenizer


# --- parts -------------------------------------------------------------------------------------------------------
def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3×3 convolutions with GroupNorm and ReLU (GroupNorm: batches of a few images per worker)."""
    groups = min(8, c_out)
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.ReLU(inplace=True))


class UNetEncoder(nn.Module):
    """Features at every level (full size, ½, ¼, …) and the bottleneck as patch features (B, N, D); `position` is
    added by the caller (the reconstruction target is the content alone)."""

    def __init__(self, channels: Sequence[int], dim: int, grid: int):
        super().__init__()
        self.blocks = nn.ModuleList([conv_block(3, channels[0])] +
                                    [conv_block(a, b) for a, b in zip(channels[:-1], channels[1:])])
        self.to_patches = nn.Linear(channels[-1], dim)
        self.position = nn.Parameter(torch.randn(grid * grid, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        levels = []
        for k, block in enumerate(self.blocks):
            x = block(F.max_pool2d(x, 2) if k else x)
            levels.append(x)
        return levels, self.to_patches(x.flatten(2).transpose(1, 2))


class TextEncoder(nn.Module):
    """Token features (B, L, H) of a CLIP text transformer; `lm_loss` is its stage-1 objective (next token, the output
    projection tied to the token embeddings)."""

    def __init__(self, clip: CLIPTextModel):
        super().__init__()
        self.clip = clip

    @property
    def hidden_size(self) -> int:
        return self.clip.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.clip(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def lm_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self(input_ids, attention_mask)[:, :-1]
        logits = hidden @ self.clip.get_input_embeddings().weight.T
        targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


class ConditionedInteraction(nn.Module):
    """Patches attend to the words, words to the patches; each conditioned token is scored as of interest (a
    sigmoid per patch given the note, per word given the image). Returns conditioned patches and words, and the two
    score vectors (padding words score 0)."""

    def __init__(self, dim: int, heads: int, bottleneck_channels: int):
        super().__init__()
        self.patches_from_words = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.words_from_patches = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_patches, self.norm_words = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.patch_interest, self.word_interest = nn.Linear(dim, 1), nn.Linear(dim, 1)
        self.to_map = nn.Linear(dim, bottleneck_channels)

    def forward(self, patches: torch.Tensor, words: torch.Tensor, word_pad: torch.Tensor):
        p, _ = self.patches_from_words(patches, words, words, key_padding_mask=word_pad, need_weights=False)
        w, _ = self.words_from_patches(words, patches, patches, need_weights=False)
        p, w = self.norm_patches(patches + p), self.norm_words(words + w)
        patch_scores = torch.sigmoid(self.patch_interest(p))[..., 0]  # (B, N)
        word_scores = torch.sigmoid(self.word_interest(w))[..., 0].masked_fill(word_pad, 0.0)  # (B, L)
        return p * patch_scores[..., None], w, patch_scores, word_scores


class MaskedReconstruction(nn.Module):
    """Rebuild the masked tokens of one modality from the other: a masked position's query is a learned mask token
    plus its position (visible ones keep their feature); it attends to the other modality's interest-weighted tokens
    only, so what it rebuilds comes across modalities. MSE to the stop-gradient, layer-normed target features at the
    masked positions."""

    def __init__(self, dim: int, target_dim: int, heads: int, positions: int):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.position = nn.Parameter(torch.randn(positions, dim) * 0.02)
        self.attend = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.predict = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, target_dim))

    def forward(self, tokens: torch.Tensor, masked: torch.Tensor, other: torch.Tensor, other_pad: torch.Tensor | None,
                target: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        queries = torch.where(masked[..., None], self.mask_token + self.position[:n], tokens)
        ctx, _ = self.attend(queries, other, other, key_padding_mask=other_pad, need_weights=False)
        rebuilt = self.predict(queries + ctx)
        goal = F.layer_norm(target.detach().float(), target.shape[-1:])
        err = ((rebuilt.float() - goal) ** 2).mean(-1)
        return err[masked].mean() if masked.any() else err.sum() * 0.0


def random_mask(valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """Mask `ratio` of each row's valid positions (at least one), chosen at random."""
    noise = torch.rand(valid.shape, device=valid.device).masked_fill(~valid, 2.0)
    k = (valid.sum(dim=1).float() * ratio).ceil().clamp(min=1).long()
    rank = noise.argsort(dim=1).argsort(dim=1)
    return (rank < k[:, None]) & valid


@dataclass
class RecLMISOutput:
    loss: torch.Tensor | None = None
    seg_loss: torch.Tensor | None = None
    contrastive_loss: torch.Tensor | None = None
    text_rec_loss: torch.Tensor | None = None
    image_rec_loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None  # stage 1 (objective "text")
    mask_logits: torch.Tensor | None = None  # (B, S, S)
    patch_scores: torch.Tensor | None = None  # (B, N) patches of interest
    word_scores: torch.Tensor | None = None  # (B, L) words of interest

    def parts(self) -> dict[str, float]:
        """The loss terms present, as floats (for logging)."""
        names = ("seg_loss", "contrastive_loss", "text_rec_loss", "image_rec_loss", "lm_loss")
        return {n: float(getattr(self, n).detach()) for n in names if getattr(self, n) is not None}


# --- the composed model ------------------------------------------------------------------------------------------
class RecLMIS(nn.Module):
    """One class for both presets: a random tiny text encoder or CLIP's (pass `text_encoder`, see `build`)."""

    def __init__(self, config: RecLMISConfig, tokenizer: PreTrainedTokenizerBase,
                 text_encoder: CLIPTextModel | None = None, text_config: CLIPTextConfig | None = None):
        super().__init__()
        self.config, self.tokenizer = copy.deepcopy(config), tokenizer
        if tokenizer.pad_token is None:  # CLIP pads with its end token
            tokenizer.pad_token = tokenizer.eos_token
        t, d, c = config.text, config.interaction_dim, config.channels
        if text_encoder is None:
            text_config = text_config or clip_text_config(t, len(tokenizer), tokenizer.pad_token_id,
                                                           tokenizer.bos_token_id, tokenizer.eos_token_id)
            text_encoder = CLIPTextModel(text_config)
        self.text_encoder = TextEncoder(text_encoder)
        self.image_encoder = UNetEncoder(c, d, config.grid)
        self.text_proj = nn.Linear(self.text_encoder.hidden_size, d)
        self.interaction = ConditionedInteraction(d, config.interaction_heads, c[-1])
        self.film = nn.ModuleList([nn.Linear(d, 2 * ch) for ch in reversed(c[:-1])])
        self.decoder = nn.ModuleList([nn.ModuleDict({"up": nn.ConvTranspose2d(hi, lo, 2, stride=2),
                                                     "block": conv_block(2 * lo, lo)})
                                      for hi, lo in zip(reversed(c[1:]), reversed(c[:-1]))])
        self.head = nn.Conv2d(c[0], 1, 1)
        self.contrast = nn.ModuleDict({"image": nn.Linear(d, d), "text": nn.Linear(d, d)})
        if config.reconstruction:
            self.image_rec = MaskedReconstruction(d, d, config.interaction_heads, config.grid ** 2)
            self.text_rec = MaskedReconstruction(d, self.text_encoder.hidden_size, config.interaction_heads,
                                                 t.max_length)

    def configure_training(self, options: RecLMISConfig) -> None:
        """Take the training options of `options` (loss weights, mask ratio, temperature, the reconstruction switch):
        switching reconstruction off drops its heads, on adds new ones. The architecture must be the same."""
        arch = ("image_size", "channels", "interaction_dim", "interaction_heads")
        changed = [k for k in arch if getattr(options, k) != getattr(self.config, k)]
        if changed:
            raise ValueError(f"The model was built with {changed[0]} = {getattr(self.config, changed[0])}, the config "
                             f"says {getattr(options, changed[0])}: start from a model built with this config")
        self.config.loss, self.config.mask_ratio = copy.deepcopy(options.loss), options.mask_ratio
        self.config.temperature = options.temperature
        if options.reconstruction and not self.config.reconstruction:
            d, heads = self.config.interaction_dim, self.config.interaction_heads
            device = next(self.parameters()).device
            self.image_rec = MaskedReconstruction(d, d, heads, self.config.grid ** 2).to(device)
            self.text_rec = MaskedReconstruction(d, self.text_encoder.hidden_size, heads,
                                                 self.config.text.max_length).to(device)
        elif not options.reconstruction and self.config.reconstruction:
            del self.image_rec, self.text_rec
        self.config.reconstruction = options.reconstruction

    # --- inputs ----------------------------------------------------------------------------------------------
    def input_dtypes(self) -> dict[str, torch.dtype]:
        """The dtype each floating input of `forward` must arrive in: the image encoder's for the pixels (target
        masks are read in fp32 by the losses)."""
        return {"pixel_values": next(self.image_encoder.parameters()).dtype}

    def encode_notes(self, notes: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (B, L) of notes, right-padded, cut at `text.max_length`."""
        empty = [i for i, n in enumerate(notes) if not n.strip()]
        if empty:
            raise PromptError(f"Note {empty[0]} is empty: RecLMIS segments what a clinical note describes")
        enc = self.tokenizer(list(notes), padding="longest", truncation=True, max_length=self.config.text.max_length,
                             return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    # --- forward ---------------------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, masks: torch.Tensor | None = None,
                objective: str = "segment", records: Sequence | None = None) -> RecLMISOutput:
        """`objective` "segment": mask logits, and with target `masks` (B, S, S) the weighted loss (the
        reconstruction and contrastive terms in training mode only). "text": stage 1's next-token loss on the notes.
        `records` is ignored (a collated batch passes as `model(**batch)`)."""
        if input_ids is None:
            raise ValueError("RecLMIS needs the note's input_ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if objective == "text":
            lm = self.text_encoder.lm_loss(input_ids, attention_mask)
            return RecLMISOutput(loss=lm, lm_loss=lm)
        if objective != "segment":
            raise ValueError(f"objective {objective!r} is not 'segment' or 'text'")
        if pixel_values is None:
            raise ValueError("objective 'segment' needs pixel_values")
        if pixel_values.shape[-1] != self.config.image_size:
            raise ValueError(f"Images are {pixel_values.shape[-1]} px but the model takes {self.config.image_size}")
        text_hidden = self.text_encoder(input_ids, attention_mask)
        word_pad = attention_mask == 0
        words = self.text_proj(text_hidden)
        levels, content = self.image_encoder(pixel_values)
        patches = content + self.image_encoder.position
        p, w, patch_scores, word_scores = self.interaction(patches, words, word_pad)

        # decoder: conditioned bottleneck, then up through the levels, each modulated by the note's vector
        x = levels[-1] + self.interaction.to_map(p).transpose(1, 2).reshape(levels[-1].shape)
        note = (w * word_scores[..., None]).sum(1) / word_scores.sum(1, keepdim=True).clamp(min=1e-6)
        for stage, film, skip in zip(self.decoder, self.film, reversed(levels[:-1])):
            x = stage["block"](torch.cat([stage["up"](x), skip], dim=1))
            gamma, beta = film(note).chunk(2, dim=-1)
            x = x * (1 + gamma[..., None, None]) + beta[..., None, None]
        logits = self.head(x)[:, 0]
        out = RecLMISOutput(mask_logits=logits, patch_scores=patch_scores, word_scores=word_scores)
        if masks is None:
            return out
        if masks.shape != logits.shape:
            raise ValueError(f"Target masks are {tuple(masks.shape)} but predicted masks are {tuple(logits.shape)}")
        weights = self.config.loss
        out.seg_loss = 0.5 * mask_bce(logits, masks) + 0.5 * soft_dice_loss(logits, masks)
        loss = weights.seg * out.seg_loss
        if self.training:
            out.contrastive_loss = self._contrastive(patches, words, patch_scores, word_scores)
            loss = loss + weights.contrastive * out.contrastive_loss
            if self.config.reconstruction:
                ratio = self.config.mask_ratio
                every_patch = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
                image_masked = random_mask(every_patch, ratio)
                out.image_rec_loss = self.image_rec(patches, image_masked, w * word_scores[..., None], word_pad,
                                                    target=content)
                text_masked = random_mask(~word_pad, ratio)
                out.text_rec_loss = self.text_rec(words, text_masked, p, None, target=text_hidden)
                loss = loss + weights.image_rec * out.image_rec_loss + weights.text_rec * out.text_rec_loss
        out.loss = loss
        return out

    def _contrastive(self, patches: torch.Tensor, words: torch.Tensor, patch_scores: torch.Tensor,
                     word_scores: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE between each image's and each note's vector: the unimodal tokens, weighted by what the
        interaction found of interest (so neither vector already holds the other modality)."""
        img = (patches * patch_scores[..., None]).sum(1) / patch_scores.sum(1, keepdim=True).clamp(min=1e-6)
        txt = (words * word_scores[..., None]).sum(1) / word_scores.sum(1, keepdim=True).clamp(min=1e-6)
        img = F.normalize(self.contrast["image"](img).float(), dim=-1)
        txt = F.normalize(self.contrast["text"](txt).float(), dim=-1)
        logits = img @ txt.T / self.config.temperature
        target = torch.arange(len(img), device=img.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

    # --- inference -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, images: Sequence[np.ndarray], questions: Sequence[str],
                 regions: Sequence[Sequence[np.ndarray]] | None = None, max_new_tokens: int = 0,
                 mask_threshold: float = 0.0) -> list[Generation]:
        """The serving contract MedPLIB's `generate` has: for each image and note ("Segment: <note>" or the note
        alone) the answer `<SEG>` and one mask at the image's size. RecLMIS takes no pixel prompts;
        `max_new_tokens` is accepted and unused (it generates no text)."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if regions is not None and any(len(r) for r in regions):
            raise PromptError("RecLMIS takes no pixel prompts (point, box or region): give the image and a note")
        device = next(self.parameters()).device
        s = self.config.image_size
        pixels = torch.stack([preprocess_image(im, s, IMAGE_MEAN, IMAGE_STD) for im in images]).to(
            device, self.input_dtypes()["pixel_values"])
        ids, attn = self.encode_notes([note_of(q) for q in questions])
        logits = self(pixels, ids.to(device), attn.to(device)).mask_logits
        results = []
        for image, lg in zip(images, logits):
            full = unsquare(lg.cpu(), *image.shape[:2])
            results.append(Generation(text=SEG_TOKEN, masks=[(full > mask_threshold).numpy()], mask_logits=[full]))
        return results

    def inference_parameters(self) -> int:
        """Parameters used at inference (the reconstruction and contrastive heads only train)."""
        return sum(p.numel() for name, p in self.named_parameters() if name.split(".")[0] not in TRAINING_ONLY)

    # --- save / load -----------------------------------------------------------------------------------------
    def save_pretrained(self, path: Path | str) -> Path:
        """A folder with config.json ("format": "reclmis", the text encoder's CLIP config), model.safetensors and
        tokenizer/ (no pickles)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "version": 1, "model": to_dict(self.config),
                "text_encoder": self.text_encoder.clip.config.to_dict()}
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        save_model(self, str(path / WEIGHTS_FILE))
        self.tokenizer.save_pretrained(str(path / TOKENIZER_DIR))
        _write_checksums(path)
        return path

    @classmethod
    def from_pretrained(cls, path: Path | str) -> "RecLMIS":
        """Load a folder written by `save_pretrained`; every weight must be present."""
        path = Path(path)
        if not (path / CONFIG_FILE).exists():
            raise FileNotFoundError(f"{path / CONFIG_FILE} does not exist: not a saved RecLMIS model folder")
        _verify_checksums(path)
        meta = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path / CONFIG_FILE} is not a RecLMIS config (format = {meta.get('format')!r})")
        config = from_dict(RecLMISConfig, meta["model"])
        text_config = CLIPTextConfig(**{k: v for k, v in meta["text_encoder"].items()
                                        if k not in ("transformers_version", "architectures", "model_type")})
        tokenizer = AutoTokenizer.from_pretrained(str(path / TOKENIZER_DIR))
        model = cls(config, tokenizer, text_config=text_config)
        missing, unexpected = load_model(model, str(path / WEIGHTS_FILE), strict=False)
        if missing or unexpected:
            raise ValueError(f"{path / WEIGHTS_FILE} does not fit the config: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")
        return model

    @classmethod
    def build(cls, config: RecLMISConfig, notes: Iterable[str] | None = None) -> "RecLMIS":
        """A new model: CLIP's text encoder and tokenizer from `text.weights` (full), else a random text encoder over
        a BPE trained on `notes` (tiny)."""
        if config.text.weights:
            clip, tokenizer = load_clip_text(config.text.weights, config.text)
            return cls(config, tokenizer, text_encoder=clip)
        if notes is None:
            raise ValueError("The config names no text encoder folder (text.weights): pass the notes to train a "
                             "tokenizer on")
        return cls(config, train_note_tokenizer(notes, config.text.vocab_size))


def _register() -> None:
    from medplib.config.reclmis import TASKS, RecLMISSettings
    from medplib.model.family import ModelFamily, register_family

    register_family(ModelFamily(name="reclmis", model_class=RecLMIS, format=FORMAT, stages=(1, 2),
                                recipe="medplib.train.reclmis:RecLMISRecipe", registered_model="reclmis",
                                gate_metric="textseg_mdice", tasks=TASKS, settings=RecLMISSettings,
                                plan="medplib.train.reclmis:RecLMISPlan",
                                example_request={"question": "Segment: One finding: lesion in the upper left."},
                                # a first champion must segment better than chance: on the synthetic notes an
                                # all-foreground mask scores Dice ~0.1
                                floor={"textseg_mdice": 0.3}))


_register()
