"""Build a MedPLIB model from a config: random init (tiny) or local CLIP, LLaVA and SAM checkpoints (full).

Accepted local formats (hub downloads are impossible here):
- CLIP: a `CLIPModel` (openai/clip-vit-large-patch14-336) or `CLIPVisionModel` folder.
- LLaVA: a llava-hf `LlavaForConditionalGeneration` folder (language model, projector, vision tower), or the original
  LLaVA / Vicuna layout: a LLaMA folder whose weights may carry `model.mm_projector.{0,2}.*`.
- SAM: a transformers `SamModel` folder (SAM-Med2D converted to it). SAM-Med2D's adapters, when the folder's weights
  carry them (`vision_encoder.layers.{i}.mlp.adapter.*`, see medplib/model/sam_adapter.py), are attached and loaded.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration, SamModel

from medplib.config.model import ModelConfig
from medplib.model.model import MedPLIB
from medplib.model.sam_adapter import ADAPTER_KEY, attach_adapters, has_adapters
from medplib.model.tokenizer import MedTokenizer

log = logging.getLogger(__name__)
PROJECTOR_PREFIX = "model.mm_projector."


def _folder(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{what} checkpoint folder {p} has no config.json (give a local folder saved by "
                                "transformers' save_pretrained)")
    if not any(p.glob("*.safetensors")):  # weights load from safetensors only: a pickle can run code when read
        pickles = sorted(f.name for pat in ("*.bin", "*.pt", "*.pth", "*.ckpt") for f in p.glob(pat))
        found = f"; it holds pickled weights ({', '.join(pickles[:3])})" if pickles else ""
        raise ValueError(f"{what} checkpoint folder {p} has no .safetensors weights{found}. medplib loads "
                         "safetensors only: convert once with save_pretrained(..., safe_serialization=True)")
    return p


def _check(what: str, pairs: Iterable[tuple[str, object, object]]) -> None:
    for key, ours, theirs in pairs:
        if ours != theirs:
            raise ValueError(f"The {what} checkpoint has {key} = {theirs} but the model config says {ours}")


def load_clip_vision(path: str | Path, cfg: ModelConfig) -> CLIPVisionModel:
    """CLIP vision tower from a CLIPModel or CLIPVisionModel folder, checked against `cfg.vision`."""
    clip = CLIPVisionModel.from_pretrained(str(_folder(path, "CLIP")), attn_implementation="sdpa",
                                           use_safetensors=True)
    c, v = clip.config, cfg.vision
    _check("CLIP", [("hidden_size", v.hidden_size, c.hidden_size), ("num_hidden_layers", v.num_layers,
                    c.num_hidden_layers), ("image_size", v.image_size, c.image_size),
                    ("patch_size", v.patch_size, c.patch_size)])
    return clip


def _projector_from_shards(folder: Path, keys_only: bool = False) -> dict[str, torch.Tensor | None]:
    state: dict[str, torch.Tensor | None] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                if key.startswith(PROJECTOR_PREFIX):
                    state[key[len(PROJECTOR_PREFIX):]] = None if keys_only else f.get_tensor(key)
    return state


def has_aligned_projector(path: str | Path) -> bool:
    """Whether a LLaVA folder brings its trained projector (llava-hf's, or the original layout's `mm_projector`):
    then MedPLIB's stage I (alignment) has nothing left to do. Reads config.json and the shards' headers only."""
    folder = _folder(path, "LLaVA")
    if json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type") == "llava":
        return True
    return bool(_projector_from_shards(folder, keys_only=True))


def load_llava(path: str | Path, cfg: ModelConfig) -> tuple[LlamaForCausalLM, dict[str, torch.Tensor],
                                                             CLIPVisionModel | None]:
    """LLaMA causal LM, projector weights (keys of our `mlp2x_gelu`: 0.*, 2.*) and, if present, the vision tower."""
    folder = _folder(path, "LLaVA")
    meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if meta.get("model_type") == "llava":  # llava-hf layout
        llava = LlavaForConditionalGeneration.from_pretrained(str(folder), attn_implementation="sdpa",
                                                              use_safetensors=True)
        with torch.device("meta"):  # both submodules are replaced by the loaded ones
            llm = LlamaForCausalLM(llava.config.text_config)
        llm.model, llm.lm_head = llava.model.language_model, llava.lm_head
        proj = llava.model.multi_modal_projector
        projector = {"0.weight": proj.linear_1.weight, "0.bias": proj.linear_1.bias,
                     "2.weight": proj.linear_2.weight, "2.bias": proj.linear_2.bias}
        vision = llava.model.vision_tower
    else:  # LLaMA / Vicuna / original LLaVA (model_type llava_llama): the LM plus optional mm_projector tensors
        allowed = set(LlamaConfig().to_dict())
        llama_cfg = LlamaConfig(**{k: v for k, v in meta.items() if k in allowed and k != "model_type"})
        llm = LlamaForCausalLM.from_pretrained(str(folder), config=llama_cfg, attn_implementation="sdpa",
                                               use_safetensors=True)
        projector, vision = _projector_from_shards(folder), None
    c, m = llm.config, cfg.llm
    _check("LLaVA", [("hidden_size", m.hidden_size, c.hidden_size), ("num_hidden_layers", m.num_layers,
                     c.num_hidden_layers), ("intermediate_size", m.intermediate_size, c.intermediate_size)])
    if projector and cfg.projector != "mlp2x_gelu":
        raise ValueError(f"The LLaVA checkpoint has an mlp2x_gelu projector but the config says {cfg.projector!r}")
    return llm, {k: v.detach().clone() for k, v in projector.items()}, vision


def load_sam(path: str | Path, cfg: ModelConfig) -> SamModel:
    """SAM (SAM-Med2D converted to transformers' SamModel) checked against `cfg.sam`, with SAM-Med2D's adapters
    attached and loaded when its weights carry them (transformers' loader would drop those keys)."""
    folder = _folder(path, "SAM")
    sam = SamModel.from_pretrained(str(folder), attn_implementation="sdpa", use_safetensors=True)
    v, s = sam.config.vision_config, cfg.sam
    _check("SAM", [("image_size", s.image_size, v.image_size), ("vision hidden_size", s.vision_hidden_size,
                   v.hidden_size), ("num_hidden_layers", s.vision_layers, v.num_hidden_layers),
                   ("output_channels", s.hidden_size, v.output_channels)])
    adapters = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            adapters |= {k: f.get_tensor(k) for k in f.keys() if ADAPTER_KEY.search(k)}
    if adapters:
        attach_adapters(sam)
        expected = {k for k in sam.state_dict() if ADAPTER_KEY.search(k)}
        given = {"vision_encoder." + k.split("vision_encoder.", 1)[1]: t  # a "sam." / "model." prefix dropped
                 for k, t in adapters.items()}
        if set(given) != expected:
            missing, extra = sorted(expected - set(given)), sorted(set(given) - expected)
            raise ValueError(f"SAM folder {folder}: its SAM-Med2D adapter weights do not match the image encoder "
                             f"(missing {missing[:3]}{'…' if len(missing) > 3 else ''}, unexpected "
                             f"{extra[:3]}{'…' if len(extra) > 3 else ''})")
        sam.load_state_dict(given, strict=False)
        log.info("SAM %s: SAM-Med2D adapters loaded in %d blocks", folder, len(sam.vision_encoder.layers))
    elif s.adapters:
        attach_adapters(sam)
        log.info("SAM %s has no adapter weights: model.sam.adapters starts them fresh", folder)
    return sam


def load_tokenizer(cfg: ModelConfig, texts: Iterable[str] | None = None) -> MedTokenizer:
    """Full preset: LLaVA's tokenizer from `llm.tokenizer` (or `llm.weights`); tiny: a BPE trained on `texts`."""
    source = cfg.llm.tokenizer or cfg.llm.weights
    if source:
        return MedTokenizer.from_pretrained(source, num_image_tokens=cfg.vision.num_patches,
                                            system_prompt=cfg.system_prompt)
    if texts is None:
        raise ValueError("The config names no tokenizer folder (llm.tokenizer / llm.weights): pass the dataset's "
                         "texts to train one")
    return MedTokenizer.train(texts, cfg.llm.vocab_size, cfg.vision.num_patches, cfg.system_prompt)


def build_model(cfg: ModelConfig, tokenizer: MedTokenizer) -> MedPLIB:
    """The model of `cfg`: parts with a `weights` folder are loaded from it, the rest is randomly initialised."""
    clip = load_clip_vision(cfg.vision.weights, cfg) if cfg.vision.weights else None
    llm, projector, llava_vision = None, {}, None
    if cfg.llm.weights:
        llm, projector, llava_vision = load_llava(cfg.llm.weights, cfg)
    if clip is None and llava_vision is not None:
        clip = llava_vision
    sam = load_sam(cfg.sam.weights, cfg) if cfg.sam.weights else None
    if sam is not None and has_adapters(sam) and not cfg.sam.adapters:  # the saved model must rebuild them
        cfg = replace(cfg, sam=replace(cfg.sam, adapters=True))
    model = MedPLIB(cfg, tokenizer, clip=clip, llm=llm, sam=sam)
    if projector:
        model.projector.load_state_dict(projector)
    model.loaded = {"vision": clip is not None, "llm": llm is not None, "sam": sam is not None}  # else random
    log.info("built MedPLIB: vision %s, llm %s, sam %s", cfg.vision.weights or "random", cfg.llm.weights or "random",
             cfg.sam.weights or "random")
    return model
