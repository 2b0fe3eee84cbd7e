"""In-context segmentation's prompts (issue 17, item 1): K = 0..3 examples shown both ways MedPLIB's in-context variant
shows them (the mask overlaid in blue at α 0.55, or as an image of its own), examples chosen repeatably, never on the
query's image; the records they make go through the dataset to the model's context images."""
from __future__ import annotations

import re

import numpy as np
import pytest

from medplib import tasks
from medplib.data.images import write_png
from medplib.data.schema import IMAGE_TOKEN, Record
from medplib.data.torch_dataset import MedDataset
from medplib.tasks.incontext import (
    ALPHA, choose_examples, icl_record, made_up_name, overlay, question, show_examples, structure_of,
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


# --- derived records (issue 17, items 2 and 3) --------------------------------------------------------------------
def _pool(root) -> list[Record]:
    """Grounding records: 12 train images (liver on each, spleen on the even ones), 5 test and 5 zero-shot images."""
    out, k = [], 0
    for split, n in (("train", 12), ("test", 5), ("zeroshot", 5)):
        for image in range(n):
            for structure in ("liver",) + (("spleen",) if image % 2 == 0 else ()):
                rec = _grounding(root, k, structure, split=split, image=100 * len(out) + image)
                out.append(Record(**{**vars(rec), "image": f"images/{split}-{image}.png"}))
                write_png(root / out[-1].image, np.full((SIZE, SIZE), 10 * image, np.uint8))
                k += 1
    return out


def test_a_stage_mix_gets_in_context_records_of_the_train_split_only(tmp_path):
    pool = _pool(tmp_path)
    made = tasks.get("icl").derive(pool, "train", seed=3)
    assert made == tasks.get("icl").derive(pool, "train", seed=3)  # repeatable
    assert made != tasks.get("icl").derive(pool, "train", seed=4)
    by_id = {r.id: r for r in pool}
    assert made and all(r.split == "train" and r.task == "icl" and len(r.context) <= 3 for r in made)
    assert all(r.id.endswith("-icl0-overlay-alias") for r in made if not r.context)  # K = 0: a made-up name
    for rec in made:
        query = by_id[rec.id.split("-icl")[0]]
        assert rec.masks == query.masks and rec.image == query.image
        assert all(c["image"] != rec.image and c["image"].startswith("images/train-") for c in rec.context)
        asked = rec.conversations[0]["value"]
        assert ("Segment the" in asked) != rec.id.endswith("-unnamed")  # named, or left to the examples
        assert asked.count(IMAGE_TOKEN) == len(rec.context) + 1
    # a quarter of the train queries per style (seeded), over seeds
    queries = sum(r.split == "train" for r in pool)
    share = np.mean([sum(bool(r.context) for r in tasks.get(name).derive(pool, "train", seed)) / queries
                     for seed in range(40) for name in ("icl", "icl_mask")])
    assert 0.18 < share < 0.32
    assert all(r.task == "icl_mask" for r in tasks.get("icl_mask").derive(pool, "train", seed=3))


def test_made_up_names_stand_for_the_structure_in_the_question_and_the_answer(tmp_path):
    pool = _pool(tmp_path)
    by_id = {r.id: r for r in pool}
    alone = {r.image for r in pool if sum(q.image == r.image for q in pool) == 1}  # liver alone: the odd images
    made = [r for seed in range(30) for name in ("icl", "icl_mask") for r in tasks.get(name).derive(pool, "train", seed)
            if r.id.endswith("-alias")]
    assert {len(r.context) for r in made} == {0, 1, 2, 3}
    for rec in made:
        query = by_id[rec.id.split("-icl")[0]]
        asked, answer = rec.conversations[0]["value"], rec.conversations[1]["value"]
        said = re.match(r"It is the (.+?)\. <SEG>", answer)
        assert said and rec.masks == query.masks
        name = said.group(1)
        assert name not in ("liver", "spleen") and f"the {name} " in asked.replace(".", " ")
        assert structure_of(query) not in asked
        if not rec.context:  # asked with no example: only where the structure is the only one on its image
            assert rec.task == "icl" and rec.image in alone
    assert made_up_name(np.random.default_rng(0), set()) == made_up_name(np.random.default_rng(0), set())
    first = made_up_name(np.random.default_rng(0), set())
    assert made_up_name(np.random.default_rng(0), {first}) != first
    with pytest.raises(ValueError, match="alias"):
        icl_record(pool[0], [], "overlay", named=False, alias="bofa")


def test_an_evaluation_asks_each_query_with_nested_examples_for_each_k(tmp_path, monkeypatch):
    from medplib.tasks import incontext

    pool = _pool(tmp_path)
    assert len({r.id.split("-icl")[0] for r in tasks.get("icl").derive(pool, "eval", seed=0)}) == 2  # 1 in 16, ≥ 1
    monkeypatch.setattr(incontext, "EVAL_SHARE", 1)
    made = tasks.get("icl").derive(pool, "eval", seed=0)
    assert {r.split for r in made} == {"test", "zeroshot"}  # in distribution and held out; never train
    by_query: dict[str, list[Record]] = {}
    for rec in made:
        by_query.setdefault(rec.id.split("-icl")[0], []).append(rec)
    for recs in by_query.values():
        assert [len(r.context) for r in recs] == [0, 1, 2, 3]
        assert recs[3].context[:2] == recs[2].context and recs[2].context[:1] == recs[1].context  # K + 1 ⊃ K
        assert all(c["image"] != recs[0].image for c in recs[3].context)
        assert "Segment the liver" in recs[3].conversations[0]["value"]  # the evaluation names the structure
    # liver is on every image, so each test and zero-shot liver query has 4 other images; spleen on 3 images: 2 others
    assert len(by_query) == 10
    assert [len(r.context) for r in tasks.get("icl_mask").derive(pool, "eval", seed=0)][:3] == [1, 2, 3]


def test_the_tables_have_dice_per_k_and_the_chart_draws_it():
    task = tasks.get("icl")
    metric = task.metric()
    for k, dice in ((0, 0.2), (0, 0.4), (3, 0.8)):
        metric.append({"modality": "pet", "context": k, "dice": dice, "iou": dice / 2, "seg_generated": 1.0,
                       "question": "q", "prediction": "p", "reference": "r"})
    table = metric.aggregate()
    assert table["all"]["dice_k0"] == pytest.approx(0.3) and table["pet"]["dice_k3"] == pytest.approx(0.8)
    assert table["all"]["dice"] == pytest.approx(1.4 / 3) and table["all"]["n"] == 3 and "dice_k1" not in table["all"]
    assert tasks.summary_keys()["icl_dice_k3"] == ("zeroshot/icl", "dice_k3")
    figures = task.figures({"zeroshot/icl": table, "test/icl_mask": {"all": {"dice_k1": 0.5, "dice_k2": 0.6}}})
    [ax] = figures["icl_dice_vs_k"].axes
    assert [list(line.get_ydata()) for line in ax.get_lines()] == [pytest.approx([0.3, 0.8]), [0.5, 0.6]]
    assert task.figures({}) == {} and tasks.get("icl_mask").figures({"zeroshot/icl": table}) == {}


def test_a_stage_mix_naming_icl_reads_in_context_records_and_a_plain_dataset_does_not(tmp_path):
    from medplib.config import load_config
    from medplib.config.stages import stage_spec

    from medplib.config.stages import full_stages

    config = tmp_path / "icl.yaml"
    config.write_text("train:\n  stage3: {tasks: [pixel]}\n  stage4: {tasks: [vl, pixel]}\n")
    plain = load_config("tiny", config)
    for stage in (3, 4):
        chosen = tasks.resolve(stage_spec(load_config("tiny"), stage).tasks)  # the tiny preset trains on them
        assert {"grounding", "textseg", "icl", "icl_mask"} <= set(chosen)
        assert "icl" not in tasks.resolve(stage_spec(plain, stage).tasks)  # a config file leaves them out
        assert "icl" not in tasks.resolve(full_stages()[stage].tasks)  # MedPLIB's mixes have none
    pool = _pool(tmp_path)
    mix = MedDataset(tmp_path, LengthTokenizer(), SIZE, SIZE, split="train", tasks=("pixel", "incontext"), records=pool,
                     seed=1)
    derived = [r for r in mix.records if r.task in ("icl", "icl_mask")]
    assert derived and len(mix) == 18 + len(derived)  # the 18 train grounding records, then the derived ones
    assert mix[mix.records.index(derived[0])].shown_context is not None
    assert len(MedDataset(tmp_path, LengthTokenizer(), SIZE, SIZE, records=pool)) == len(pool)


def test_an_evaluation_gives_the_model_the_examples_and_scores_dice_per_k(tmp_path, monkeypatch):
    import json
    from dataclasses import asdict

    from medplib.eval.runner import evaluate
    from medplib.model.model import Generation

    from medplib.tasks import incontext

    monkeypatch.setattr(incontext, "EVAL_SHARE", 1)
    pool = _pool(tmp_path)
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(asdict(r)) + "\n" for r in pool))

    class CopiesTheFirstExample:
        """Segments as its first shown example's blue pixels say (none without one): Dice rises from K = 0."""

        def eval(self):
            return self

        def generate(self, images, questions, regions, max_new_tokens, contexts=None):
            contexts = contexts or [[] for _ in images]
            out = []
            for image, shown in zip(images, contexts):
                mask = (shown[0][..., 2] > shown[0][..., 0] + 50) if shown else np.zeros(image.shape[:2], bool)
                out.append(Generation("It is it. <SEG>", [mask]))
            return out

    report = evaluate(CopiesTheFirstExample(), tmp_path, splits=("test", "zeroshot"), tasks=("icl",))
    held_out = report.tables["zeroshot/icl"]["all"]
    assert held_out["dice_k0"] == 0.0 and held_out["dice_k1"] > 0.5 and held_out["n"] == 20
    assert report.summary["icl_dice_k0"] == 0.0 and report.summary["icl_dice_k3"] == held_out["dice_k3"]
    assert {r["context"] for r in report.rows if "context" in r} == {1, 2, 3}
