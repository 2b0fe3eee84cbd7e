"""DICOM reader: pydicom's bundled test files (uncompressed or natively decoded only) plus broken files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medplib.data.readers.dicom import convert_dicom, safe_name
from medplib.data.schema import MASK_RE, MODALITIES, SEG_TOKEN, RecordError, modality_from_filename
from medplib.data.synth import FILES

# Bundled with pydicom (no download) and decodable without optional plugins: explicit VR little endian, or
# JPEG baseline which Pillow decodes.
CT, MR, US_RGB, US_MULTIFRAME = "CT_small.dcm", "MR_small.dcm", "examples_rgb_color.dcm", "examples_ybr_color.dcm"
TRUNCATED_BUNDLED = "MR_truncated.dcm"  # pixel data shorter than the header says
NOT_AN_IMAGE = "rtdose.dcm"  # has pixels, but Modality RTDOSE is none of the 8


def _copy(name: str, dst: Path) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is not bundled"
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(path, dst))


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    _copy(CT, root / "patient1" / "ct.dcm")
    _copy(MR, root / "patient2" / "mr.dcm")
    _copy(US_RGB, root / "us" / "rgb.dcm")
    _copy(TRUNCATED_BUNDLED, root / "broken" / "mr_truncated.dcm")
    _copy(NOT_AN_IMAGE, root / "broken" / "dose.dcm")
    ct_bytes = Path(get_testdata_file(CT)).read_bytes()
    (root / "broken" / "ct_cut.dcm").write_bytes(ct_bytes[:30000])  # cut inside the pixel data
    (root / "broken" / "ct_stub.dcm").write_bytes(ct_bytes[:3000])  # cut before the pixel data
    (root / "notes.txt").write_text("not a DICOM file\n")
    ds = pydicom.dcmread(get_testdata_file(CT))
    del ds.PixelData
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.save_as(root / "broken" / "ct_header_only.dcm")
    (root / ".DS_Store").write_bytes(b"\0\1")  # hidden: not a candidate
    return root


def _errors_by_file(errors: list[RecordError]) -> dict[str, RecordError]:
    by_file = {e.file: e for e in errors}
    assert len(by_file) == len(errors), [str(e) for e in errors]
    return by_file


def _records(out: Path) -> list[dict]:
    return [r for p in sorted(out.rglob("*.json")) for r in json.loads(p.read_text(encoding="utf-8"))]


def test_valid_files_convert_and_each_bad_file_is_reported(src: Path, tmp_path: Path):
    _copy(US_MULTIFRAME, src / "us" / "cine.dcm")  # 30 frames: slow-ish to write, so only in this test
    out = tmp_path / "out"
    errors = convert_dicom(src, out)

    by_file = _errors_by_file(errors)
    assert set(by_file) == {"broken/mr_truncated.dcm", "broken/dose.dcm", "broken/ct_cut.dcm",
                            "broken/ct_stub.dcm", "broken/ct_header_only.dcm", "notes.txt"}
    assert by_file["notes.txt"].field == "file" and "not a DICOM file" in by_file["notes.txt"].reason
    assert by_file["broken/dose.dcm"].field == "Modality" and by_file["broken/dose.dcm"].value == "RTDOSE"
    for name in ("broken/mr_truncated.dcm", "broken/ct_cut.dcm"):
        assert by_file[name].field == "PixelData" and "cannot decode" in by_file[name].reason
    for name in ("broken/ct_stub.dcm", "broken/ct_header_only.dcm"):
        assert by_file[name].field == "PixelData" and "no pixel data" in by_file[name].reason
    assert all(str(e).startswith(e.file + ":") for e in errors)  # the message names the file

    images = sorted(p.name for p in (out / "images").iterdir())
    by_modality = {m: [n for n in images if modality_from_filename(n) == m] for m in MODALITIES}
    assert len(by_modality["ct"]) == 1 and len(by_modality["mr"]) == 1
    # One RGB still + every distinct frame of the 30-frame cine loop (it repeats two frames: duplicates skipped).
    cine_frames = pydicom.dcmread(src / "us" / "cine.dcm").pixel_array
    distinct = len({frame.tobytes() for frame in cine_frames})
    assert distinct == 28 and len(by_modality["ultrasound"]) == 1 + distinct
    assert sum(map(len, by_modality.values())) == len(images)
    sizes = {n: Image.open(out / "images" / n).size for n in images}
    assert sizes[by_modality["ct"][0]] == (128, 128) and sizes[by_modality["mr"][0]] == (64, 64)
    assert {sizes[n] for n in by_modality["ultrasound"]} == {(320, 240)}
    (last,) = [n for n in by_modality["ultrasound"] if n.endswith("z_0029.png")]  # frame 29 differs from 28
    np.testing.assert_array_equal(np.asarray(Image.open(out / "images" / last)), cine_frames[29])
    for name in images:
        parts = name[: -len(".png")].split("--")
        assert len(parts) == 4 and parts[1] == "dicom" and parts[0].split("_")[1] == "00"
        assert parts[3].startswith("z_")


def test_ct_uses_rescale_and_soft_tissue_window_mr_uses_header_window(tmp_path: Path):
    src = tmp_path / "src"
    _copy(CT, src / "ct.dcm")
    _copy(MR, src / "mr.dcm")
    out = tmp_path / "out"
    assert convert_dicom(src, out) == []

    ct = pydicom.dcmread(src / "ct.dcm")
    hu = ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    assert "WindowCenter" not in ct  # so the CT default applies: centre 40, width 400
    expected = np.clip(np.rint((hu - (40 - 200)) * 255 / 400), 0, 255).astype(np.uint8)
    (ct_png,) = (out / "images").glob("ct_*.png")
    np.testing.assert_array_equal(np.asarray(Image.open(ct_png)), expected)

    mr = pydicom.dcmread(src / "mr.dcm")
    c, w = float(mr.WindowCenter), float(mr.WindowWidth)
    expected = np.clip(np.rint((mr.pixel_array - (c - w / 2)) * 255 / w), 0, 255).astype(np.uint8)
    (mr_png,) = (out / "images").glob("mr_*.png")
    np.testing.assert_array_equal(np.asarray(Image.open(mr_png)), expected)


def test_monochrome1_is_inverted(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    ds = pydicom.dcmread(get_testdata_file(MR))
    ds.save_as(src / "m2.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.SOPInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.1", "1.2.826.0.1.2"
    ds.save_as(src / "m1.dcm")
    out = tmp_path / "out"
    assert convert_dicom(src, out) == []
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == 2
    a, b = (np.asarray(Image.open(p)).astype(int) for p in pngs)
    np.testing.assert_array_equal(a + b, np.full(a.shape, 255))


def test_records_follow_the_mecovqa_layout(src: Path, tmp_path: Path):
    out = tmp_path / "out"
    convert_dicom(src, out)
    for rel in ("train/MeCoVQA-Complex.json", "train/MeCoVQA-Grounding.json", "train/alignment.json",
                "test/MeCoVQA_Complex_VQA_test.json", "test/MeCoVQA_Grounding_test.json"):
        assert isinstance(json.loads((out / rel).read_text(encoding="utf-8")), list), rel
    records = _records(out)
    images = {r["image"] for r in records}
    assert images == {f"images/{p.name}" for p in (out / "images").iterdir()}
    for r in records:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n") and gpt["from"] == "gpt"
        assert r["answer_type"] in ("open", "closed")
        assert gpt["value"].count(SEG_TOKEN) == len(MASK_RE.findall(gpt["value"]))
    ct_image = next(i for i in images if i.startswith("images/ct_"))
    qa = {r["conversations"][0]["value"].split("\n", 1)[1]: (r["answer_type"], r["conversations"][1]["value"])
          for r in records if r["image"] == ct_image}
    assert qa["Is this a CT image?"] == ("closed", "yes")
    assert qa["What modality is this image?"] == ("open", "This is a CT image.")
    assert qa["Describe the image briefly."] == ("open", "A CT slice.")
    assert [a for q, a in qa.items() if q.startswith("Is this a") and q != "Is this a CT image?"] == [("closed", "no")]


def test_same_input_gives_the_same_bytes_and_split_follows_test_fraction(src: Path, tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    convert_dicom(src, a)
    convert_dicom(src, b)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)

    for fraction, empty, full in ((0.0, "test", "train"), (1.0, "train", "test")):
        out = tmp_path / f"f{fraction}"
        convert_dicom(src, out, test_fraction=fraction)
        assert all(json.loads(p.read_text()) == [] for p in (out / empty).glob("*.json"))
        assert json.loads((out / FILES[(full, "complex")]).read_text())


def test_hostile_header_values_give_safe_file_names(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    ds = pydicom.dcmread(get_testdata_file(CT))
    ds.PatientID = "../../etc/passwd--x y"
    ds.save_as(src / "evil.dcm")
    out = tmp_path / "out"
    assert convert_dicom(src, out) == []
    (png,) = [p for p in out.rglob("*.png")]
    assert png.parent == out / "images"
    assert "/" not in png.name and ".." not in png.name and png.name.count("--") == 3
    assert safe_name("../a//b--c..d") == "a-b-c.d"
    assert safe_name("") and "/" not in safe_name("/")


def test_unknown_or_missing_modality_is_reported(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    ds = pydicom.dcmread(get_testdata_file(CT))
    ds.Modality = "ZZ"
    ds.save_as(src / "zz.dcm")
    del ds.Modality
    ds.save_as(src / "none.dcm")
    _copy(MR, src / "ok.dcm")
    out = tmp_path / "out"
    by_file = _errors_by_file(convert_dicom(src, out))
    assert set(by_file) == {"zz.dcm", "none.dcm"}
    assert by_file["zz.dcm"].field == "Modality" and by_file["zz.dcm"].value == "ZZ"
    assert "no Modality" in by_file["none.dcm"].reason
    assert [p.name.split("_")[0] for p in (out / "images").iterdir()] == ["mr"]


def test_a_folder_of_only_bad_files_still_writes_the_layout(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello")
    out = tmp_path / "out"
    errors = convert_dicom(src, out)
    assert [e.file for e in errors] == ["a.txt"]
    assert _records(out) == [] and (out / "train" / "MeCoVQA-Complex.json").is_file()


def test_bad_source_folder_raises_value_error(tmp_path: Path):
    with pytest.raises(ValueError, match="does not exist"):
        convert_dicom(tmp_path / "missing", tmp_path / "out1")
    (tmp_path / "file.dcm").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a folder"):
        convert_dicom(tmp_path / "file.dcm", tmp_path / "out2")
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    with pytest.raises(ValueError, match="no candidate files"):
        convert_dicom(tmp_path / "empty", tmp_path / "out3")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        convert_dicom(tmp_path / "full", tmp_path / "full")


def test_converted_folder_ingests_without_quarantine(src: Path, tmp_path: Path):
    from medplib.data.ingest import build_dataset

    out = tmp_path / "out"
    errors = convert_dicom(src, out)
    result = build_dataset(out, tmp_path / "data", "dicom", errors, max_pixels=8192 * 8192)
    assert result.quarantined == len(errors)  # only the conversion problems
    assert result.valid == len(_records(out)) and result.total == result.valid + result.quarantined
    assert set(result.by_modality) == {"ct", "mr", "ultrasound"}
