"""Shapes, errors, region pooling, tokenizer template, generation and save/load of the tiny MedPLIB."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medplib.config.base import ConfigError
from medplib.config.model import ModelConfig
from medplib.model import (
    LossWeights, MedPLIB, MedTokenizer, PromptError, box_prompt_mask, freeform_prompt_mask, point_prompt_mask,
)
from medplib.model.losses import mask_bce, sigmoid_focal_loss
from medplib.model.model import RegionEncoder
from medplib.model.tokenizer import IGNORE_INDEX

from .conftest import conversation

Q_SEG, A_SEG = "<image>\nSegment the liver.", "It is the liver. <SEG>"
Q_REGION = "<image>\nWhat is in <region></region>?"


def _encode(tokenizer, pairs):
    encoded = [tokenizer.encode_conversation(conversation(q, a)) for q, a in pairs]
    length = max(len(i) for i, _ in encoded)
    ids = torch.full((len(pairs), length), tokenizer.pad_token_id)
    labels = torch.full((len(pairs), length), IGNORE_INDEX)
    mask = torch.zeros((len(pairs), length), dtype=torch.long)
    for b, (i, lab) in enumerate(encoded):
        ids[b, : len(i)], labels[b, : len(i)], mask[b, : len(i)] = torch.tensor(i), torch.tensor(lab), 1
    return ids, labels, mask


# --- tokenizer and template ----------------------------------------------------------------------------------------
def test_template_labels_only_answers_and_prompt_is_the_training_prefix(tokenizer: MedTokenizer):
    ids, labels = tokenizer.encode_conversation(conversation(Q_SEG, A_SEG))
    prompt = tokenizer.encode_prompt(Q_SEG)
    assert ids[: len(prompt)] == prompt  # one template for training and generation
    assert all(lab == IGNORE_INDEX for lab in labels[: len(prompt)])
    assert labels[len(prompt):] == ids[len(prompt):]
    assert tokenizer.decode(ids[len(prompt):]) == A_SEG
    assert ids.count(tokenizer.image_token_id) == tokenizer.num_image_tokens == 64
    start = ids.index(tokenizer.im_start_id)
    assert ids[start + 65] == tokenizer.im_end_id
    for token in ("<SEG>", "<region>", "</region>", "<ref>", "<sr>", "<mask>", "<im_start>", "<image>"):
        assert len(tokenizer.hf.encode(token, add_special_tokens=False)) == 1, token


def test_tokenizer_saves_and_loads(tokenizer: MedTokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = MedTokenizer.from_pretrained(tmp_path / "tok")
    turns = conversation(Q_REGION, "It is the kidney.")
    assert loaded.encode_conversation(turns) == tokenizer.encode_conversation(turns)
    assert (loaded.seg_token_id, loaded.num_image_tokens) == (tokenizer.seg_token_id, 64)
    with pytest.raises(ValueError, match="human/gpt pairs"):
        tokenizer.encode_conversation(turns[:1])


# --- forward shapes and errors ---------------------------------------------------------------------------------------
def test_forward_shapes_losses_and_gradients(tiny_model: MedPLIB, tokenizer):
    ids, labels, mask = _encode(tokenizer, [(Q_SEG, A_SEG), (Q_REGION, "It is the kidney.")])
    region = torch.zeros(1, 64, 64, dtype=torch.bool)
    region[0, 8:24, 8:24] = True
    target = torch.zeros(1, 64, 64)
    target[0, 20:40, 20:40] = 1
    tiny_model.train()
    out = tiny_model(ids, torch.randn(2, 3, 64, 64), mask, labels, torch.randn(2, 3, 64, 64), region,
                     torch.tensor([1]), target, LossWeights(ce=1.0, bce=2.0, dice=0.5))
    assert out.mask_logits.shape == (1, 64, 64) and out.seg_batch_index.tolist() == [0]
    expected = out.ce_loss + 2.0 * out.mask_bce + 0.5 * out.mask_dice
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    for name in ("region_encoder.region_fea_adapter.weight", "text_hidden_fcs.0.weight", "projector.0.weight",
                 "sam.mask_decoder.iou_token.weight"):
        grad = tiny_model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    # the tiny preset freezes its (pretrained) CLIP tower as MedPLIB does (model.vision.freeze)
    assert all(p.grad is None and not p.requires_grad for p in tiny_model.vision_tower.parameters())
    # SAM's vision encoder learns too (initializer_range 0.02, not transformers' 1e-10)
    assert tiny_model.sam.vision_encoder.patch_embed.projection.weight.grad.abs().max() > 1e-8
    out = tiny_model.eval()(ids, torch.randn(2, 3, 64, 64), mask, region_masks=region,
                            region_batch_index=torch.tensor([1]), sam_pixel_values=torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, ids.shape[1], len(tokenizer)) and out.loss is None


def test_sigmoid_focal_loss_matches_a_hand_computation():
    logits, targets = torch.tensor([[0.0, 2.0], [-1.0, 3.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])

    def sigmoid(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    # alpha_t * BCE * (1 - p_t)^2 per pixel: alpha_t = 0.25 on foreground, 0.75 on background
    pixels = [0.25 * math.log(2) * 0.5 ** 2, 0.75 * math.log(1 + math.exp(2)) * sigmoid(2) ** 2,
              0.75 * math.log(1 + math.exp(-1)) * sigmoid(-1) ** 2,
              0.25 * math.log(1 + math.exp(-3)) * sigmoid(-3) ** 2]
    assert float(sigmoid_focal_loss(logits, targets)) == pytest.approx(sum(pixels) / 4, rel=1e-6)
    # gamma 0 and alpha 0.5: half the BCE
    assert float(sigmoid_focal_loss(logits, targets, alpha=0.5, gamma=0.0)) == pytest.approx(
        0.5 * float(mask_bce(logits, targets)), rel=1e-6)


def test_focal_weight_zero_leaves_the_loss_unchanged_and_the_recipe_reports_it(tiny_model: MedPLIB, tokenizer):
    from medplib.config.base import to_dict
    from medplib.config.stages import tiny_stages
    from medplib.train.recipe import StageRecipe

    ids, labels, mask = _encode(tokenizer, [(Q_SEG, A_SEG)])
    target = torch.zeros(1, 64, 64)
    target[0, 20:40, 20:40] = 1
    batch = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 64, 64), "attention_mask": mask, "labels": labels,
             "sam_pixel_values": torch.randn(1, 3, 64, 64), "seg_masks": target}
    off = tiny_model(**batch, loss_weights=LossWeights(ce=1.0, bce=2.0, dice=0.5, focal=0.0))
    assert torch.equal(off.loss, off.ce_loss + 2.0 * off.mask_bce + 0.5 * off.mask_dice)
    assert float(off.mask_focal) == pytest.approx(float(sigmoid_focal_loss(off.mask_logits, target)), rel=1e-6)
    on = tiny_model(**batch, loss_weights=LossWeights(ce=1.0, bce=2.0, dice=0.5, focal=3.0))
    torch.testing.assert_close(on.loss, off.loss + 3.0 * off.mask_focal)
    recipe = StageRecipe({"spec": to_dict(tiny_stages()[3]), "data_dir": "unused", "base": "unused"})
    _, parts = recipe.loss(tiny_model, batch)
    assert parts["focal"] == pytest.approx(float(off.mask_focal), rel=1e-6) and {"bce", "dice_loss"} <= set(parts)


def test_vision_tower_is_clips_second_to_last_layer_without_cls(tiny_model: MedPLIB):
    x = torch.randn(2, 3, 64, 64)
    ref = tiny_model.vision_tower.clip(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(tiny_model.vision_tower(x), ref)
    assert ref.shape == (2, 64, 64)


def test_image_token_count_mismatch_names_the_counts(tiny_model: MedPLIB, tokenizer):
    ids, _, _ = _encode(tokenizer, [(Q_SEG, A_SEG)])
    with pytest.raises(ValueError, match=r"tokens: 64, features: 128 \(2 images x 64 patches\)"):
        tiny_model(ids, torch.randn(2, 3, 64, 64))
    no_image = torch.tensor([tokenizer.encode_prompt("Segment the liver.")])
    with pytest.raises(ValueError, match="tokens: 0, features: 64"):
        tiny_model(no_image, torch.randn(1, 3, 64, 64))


def test_region_and_seg_mismatches_are_errors(tiny_model: MedPLIB, tokenizer):
    ids, labels, mask = _encode(tokenizer, [(Q_REGION, "It is the kidney.")])
    with pytest.raises(ValueError, match="tokens: 1, prompt masks: 0"):
        tiny_model(ids, torch.randn(1, 3, 64, 64), mask, labels)
    with pytest.raises(PromptError, match="Region prompt 0 is empty"):
        tiny_model(ids, torch.randn(1, 3, 64, 64), mask, labels, region_masks=torch.zeros(1, 64, 64, dtype=torch.bool))
    ids, labels, mask = _encode(tokenizer, [(Q_SEG, A_SEG)])
    with pytest.raises(ValueError, match="no sam_pixel_values"):
        tiny_model(ids, torch.randn(1, 3, 64, 64), mask, labels)
    with pytest.raises(ValueError, match="tokens: 1, masks: 2"):
        tiny_model(ids, torch.randn(1, 3, 64, 64), mask, labels, torch.randn(1, 3, 64, 64),
                   seg_masks=torch.zeros(2, 64, 64))


def test_the_mask_is_read_from_the_state_that_emits_seg(tiny_model: MedPLIB, tokenizer):
    """LISA / MedPLIB: the grounding head reads the hidden state whose LM head predicts `<SEG>`, not the one at it."""
    tiny_model.config.seg_state = "emitting"  # the full preset's; the tiny preset reads the <SEG> token's own
    ids, _, mask = _encode(tokenizer, [(Q_SEG, A_SEG)])
    x, s = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    fed = []  # what the grounding head reads
    tiny_model.text_hidden_fcs.register_forward_hook(lambda module, args, out: fed.append(args[0]))
    before = tiny_model(ids, x, mask, sam_pixel_values=s).mask_logits
    seg_at = int((ids[0] == tokenizer.seg_token_id).nonzero())
    embeddings = tiny_model.get_input_embeddings().weight
    with torch.no_grad():  # the <SEG> embedding itself cannot reach the state before it (causal attention)
        embeddings[tokenizer.seg_token_id] += 5.0
    torch.testing.assert_close(tiny_model(ids, x, mask, sam_pixel_values=s).mask_logits, before, atol=0, rtol=0)
    torch.testing.assert_close(fed[1], fed[0], atol=0, rtol=0)
    with torch.no_grad():  # ...while the token that emits it does
        embeddings[ids[0, seg_at - 1]] += 5.0
    after = tiny_model(ids, x, mask, sam_pixel_values=s).mask_logits
    assert (fed[2] - fed[0]).abs().max() > 0.1 and not torch.equal(after, before)


def test_seg_state_token_reads_the_seg_token_s_own_state(tiny_model: MedPLIB, tokenizer):
    assert tiny_model.config.seg_state == "token" and ModelConfig.full().seg_state == "emitting"
    ids, _, mask = _encode(tokenizer, [(Q_SEG, A_SEG)])
    x, s = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    before = tiny_model(ids, x, mask, sam_pixel_values=s).mask_logits
    with torch.no_grad():  # the <SEG> embedding reaches the state at it
        tiny_model.get_input_embeddings().weight[tokenizer.seg_token_id] += 5.0
    assert not torch.equal(tiny_model(ids, x, mask, sam_pixel_values=s).mask_logits, before)
    with pytest.raises(ConfigError, match="Config key 'model.seg_state' = 'last' is not 'emitting' or 'token'"):
        ModelConfig(seg_state="last").validate("model.")


@pytest.mark.parametrize("seg_state", ["emitting", "token"])
def test_generated_seg_masks_agree_with_the_teacher_forced_ones(tiny_model: MedPLIB, tokenizer, seg_state):
    from medplib.data.torch_dataset import CLIP_MEAN, CLIP_STD, SAM_MEAN, SAM_STD, preprocess_image

    tiny_model.config.seg_state = seg_state
    _force_next_token(tiny_model, tokenizer.seg_token_id)
    fed = []  # the states the grounding head reads
    tiny_model.text_hidden_fcs.register_forward_hook(lambda module, args, out: fed.append(args[0]))
    image = np.random.default_rng(2).integers(0, 255, (64, 64), dtype=np.uint8)
    generated = tiny_model.generate([image], ["Segment the liver."], max_new_tokens=2)[0]
    assert generated.text == "<SEG><SEG>"
    prompt = tokenizer.encode_prompt("<image>\nSegment the liver.")
    ids = torch.tensor([prompt + [tokenizer.seg_token_id] * 2])
    forced = tiny_model(ids, preprocess_image(image, 64, CLIP_MEAN, CLIP_STD)[None],
                        sam_pixel_values=preprocess_image(image, 64, SAM_MEAN, SAM_STD)[None]).mask_logits
    assert forced.shape == (2, 64, 64)
    # emitting: the first mask from the prompt's last state, the second from the first <SEG>'s; token: from each
    # <SEG>'s own: two different states either way
    torch.testing.assert_close(fed[0], fed[1], atol=1e-4, rtol=1e-4)
    assert (fed[1][0] - fed[1][1]).abs().max() > 0.1
    torch.testing.assert_close(torch.stack(generated.mask_logits), forced, atol=1e-5, rtol=1e-3)


def test_a_seg_without_a_token_before_it_is_an_error(tiny_model: MedPLIB, tokenizer):
    tiny_model.config.seg_state = "emitting"
    ids, _, mask = _encode(tokenizer, [(Q_SEG, A_SEG)])
    first = ids.clone()
    first[0, 0] = tokenizer.seg_token_id
    with pytest.raises(ValueError, match=r"Sample\(s\) \[0\] have a <SEG> with no real token before it"):
        tiny_model(first, torch.randn(1, 3, 64, 64), mask, sam_pixel_values=torch.randn(1, 3, 64, 64))
    padded = torch.cat([torch.full((1, 1), tokenizer.pad_token_id), first[:, 1:]], dim=1)  # a <SEG> after padding
    padded[0, 1] = tokenizer.seg_token_id
    with pytest.raises(ValueError, match="at position 0 or after padding"):
        tiny_model(padded, torch.randn(1, 3, 64, 64), torch.cat([torch.zeros(1, 1, dtype=torch.long), mask[:, 1:]], 1),
                   sam_pixel_values=torch.randn(1, 3, 64, 64))


# --- pixel prompts and region pooling --------------------------------------------------------------------------------
def test_region_pooling_is_exactly_the_mean_of_covered_patches():
    enc = RegionEncoder(vision_hidden=5, llm_hidden=3, patch_size=8, max_points=512)
    features = torch.randn(1, 64, 5)  # 8x8 patch grid of a 64 px image
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 8:24, 16:40] = True  # patch rows 1-2, columns 2-4: 6 patches
    mask[0, 50, 60] = True  # a stray pixel covering 1/64 of a patch does not count
    patches = [r * 8 + c for r in (1, 2) for c in (2, 3, 4)]
    weights = enc.patch_weights(mask)
    assert weights[0].nonzero().flatten().tolist() == patches
    pooled = torch.einsum("rn,rnc->rc", weights, features)
    torch.testing.assert_close(pooled[0], features[0, patches].mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(enc(features, mask), enc.region_fea_adapter(features[0, patches].mean(0))[None])


def test_region_pooling_caps_points_and_keeps_small_prompts():
    enc = RegionEncoder(vision_hidden=4, llm_hidden=4, patch_size=8, max_points=5)
    full = torch.ones(1, 64, 64, dtype=torch.bool)
    assert 0 < int((enc.patch_weights(full) > 0).sum()) <= 5
    tiny = torch.zeros(1, 64, 64, dtype=torch.bool)
    tiny[0, 30:33, 30:33] = True  # smaller than half a patch: its best-covered patch is used
    assert (enc.patch_weights(tiny)[0] > 0).nonzero().flatten().tolist() == [3 * 8 + 3]


def test_pixel_prompts_and_their_errors():
    point = point_prompt_mask(10, 20, 64, 64)
    assert point.sum() == 9 * 9 and point[20, 10]  # 41 px at 336 scaled to 64 px: a 9x9 square
    assert point_prompt_mask(100, 100, 336, 336).sum() == 41 * 41
    assert point_prompt_mask(0, 0, 64, 64).sum() == 5 * 5  # clipped at the corner
    box = box_prompt_mask(2, 3, 10, 5, 64, 64)
    assert box.sum() == 9 * 3 and box[3, 2] and box[5, 10]
    with pytest.raises(PromptError, match=r"Point \(64, 3\) is outside the 64x64 image"):
        point_prompt_mask(64, 3, 64, 64)
    with pytest.raises(PromptError, match="reaches outside"):
        box_prompt_mask(0, 0, 70, 10, 64, 64)
    with pytest.raises(PromptError, match="is empty"):
        box_prompt_mask(10, 0, 2, 10, 64, 64)
    with pytest.raises(PromptError, match="no foreground"):
        freeform_prompt_mask(np.zeros((64, 64), bool), 64, 64)
    with pytest.raises(PromptError, match="32x64 but the image is 64x64"):
        freeform_prompt_mask(np.ones((64, 32), bool), 64, 64)


def _force_next_token(model: MedPLIB, token_id: int) -> None:
    bonus = torch.zeros(len(model.tokenizer))
    bonus[token_id] = 1e4
    model.llm.lm_head.register_forward_hook(lambda module, args, out: out + bonus)


# --- generation and save/load ----------------------------------------------------------------------------------------
def test_batched_generate_returns_text_and_one_mask_per_seg(tiny_model: MedPLIB, tokenizer):
    _force_next_token(tiny_model, tokenizer.seg_token_id)  # the untrained model now answers <SEG><SEG>...
    images = [np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8),
              np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)]
    region = box_prompt_mask(4, 4, 20, 20, 48, 64)
    results = tiny_model.generate(images, ["Segment the liver.", "What is in <region>?"], [[], [region]],
                                  max_new_tokens=3)
    for result, image in zip(results, images):
        assert result.text == "<SEG><SEG><SEG>"
        assert len(result.masks) == 3 and result.masks[0].shape == image.shape[:2] and result.masks[0].dtype == bool
    # batching does not change an answer: left padding with matching positions
    alone = tiny_model.generate(images[1:], ["What is in <region>?"], [[region]], max_new_tokens=3)[0]
    torch.testing.assert_close(alone.mask_logits[0], results[1].mask_logits[0], atol=1e-4, rtol=0)
    with pytest.raises(PromptError, match="1 <region> placeholder"):
        tiny_model.generate(images[:1], ["What is in <region>?"], [[]])


def test_generate_stops_at_end_token(tiny_model: MedPLIB, tokenizer):
    _force_next_token(tiny_model, tokenizer.eos_token_id)
    result = tiny_model.generate([np.zeros((64, 64), np.uint8)], ["Is this a CT image?"], max_new_tokens=5)[0]
    assert result.text == "" and result.masks == []


def test_save_and_load_round_trip_without_pickles(tiny_model: MedPLIB, tokenizer, tmp_path):
    path = tiny_model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == ["checksums.json", "config.json", "model.safetensors", "tokenizer"]
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt"))
    loaded = MedPLIB.from_pretrained(path).eval()
    ids, _, mask = _encode(tokenizer, [(Q_SEG, A_SEG)])
    x, s = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    a, b = tiny_model(ids, x, mask, sam_pixel_values=s), loaded(ids, x, mask, sam_pixel_values=s)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    torch.testing.assert_close(a.mask_logits, b.mask_logits, atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="not a saved MedPLIB model"):
        MedPLIB.from_pretrained(tmp_path)


def test_a_model_saved_before_a_new_special_token_loads_and_evaluates_after_it(tiny_model: MedPLIB, tokenizer,
                                                                              tmp_path, monkeypatch):
    import medplib.model.tokenizer as tokenizer_module
    from medplib.data.ingest import build_dataset
    from medplib.data.synth import generate
    from medplib.eval.runner import evaluate

    from .conftest import TEXTS

    path = tiny_model.save_pretrained(tmp_path / "m")
    # later, a task brings a special token of its own
    monkeypatch.setattr(tokenizer_module, "SPECIAL_TOKENS", tokenizer_module.SPECIAL_TOKENS + ("<count>",))
    fresh = MedTokenizer.train(TEXTS, 256, 64)
    assert "<count>" in fresh.special_tokens  # a tokenizer built now has it
    loaded = MedPLIB.from_pretrained(path).eval()  # the old one loads as saved: not a token more
    assert len(loaded.tokenizer) == len(tokenizer) and "<count>" not in loaded.tokenizer.special_tokens
    assert loaded.llm.get_input_embeddings().num_embeddings == len(tokenizer)
    generate(tmp_path / "src", n=8, seed=3)
    build_dataset(tmp_path / "src", tmp_path / "data", "synth", [], 8192 * 8192)
    before, after = (evaluate(m, tmp_path / "data", splits=("test",), limit=6) for m in (tiny_model, loaded))
    assert after.summary == before.summary and after.summary  # it evaluates, with the same answers
