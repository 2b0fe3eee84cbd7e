"""TISR's plug-in (medplib/model/tisr.py): pseudo-words from the image before the prompt, the refinement loss on the
reports of a batch, attach / save / load, and the stage recipe attaching it when the config enables it."""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medplib.config import ConfigError, from_dict
from medplib.config.model import ModelConfig, TISRConfig
from medplib.config.stages import tiny_stages
from medplib.model import MedPLIB, MedTokenizer
from medplib.model.tisr import TextualInversion, prepend, refinement_loss, text_embedding
from medplib.train.lora import set_trainable
from medplib.train.recipe import build_stage_model

from .test_model import _encode

REPORT_Q = "<image>\nWrite the findings of this chest X-ray."
REPORTS = ["No liver is seen. There is a small kidney.", "There is a large liver. No kidney is seen."]


def _with_tisr(tiny_config: ModelConfig, tokenizer: MedTokenizer, **keys) -> MedPLIB:
    torch.manual_seed(0)
    config = dataclasses.replace(tiny_config, tisr=TISRConfig(enabled=True, **keys))
    return MedPLIB(config, tokenizer).eval()


def _batch(tokenizer, n: int = 2):
    ids, labels, mask = _encode(tokenizer, [(REPORT_Q, REPORTS[i % 2]) for i in range(n)])
    return dict(input_ids=ids, labels=labels, attention_mask=mask, pixel_values=torch.randn(n, 3, 64, 64),
                records=[SimpleNamespace(task="report")] * n)


def test_pseudo_words_go_before_the_prompt_and_carry_the_image(tiny_config, tokenizer):
    model = _with_tisr(tiny_config, tokenizer, num_pseudo_words=3)
    batch = _batch(tokenizer)
    batch.pop("labels")
    logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape  # one logit row per prompt token: the prefix is cut off
    with torch.no_grad():
        model.tisr.mlp[-1].bias.add_(1.0)  # other pseudo-words, same prompt
    assert not torch.allclose(model(**batch).logits, logits, atol=1e-4)
    words = model.tisr(torch.randn(2, 64, tiny_config.vision.hidden_size))
    assert words.shape == (2, 3, tiny_config.llm.hidden_size)


def test_prepend_puts_the_words_first_and_unmasked():
    words, embeds = torch.ones(2, 3, 4), torch.zeros(2, 5, 4)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # left padding
    out, out_mask = prepend(words, embeds, mask)
    assert out.shape == (2, 8, 4) and torch.equal(out[:, :3], words) and torch.equal(out[:, 3:], embeds)
    assert out_mask.tolist() == [[1, 1, 1, 0, 0, 1, 1, 1], [1] * 8]
    with pytest.raises(ValueError, match="do not fit"):
        prepend(torch.ones(1, 3, 4), embeds, mask)


def test_batched_generation_with_pseudo_words_equals_one_at_a_time(tiny_config, tokenizer):
    model = _with_tisr(tiny_config, tokenizer)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 48), dtype=np.uint8) for _ in range(2)]
    questions = ["Write the findings of this chest X-ray.", "Is this a CT image?"]  # different lengths: left pads
    both = model.generate(images, questions, max_new_tokens=6)
    alone = [model.generate([im], [q], max_new_tokens=6)[0] for im, q in zip(images, questions)]
    assert [g.text for g in both] == [g.text for g in alone]


def test_refinement_loss_reads_the_reports_and_moves_only_the_plugin(tiny_config, tokenizer):
    model = _with_tisr(tiny_config, tokenizer, refine_weight=0.5)
    out = model(**_batch(tokenizer))
    assert out.tisr_loss is not None and out.tisr_loss > 0
    assert torch.allclose(out.loss, out.ce_loss + 0.5 * out.tisr_loss)
    out.tisr_loss.backward()
    assert model.tisr.queries.grad is not None and model.tisr.queries.grad.abs().sum() > 0
    assert model.get_input_embeddings().weight.grad is None  # the report's embedding is the target, not moved

    other = _batch(tokenizer)
    other["records"] = [SimpleNamespace(task="report"), SimpleNamespace(task="vqa_closed")]
    assert model(**other).tisr_loss is None  # one report: nothing to contrast
    assert model(**_batch(tokenizer, n=1)).tisr_loss is None
    off = _with_tisr(tiny_config, tokenizer, refine_weight=0.0)
    assert off(**_batch(tokenizer)).tisr_loss is None


