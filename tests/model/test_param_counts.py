"""Full-preset parameter counts, computed on the meta device (no memory, no weights)."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from medplib.config.base import merge
from medplib.config.model import ModelConfig
from medplib.model import MedPLIB, MedTokenizer, parameter_counts


def llava_sized_tokenizer(config: ModelConfig) -> MedTokenizer:
    """A stand-in with LLaVA-1.5's 32000-entry vocabulary (plus MedPLIB's special tokens once wrapped)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 32000)}}
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                 unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    return MedTokenizer(hf, config.vision.num_patches, config.system_prompt)


def test_full_preset_parameter_counts_on_meta():
    dense_cfg = ModelConfig.full()
    tok = llava_sized_tokenizer(dense_cfg)
    assert len(tok) == 32000 + 12
    with torch.device("meta"):
        dense = MedPLIB(dense_cfg, tok)
        moe = MedPLIB(merge(dense_cfg, {"moe": {"num_experts": 2}}), tok)
    d, m = parameter_counts(dense), parameter_counts(moe)
    parts = {name: sum(p.numel() for p in getattr(dense, name).parameters())
             for name in ("vision_tower", "llm", "sam", "projector", "region_encoder", "text_hidden_fcs")}
    print({"dense": d, "moe2": m, "parts": parts})
    assert 303e6 < parts["vision_tower"] < 305e6  # CLIP ViT-L/14-336
    assert 6.73e9 < parts["llm"] < 6.75e9  # LLaMA-2-7B + 12 tokens
    assert 90e6 < parts["sam"] < 95e6  # SAM ViT-B encoder + prompt encoder + decoder
    assert 7.0e9 < d["total"] < 7.3e9 and d["active"] == d["total"]  # ≈ 7B dense
    ffn = 3 * 4096 * 11008 * 32  # one expert's FFNs over 32 layers ≈ 4.33B
    assert m["total"] == d["total"] + ffn + 2 * 4096 * 32  # second expert + routers
    assert 11.0e9 < m["total"] < 11.8e9  # ≈ 11B with 2 experts
    assert m["active"] == d["total"] + 2 * 4096 * 32  # ≈ 7B active: one expert + the router
