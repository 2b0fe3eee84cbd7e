"""The torch dataset over normalised synthetic records: text, tensors, geometry and batch alignment."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medplib.data.images import read_mask
from medplib.data.ingest import build_dataset
from medplib.data.synth import generate
from medplib.data.schema import RecordError
from medplib.data.torch_dataset import (
    MedDataset, encode_within, preprocess_mask, read_records, strip_paths, unsquare,
)
from medplib.model.tokenizer import IGNORE_INDEX

from .conftest import conversation


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


def _answers(ids: list[int], labels: list[int]) -> list[int]:
    return [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]


def test_max_len_cuts_the_earliest_turns_without_seg_first(tokenizer):
    region = ("<image>\nWhat is in <region></region>?", "It is the kidney.")
    seg, last = ("Segment the liver.", "It is the liver. <SEG>"), ("How many structures are visible?", "two.")
    turns = [t for q, a in (region, seg, last) for t in conversation(q, a)]
    ids, labels = tokenizer.encode_conversation(turns)
    assert encode_within(turns, ["r.png"], tokenizer, len(ids), "rec") == (ids, labels, ["r.png"])
    cut_ids, cut_labels, regions = encode_within(turns, ["r.png"], tokenizer, len(ids) - 1, "rec")
    # the first pair goes with its region prompt; its <image> moves on; the <SEG> answer stays
    kept = [("<image>\n" + seg[0], seg[1]), last]
    assert (cut_ids, cut_labels) == tokenizer.encode_conversation([t for q, a in kept for t in conversation(q, a)])
    assert regions == [] and cut_ids.count(tokenizer.image_token_id) == 64
    assert tokenizer.seg_token_id in _answers(cut_ids, cut_labels)


def test_max_len_cuts_the_middle_of_a_question_never_the_answer_or_placeholders(tokenizer):
    filler = " ".join(f"word{i}" for i in range(40))
    turns = conversation(f"<image>\nWhat is in <region></region>? {filler} Answer briefly.", "It is the kidney.")
    ids, labels = tokenizer.encode_conversation(turns)
    max_len = len(ids) - 20
    cut_ids, cut_labels, regions = encode_within(turns, ["r.png"], tokenizer, max_len, "rec")
    assert max_len - 8 <= len(cut_ids) <= max_len  # the fewest words go: a word is a few tokens
    assert _answers(cut_ids, cut_labels) == _answers(ids, labels)
    assert regions == ["r.png"] and cut_ids.count(tokenizer.region_token_id) == 1
    assert cut_ids.count(tokenizer.image_token_id) == 64
    text = tokenizer.hf.decode(cut_ids)
    assert "What is in" in text and "word0 " in text and "word39 Answer briefly." in text and "word20" not in text


def test_a_record_whose_answer_and_image_overflow_max_len_is_an_error(tokenizer):
    turns = conversation("<image>\nSegment the liver.", "It is the liver. <SEG>")
    with pytest.raises(RecordError, match=r"record rec-7: field 'conversations' = '\d+ positions': with its context "
                                          r"cut it still takes \d+ positions \(\d+ of them answer tokens.*max_len 60"):
        encode_within(turns, [], tokenizer, 60, "rec-7")  # the image alone takes 64 positions


def test_the_stage_recipe_gives_the_dataset_its_max_len(data_dir: Path, tiny_model, tokenizer):
    from medplib.config.base import to_dict
    from medplib.config.model import TISRConfig
    from medplib.config.stages import tiny_stages
    from medplib.train.recipe import StageRecipe

    recipe = StageRecipe({"spec": to_dict(tiny_stages()[2]), "data_dir": str(data_dir), "base": "unused"})
    recipe.model = tiny_model
    assert recipe.train_dataset().max_len == 512
    tiny_model.attach_tisr(TISRConfig(enabled=True, num_pseudo_words=4))
    assert recipe.train_dataset().max_len == 512 - 4  # TISR's pseudo-words take positions before the prompt
    for task in ("grounding", "region_vqa"):  # a question word goes; the answer, <SEG> and <region> stay
        record = MedDataset(data_dir, tokenizer, 64, 64, tasks=(task,)).records[0]
        full = MedDataset(data_dir, tokenizer, 64, 64, records=[record])[0]
        short = MedDataset(data_dir, tokenizer, 64, 64, records=[record], max_len=len(full.input_ids) - 1)[0]
        assert len(short.input_ids) < len(full.input_ids)
        assert _answers(short.input_ids.tolist(), short.labels.tolist()) == _answers(full.input_ids.tolist(),
                                                                                     full.labels.tolist())
        assert (len(short.region_masks), len(short.seg_masks)) == (len(full.region_masks), len(full.seg_masks))
