"""The GX gate for real: passes on a hand-built valid dataset, fails naming the expectation on each corruption."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medplib.data.expectations import validate_dataset
from medplib.data.images import write_png

SIZE = 32


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]


def _write_records(root: Path, records: list[dict]) -> None:
    (root / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _read_records(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "records.jsonl").read_text(encoding="utf-8").splitlines()]


def _build_valid(root: Path) -> None:
    """Four images in three splits; VQA, region VQA (prompt mask), grounding (<SEG> + mask) and a caption."""
    rng = np.random.default_rng(0)
    images = {"ct": "train", "mr": "train", "x": "test", "ultrasound": "zeroshot"}
    records = []
    for k, (modality, split) in enumerate(images.items()):
        stem = f"{modality}_00--hand--case{k}--z_0000"
        image = f"images/{stem}.png"
        pixels = rng.integers(0, 255, (SIZE, SIZE), dtype=np.uint8)
        write_png(root / image, np.stack([pixels] * 3, axis=2) if modality == "x" else pixels)
        target = np.zeros((SIZE, SIZE), bool)
        target[8 + k:20, 6:18 + k] = True
        merged, prompt = f"masks_merged/{stem}--liver_merged.png", f"masks/{stem}--liver--box.png"
        write_png(root / merged, target)
        write_png(root / prompt, target)

        def add(task: str, conversations: list[dict], masks=(), regions=(), answer_type="open") -> None:
            records.append({"id": f"{stem}-{len(records)}", "image": image, "modality": modality, "split": split,
                            "task": task, "conversations": conversations, "masks": list(masks),
                            "regions": list(regions), "answer_type": answer_type, "source": "hand",
                            "source_id": str(len(records))})

        add("grounding", _turns("Segment the liver.", f"It is the liver. <SEG> <mask>{merged}</mask>"), masks=[merged])
        if split == "zeroshot":
            continue
        add("vqa_closed", _turns("Is there a liver?", "yes"), answer_type="closed")
        add("vqa_open", _turns("What modality is this image?", f"This is a {modality} image."))
        add("region_vqa", _turns(f"What is in <region>{prompt}</region>?", "It is the liver."), regions=[prompt])
        add("caption", _turns("Describe the image briefly.", "An image showing a liver."))
    _write_records(root, records)


@pytest.fixture(scope="module")
def valid_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("valid") / "data"
    _build_valid(root)
    return root


def test_gate_passes_on_valid_data_and_writes_data_docs(valid_dir, tmp_path):
    report = validate_dataset(valid_dir, tmp_path / "docs")
    assert report.success, report.summary()
    assert (report.n_records, report.n_images, report.n_masks) == (16, 4, 7)
    assert report.data_docs == (tmp_path / "docs" / "index.html").resolve() and report.data_docs.is_file()
    pages = sorted(p.parent.parent.parent.name for p in (tmp_path / "docs" / "validations").rglob("*.html"))
    assert pages == ["medplib_images", "medplib_masks", "medplib_records"]
    expected = {"expect_column_values_to_be_in_set", "expect_column_pair_values_to_be_equal",
                "expect_compound_columns_to_be_unique", "expect_column_values_to_be_unique",
                "expect_column_values_to_be_between", "expect_column_values_to_not_be_null"}
    assert expected <= {r["expectation"] for r in report.results}
    assert json.loads(json.dumps(report.to_dict()))["n_failed"] == 0
    assert report.summary().startswith("Validation passed")


def _truncate_image(root: Path) -> str:
    path = root / "images/mr_00--hand--case1--z_0000.png"
    path.write_bytes(path.read_bytes()[:60])
    return "images/mr_00--hand--case1--z_0000.png"


def _grey_mask(root: Path) -> str:
    rel = "masks_merged/ct_00--hand--case0--z_0000--liver_merged.png"
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[4:12, 4:12] = 128
    write_png(root / rel, m)
    return rel


def _small_mask(root: Path) -> str:
    rel = "masks/x_00--hand--case2--z_0000--liver--box.png"
    write_png(root / rel, np.ones((SIZE // 2, SIZE // 2), bool))
    return rel


def _empty_mask(root: Path) -> str:
    rel = "masks_merged/mr_00--hand--case1--z_0000--liver_merged.png"
    write_png(root / rel, np.zeros((SIZE, SIZE), bool))
    return rel


def _edit_record(root: Path, index: int, edit) -> str:
    records = _read_records(root)
    edit(records[index], records)
    _write_records(root, records)
    return records[index]["id"]


def _unknown_modality(root: Path) -> str:
    return _edit_record(root, 2, lambda r, _: r.update(modality="xray"))


def _drop_mask_tag(root: Path) -> str:
    def edit(r, _):
        r["conversations"][1]["value"] = "It is the liver. <SEG>"
    return _edit_record(root, 0, edit)


def _duplicate_id(root: Path) -> str:
    return _edit_record(root, 3, lambda r, records: r.update(id=records[1]["id"]))


def _train_and_test(root: Path) -> str:
    _edit_record(root, 4, lambda r, _: r.update(split="test"))  # a train image's caption moved to test
    return "images/ct_00--hand--case0--z_0000.png"


def _missing_region(root: Path) -> str:
    (root / "masks/ct_00--hand--case0--z_0000--liver--box.png").unlink()
    return "masks/ct_00--hand--case0--z_0000--liver--box.png"


def _region_outside(root: Path) -> str:
    write_png(root.parent / "outside.png", np.ones((SIZE, SIZE), bool))  # exists, but outside the dataset

    def edit(r, _):
        r["regions"] = ["../outside.png"]
        r["conversations"][0]["value"] = "<image>\nWhat is in <region>../outside.png</region>?"
    return _edit_record(root, 8, edit)


def _duplicate_record(root: Path) -> str:
    records = _read_records(root)
    records.append({**records[1], "id": "copy-of-1"})
    _write_records(root, records)
    return "copy-of-1"


def _bad_json_line(root: Path) -> str:
    with (root / "records.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"id": "broken", "image": \n')
    return "17"


def _empty_conversation(root: Path) -> str:
    return _edit_record(root, 6, lambda r, _: r.update(conversations=[]))


def _no_records(root: Path) -> str:
    (root / "records.jsonl").write_text("\n", encoding="utf-8")
    return "0"


IN_SET, PAIR, BETWEEN = ("expect_column_values_to_be_in_set", "expect_column_pair_values_to_be_equal",
                         "expect_column_values_to_be_between")
# corruption → (the failures it must cause, exactly; which example field names the culprit)
CASES = {
    "truncated png": (_truncate_image, {("images", IN_SET, "readable")}, "path"),
    "non-binary mask": (_grey_mask, {("masks", IN_SET, "binary")}, "path"),
    "mask size": (_small_mask, {("masks", PAIR, "width,image_width"), ("masks", PAIR, "height,image_height")}, "path"),
    "empty mask": (_empty_mask, {("masks", BETWEEN, "fg_fraction")}, "path"),
    "unknown modality": (_unknown_modality, {("records", IN_SET, "modality"),
                                             ("records", PAIR, "modality,image_modality")}, "id"),
    "<SEG> without <mask>": (_drop_mask_tag, {("records", PAIR, "n_seg,n_mask_tags"),
                                              ("records", IN_SET, "tags_listed"),
                                              ("records", IN_SET, "task_target")}, "id"),
    "duplicate id": (_duplicate_id, {("records", "expect_column_values_to_be_unique", "id")}, "id"),
    "image in train and test": (_train_and_test, {("images", BETWEEN, "n_splits")}, "path"),
    "missing prompt mask": (_missing_region, {("records", IN_SET, "region_files_exist")}, "missing_files"),
    "region path outside the dataset": (_region_outside, {("records", IN_SET, "paths_safe"),
                                                          ("records", IN_SET, "region_files_exist")}, "id"),
    "duplicate record": (_duplicate_record, {("records", "expect_compound_columns_to_be_unique",
                                              "image,conversation_hash,context_hash")}, "id"),
    "malformed json line": (_bad_json_line, {("records", IN_SET, "json_ok"),
                                             ("records", "expect_column_values_to_not_be_null", "id")}, "line"),
    "no records": (_no_records, {("records", "expect_table_row_count_to_be_between", None)}, "observed_value"),
    "empty conversation": (_empty_conversation, {
        ("records", BETWEEN, "n_turns"), ("records", IN_SET, "roles_ok"), ("records", IN_SET, "image_token")}, "id"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gate_fails_naming_expectation_and_example(name, valid_dir, tmp_path):
    corrupt, expected, key = CASES[name]
    root = tmp_path / "data"
    shutil.copytree(valid_dir, root)
    culprit = corrupt(root)

    report = validate_dataset(root, tmp_path / "docs")

    assert not report.success
    assert {(r["table"], r["expectation"], r["column"]) for r in report.failed} == expected
    for r in report.failed:
        assert r["examples"] and (r["unexpected_count"] >= 1 or r["column"] is None), r  # table-level: observed
        assert any(culprit in str(e.get(key)) for e in r["examples"]), (culprit, r["examples"])
        assert r["expectation"] in report.summary() and culprit in report.summary()
    assert report.data_docs.is_file()
    assert json.loads(json.dumps(report.to_dict()))["n_failed"] == len(expected)


def test_no_records_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="medplib data ingest"):
        validate_dataset(tmp_path, tmp_path / "docs")


def test_gate_passes_on_ingested_synthetic_data(tmp_path):
    """The gate and ingest agree on what good data is."""
    from medplib.data.images import MAX_IMAGE_PIXELS
    from medplib.data.ingest import build_dataset
    from medplib.data.synth import generate

    generate(tmp_path / "src", n=16, seed=3)
    ingested = build_dataset(tmp_path / "src", tmp_path / "data", "synth", [], MAX_IMAGE_PIXELS)
    report = validate_dataset(tmp_path / "data", tmp_path / "docs")
    assert report.success, report.summary()
    assert report.n_records == ingested.valid > 0 and report.n_images == 16


def test_a_zero_shot_image_or_modality_in_train_fails_the_gate_naming_it(tmp_path):
    """Zero-shot means held out: every image of a zero-shot modality is in the zero-shot split, and the gate fails a
    dataset where one of its images (or, in synthetic data, a grounding record of its modality) is trained on."""
    from medplib.data.images import MAX_IMAGE_PIXELS
    from medplib.data.ingest import build_dataset
    from medplib.data.synth import generate

    generate(tmp_path / "src", n=16, seed=3)
    build_dataset(tmp_path / "src", tmp_path / "data", "synth", [], MAX_IMAGE_PIXELS)
    records = [json.loads(line) for line in (tmp_path / "data/records.jsonl").read_text().splitlines()]
    zeroshot = [r for r in records if r["split"] == "zeroshot"]
    assert zeroshot and {r["modality"] for r in zeroshot} == {"pet", "fundus"}
    assert not [r for r in records if r["modality"] in ("pet", "fundus") and r["split"] != "zeroshot"]
    assert validate_dataset(tmp_path / "data", tmp_path / "docs").success

    # a grounding question about a zero-shot image, put in train
    turns = [dict(t) for t in zeroshot[0]["conversations"]]
    turns[0]["value"] += " Outline it."
    leaked = {**zeroshot[0], "id": "leaked-into-train", "split": "train", "conversations": turns}
    (tmp_path / "data/records.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [*records, leaked]), encoding="utf-8")
    report = validate_dataset(tmp_path / "data", tmp_path / "docs")
    assert not report.success
    failed = {(r["table"], r["column"]): r for r in report.failed}
    assert set(failed) == {("images", "n_splits"), ("records", "zeroshot_held_out")}
    assert failed[("images", "n_splits")]["examples"][0]["path"] == leaked["image"]
    assert failed[("images", "n_splits")]["examples"][0]["splits"] == "train,zeroshot"
    example = failed[("records", "zeroshot_held_out")]["examples"][0]
    assert (example["id"], example["image"], example["modality"]) == ("leaked-into-train", leaked["image"],
                                                                      leaked["modality"])
    assert leaked["image"] in report.summary()
