"""Records with context images (in-context examples, other views): ingest, the GX gate, the leak check and the
torch dataset see every image and mask of a record; single-image records are written as before."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from medplib import tasks
from medplib.data.expectations import validate_dataset
from medplib.data.images import write_png
from medplib.data.ingest import build_dataset
from medplib.data.schema import Record
from medplib.data.synth import generate
from medplib.data.torch_dataset import MedDataset, read_records
from tests.stub_tokenizer import LengthTokenizer

SIZE = 16
IN_SET = "expect_column_values_to_be_in_set"


class InContextSegmentation(tasks.Task):
    """SegICL-like: up to 3 example image/mask pairs, then "segment the same in this image"."""

    name = "icl_test"
    groups = ("icl_test",)
    family = "icl"  # train/MeCoVQA-Icl.json, test/MeCoVQA_Icl_test.json
    max_context = 3


@pytest.fixture
def icl_task():
    task = tasks.register(InContextSegmentation())
    yield task
    tasks.unregister(task.name)


def _image(root: Path, k: int) -> str:
    rel = f"images/ct_00--icl--case{k}--z_0000.png"
    write_png(root / rel, np.random.default_rng(k).integers(0, 255, (SIZE, SIZE), dtype=np.uint8))
    return rel


def _mask(root: Path, k: int, side: int = SIZE) -> str:
    rel = f"masks/ct_00--icl--case{k}--z_0000--{side}.png"
    m = np.zeros((side, side), bool)
    m[2:6 + k % 8, 3:9] = True
    write_png(root / rel, m)
    return rel


def _record(image: str, target: str, context: list[dict] | None) -> dict:
    rec = {"image": image, "conversations": [
        {"from": "human", "value": "<image>\nSegment what the examples show."},
        {"from": "gpt", "value": f"Here it is. <SEG> <mask>{target}</mask>"}]}
    if context is not None:
        rec["context"] = context
    return rec


def _write(root: Path, rel: str, records: list) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(json.dumps(records), encoding="utf-8")


def _lines(data: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (data / name).read_text(encoding="utf-8").splitlines()]


def test_context_pairs_round_trip_bad_ones_are_quarantined(tmp_path: Path, icl_task):
    src, data = tmp_path / "src", tmp_path / "data"
    images = [_image(src, k) for k in range(6)]
    masks = [_mask(src, k) for k in range(6)]
    three = [{"image": images[k], "mask": masks[k]} for k in (1, 2, 3)]
    small = _mask(src, 9, side=SIZE // 2)
    (src / "images/ct_00--icl--corrupt.png").write_bytes(b"not a png")
    good = [
        _record(images[0], masks[0], three),  # three example pairs
        _record(images[0], masks[0], three[:2] + [{"image": images[4], "mask": masks[4]}]),  # differs in context
        _record(images[0], masks[0], None),  # no context
        _record(images[5], masks[5], [{"image": images[1]}]),  # a second view, no mask
    ]
    bad = {  # index in the file → (field, value, phrase of the reason)
        4: ("context[1].mask", small, f"mask is 8x8 but image '{images[2]}' is 16x16"),
        5: ("context[0].image", "images/ct_00--icl--missing.png", "does not exist"),
        6: ("context[2].image", "images/ct_00--icl--corrupt.png", "not a readable image"),
        7: ("context", [images[1]] * 4, "takes at most 3 context image(s) but the record has 4"),
        8: ("context[0]", "oops", "expected {'image': path, 'mask': path or null}"),
    }
    records = good + [
        _record(images[0], masks[0], [three[0], {"image": images[2], "mask": small}, three[2]]),
        _record(images[0], masks[0], [{"image": "images/ct_00--icl--missing.png", "mask": None}]),
        _record(images[0], masks[0], three[:2] + [{"image": "images/ct_00--icl--corrupt.png", "mask": None}]),
        _record(images[0], masks[0], [{"image": images[1], "mask": masks[1]}] * 4),
        _record(images[0], masks[0], ["oops"]),
    ]
    _write(src, "train/MeCoVQA-Icl.json", records)
    # a built-in single-image task takes no context
    _write(src, "train/MeCoVQA-Grounding.json", [_record(images[3], masks[3], three[:1])])

    result = build_dataset(src, data, "hand", [], 10**6)

    assert (result.total, result.valid, result.quarantined) == (10, 4, 6)
    quarantined = _lines(data, "quarantine.jsonl")
    assert {q["file"] for q in quarantined} == {f"train/MeCoVQA-Icl.json[{i}]" for i in bad} | {
        "train/MeCoVQA-Grounding.json[0]"}
    for q in quarantined:
        if q["file"].startswith("train/MeCoVQA-Grounding"):
            assert q["field"] == "context" and "task 'grounding' takes no context image(s)" in q["reason"]
            continue
        field, value, phrase = bad[int(q["file"].split("[")[1].rstrip("]"))]
        assert (q["field"], q["value"], phrase in q["reason"]) == (field, value, True), q

    # round trip: the record as read is the record as written, with its three pairs in order
    lines = (data / "records.jsonl").read_text(encoding="utf-8").splitlines()
    recs = [Record.from_dict(json.loads(line)) for line in lines]
    assert [r.to_json() for r in recs] == lines
    by_n = {len(r.context): r for r in recs if r.image == images[0]}
    assert by_n[3].context == three and by_n[3].task == "icl_test"
    assert '"context"' not in next(line for line in lines if json.loads(line).get("context") is None)
    view = next(r for r in recs if r.image == images[5])
    assert view.context == [{"image": images[1], "mask": None}]
    # ids: differing only in context gives another id; all context files were written to data/
    assert len({r.id for r in recs}) == 4
    for r in recs:
        for pair in r.context:
            assert (data / pair["image"]).is_file() and (pair["mask"] is None or (data / pair["mask"]).is_file())

    # the GX gate passes on what ingest let through and counts the context files
    report = validate_dataset(data, tmp_path / "docs")
    assert report.success, report.summary()
    assert (report.n_records, report.n_images, report.n_masks) == (4, 6, 6)

    # the torch dataset: the records keep their pairs; a prompt with one <image> shows none of them
    ds = MedDataset(data, LengthTokenizer(), 32, 32)
    sample = ds[ds.records.index(by_n[3])]
    assert sample.record.context == three and sample.shown_context is None
    second = ds[ds.records.index(view)]
    assert second.record.context == [{"image": images[1], "mask": None}] and second.shown_context is None
    assert set(ds.collate([sample, second])) >= {"input_ids", "pixel_values", "seg_masks"}


def _edit(data: Path, edit) -> None:
    lines = [json.loads(line) for line in (data / "records.jsonl").read_text(encoding="utf-8").splitlines()]
    edit(lines)
    (data / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")


def test_gate_checks_context_files_and_catches_a_test_image_used_as_context_in_train(tmp_path: Path, icl_task):
    src, data = tmp_path / "src", tmp_path / "data"
    images = [_image(src, k) for k in range(4)]
    masks = [_mask(src, k) for k in range(4)]
    # test query images[3]; the train record's examples are train images; the test record's example is a train
    # image (allowed: in-context examples come from a labelled pool)
    _write(src, "train/MeCoVQA-Icl.json", [_record(images[0], masks[0], [{"image": images[1], "mask": masks[1]}])])
    _write(src, "test/MeCoVQA_Icl_test.json", [_record(images[3], masks[3], [{"image": images[0], "mask": masks[0]}])])
    assert build_dataset(src, data, "hand", [], 10**6).valid == 2
    assert validate_dataset(data, tmp_path / "docs").success

    # a test image shown as context in a train record is a leak, named by its path
    def leak(lines):
        train = next(r for r in lines if r["split"] == "train")
        train["context"].append({"image": images[3], "mask": masks[3]})
    _edit(data, leak)
    report = validate_dataset(data, tmp_path / "docs2")
    assert [(r["table"], r["expectation"], r["column"]) for r in report.failed] == [
        ("images", IN_SET, "no_context_leak")]
    assert report.failed[0]["examples"][0]["path"] == images[3] and images[3] in report.summary()
    assert report.failed[0]["examples"][0]["context_splits"] == "train"

    # a context mask of another size than its context image, and a missing context image
    write_png(data / masks[1], np.ones((SIZE // 2, SIZE // 2), bool))
    _edit(data, lambda lines: lines[0]["context"].append({"image": "images/ct_00--gone.png", "mask": None}))
    failed = {(r["table"], r["column"]): r for r in validate_dataset(data, tmp_path / "docs3").failed}
    assert set(failed) == {("images", "no_context_leak"), ("records", "context_files_exist"),
                           ("masks", "width,image_width"), ("masks", "height,image_height")}
    assert "images/ct_00--gone.png" in failed[("records", "context_files_exist")]["examples"][0]["missing_files"]
    assert failed[("masks", "width,image_width")]["examples"][0]["path"] == masks[1]


# sha256 of manifest.json (every file's sha256, records.jsonl included) for synth n=48 at the default seed 42, as
# written before records could carry context: single-image data must not change by a byte.
SYNTH_48_MANIFEST = "b7e05475db7442fb104961c27b3e6b2a859e0182a8a0620d956f880da828fc82"  # re-pinned when synth changes on purpose (issue 14: zero-shot held out, balanced presence; every structure visible)


def test_single_image_synthetic_data_is_unchanged(tmp_path: Path):
    generate(tmp_path / "src", n=48, seed=42)
    build_dataset(tmp_path / "src", tmp_path / "data", "synth", [], 10**8)
    assert hashlib.sha256((tmp_path / "data/manifest.json").read_bytes()).hexdigest() == SYNTH_48_MANIFEST
    assert all(not r.context for r in read_records(tmp_path / "data"))
