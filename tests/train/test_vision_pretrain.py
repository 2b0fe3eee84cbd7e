"""Contrastive pretraining of the tiny preset's CLIP tower (medplib/train/vision_pretrain.py): it learns to tell images
apart by what they show, on images it never trained on; the initial model keeps the pretrained tower, frozen."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medplib.config.base import ConfigError, merge
from medplib.config.model import ModelConfig
from medplib.config.presets import load_config
from medplib.data.schema import Record
from medplib.model.model import MedPLIB, VisionTower, clip_vision_config
from medplib.train.vision_pretrain import (ContrastiveHeads, bag_of_words, caption_pairs, contrastive_loss,
                                          pretrain_tower, words)

CAPTIONS = ["An image showing a square.", "An image showing a disk.", "An image showing a square and a disk.",
            "An image showing nothing."]


def _image(caption: str, rng: np.random.Generator) -> np.ndarray:
    """A 64 px grey image with noise and, at random places, the shapes its caption names."""
    img = rng.normal(0.5, 0.05, (64, 64))
    yy, xx = np.mgrid[:64, :64]
    if "square" in caption:
        y, x = rng.integers(4, 40, 2)
        img[y:y + 16, x:x + 16] = 1.0
    if "disk" in caption:
        y, x = rng.integers(12, 52, 2)
        img[(yy - y) ** 2 + (xx - x) ** 2 < 81] = 0.0
    return np.clip(np.repeat(img[..., None], 3, -1), 0, 1)


def _pairs(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    rng = np.random.default_rng(seed)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    pixels = torch.tensor(np.stack([_image(c, rng) for c in captions]), dtype=torch.float32).permute(0, 3, 1, 2)
    return (pixels - 0.4) / 0.27, captions


def _tower(seed: int = 0) -> VisionTower:
    torch.manual_seed(seed)
    from transformers import CLIPVisionModel

    cfg = ModelConfig.tiny()
    tower = VisionTower(CLIPVisionModel(clip_vision_config(cfg)), cfg.vision.select_layer)
    tower.requires_grad_(False)  # as the tiny preset's model holds it (model.vision.freeze)
    return tower


def _retrieval(tower: VisionTower, heads: ContrastiveHeads, pixels: torch.Tensor, captions: list[str]) -> float:
    bow, _ = bag_of_words(CAPTIONS)
    with torch.no_grad():
        scores = F.normalize(heads.embed_images(tower.eval(), pixels), dim=-1) @ F.normalize(heads.text(bow), -1).T
    return float(np.mean([CAPTIONS[int(i)] == c for i, c in zip(scores.argmax(1), captions)]))


def test_the_tower_learns_what_images_show_on_images_it_never_saw():
    """Retrieval of the caption among 4 (chance 0.25) on 48 images it never trained on, after 120 steps on 256 (the
    contrastive heads are kept to read the tower)."""
    train_pixels, train_captions = _pairs(256, seed=1)
    test_pixels, test_captions = _pairs(48, seed=2)
    torch.manual_seed(0)
    heads = ContrastiveHeads(64, len(bag_of_words(CAPTIONS)[1]))
    tower = _tower()
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    result = pretrain_tower(tower, train_pixels, train_captions, epochs=30, batch=64, lr=1e-3, seed=0,
                            progress=False, heads=heads)
    assert result.steps == 120 and result.pairs == 256 and result.captions == 4
    # 16 positives per caption in a batch of 64: the loss's floor is log 16 = 2.77 (the targets' entropy)
    assert result.first_loss > 3.3 and result.last_loss < 3.0 and result.retrieval > 0.9, result
    held_out = _retrieval(tower, heads, test_pixels, test_captions)
    assert held_out >= 0.85, held_out  # chance 0.25; measured 0.98
    # the tower itself changed (not only the heads), and is left frozen as it was found
    changed = [k for k, v in tower.state_dict().items() if not torch.equal(v, before[k])]
    assert "clip.embeddings.patch_embedding.weight" in changed
    assert any(k.startswith("clip.encoder.layers.0.") for k in changed)
    assert not any(p.requires_grad for p in tower.parameters())
    # blocks past the selected layer never run, so pretraining leaves them as they were
    assert not any(k.startswith(f"clip.encoder.layers.{tower.num_blocks}.") for k in changed)


def test_pretraining_is_seeded():
    pixels, captions = _pairs(16, seed=3)
    a, b = _tower(), _tower()
    ra = pretrain_tower(a, pixels, captions, epochs=4, batch=8, lr=1e-3, seed=5, progress=False)
    rb = pretrain_tower(b, pixels, captions, epochs=4, batch=8, lr=1e-3, seed=5, progress=False)
    assert ra.last_loss == rb.last_loss
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_pairs_sharing_a_caption_are_each_others_positives():
    assert words("A CT image, showing the Liver.") == ["a", "ct", "image", "showing", "the", "liver"]
    bow, vocab = bag_of_words(["a liver", "a kidney"])
    assert vocab == ["a", "kidney", "liver"] and bow.tolist() == [[1, 0, 1], [1, 1, 0]]
    # image 0 scores highest with text 1: right when 0 and 1 share a caption, wrong when every pair is its own
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    scale = torch.tensor(np.log(10.0))
    shared = contrastive_loss(image, text, torch.tensor([0, 0, 1]), scale)
    distinct = contrastive_loss(image, text, torch.tensor([0, 1, 2]), scale)
    assert shared + 3 < distinct, (shared, distinct)  # 3.3 against 6.7
    with pytest.raises(ValueError, match="got 2 images and 1 captions"):
        pretrain_tower(_tower(), torch.zeros(2, 3, 64, 64), ["a"], 1, 2, 1e-3, progress=False)


def _data(root: Path, captions: bool) -> Path:
    data = root / "data"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(8):
        caption = CAPTIONS[i % 4]
        Image.fromarray((_image(caption, rng) * 255).astype(np.uint8)).save(data / "images" / f"{i}.png")
        if captions or i == 7:  # without captions, the one caption record is in the test split
            split = "train" if i < 7 else "test"
            turns = [{"from": "human", "value": "<image>\nDescribe the image briefly."},
                     {"from": "gpt", "value": caption}]
            records.append(Record(f"c{i}", f"images/{i}.png", "ct", split, "caption", turns))
        turns = [{"from": "human", "value": "<image>\nIs this a CT image?"}, {"from": "gpt", "value": "Yes."}]
        records.append(Record(f"q{i}", f"images/{i}.png", "ct", "train", "vqa_closed", turns))
    (data / "records.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
    return data


def test_the_initial_model_holds_the_pretrained_tower_frozen(tmp_path):
    from medplib.train.runner import VISION_PRETRAIN_FILE, build_init_model

    data = _data(tmp_path, captions=True)
    assert caption_pairs(data) == [(f"images/{i}.png", CAPTIONS[i % 4]) for i in range(7)]
    cfg = merge(load_config("tiny"), {"model": {"vision": {"pretrain_epochs": 8, "pretrain_batch": 4}}})
    assert cfg.model.vision.freeze  # the tiny preset freezes it, as MedPLIB freezes its CLIP
    out = build_init_model(cfg, data, tmp_path / "init")
    record = json.loads((out / VISION_PRETRAIN_FILE).read_text())
    assert record["steps"] == 14 and record["pairs"] == 7 and record["captions"] == 4
    model = MedPLIB.from_pretrained(out)
    plain = build_init_model(merge(cfg, {"model": {"vision": {"pretrain_epochs": 0}}}), data, tmp_path / "plain")
    assert not (plain / VISION_PRETRAIN_FILE).exists()
    random = MedPLIB.from_pretrained(plain)
    key = "clip.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(model.vision_tower.state_dict()[key], random.vision_tower.state_dict()[key])
    # the rest of the model is the same seeded init: only the tower was pretrained
    assert torch.equal(model.projector[0].weight, random.projector[0].weight)
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    # stages I and II of the tiny preset do not train the tower
    from medplib.train.lora import set_trainable

    for stage in (1, 2):
        set_trainable(model, getattr(cfg.train, f"stage{stage}").train)
        assert not any(p.requires_grad for p in model.vision_tower.parameters()), stage


def test_no_caption_to_pretrain_on_is_a_clear_error_and_bad_keys_are_refused(tmp_path):
    from medplib.train.runner import build_init_model

    data = _data(tmp_path, captions=False)
    with pytest.raises(ValueError, match=r"model.vision.pretrain_epochs = 120 but .*data/records.jsonl has no "
                                         r"train-split caption \(alignment\) record"):
        build_init_model(load_config("tiny"), data, tmp_path / "init")
    for key, value, message in (("pretrain_epochs", -1, "must be >= 0"), ("pretrain_batch", 1, "must be >= 2"),
                                ("pretrain_lr", 0.0, "must be > 0")):
        with pytest.raises(ConfigError, match=rf"Config key 'model.vision.{key}' = {value} {message}"):
            load_config("tiny", {"model": {"vision": {key: value}}})


def test_each_image_moves_by_its_own_offset_within_the_bound():
    from medplib.train.vision_pretrain import shift

    pixels = torch.zeros(64, 1, 16, 16)
    pixels[:, 0, 8, 8] = 1.0  # one bright pixel in the middle of each image
    moved = shift(pixels, 3, torch.Generator().manual_seed(0))
    assert moved.shape == pixels.shape and torch.equal(moved.sum((1, 2, 3)), torch.ones(64))
    where = [divmod(int(m.flatten().argmax()), 16) for m in moved]
    offsets = {(y - 8, x - 8) for y, x in where}
    assert all(abs(dy) <= 3 and abs(dx) <= 3 for dy, dx in offsets)
    assert len(offsets) > 20  # its own offset per image (49 possible)
    # edges replicated, not wrapped: a ramp moved by dx is the ramp's values dx on, clamped at its ends
    ramp = torch.arange(16.0).expand(8, 1, 16, 16).clone()
    out = shift(ramp, 4, torch.Generator().manual_seed(1))
    for row in out[:, 0, 0]:
        assert any(torch.equal(row, (torch.arange(16.0) + dx).clamp(0, 15)) for dx in range(-4, 5)), row
    # seeded, and 0 leaves the images as they are
    again = shift(pixels, 3, torch.Generator().manual_seed(0))
    assert torch.equal(moved, again) and shift(pixels, 0, torch.Generator()) is pixels


def test_a_shift_of_half_the_image_is_refused():
    with pytest.raises(ConfigError, match=r"Config key 'model.vision.pretrain_shift' = 32 must be below half of "
                                          r"'model.vision.image_size' = 64"):
        load_config("tiny", {"model": {"vision": {"pretrain_shift": 32}}})
    with pytest.raises(ConfigError, match=r"Config key 'model.vision.pretrain_shift' = -1 must be >= 0"):
        load_config("tiny", {"model": {"vision": {"pretrain_shift": -1}}})
