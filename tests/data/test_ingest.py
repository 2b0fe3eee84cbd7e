"""Ingest: good records all flow, every broken one is quarantined naming file and field, counts add up."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medplib.config import load_config
from medplib.data.images import write_png
from medplib.data.ingest import build_dataset, ingest, parse_source
from medplib.data.schema import MODALITIES, Record
from medplib.data.synth import generate


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, n=24, seed=3)
    return out


def _turns(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]


def make_broken_source(src: Path, dst: Path) -> dict[str, str]:
    """Copy a good source and add one broken record per kind; returns {marker question: expected field}."""
    shutil.copytree(src, dst)
    good_image = sorted((dst / "images").glob("ct_*.png"))[0]
    img = np.asarray(Image.open(good_image))
    h, w = img.shape[:2]
    stem = "ct_00--bad--case0--z_0000"
    write_png(dst / f"images/{stem}.png", img)
    full = np.zeros((h, w), bool)
    full[4:20, 4:20] = True
    write_png(dst / "masks/ok.png", full)
    write_png(dst / "masks/small.png", np.ones((h // 2, w // 2), bool))
    write_png(dst / "masks/empty.png", np.zeros((h, w), bool))
    (dst / "images/ct_00--corrupt.png").write_bytes(b"this is not a png at all")
    data = (dst / f"images/{stem}.png").read_bytes()
    (dst / "images/ct_00--truncated.png").write_bytes(data[: len(data) // 2])
    write_png(dst / "images/ct_00--huge.png", np.zeros((300, 300), np.uint8))
    write_png(dst / "images/zz_00--alien.png", img)
    (dst / "secret.png").write_bytes(good_image.read_bytes())
    image = f"images/{stem}.png"
    cases = {
        "corrupt": ({"image": "images/ct_00--corrupt.png", "conversations": _turns("corrupt?", "no")}, "image"),
        "truncated": ({"image": "images/ct_00--truncated.png", "conversations": _turns("truncated?", "no")}, "image"),
        "missing": ({"image": "images/ct_00--missing.png", "conversations": _turns("missing?", "no")}, "image"),
        "bomb": ({"image": "images/ct_00--huge.png", "conversations": _turns("bomb?", "no")}, "image"),
        "modality": ({"image": "images/zz_00--alien.png", "conversations": _turns("modality?", "no")}, "image"),
        "escape": ({"image": "../secret.png", "conversations": _turns("escape?", "no")}, "image"),
        "absolute": ({"image": str(good_image), "conversations": _turns("absolute?", "no")}, "image"),
        "empty conversation": ({"image": image, "conversations": []}, "conversations"),
        "no image field": ({"conversations": _turns("no image field?", "no")}, "image"),
        "seg count": ({"image": image, "conversations": _turns("Segment it.", "It. <SEG> <SEG> <mask>masks/ok.png</mask>")},
                      "conversations[1].value"),
        "mask size": ({"image": image, "conversations": _turns("mask size?", "It. <SEG> <mask>masks/small.png</mask>")},
                      "conversations[1].value <mask>"),
        "empty mask": ({"image": image, "conversations": _turns("empty mask?", "It. <SEG> <mask>masks/empty.png</mask>")},
                       "conversations[1].value <mask>"),
        "region escape": ({"image": image, "conversations": _turns("what is in <region>../../etc/passwd</region>?", "x")},
                          "conversations[0].value <region>"),
        "non-utf8": ({"image": image, "conversations": _turns("non-utf8 \udcff?", "no")}, "conversations[0].value"),
        "bad answer type": ({"image": image, "answer_type": "maybe", "conversations": _turns("answer type?", "no")},
                            "answer_type"),
        "not an object": (["image", "x"], "record"),
    }
    records = [c[0] for c in cases.values()]
    ok = {"image": image, "conversations": _turns("Segment the square.", "It is the square. <SEG> <mask>masks/ok.png</mask>")}
    records += [ok, dict(ok)]  # the second is a duplicate
    text = json.dumps(records, ensure_ascii=False)
    raw = text.encode("utf-8", "surrogateescape")
    (dst / "train/MeCoVQA-Grounding-extra.json").write_bytes(raw)
    (dst / "test/MeCoVQA_Grounding_broken_test.json").write_text('[{"image": "images/x.png", ', encoding="utf-8")
    (dst / "train/notes.json").write_text("[]", encoding="utf-8")
    fields = {k: v[1] for k, v in cases.items()}
    fields["duplicate"] = "id"
    return fields


def test_mixed_good_and_broken_source(synth_dir: Path, tmp_path: Path):
    src = tmp_path / "mecovqa"
    expected = make_broken_source(synth_dir, src)
    good = build_dataset(synth_dir, tmp_path / "good_data", "synth", [], 200 * 200)
    result = build_dataset(src, tmp_path / "data", "mecovqa", [], 200 * 200)
    q = [json.loads(line) for line in (tmp_path / "data/quarantine.jsonl").read_text().splitlines()]
    recs = [Record.from_dict(json.loads(line)) for line in (tmp_path / "data/records.jsonl").read_text().splitlines()]
    # counts add up; every good record flows (the synthetic ones plus the one good extra record)
    assert result.total == result.valid + result.quarantined == len(recs) + len(q)
    assert result.valid == good.valid + 1
    assert {r.id for r in recs} >= {json.loads(l)["id"] for l in (tmp_path / "good_data/records.jsonl").open()}
    # every broken kind is quarantined once, naming its file and field; + malformed JSON file + unknown file name
    assert result.quarantined == len(expected) + 2
    by_question = {}
    for entry in q:
        assert entry["file"] and entry["field"] and entry["reason"]
        rec = entry.get("record") or {}
        convs = rec.get("conversations") if isinstance(rec, dict) else None
        key = convs[0]["value"] if convs else json.dumps(rec)
        by_question[key] = entry
    for name, field in expected.items():
        hits = [e for e in q if e["field"] == field and e["file"].startswith("train/MeCoVQA-Grounding-extra.json[")]
        assert hits, f"no quarantine entry for {name!r} with field {field!r}"
    reasons = " | ".join(e["reason"] for e in q)
    for phrase in ("not a readable image", "does not exist", "above the limit", "unknown modality", "escapes",
                   "absolute paths", "empty conversation", "2 <SEG> token(s) but 1 <mask>", "is 32x32 but image",
                   "mask is empty", "not valid UTF-8", "duplicate of", "malformed JSON", "cannot tell the task"):
        assert phrase in reasons, phrase
    assert not any(str(tmp_path) in json.dumps(e) for e in q if e["field"] != "image" or "absolute" not in e["reason"])
    # normalised files exist and are binary masks
    for r in recs:
        assert (tmp_path / "data" / r.image).is_file()
        assert r.modality in MODALITIES
        for m in r.masks + r.regions:
            vals = np.unique(np.asarray(Image.open(tmp_path / "data" / m)))
            assert set(vals.tolist()) <= {0, 255}


def test_same_seed_same_version_other_seed_other_version(tmp_path: Path, home):
    cfg = load_config("tiny", {"data": {"synth_n": 24}})
    versions = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        proj = tmp_path / name
        proj.mkdir()
        versions.append(ingest("synth", proj, home, cfg, seed=seed).version)
    assert versions[0] == versions[1] != versions[2]
    assert versions[0].endswith(".dir")
    pushed = list((home.dvc_remote).rglob("*"))
    assert any(p.is_file() for p in pushed)


def test_parse_source_errors(tmp_path: Path):
    with pytest.raises(ValueError, match="not understood"):
        parse_source("ftp:somewhere")
    with pytest.raises(ValueError, match="does not exist"):
        parse_source(f"mecovqa:{tmp_path / 'nope'}")
    assert parse_source("synth") == ("synth", None)


def test_synth_is_deterministic_and_in_mecovqa_layout(tmp_path: Path):
    a, b = generate(tmp_path / "a", n=16, seed=1), generate(tmp_path / "b", n=16, seed=1)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
    assert a.records == b.records
    names = {str(f) for f in files_a}
    assert "train/MeCoVQA-Complex.json" in names and "train/MeCoVQA-Grounding.json" in names
    assert any(n.startswith("zeroshot4grounding/") for n in names)
    assert {Path(n).name.split("_")[0] for n in names if n.startswith("images/")} == set(MODALITIES)


def test_validation_is_carved_from_train_by_image_and_recorded(tmp_path: Path):
    """MeCoVQA has no validation files: ingest moves a fixed share of the training images (all their records) to
    `val`, by a hash of the pixels; test and zero-shot stay as they are; the manifest records it."""
    from collections import defaultdict

    from medplib.data.expectations import validate_dataset

    generate(tmp_path / "src", n=80, seed=5)
    plain = build_dataset(tmp_path / "src", tmp_path / "plain", "synth", [], 10**7)
    carved = build_dataset(tmp_path / "src", tmp_path / "data", "synth", [], 10**7, val_fraction=0.25)
    again = build_dataset(tmp_path / "src", tmp_path / "again", "synth", [], 10**7, val_fraction=0.25)
    read = lambda d: [json.loads(line) for line in (d / "records.jsonl").read_text().splitlines()]  # noqa: E731
    before, after = read(tmp_path / "plain"), read(tmp_path / "data")
    assert len(before) == len(after) == plain.valid == carved.valid
    assert (tmp_path / "data/records.jsonl").read_bytes() == (tmp_path / "again/records.jsonl").read_bytes()

    splits_of = defaultdict(set)
    for r in after:
        splits_of[r["image"]].add(r["split"])
    assert all(len(s) == 1 for s in splits_of.values())  # an image's records go together
    train_before = {r["image"] for r in before if r["split"] == "train"}
    val = {i for i, s in splits_of.items() if s == {"val"}}
    assert val and val < train_before and 0.1 < len(val) / len(train_before) < 0.45
    for split in ("test", "zeroshot"):  # held-out splits are untouched
        assert {r["image"] for r in before if r["split"] == split} == {i for i, s in splits_of.items() if s == {split}}
    manifest = json.loads((tmp_path / "data/manifest.json").read_text())
    assert manifest["val_fraction"] == 0.25 and manifest["by_split"] == carved.by_split
    assert carved.by_split["val"] == sum(r["split"] == "val" for r in after)
    assert validate_dataset(tmp_path / "data", tmp_path / "docs").success
    # the default config carves 10%
    assert load_config("tiny").data.val_fraction == 0.1


def test_a_source_with_its_own_validation_files_keeps_them_and_train_stays_whole(tmp_path: Path):
    """A staged folder with val/*.json (R2Gen's `val`) brings its validation split: nothing is carved from train."""
    generate(tmp_path / "src", n=40, seed=5)
    carved = build_dataset(tmp_path / "src", tmp_path / "carved", "synth", [], 10**7, val_fraction=0.3)
    train = json.loads((tmp_path / "src/train/alignment.json").read_text())
    (tmp_path / "src/val").mkdir()
    (tmp_path / "src/val/alignment_val.json").write_text(json.dumps(train[:2]))
    (tmp_path / "src/train/alignment.json").write_text(json.dumps(train[2:]))
    own = build_dataset(tmp_path / "src", tmp_path / "own", "synth", [], 10**7, val_fraction=0.3)
    assert carved.by_split["val"] > 2 and own.by_split["val"] == 2 and own.total == carved.total
    assert own.by_split["train"] == carved.by_split["train"] + carved.by_split["val"] - 2
    records = [json.loads(line) for line in (tmp_path / "own/records.jsonl").read_text().splitlines()]
    assert sorted(r["source"] for r in records if r["split"] == "val") == ["val/alignment_val.json"] * 2


@pytest.mark.parametrize("rel, reason", [
    ("images/a.png", None), ("images/../images/a.png", "path escapes the folder ('..')"),
    ("/etc/passwd", "absolute paths are not allowed; use a path inside the folder"),
    ("C:/data/a.png", "absolute paths are not allowed; use a path inside the folder"),
    ("images/out.png", "path resolves outside the folder (symlink?)"),
])
def test_path_problem_names_what_leaves_the_folder(tmp_path: Path, rel: str, reason: str | None):
    from medplib.data.schema import path_problem

    (tmp_path / "root/images").mkdir(parents=True)
    (tmp_path / "root/images/out.png").symlink_to(tmp_path / "elsewhere.png")
    assert path_problem(rel, tmp_path / "root", "the folder") == reason


def test_every_structure_stands_out_from_its_field():
    """A presence question is answerable only if the structure can be seen: each structure differs from the field it
    lies on by at least MIN_CONTRAST speckle sigmas, by its colour and as measured on rendered phantoms (structure
    pixels against a ring of field pixels around them)."""
    from scipy.ndimage import binary_dilation

    from medplib.data.synth import LOOKS, MIN_CONTRAST, NOISE, STRUCTURES, _render, contrast

    assert set(STRUCTURES) == set(LOOKS) == set(MODALITIES)
    weak = [(m, name, round(contrast(m, bright), 2)) for m, ss in STRUCTURES.items() for name, _, bright in ss
            if contrast(m, bright) < MIN_CONTRAST]
    assert not weak, f"structures fainter than {MIN_CONTRAST} sigmas of speckle: {weak}"
    rng = np.random.default_rng(0)
    seen: dict[tuple[str, str], list[float]] = {}
    for modality in STRUCTURES:
        for _ in range(12):
            img, structures = _render(modality, 64, rng)
            pixels = img.astype(np.float64).reshape(64, 64, -1) / 255
            occupied = np.any([m for _, m in structures], axis=0) if structures else np.zeros((64, 64), bool)
            for name, mask in structures:
                ring = binary_dilation(mask, iterations=3) & ~occupied
                if ring.sum() < 20:
                    continue
                diff = np.abs(pixels[mask].mean(0) - pixels[ring].mean(0)).max() / NOISE[modality]
                seen.setdefault((modality, name), []).append(diff)
    faint = {k: round(float(np.median(v)), 2) for k, v in seen.items() if np.median(v) < 0.8 * MIN_CONTRAST}
    assert len(seen) >= 20 and not faint, f"rendered structures that barely show: {faint}"
