"""The LViT reader (`--source lvit:DIR`) on small hand-made files in both real layouts, QaTa-COV19 (the sheet names
the mask, `mask_<image>`; one Train_Val sheet) and MosMedData+ (the sheet names the image's stem; a sheet per split),
bad rows included: valid rows flow, each bad one is quarantined naming its sheet, row, field and value, and the
counts add up. Then the synthetic source's `lvit/` folder, read back through the same reader."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import openpyxl
import pytest

from medplib.config import load_config
from medplib.data import readers
from medplib.data.images import read_mask, write_png
from medplib.data.ingest import build_dataset, stage_source
from medplib.data.readers.lvit import convert_lvit, modality_of, read_sheet
from medplib.data.torch_dataset import read_records

QATA, MOSMED = "QaTa-COV19", "MosMedData+"
SHAPE = (40, 48)  # h, w


def _sheet(path: Path, rows: list[tuple], header: tuple = ("Image", "Description")) -> None:
    """A sheet as LViT ships it, written with openpyxl itself (not the reader module's writer)."""
    book = openpyxl.Workbook()
    book.active.title = "Sheet1"
    book.active.append(list(header))
    for row in rows:
        book.active.append(list(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    book.save(path)


def _pair(folder: Path, image: str, mask: str | None, rng: np.random.Generator, mask_shape=SHAPE) -> None:
    write_png(folder / "img" / image, (rng.random(SHAPE) * 255).astype(np.uint8))
    if mask is not None:
        m = np.zeros(mask_shape, bool)
        m[5:15, 10:30] = True
        write_png(folder / "labelcol" / mask, m)  # 0/255, as LViT's masks


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "datasets"
    rng = np.random.default_rng(0)
    qata = src / QATA
    train, val, test = qata / "Train_Folder", qata / "Val_Folder", qata / "Test_Folder"
    _pair(train, "covid_1.png", "mask_covid_1.png", rng)
    _pair(train, "covid_2.png", "mask_covid_2.png", rng)
    _pair(train, "covid_3.png", None, rng)  # its mask is missing
    _pair(train, "covid_4.png", "mask_covid_4.png", rng, mask_shape=(20, 20))  # mask of another size
    _pair(val, "covid_5.png", "mask_covid_5.png", rng)
    _pair(test, "covid_7.png", "mask_covid_7.png", rng)
    _sheet(train / "Train_Val_text.xlsx", [
        ("mask_covid_1.png", "Unilateral pulmonary infection, one infected area, upper left lung."),  # row 2
        ("mask_covid_2.png", "Bilateral pulmonary infection, two infected areas,\nall left lung and lower right lung."),
        ("mask_covid_3.png", "Unilateral pulmonary infection, one infected area, lower right lung."),  # no mask
        ("mask_covid_4.png", "Unilateral pulmonary infection, one infected area, all right lung."),  # mask size
        ("mask_covid_5.png", "Bilateral pulmonary infection, two infected areas, upper lungs."),  # in Val_Folder
        ("mask_covid_9.png", "Unilateral pulmonary infection, one infected area, upper right lung."),  # no image
        (None, None),  # row 8: blank, skipped
        ("mask_covid_2.png", "   "),  # row 9: empty description
    ])
    shutil.copyfile(train / "Train_Val_text.xlsx", val / "Train_Val_text.xlsx")  # the shared sheet, copied: read once
    _sheet(test / "Test_text.xlsx", [("mask_covid_7.png", "Bilateral pulmonary infection, all lungs.")])

    mosmed = src / MOSMED
    train, val, test = mosmed / "Train_Folder", mosmed / "Val_Folder", mosmed / "Test_Folder"
    _pair(train, "study_0001_10.png", "study_0001_10.png", rng)
    _pair(train, "study_0002_11.png", "study_0002_11.png", rng)
    _pair(train, "17.png", "17.png", rng)
    _pair(val, "study_0004_13.png", "study_0004_13.png", rng)
    _pair(test, "study_0005_14.png", "study_0005_14.png", rng)
    _sheet(train / "Train_text.xlsx", [
        ("study_0001_10", "Unilateral pulmonary infection, one infected area, lower left lung."),  # the stem
        ("study_0002_11.png", "Bilateral pulmonary infection, two infected areas, lower lungs."),  # the name
        (17, "Unilateral pulmonary infection, one infected area, middle right lung."),  # a numeric stem
        (None, "A note without an image."),  # row 5: empty Image cell
        ("study_0003_12", "Unilateral pulmonary infection, one infected area, upper left lung."),  # no image
    ])
    _sheet(val / "Val_text.xlsx", [("study_0004_13", "Bilateral pulmonary infection, two infected areas.")])
    (test / "Test_text.xlsx").write_bytes(b"PK\x03\x04 this is not a workbook")  # unreadable
    _sheet(test / "Extra_text.xlsx", [("study_0005_14", "A note.")], header=("Name", "Text"))  # not LViT's columns
    return src


def test_modality_comes_from_the_dataset_folder_name(tmp_path: Path):
    named = {QATA: "x", "QaTa-COV19-v2": "x", MOSMED: "ct", "MosMedDataPlus": "ct", "ct_lungs": "ct",
             "x-chest": "x", "ultrasound": "ultrasound", "MR brain": "mr"}
    assert {name: modality_of(tmp_path / name) for name in named} == named
    with pytest.raises(ValueError, match=r"cannot tell its modality from its name 'covid_scans'.*'ct_covid_scans'"):
        modality_of(tmp_path / "covid_scans")
    with pytest.raises(ValueError, match="cannot tell its modality"):
        modality_of(tmp_path / "ctx")  # a modality key must be a word of its own


def test_the_reader_stages_valid_rows_and_quarantines_the_rest(source: Path, tmp_path: Path):
    out = tmp_path / "staged"
    errors = convert_lvit(source, out)
    qata, mos = f"{QATA}/Train_Folder/Train_Val_text.xlsx", f"{MOSMED}/Train_Folder/Train_text.xlsx"
    expected = {
        (f"{qata}[row 4]", "Image"): ("mask_covid_3.png", "missing mask: Train_Folder/labelcol/mask_covid_3.png"),
        (f"{qata}[row 5]", "Image"): ("mask_covid_4.png",
                                      "mask labelcol/mask_covid_4.png is 20x20 but its image img/covid_4.png is 48x40"),
        (f"{qata}[row 7]", "Image"): ("mask_covid_9.png", "missing image: no covid_9.png in Train_Folder/img/ or "
                                                          "Val_Folder/img/"),
        (f"{qata}[row 9]", "Description"): ("", "empty description"),
        (f"{mos}[row 5]", "Image"): ("", "empty Image cell"),
        (f"{mos}[row 6]", "Image"): ("study_0003_12", "missing image: no study_0003_12.* in Train_Folder/img/"),
        (f"{MOSMED}/Test_Folder/Test_text.xlsx", "sheet"): ("Test_text.xlsx", "unreadable sheet ("),
        (f"{MOSMED}/Test_Folder/Extra_text.xlsx", "header"): (["Name", "Text"], "expected the columns Image | "
                                                                                "Description"),
    }
    found = {(e.file, e.field): e for e in errors}
    assert set(found) == set(expected)
    for key, (value, reason) in expected.items():
        assert found[key].value == value and found[key].reason.startswith(reason), (key, found[key])

    staged = {p.relative_to(out).as_posix(): json.loads(p.read_text()) for p in out.rglob("*.json")}
    assert {k: len(v) for k, v in staged.items()} == {
        "train/MeCoVQA-TextSeg.json": 5, "val/MeCoVQA_TextSeg_val.json": 2, "test/MeCoVQA_TextSeg_test.json": 1}
    by_id = {r["id"]: r for records in staged.values() for r in records}
    first = by_id[f"{qata}[row 2]"]
    assert first == {
        "id": f"{qata}[row 2]", "image": "images/x_00--QaTa-COV19--train--covid_1.png", "answer_type": "open",
        "conversations": [
            {"from": "human", "value": "<image>\nSegment: Unilateral pulmonary infection, one infected area, upper "
                                       "left lung."},
            {"from": "gpt", "value": "It is here. <SEG> <mask>masks_merged/x_00--QaTa-COV19--train--covid_1--"
                                     "note_merged.png</mask>"}]}
    # the note's line break is a space; the QaTa row found in Val_Folder is in the validation split
    assert "two infected areas, all left lung" in by_id[f"{qata}[row 3]"]["conversations"][0]["value"]
    assert by_id[f"{qata}[row 6]"]["image"] == "images/x_00--QaTa-COV19--val--covid_5.png"
    assert by_id[f"{qata}[row 6]"] in staged["val/MeCoVQA_TextSeg_val.json"]
    # MosMedData+ rows by stem, by name and by a number; '+' is left out of the staged names
    assert [by_id[f"{mos}[row {n}]"]["image"] for n in (2, 3, 4)] == [
        "images/ct_00--MosMedData--train--study_0001_10.png", "images/ct_00--MosMedData--train--study_0002_11.png",
        "images/ct_00--MosMedData--train--17.png"]
    # staged files are the source's (hard links or copies), masks still 0/255
    assert (out / first["image"]).read_bytes() == (source / QATA / "Train_Folder/img/covid_1.png").read_bytes()
    mask = read_mask(out / "masks_merged/x_00--QaTa-COV19--train--covid_1--note_merged.png")
    assert mask.shape == SHAPE and mask.sum() == 10 * 20


def test_ingest_of_an_lvit_folder_keeps_its_own_validation_split_and_adds_up(source: Path, tmp_path: Path, home):
    cfg = load_config("tiny")
    root, pre_errors, name = stage_source(f"lvit:{source}", home, cfg)
    result = build_dataset(root, tmp_path / "data", name, pre_errors, 10**7, val_fraction=0.45)
    rows = 7 + 1 + 5 + 1  # every non-blank row of every sheet read once (QaTa's shared sheet once)
    sheets = 2  # the unreadable sheet and the one without LViT's columns: one problem each
    assert (result.source, result.total, result.valid) == ("lvit", rows + sheets, 8)
    assert result.total == result.valid + result.quarantined
    assert result.by_task == {"textseg": 8} and result.by_modality == {"ct": 4, "x": 4}
    # Val_Folder is the validation split and nothing is carved from train, however large val_fraction is
    assert result.by_split == {"test": 1, "train": 5, "val": 2}
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["by_split"] == result.by_split and manifest["val_fraction"] == 0.0
    assert result.quarantine_reasons == {"empty Image cell": 1, "empty description": 1, "expected the columns Image | "
                                         "Description in the first row": 1, "mask labelcol/mask_covid_4.png is 20x20 "
                                         "but its image img/covid_4.png is 48x40": 1, "missing image": 2,
                                         "missing mask": 1, "unreadable sheet (BadZipFile": 1}
    records = read_records(tmp_path / "data")
    assert all(r.masks and r.question.startswith("<image>\nSegment: ") for r in records)

    # without a Val_Folder the same training rows are carved as for any source
    shutil.rmtree(source / QATA / "Val_Folder")
    shutil.rmtree(source / MOSMED / "Val_Folder")
    root, pre_errors, name = stage_source(f"lvit:{source}", home, cfg)
    carved = build_dataset(root, tmp_path / "carved", name, pre_errors, 10**7, val_fraction=0.45)
    assert carved.by_split["val"] >= 1 and carved.by_split["val"] + carved.by_split["train"] == 5


def test_one_dataset_folder_is_a_source_and_a_name_without_modality_is_refused(source: Path, tmp_path: Path, home):
    errors = convert_lvit(source / QATA, tmp_path / "one")
    assert sorted(e.file for e in errors) == [f"Train_Folder/Train_Val_text.xlsx[row {n}]" for n in (4, 5, 7, 9)]
    assert "lvit" in readers.kinds() and "lvit:DIR" in readers.usage()
    (source / QATA).rename(source / "covid_scans")
    with pytest.raises(ValueError, match=f"LViT dataset folder {re.escape(str(source / 'covid_scans'))}: cannot tell"):
        convert_lvit(source, tmp_path / "named")
    with pytest.raises(FileNotFoundError, match="has no Train_Folder, Val_Folder or Test_Folder"):
        convert_lvit(source / MOSMED / "Train_Folder", tmp_path / "none")


def test_synthetic_source_writes_lvit_datasets_and_stages_them_through_the_reader(tmp_path: Path, home):
    from medplib.data.synth import generate

    summary = generate(tmp_path / "synth", n=24, seed=3)
    assert summary.sources == ["iuxray", "lvit", "medgrit"]
    lvit = {rel: n for rel, n in summary.files.items() if rel.startswith("lvit/")}
    # one dataset per modality asked (the zero-shot modalities, pet and fundus, get no training records), X-ray's as
    # QaTa-COV19's (one Train_Val sheet, rows named by their masks), the others as MosMedData+'s
    assert {rel.split("/")[1] for rel in lvit} == {"ct", "mr", "x", "endoscopy", "dermoscopy", "ultrasound"}
    assert "lvit/x/Train_Folder/Train_Val_text.xlsx" in lvit and "lvit/ct/Train_Folder/Train_text.xlsx" in lvit
    for rel, n in lvit.items():
        rows = read_sheet(tmp_path / "synth" / rel, rel)
        assert len(rows) == n and [number for number, _, _ in rows] == list(range(2, n + 2))
        assert all(cell.startswith("mask_") is (rel.startswith("lvit/x/")) for _, cell, _ in rows)
        assert all(re.fullmatch(r"(One finding|Two findings|Three findings): .+ in the (upper|lower) (left|right)\.",
                                text) for _, _, text in rows)
    assert 12 <= sum(lvit.values()) <= 18  # about one per image of the 18 non-zero-shot phantoms
    # the same arguments give the same bytes, spreadsheets included (no time of writing inside them)
    generate(tmp_path / "again", n=24, seed=3)
    written = sorted(p.relative_to(tmp_path / "synth") for p in (tmp_path / "synth" / "lvit").rglob("*") if p.is_file())
    assert all((tmp_path / "synth" / f).read_bytes() == (tmp_path / "again" / f).read_bytes() for f in written)

    root, pre_errors, name = stage_source("synth", home, load_config("tiny", {"data": {"synth_n": 24}}), seed=3)
    assert pre_errors == []
    result = build_dataset(root, tmp_path / "data", name, pre_errors, 10**7, val_fraction=0.0)
    assert result.quarantined == 0 and result.by_task["textseg"] == sum(lvit.values())
    records = read_records(tmp_path / "data")
    textseg = [r for r in records if r.task == "textseg"]
    assert {r.split for r in textseg} == {"train", "test"} and not {r.modality for r in textseg} & {"pet", "fundus"}
    # the rows name the phantoms' own images (no copy under another name), and each mask is the union of the masks
    # of the structures its note names
    grounding = {(r.image, r.question.split("Segment the ")[1].rstrip(".")): r.masks[0]
                 for r in records if r.task == "grounding"}
    for r in textseg:
        names = re.findall(r"(?:: |, | and )([a-z ]+?) in the (?:upper|lower) (?:left|right)", r.question)
        assert names and all((r.image, n) in grounding for n in names), r.question
        union = np.logical_or.reduce([read_mask(tmp_path / "data" / grounding[r.image, n]) for n in names])
        assert (read_mask(tmp_path / "data" / r.masks[0]) == union).all()
