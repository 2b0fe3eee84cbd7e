"""The torch dataset over normalised synthetic records: text, tensors, geometry and batch alignment."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medplib.data.images import read_mask
from medplib.data.ingest import build_dataset
from medplib.data.synth import generate
from medplib.data.torch_dataset import MedDataset, preprocess_mask, read_records, strip_paths, unsquare
from medplib.model.tokenizer import IGNORE_INDEX


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root / "src", n=16, seed=5)
    build_dataset(root / "src", root / "data", "synth", [], 8192 * 8192)
    return root / "data"


def test_strip_paths_keeps_placeholders_and_returns_paths():
    turns = [{"from": "human", "value": "<image>\nWhat is in <region>masks/a.png</region>?"},
             {"from": "gpt", "value": "It is the liver. <SEG> <mask>masks_merged/b.png</mask>"}]
    text, regions, masks = strip_paths(turns)
    assert [t["value"] for t in text] == ["<image>\nWhat is in <region></region>?", "It is the liver. <SEG>"]
    assert (regions, masks) == (["masks/a.png"], ["masks_merged/b.png"])


def test_samples_and_batches_line_up(data_dir: Path, tokenizer):
    records = read_records(data_dir)
    ds = MedDataset(data_dir, tokenizer, 64, 64, tasks=("grounding", "region_vqa", "vqa_closed"))
    assert {r.task for r in ds.records} == {"grounding", "region_vqa", "vqa_closed"} and len(ds) < len(records)
    picks = [next(i for i, r in enumerate(ds.records) if r.task == t) for t in ("region_vqa", "grounding", "vqa_closed")]
    samples = [ds[i] for i in picks]
    region, grounding, closed = samples
    assert region.region_masks.shape == (1, 64, 64) and region.seg_masks.shape == (0, 64, 64)
    assert grounding.seg_masks.shape == (1, 64, 64) and grounding.region_masks.shape == (0, 64, 64)
    target = read_mask(data_dir / grounding.record.masks[0])
    assert torch.equal(grounding.seg_masks[0].bool(), torch.from_numpy(target))  # 64 px: no resampling
    assert grounding.pixel_values.shape == (3, 64, 64) and grounding.sam_pixel_values.shape == (3, 64, 64)
    answer = [i for i, lab in zip(grounding.input_ids.tolist(), grounding.labels.tolist()) if lab != IGNORE_INDEX]
    assert tokenizer.decode(answer).endswith("<SEG>") and "<mask>" not in tokenizer.decode(answer)

    batch = ds.collate(samples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["region_batch_index"].tolist() == [0] and batch["seg_masks"].shape == (1, 64, 64)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths == [len(s.input_ids) for s in samples]
    assert (batch["input_ids"] == tokenizer.seg_token_id).nonzero()[:, 0].tolist() == [1]  # the SEG is sample 1's


def test_geometry_of_non_square_images_round_trips():
    mask = np.zeros((40, 64), bool)
    mask[10:30, 5:25] = True
    square = preprocess_mask(mask, 32)  # padded to 64x64 (12 rows above), then halved
    assert square.shape == (32, 32) and square[(12 + 10) // 2 + 1, 3] and not square[0, 3]
    back = unsquare(square.float() * 20 - 10, 40, 64)
    assert back.shape == (40, 64)
    assert ((back > 0).numpy() == mask).mean() > 0.97
