"""Text-guided segmentation (`textseg`): notes written from a phantom's structures with the union mask, records in
the LViT layout, the record check, Dice/IoU scoring as grounding's, and its place in the registry and stage mixes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medplib import tasks
from medplib.config import stage_spec
from medplib.data.images import read_mask
from medplib.data.synth import Scene
from medplib.eval.runner import aggregate, summarise
from medplib.tasks.textseg import note

TEXTSEG = tasks.get("textseg")


def _mask(y: slice, x: slice, size: int = 32) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[y, x] = True
    return m


def _scene(tmp_path: Path, modality: str, seed: int) -> Scene:
    structures = [("liver", _mask(slice(2, 8), slice(2, 8))), ("kidney", _mask(slice(20, 28), slice(22, 30))),
                  ("spleen", _mask(slice(22, 30), slice(2, 9)))]
    return Scene(out=tmp_path, index=0, modality=modality, stem=f"{modality}_00--synth--case00000--z_0000",
                 split="train", structures=structures, rng=np.random.default_rng(seed))


def test_notes_say_how_many_findings_which_and_where():
    assert note([("liver", "in the upper left")]) == "One finding: liver in the upper left."
    assert note([("liver", "in the upper left"), ("kidney", "in the lower right")]) == (
        "Two findings: liver in the upper left and kidney in the lower right.")
    assert note([("a", "in the upper left"), ("b", "in the lower left"), ("c", "in the lower right")]) == (
        "Three findings: a in the upper left, b in the lower left and c in the lower right.")


@pytest.mark.parametrize("modality", ["x", "ct"])
def test_synth_writes_one_lvit_row_whose_mask_is_the_union_of_the_named_structures(tmp_path: Path, modality: str):
    seen = set()
    for seed in range(12):
        scene = _scene(tmp_path, modality, seed)
        [row] = TEXTSEG.synth(scene)
        named = [name for name, _ in scene.structures if f" {name} in the " in f" {row['Description']}"]
        seen.add(len(named))
        stem = scene.stem
        mask_file = f"labelcol/mask_{stem}.png" if modality == "x" else f"labelcol/{stem}.png"
        assert row["Image"] == (f"mask_{stem}.png" if modality == "x" else stem)  # QaTa names the mask, MosMed the stem
        assert set(row["files"]) == {f"img/{stem}.png", mask_file} and row["files"][f"img/{stem}.png"] == scene.image_rel
        union = np.logical_or.reduce([m for name, m in scene.structures if name in named])
        assert (read_mask(tmp_path / row["files"][mask_file]) == union).all()
        where = {"liver": "upper left", "kidney": "lower right", "spleen": "lower left"}
        assert all(f"{name} in the {where[name]}" in row["Description"] for name in named)
    assert seen == {1, 2, 3}  # the subset named varies: a model must read the note
    assert TEXTSEG.synth(Scene(out=tmp_path, index=1, modality="ct", stem="ct_00--empty", split="train",
                               structures=[], rng=np.random.default_rng(0))) == []


def test_synth_files_are_lvit_sheets_per_modality_and_split():
    assert TEXTSEG.synth_file("train", "x") == "x/Train_Folder/Train_Val_text.xlsx"
    assert TEXTSEG.synth_file("test", "x") == "x/Test_Folder/Test_text.xlsx"
    assert TEXTSEG.synth_file("train", "ct") == "ct/Train_Folder/Train_text.xlsx"
    assert TEXTSEG.file_for("val") == "val/MeCoVQA_TextSeg_val.json"


def test_the_check_needs_a_note_and_one_mask():
    turns = TEXTSEG.turns("One finding: liver in the upper left.", "masks_merged/a.png")
    assert turns[0]["value"] == "<image>\nSegment: One finding: liver in the upper left."
    assert TEXTSEG.check(turns, ["masks_merged/a.png"], []) is None
    assert TEXTSEG.check(turns, [], [])[1] == "a textseg answer needs one <SEG> with a <mask>, not 0"
    empty = TEXTSEG.turns("  ", "masks_merged/a.png")
    assert TEXTSEG.check(empty, ["masks_merged/a.png"], [])[1] == "a textseg question needs a note to segment by"


def test_scored_by_dice_and_iou_and_summarised_as_textseg_mdice():
    target = _mask(slice(0, 4), slice(0, 8))
    half = _mask(slice(0, 4), slice(0, 4))
    assert TEXTSEG.score("It is here.", "", [half], target) == {"dice": pytest.approx(2 * 16 / 48),
                                                                "iou": 0.5, "seg_generated": 1.0}
    assert TEXTSEG.score("I cannot tell.", "", [], target) == {"dice": 0.0, "iou": 0.0, "seg_generated": 0.0}
    rows = [{"id": str(i), "split": "test", "task": "textseg", "modality": m, "prediction": "", "reference": "",
             **TEXTSEG.score("", "", [p], target)} for i, (m, p) in enumerate([("x", target), ("ct", half)])]
    table = aggregate(rows, ["test"])["test/textseg"]
    summary = summarise({"test/textseg": table})
    assert summary["textseg_mdice"] == pytest.approx((1 + 2 / 3) / 2) and summary["textseg_miou"] == 0.75
    assert TEXTSEG.headline_metric() == "textseg_mdice"


def test_textseg_joins_the_grounding_stages_and_takes_lvit_rows():
    names = tasks.names()  # after the built-in and refer tasks: their synthetic draws are unchanged
    assert names.index("textseg") > names.index("refer_mii")
    assert tasks.groups()["pixel"] == ["grounding", "refer_vg", "textseg"]
    assert tasks.for_source("lvit") == {"text": TEXTSEG} and TEXTSEG.synth_source == "lvit"
    for preset in ("tiny", "full"):
        for stage in (1, 2, 3, 4):
            assert ("textseg" in tasks.resolve(stage_spec(preset, stage).tasks)) is (stage in (3, 4)), (preset, stage)