def test_refinement_aligns_each_image_with_its_own_report():
    """The contrastive loss learns: 8 images' pseudo-words find their own report among the 8 (chance 1/8)."""
    torch.manual_seed(0)
    inversion = TextualInversion(feature_size=16, embed_size=12, num_pseudo_words=2)
    features, reports = torch.randn(8, 10, 16), torch.randn(8, 12)
    before = refinement_loss(inversion(features), reports, 0.1).item()
    optimizer = torch.optim.Adam(inversion.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        refinement_loss(inversion(features), reports, 0.1).backward()
        optimizer.step()
    after = refinement_loss(inversion(features), reports, 0.1).item()
    assert before > 0.5 * math.log(8) and after < 0.1 * before, (before, after)
    similarity = torch.nn.functional.normalize(inversion(features).mean(1), dim=-1) @ \
        torch.nn.functional.normalize(reports, dim=-1).T
    assert similarity.argmax(dim=1).tolist() == list(range(8))
    assert refinement_loss(inversion(features[:1]), reports[:1], 0.1) is None


def test_text_embedding_is_the_mean_of_the_answer_tokens(tiny_model: MedPLIB):
    labels = torch.tensor([[-100, 5, 7, -100], [-100, -100, -100, -100]])
    table = tiny_model.get_input_embeddings().weight
    text = text_embedding(tiny_model, labels)
    assert torch.allclose(text[0], (table[5] + table[7]) / 2) and torch.equal(text[1], torch.zeros_like(text[1]))


def test_attach_save_and_load(tiny_model: MedPLIB, tmp_path):
    assert tiny_model.tisr is None and not tiny_model.config.tisr.enabled
    tiny_model.attach_tisr(TISRConfig(num_pseudo_words=2, seed=3))
    assert tiny_model.config.tisr.enabled and tiny_model.tisr.num_pseudo_words == 2
    with pytest.raises(ValueError, match="already has"):
        tiny_model.attach_tisr(TISRConfig())
    image = np.full((32, 32), 100, np.uint8)
    expected = tiny_model.generate([image], ["Write the findings of this chest X-ray."], max_new_tokens=5)[0].text
    loaded = MedPLIB.from_pretrained(tiny_model.save_pretrained(tmp_path / "m")).eval()
    assert loaded.tisr is not None and torch.equal(loaded.tisr.queries, tiny_model.tisr.queries)
    assert loaded.generate([image], ["Write the findings of this chest X-ray."], max_new_tokens=5)[0].text == expected


def test_the_stage_recipe_attaches_it_when_the_config_enables_it(tiny_model: MedPLIB, tmp_path):
    base = tiny_model.save_pretrained(tmp_path / "stage1")
    spec = tiny_stages()[2]
    plain = build_stage_model(spec, base)
    assert plain.tisr is None
    plugged = build_stage_model(spec, base, tisr=TISRConfig(enabled=True, seed=1))
    assert plugged.tisr is not None and plugged.tisr.queries.requires_grad  # stage II's patterns train it
    frozen = build_stage_model(tiny_stages()[3], base, tisr=TISRConfig(enabled=True, seed=1))
    assert not frozen.tisr.queries.requires_grad  # the grounding stage does not
    again = build_stage_model(spec, base, tisr=TISRConfig(enabled=True, seed=1))
    assert torch.equal(again.tisr.queries, plugged.tisr.queries)  # seeded
    set_trainable(plain, ("tisr.*", "projector.*"))  # a pattern with no match in a model without it is harmless


@pytest.mark.parametrize("key, value", [("num_pseudo_words", 0), ("refine_weight", -1.0), ("temperature", 0.0),
                                        ("refine_tasks", ["no_such_task"])])
def test_bad_tisr_config_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"model.tisr.{key}"):
        from_dict(TISRConfig, {key: value}, "model.tisr.")
