"""In-context segmentation's prompts (issue 17, item 1): K = 0..3 examples shown both ways MedPLIB's in-context variant
shows them (the mask overlaid in blue at α 0.55, or as an image of its own), examples chosen repeatably, never on the
query's image; the records they make go through the dataset to the model's context images."""
from __future__ import annotations

import numpy as np
import pytest

from medplib import tasks
from medplib.data.images import write_png
from medplib.data.schema import IMAGE_TOKEN, Record
from medplib.data.torch_dataset import MedDataset
from medplib.tasks.incontext import (
    ALPHA, choose_examples, icl_record, overlay, question, show_examples, structure_of,
)
from tests.stub_tokenizer import LengthTokenizer

SIZE = 32


def _grounding(root, k: int, structure: str, split: str = "train", image: int | None = None) -> Record:
    img, mask = f"images/ct_00--icl--case{image if image is not None else k}.png", f"masks/m{k}-{structure}.png"
    write_png(root / img, np.random.default_rng(k).integers(0, 200, (SIZE, SIZE), dtype=np.uint8))
    m = np.zeros((SIZE, SIZE), bool)
    m[4:12 + k % 5, 6:20] = True
    write_png(root / mask, m)
    return Record(id=f"g{k}", image=img, modality="ct", split=split, task="grounding", masks=[mask],
                  conversations=[{"from": "human", "value": f"<image>\nSegment the {structure}."},
                                 {"from": "gpt", "value": f"It is the {structure}. <SEG> <mask>{mask}</mask>"}])


@pytest.mark.parametrize("style,per_example", [("overlay", 1), ("separate", 2)])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_the_prompt_has_a_placeholder_per_shown_image_then_the_query(k, style, per_example):
    text = question(k, "liver", style)
    assert text.count(IMAGE_TOKEN) == per_example * k + 1
    assert text.rstrip().endswith(IMAGE_TOKEN) or text.startswith(IMAGE_TOKEN)  # the query's comes last (K = 0: alone)
    assert "Segment the liver" in text
    if k:
        assert [f"Example {i + 1}:" in text for i in range(3)] == [i < k for i in range(3)]


def test_bad_prompts_are_refused():
    with pytest.raises(ValueError, match="4 examples: in-context segmentation takes 0 to 3"):
        question(4, "liver", "overlay")
    with pytest.raises(ValueError, match="example style 'sepia'"):
        question(1, "liver", "sepia")
    with pytest.raises(ValueError, match="example 1 has no mask"):
        show_examples([(np.zeros((4, 4), np.uint8), None)], "overlay")


def test_examples_are_shown_overlaid_in_blue_or_as_mask_images():
    image = np.full((8, 8), 100, np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:6] = True
    [shown] = show_examples([(image, mask)], "overlay")
    assert shown.shape == (8, 8, 3)
    inside = np.rint((1 - ALPHA) * 100 + ALPHA * np.array([0, 0, 255])).astype(np.uint8)
    assert (shown[mask] == inside).all() and (shown[~mask] == 100).all()
    assert np.array_equal(overlay(image, mask), shown)
    img, as_image = show_examples([(image, mask)], "separate")
    assert img is image and np.array_equal(as_image, mask.astype(np.uint8) * 255)


def test_examples_share_the_structure_and_split_never_the_query_image_and_repeat_with_the_seed(tmp_path):
    query = _grounding(tmp_path, 0, "liver")
    pool = [query, _grounding(tmp_path, 1, "liver", image=0),  # the query's own image, another record
            _grounding(tmp_path, 2, "spleen")] + [_grounding(tmp_path, k, "liver") for k in range(3, 9)] + [
        _grounding(tmp_path, 9, "liver", split="test")]
    assert structure_of(query) == "liver"
    chosen = choose_examples(query, pool, 3, seed=1)
    assert len(chosen) == 3 and len({r.id for r in chosen}) == 3
    assert all(r.image != query.image and structure_of(r) == "liver" and r.split == "train" for r in chosen)
    assert [r.id for r in choose_examples(query, pool, 3, seed=1)] == [r.id for r in chosen]  # repeatable
    draws = {tuple(r.id for r in choose_examples(query, pool, 3, seed=s)) for s in range(6)}
    assert len(draws) > 1  # another seed, other examples
    assert choose_examples(query, pool, 0, seed=1) == []
    with pytest.raises(ValueError, match="3 examples of the liver asked, 1 other test image"):
        choose_examples(_grounding(tmp_path, 10, "liver", split="test"), pool, 3, seed=1)


@pytest.mark.parametrize("style,shown", [("overlay", 2), ("separate", 4)])
def test_an_in_context_record_reaches_the_model_as_context_images(tmp_path, style, shown):
    query = _grounding(tmp_path, 0, "liver")
    examples = [_grounding(tmp_path, k, "liver") for k in (1, 2)]
    rec = icl_record(query, examples, style)
    assert rec.task == {"overlay": "icl", "separate": "icl_mask"}[style] and rec.image == query.image
    assert rec.context == [{"image": e.image, "mask": e.masks[0]} for e in examples] and rec.masks == query.masks
    assert tasks.get(rec.task).check_context(rec.context) is None
    assert tasks.get(rec.task).check_context([{"image": examples[0].image, "mask": None}])[1] == \
        "every in-context example needs its mask"
    sample = MedDataset(tmp_path, LengthTokenizer(), SIZE, SIZE, records=[rec])[0]
    assert sample.shown_context.shape == (shown, 3, SIZE, SIZE) and len(sample.seg_masks) == 1
