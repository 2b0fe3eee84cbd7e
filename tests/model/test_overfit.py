"""The tiny model learns: 8 synthetic samples are overfitted (answers and masks), and the masks follow the question.

Three images each carry two grounding questions about different objects, so one image needs two different masks:
only the `<SEG>` state tells them apart (zeroing it must cost Dice). Two region questions exercise the pixel prompts.
"""
from __future__ import annotations

import collections
import time

import numpy as np
import pytest
import torch

from medplib.config.model import ModelConfig
from medplib.data.images import read_image, read_mask
from medplib.data.ingest import build_dataset
from medplib.data.synth import generate
from medplib.data.torch_dataset import MedDataset, read_records, strip_paths
from medplib.model import LossWeights, MedPLIB, MedTokenizer, dice_score


@pytest.mark.integration
def test_overfit_eight_synthetic_samples(tmp_path):
    generate(tmp_path / "src", n=24, seed=1)
    build_dataset(tmp_path / "src", tmp_path / "data", "synth", [], 8192 * 8192)
    records = read_records(tmp_path / "data")
    by_image = collections.defaultdict(list)
    for r in records:
        if r.task == "grounding" and r.split == "train":
            by_image[r.image].append(r)
    pairs = [rs[:2] for rs in by_image.values() if len(rs) >= 2][:3]
    chosen = [r for pair in pairs for r in pair] + [r for r in records if r.task == "region_vqa"][:2]
    assert len(chosen) == 8 and len(pairs) == 3

    cfg = ModelConfig.tiny()
    texts = [t["value"] for r in records for t in strip_paths(r.conversations)[0]]
    tokenizer = MedTokenizer.train(texts, cfg.llm.vocab_size, cfg.vision.num_patches)
    dataset = MedDataset(tmp_path / "data", tokenizer, cfg.vision.image_size, cfg.sam.image_size, records=chosen)
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    torch.manual_seed(0)
    model = MedPLIB(cfg, tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    weights = LossWeights(ce=1.0, bce=1.0, dice=1.0)
    start = time.perf_counter()
    for step in range(600):
        out = model(**batch, loss_weights=weights)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if step % 20 == 19:
            dice = dice_score(out.mask_logits > 0, batch["seg_masks"] > 0.5)
            if out.ce_loss.item() < 0.02 and dice.min().item() > 0.95:
                break
    model.eval()
    with torch.no_grad():
        out = model(**batch, loss_weights=weights)
        dice = dice_score(out.mask_logits > 0, batch["seg_masks"] > 0.5)
        generated = _generate_and_score(model, tmp_path / "data", chosen)
        model.text_hidden_fcs.register_forward_hook(lambda m, args, o: torch.zeros_like(o))  # <SEG> state zeroed
        blind = dice_score(model(**batch).mask_logits > 0, batch["seg_masks"] > 0.5)
    print(f"overfit: {step + 1} steps in {time.perf_counter() - start:.0f} s, answer CE {out.ce_loss.item():.4f}, "
          f"Dice {dice.mean().item():.3f} (min {dice.min().item():.3f}), <SEG> zeroed {blind.mean().item():.3f}")
    assert out.ce_loss.item() < 0.05  # answer loss near zero
    assert dice.mean().item() > 0.9
    assert blind.mean().item() < dice.mean().item() - 0.2  # the question, through <SEG>, chooses the object
    # generation (the same template, greedy) gives the trained answers and their masks at the image size
    assert generated["texts_right"] == 8
    assert generated["mask_dice"] > 0.85


def _generate_and_score(model: MedPLIB, data_dir, records) -> dict:
    turns = [strip_paths(r.conversations)[0] for r in records]
    images = [read_image(data_dir / r.image) for r in records]
    regions = [[read_mask(data_dir / p) for p in r.regions] for r in records]
    results = model.generate(images, [t[0]["value"] for t in turns], regions, max_new_tokens=16)
    scores = []
    for r, res, image in zip(records, results, images):
        assert len(res.masks) == (len(r.masks) if res.text.endswith("<SEG>") else res.text.count("<SEG>"))
        for path, mask in zip(r.masks, res.masks):
            assert mask.shape == image.shape[:2] and mask.dtype == np.bool_
            scores.append(dice_score(torch.from_numpy(mask), torch.from_numpy(read_mask(data_dir / path))).item())
    right = sum(res.text == t[1]["value"] for res, t in zip(results, turns))
    print("generated:", [res.text for res in results])
    return {"texts_right": right, "mask_dice": float(np.mean(scores)) if scores else 0.0}
