"""The R2Gen reader (`--source iuxray:DIR`) on small files in both real layouts, broken records included: IU X-Ray
(two PNG views per record) and MIMIC-CXR (one JPEG, `subject_id` / `study_id`). Valid records flow, each broken
one is quarantined naming its file, field and value, the counts add up, and R2Gen's own `val` is the validation
split. Then the synthetic `iuxray/` folder, read back through the same reader."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medplib import tasks
from medplib.data import readers
from medplib.data.images import read_image, write_png
from medplib.data.ingest import build_dataset, stage_source
from medplib.data.readers.r2gen import convert_r2gen, staged_image
from medplib.data.torch_dataset import read_records

QUESTION = "<image>\nWrite the findings of this chest X-ray."
REPORT = "The heart size is normal. The lungs are clear. No pneumothorax or pleural effusion."
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _iu(rid: str, report: object = REPORT, views: object = None, split: str = "train") -> dict:
    return {"id": rid, "report": report, "image_path": [f"{rid}/0.png", f"{rid}/1.png"] if views is None else views,
            "split": split}


@pytest.fixture
def iuxray(tmp_path: Path) -> Path:
    src = tmp_path / "iu_xray"
    rng = np.random.default_rng(0)
    for rid in ("CXR1_1_IM-0001", "CXR2_IM-0652", "CXR3_IM-1384", "CXR4_IM-2050", "CXR5_IM-2117"):
        for view in ("0", "1"):
            write_png(src / "images" / rid / f"{view}.png", (rng.random((40, 48)) * 255).astype(np.uint8))
    (src / "images" / "CXR4_IM-2050" / "1.png").unlink()  # a record whose lateral view is gone
    write_png(tmp_path / "outside.png", np.zeros((40, 48), np.uint8))
    os.symlink(tmp_path / "outside.png", src / "images" / "CXR5_IM-2117" / "link.png")
    annotation = {
        "train": [_iu("CXR1_1_IM-0001"),
                  _iu("CXR2_IM-0652", report="  "),  # empty report
                  _iu("CXR4_IM-2050"),  # second view missing
                  _iu("CXR5_IM-2117", views=["CXR5_IM-2117/0.png", "../outside.png"]),  # leaves images/
                  _iu("CXR5_IM-2117", views=["/etc/hostname", "CXR5_IM-2117/1.png"]),  # absolute
                  _iu("CXR5_IM-2117", views=["CXR5_IM-2117/0.png", "CXR5_IM-2117/link.png"]),  # out by a link
                  _iu("CXR5_IM-2117", views=["CXR5_IM-2117/0.png"] * 3),  # three views
                  "CXR9_IM-0000"],  # not a record
        "val": [_iu("CXR2_IM-0652", split="val")],
        "test": [_iu("CXR3_IM-1384", split="test"),
                 {"id": "CXR5_IM-2117", "image_path": ["CXR5_IM-2117/0.png", "CXR5_IM-2117/1.png"]}],  # no report
        "notes": "made by hand",
    }
    (src / "annotation.json").write_text(json.dumps(annotation))
    return src


@pytest.fixture
def mimic(tmp_path: Path) -> tuple[Path, np.ndarray]:
    src = tmp_path / "mimic_cxr"
    folder = src / "images" / "p10" / "p10000032" / "s50414267"
    folder.mkdir(parents=True)
    pixels = (np.random.default_rng(1).random((48, 40)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(folder / "02aa804e-bde0afdd.jpg", format="JPEG", quality=95)
    (folder / "174413ec-4ec4c1f7.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    record = {"study_id": 50414267, "subject_id": 10000032, "report": "No acute cardiopulmonary process.",
              "split": "train"}
    # the second view file is not a JPEG, the third is not there
    ids = ("02aa804e-bde0afdd", "174413ec-4ec4c1f7", "2a2277a9-b0ded155")
    annotation = {"train": [{**record, "id": i, "image_path": [f"p10/p10000032/s50414267/{i}.jpg"]} for i in ids],
                  "val": [], "test": []}
    (src / "annotation.json").write_text(json.dumps(annotation))
    return src, pixels


def test_iu_xray_records_are_staged_with_their_second_view_and_the_broken_ones_named(iuxray: Path, tmp_path: Path):
    out = tmp_path / "staged"
    errors = convert_r2gen(iuxray, out)
    found = {(e.file, e.field): e for e in errors}
    expected = {
        ("annotation.json[train][1]", "report"): ("  ", "empty report"),
        ("annotation.json[train][2]", "image_path[1]"): ("CXR4_IM-2050/1.png", "missing view: images/CXR4_IM-2050/"),
        ("annotation.json[train][3]", "image_path[1]"): ("../outside.png", "path escapes the images/ folder ('..')"),
        ("annotation.json[train][4]", "image_path[0]"): ("/etc/hostname", "absolute paths are not allowed"),
        ("annotation.json[train][5]", "image_path[1]"): ("CXR5_IM-2117/link.png", "path resolves outside the images/"),
        ("annotation.json[train][6]", "image_path"): (["CXR5_IM-2117/0.png"] * 3, "expected a list of 1 to 2 view"),
        ("annotation.json[train][7]", "record"): ("CXR9_IM-0000", "expected {'id', 'report'"),
        ("annotation.json[test][1]", "report"): (None, "expected the report text"),
        ("annotation.json", "notes"): ("notes", "not a split R2Gen reads (train, val, test)"),
    }
    assert set(found) == set(expected)
    for key, (value, reason) in expected.items():
        assert found[key].value == value and found[key].reason.startswith(reason), (key, found[key])

    staged = {p.relative_to(out).as_posix(): json.loads(p.read_text()) for p in out.rglob("*.json")}
    assert {k: len(v) for k, v in staged.items()} == {"train/R2Gen_report.json": 1, "val/R2Gen_report_val.json": 1,
                                                     "test/R2Gen_report_test.json": 1}
    first = staged["train/R2Gen_report.json"][0]
    assert first == {"id": "CXR1_1_IM-0001", "image": "images/CXR1_1_IM-0001/x_0.png", "answer_type": "open",
                     "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": REPORT}],
                     "context": [{"image": "images/CXR1_1_IM-0001/x_1.png", "mask": None}]}
    # the views are the source's files, linked; broken records' views are not staged
    assert (out / first["image"]).read_bytes() == (iuxray / "images/CXR1_1_IM-0001/0.png").read_bytes()
    assert not (out / "images/CXR4_IM-2050").exists()


def test_mimic_cxr_jpegs_are_staged_as_png_and_the_study_named(mimic, tmp_path: Path):
    src, pixels = mimic
    out = tmp_path / "staged"
    errors = convert_r2gen(src, out)
    assert [(e.file, e.field, e.reason.split(":")[0]) for e in errors] == [
        ("annotation.json[train][1]", "image_path[0]", "unreadable view"),
        ("annotation.json[train][2]", "image_path[0]", "missing view")]
    assert errors[0].reason.startswith("unreadable view: images/p10/p10000032/s50414267/174413ec-4ec4c1f7.jpg: "
                                       "not a readable image")
    (record,) = json.loads((out / "train/R2Gen_report.json").read_text())
    assert record["id"] == "10000032/50414267/02aa804e-bde0afdd" and "context" not in record
    assert record["image"] == "images/p10/p10000032/s50414267/x_02aa804e-bde0afdd.png"
    assert (out / record["image"]).read_bytes().startswith(PNG_SIGNATURE)
    # decoded once and written losslessly: the staged pixels are the JPEG's decoded pixels
    assert np.array_equal(read_image(out / record["image"]), read_image(next((src / "images").rglob("02aa*.jpg"))))
    assert np.abs(read_image(out / record["image"]).astype(int) - pixels).mean() < 4  # and it is the same picture


def test_staged_names_keep_the_folder_and_say_the_modality():
    assert staged_image("CXR2384_IM-0942/0.png") == "images/CXR2384_IM-0942/x_0.png"
    assert staged_image("p10/p10000032/s50414267/02aa.jpg") == "images/p10/p10000032/s50414267/x_02aa.png"


def test_ingest_of_an_iu_xray_folder_adds_up_and_keeps_its_own_validation_split(iuxray: Path, tmp_path: Path, home):
    from medplib.config import load_config

    root, pre_errors, name = stage_source(f"iuxray:{iuxray}", home, load_config("tiny"))
    # val_fraction would carve a validation split from train; R2Gen brings its own, so train stays whole
    result = build_dataset(root, tmp_path / "data", name, pre_errors, 10**7, val_fraction=0.45)
    assert (result.source, result.total, result.valid, result.quarantined) == ("iuxray", 3 + 9, 3, 9)
    assert result.by_split == {"test": 1, "train": 1, "val": 1} and result.by_task == {"report": 3}
    assert result.quarantine_reasons["empty report"] == 1
    records = {r.split: r for r in read_records(tmp_path / "data")}
    assert records["val"].source_id == "CXR2_IM-0652" and records["val"].source == "val/R2Gen_report_val.json"
    assert all(r.modality == "x" and r.answer_type == "open" and len(r.context) == 1 for r in records.values())
    assert records["train"].conversations[1]["value"] == REPORT
    assert (tmp_path / "data" / records["train"].context[0]["image"]).is_file()


def test_iuxray_is_a_registered_source_and_the_vl_stages_train_reports():
    from medplib.config import stage_spec

    assert "iuxray" in readers.kinds() and "iuxray:DIR" in readers.usage()
    assert readers.get("iuxray").convert is not None and readers.get("iuxray").write_synth is not None
    assert tasks.for_source("iuxray") == {"report": tasks.get("report")}
    for stage in (1, 2, 3, 4):
        assert ("report" in tasks.resolve(stage_spec("tiny", stage).tasks)) is (stage in (2, 4)), stage


def test_synthetic_reports_are_written_in_r2gens_layout_and_read_back_by_its_reader(tmp_path: Path, home):
    from medplib.config import load_config
    from medplib.data.synth import generate

    summary = generate(tmp_path / "synth", n=24, seed=3)
    assert summary.sources == ["iuxray", "lvit", "medgrit"]
    folder = tmp_path / "synth" / "iuxray"
    annotation = json.loads((folder / "annotation.json").read_text())
    assert list(annotation) == ["train", "val", "test"] and annotation["val"] == []
    written = annotation["train"] + annotation["test"]
    xray = [f"x_00--synth3--case{i:05d}--z_0000" for i in range(24) if i % 8 == 2]  # MODALITIES[2] is x
    assert sorted(r["id"] for r in written) == xray  # one report per X-ray phantom, no other modality
    assert summary.files["iuxray/annotation.json"] == len(written)
    for r in written:
        assert r["image_path"] == [f"{r['id']}/0.png", f"{r['id']}/1.png"] and r["split"] in ("train", "test")
        # every structure an X-ray phantom may show is reported, present or not ("No …")
        sentences = r["report"].rstrip(".").split(". ")
        assert len(sentences) == 3
        for sentence, name in zip(sentences, ("nodule", "heart", "fracture")):
            assert sentence == f"No {name} is seen" or re.fullmatch(
                rf"There is a (small|large) {name} in the (upper|lower) (left|right)", sentence), sentence
        front = read_image(folder / "images" / r["image_path"][0])
        side = read_image(folder / "images" / r["image_path"][1])
        assert np.array_equal(front, read_image(tmp_path / "synth" / f"images/{r['id']}.png"))
        assert any(np.array_equal(np.roll(np.fliplr(front), s, axis=1), side) for s in range(-3, 4))
    # the mentions agree with the phantom's own caption (same structures)
    captions = json.loads((tmp_path / "synth" / "train/alignment.json").read_text())
    for r in annotation["train"]:
        caption = next(c["conversations"][1]["value"] for c in captions if c["image"] == f"images/{r['id']}.png")
        assert {n for n in ("nodule", "heart", "fracture") if n in caption} == {
            n for n in ("nodule", "heart", "fracture") if f"No {n}" not in r["report"]}

    root, pre_errors, name = stage_source("synth", home, load_config("tiny", {"data": {"synth_n": 24}}), seed=3)
    assert pre_errors == []
    result = build_dataset(root, tmp_path / "data", name, pre_errors, 10**7, val_fraction=0.0)
    assert result.quarantined == 0 and result.by_task["report"] == len(written)
    reports = [r for r in read_records(tmp_path / "data") if r.task == "report"]
    assert sorted(r.source_id for r in reports) == xray
    assert all(r.question == QUESTION and len(r.context) == 1 for r in reports)
    assert {r.split for r in reports} == {r["split"] for r in written}
