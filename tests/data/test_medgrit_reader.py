"""The Med-GRIT-270k reader (`--source medgrit:DIR`) on small files in BiRD's real format, broken records included:
valid pairs flow, each broken one is quarantined naming its file, field and value, and the counts add up."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medplib.data import readers
from medplib.data.images import write_png
from medplib.data.ingest import build_dataset
from medplib.data.readers.medgrit import convert_medgrit, recognise, split_and_code
from medplib.data.torch_dataset import read_records

CT, MR, X = "ct_00--AbdomenCT1K--Case_00011--x_0040", "mr_00--BraTS--Case_00002--z_0071", "x_00--COVID--img_0003"


def _rec(image: str, *pairs: tuple[str, str], picture: bool = False) -> dict:
    first_q, first_a = pairs[0]
    tag = f"{'Picture 1: ' if picture else ''}<img>{image}.png</img>\n"
    return {"id": image, "conversations": [[tag + first_q, first_a], *[list(p) for p in pairs[1:]]]}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "medgrit"
    rng = np.random.default_rng(0)
    for stem in (CT, MR, X):
        write_png(src / "images" / f"{stem}.png", (rng.random((40, 48)) * 255).astype(np.uint8))
    test = src / "test"
    test.mkdir()
    vg = [_rec(CT, ("Where is the <ref>liver</ref>?", "<ref>liver</ref><box>(120,300),(480,720)</box>")),
          _rec(MR, ("Locate the <ref>tumor</ref>.", "<box>(10.5,20),(30,40.25)</box>"), picture=True),
          _rec(CT, ("Where is the <ref>spleen</ref>?", "<ref>spleen</ref><box>(500,300),(400,720)</box>")),  # x2<x1
          _rec(CT, ("Where is the <ref>kidney</ref>?", "<ref>kidney</ref><box>(1,2),(3,1200)</box>")),  # grid
          _rec(CT, ("Where is the <ref>aorta</ref>?", "<ref>aorta</ref><box>(1,2),(3)</box>")),  # malformed
          _rec("ct_00--gone", ("Where is the <ref>liver</ref>?", "<ref>liver</ref><box>(1,2),(3,4)</box>")),
          _rec(X, ("Where is the lung?", "It is on the left."))]  # a VG answer without a box
    (test / "0301_CombinedAll_7.5w_test_chatlm_VG_img_coord_OneConv.json").write_text(json.dumps(vg))
    ro = [_rec(MR, ("What is in <box>(10,20),(30,40)</box>?", "tumor core")),
          _rec(X, ("What is in <box>(10,20),(300,40)</box>?", "<ref>left lung</ref><box>(1,2),(3,4)</box>")),
          _rec(X, ("What is this?", "left lung"))]  # no box asked about
    (test / "0301_CombinedAll_7.5w_test_chatlm_RO_img_coord_OneConv.json").write_text(json.dumps(ro))
    train = [
        _rec(CT, ("Where is the <ref>liver</ref>?", "<ref>liver</ref><box>(120,300),(480,720)</box>"),  # VG
             ("What is in <box>(120,300),(480,720)</box>?", "liver"),  # RO
             ("Describe the image with the objects located.",
              "A CT slice showing the <ref>liver</ref><box>(120,300),(480,720)</box> and the "
              "<ref>spleen</ref><box>(600,300),(800,500)</box>."),  # GC
             ("What does the image show?", "An abdominal CT slice with a normal liver."),  # MII
             ("Describe the image with the objects located.",
              "The <ref>liver</ref><box>(1,2),(3,4)</box> next to <box>(5,6),(7,8)</box>.")),  # GC, 1 ref 2 boxes
        _rec("ct_00--missing", ("Where is the <ref>liver</ref>?", "<ref>liver</ref><box>(1,2),(3,4)</box>"),
             ("What is it?", "liver")),  # missing image: both pairs quarantined
        _rec("zz_00--alien", ("What is this?", "Something.")),  # unknown modality
        {"id": MR, "conversations": [[f"<img>{MR}.png</img>\nWhat modality?"]]},  # not a pair
        {"id": MR},  # no conversations
    ]
    (src / "0301_CombinedAll_7.5w_train1_chatlm_img_coord2.json").write_text(json.dumps(train))
    (src / "notes_about_the_data.json").write_text("[]")  # neither train nor test
    return src


def test_file_names_say_split_and_task():
    assert split_and_code("0301_CombinedAll_7.5w_test_chatlm_GC_img_coord_OneConv.json") == ("test", "GC")
    assert split_and_code("0301_CombinedAll_7.5w_train1_chatlm_img_coord2.json") == ("train", None)
    assert split_and_code("medgrit-test.RO.json") == ("test", "RO")
    assert split_and_code("all.json") == (None, None) and split_and_code("train_test_VG.json") == (None, "VG")
    assert split_and_code("trainee_VGG_test.json") == ("test", None)


def test_tasks_are_recognised_from_the_conversation():
    assert recognise("What is in <box>(1,2),(3,4)</box>?", "liver") == "RO"
    assert recognise("Where is the <ref>liver</ref>?", "<ref>liver</ref><box>(1,2),(3,4)</box>") == "VG"
    assert recognise("Find the liver.", "<box>(1,2),(3,4)</box>.") == "VG"
    assert recognise("Describe it.", "A slice with the <ref>liver</ref><box>(1,2),(3,4)</box>.") == "GC"
    assert recognise("Describe it.", "A normal slice.") == "MII"


def test_the_reader_stages_valid_pairs_and_quarantines_the_rest(source: Path, tmp_path: Path):
    out = tmp_path / "staged"
    errors = convert_medgrit(source, out)
    found = {(e.file, e.field): e for e in errors}
    vg = "test/0301_CombinedAll_7.5w_test_chatlm_VG_img_coord_OneConv.json"
    ro = "test/0301_CombinedAll_7.5w_test_chatlm_RO_img_coord_OneConv.json"
    train = "0301_CombinedAll_7.5w_train1_chatlm_img_coord2.json"
    expected = {
        (f"{vg}[2]", "conversations[0]"): ("<box>(500,300),(400,720)</box>", "box corners reversed"),
        (f"{vg}[3]", "conversations[0]"): ("<box>(1,2),(3,1200)</box>", "coordinate outside the grid"),
        (f"{vg}[4]", "conversations[0]"): ("<box>(1,2),(3)</box>", "malformed box text"),
        (f"{vg}[5]", "conversations[0][0]"): ("ct_00--gone.png", "missing image"),
        (f"{vg}[6]", "conversations[0]"): ("It is on the left.", "a refer_vg answer needs a <box>"),
        (f"{ro}[1]", "conversations[0]"): ("<ref>left lung</ref><box>(1,2),(3,4)</box>",
                                           "a refer_ro answer names the object, without a <box>"),
        (f"{ro}[2]", "conversations[0]"): ("<image>\nWhat is this?", "a refer_ro question needs a <box> to ask about"),
        (f"{train}[0]", "conversations[4]"): (
            "The <ref>liver</ref><box>(1,2),(3,4)</box> next to <box>(5,6),(7,8)</box>.", "<ref>/<box> counts disagree"),
        (f"{train}[1]", "conversations[0][0]"): ("ct_00--missing.png", "missing image"),
        (f"{train}[1]", "conversations[1]"): ("ct_00--missing.png", "missing image"),
        (f"{train}[2]", "conversations[0][0]"): ("zz_00--alien.png", "unknown modality 'zz'"),
        (f"{train}[3]", "conversations[0]"): ([f"<img>{MR}.png</img>\nWhat modality?"], "expected a [user, assistant]"),
        (f"{train}[4]", "conversations"): (None, "expected {'id', 'conversations'"),
        ("notes_about_the_data.json", "file name"): ("notes_about_the_data.json", "cannot tell the split"),
    }
    assert set(found) == set(expected)
    for key, (value, reason) in expected.items():
        assert found[key].value == value and found[key].reason.startswith(reason), (key, found[key])

    staged = {p.relative_to(out).as_posix(): json.loads(p.read_text()) for p in out.rglob("*.json")}
    assert {k: len(v) for k, v in staged.items()} == {
        "test/MedGRIT_VG_test.json": 2, "test/MedGRIT_RO_test.json": 1, "train/MedGRIT_VG.json": 1,
        "train/MedGRIT_RO.json": 1, "train/MedGRIT_GC.json": 1, "train/MedGRIT_MII.json": 1}
    first = staged["test/MedGRIT_VG_test.json"][1]
    assert first["image"] == f"images/{MR}.png" and first["id"] == f"{vg}[1].conversations[0]"
    assert first["conversations"] == [{"from": "human", "value": "<image>\nLocate the <ref>tumor</ref>."},
                                      {"from": "gpt", "value": "<box>(10.5,20),(30,40.25)</box>"}]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{s}.png" for s in (CT, MR))


def test_ingest_of_a_medgrit_folder_adds_up(source: Path, tmp_path: Path, home):
    from medplib.config import load_config
    from medplib.data.ingest import stage_source

    root, pre_errors, name = stage_source(f"medgrit:{source}", home, load_config("tiny"))
    result = build_dataset(root, tmp_path / "data", name, pre_errors, 10**7, val_fraction=0.0)
    pairs = 7 + 3 + 5 + 2 + 1 + 1 + 1 + 1  # every pair of every record (a record without pairs counts once)
    assert (result.source, result.total, result.valid) == ("medgrit", pairs, 7)
    assert result.total == result.valid + result.quarantined
    assert result.by_task == {"refer_gc": 1, "refer_mii": 1, "refer_ro": 2, "refer_vg": 3}
    assert result.by_split == {"test": 3, "train": 4}
    assert result.quarantine_reasons["missing image"] == 3 and result.quarantine_reasons["box corners reversed"] == 1
    records = read_records(tmp_path / "data")
    assert {r.modality for r in records} == {"ct", "mr"} and all(r.answer_type == "open" for r in records)
    assert all(r.conversations[0]["value"].startswith("<image>\n") for r in records)


def test_medgrit_is_a_registered_source_and_the_stages_read_its_tasks():
    from medplib import tasks
    from medplib.config import stage_spec

    assert "medgrit" in readers.kinds() and "medgrit:DIR" in readers.usage()
    assert tasks.groups()["refer"] == ["refer_vg", "refer_ro", "refer_gc", "refer_mii"]
    text = {"refer_ro", "refer_gc", "refer_mii"}  # answered in text: the visual-language stages
    for preset in ("tiny", "full"):
        for stage in (1, 2, 3, 4):
            mix = set(tasks.resolve(stage_spec(preset, stage).tasks))
            assert (text <= mix) is (stage in (2, 4)), (preset, stage)
            # visual grounding is answered through <SEG>: the stages that train the mask decoder
            assert ("refer_vg" in mix) is (stage in (3, 4)), (preset, stage)


def test_synthetic_source_writes_med_grit_files_and_stages_them_through_the_reader(tmp_path: Path, home):
    from medplib.config import load_config
    from medplib.data.ingest import stage_source
    from medplib.data.synth import generate

    summary = generate(tmp_path / "synth", n=24, seed=3)
    assert summary.sources == ["iuxray", "lvit", "medgrit"]  # the refer tasks, text-guided segmentation (lvit/), reports (iuxray/)
    written = sorted(p.name for p in (tmp_path / "synth" / "medgrit").glob("*.json"))
    assert written == ["MedGRIT_test_chatlm_GC_img_coord_OneConv.json", "MedGRIT_test_chatlm_MII_img_coord_OneConv.json",
                       "MedGRIT_test_chatlm_RO_img_coord_OneConv.json", "MedGRIT_test_chatlm_VG_img_coord_OneConv.json",
                       "MedGRIT_train1_chatlm_img_coord2.json"]
    train = json.loads((tmp_path / "synth" / "medgrit" / written[-1]).read_text())
    assert all(list(r) == ["conversations", "id"] and len(r["conversations"]) == 1 for r in train)
    assert all(r["conversations"][0][0].startswith(f"Picture 1: <img>{r['id']}.png</img>\n") for r in train)
    # every image a Med-GRIT record names is there, as Med-GRIT keeps them
    assert all((tmp_path / "synth" / "medgrit" / "images" / f"{r['id']}.png").is_file() for r in train)

    root, pre_errors, name = stage_source("synth", home, load_config("tiny", {"data": {"synth_n": 24}}), seed=3)
    assert pre_errors == []
    result = build_dataset(root, tmp_path / "data", name, pre_errors, 10**7, val_fraction=0.0)
    assert result.quarantined == 0
    refer_files = sum(n for rel, n in summary.files.items() if rel.startswith("medgrit/"))
    assert sum(result.by_task[t] for t in ("refer_vg", "refer_ro", "refer_gc", "refer_mii")) == refer_files
    # the combined training file's pairs were told apart by their text: each task has its training records
    by_task_split = {(r.task, r.split) for r in read_records(tmp_path / "data")}
    assert {(t, "train") for t in ("refer_vg", "refer_ro", "refer_gc", "refer_mii")} <= by_task_split
