"""NIfTI reader: nibabel's bundled volumes, label volumes built here, and broken inputs."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path
from PIL import Image

from medplib.data.readers.nifti import convert_nifti
from medplib.data.schema import MASK_RE, SEG_TOKEN, RecordError

ANATOMICAL = Path(data_path) / "anatomical.nii"  # 3D (33, 41, 25), LAS, int16
EXAMPLE_4D = Path(data_path) / "example4d.nii.gz"  # 4D (128, 96, 24, 2)


def _label_for(image_path: Path) -> np.ndarray:
    """1 = the brightest 10 % of voxels, 2 = the brightest 1 % in the first 10 slices (absent from the others).

    Labels by brightness let a test check that each mask sits on its image the right way round.
    """
    data = np.asanyarray(nib.load(image_path).dataobj)
    label = np.zeros(data.shape, np.uint8)
    label[data > np.percentile(data, 90)] = 1
    label[:, :, :10][data[:, :, :10] > np.percentile(data, 99)] = 2
    return label


def _save(array: np.ndarray, path: Path, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    shutil.copy(ANATOMICAL, root / "brain01.nii")
    _save(_label_for(ANATOMICAL), root / "brain01_label.nii.gz", nib.load(ANATOMICAL).affine)
    (root / "labels.json").write_text(json.dumps({"1": "white matter", "2": "bright spot"}))
    shutil.copy(EXAMPLE_4D, root / "ct_func.nii.gz")  # modality from the file-name prefix
    return root


def _records(out: Path) -> list[dict]:
    return [r for p in sorted(out.rglob("*.json")) for r in json.loads(p.read_text(encoding="utf-8"))]


def _errors_by_file(errors: list[RecordError]) -> dict[str, RecordError]:
    by_file = {e.file: e for e in errors}
    assert len(by_file) == len(errors), [str(e) for e in errors]
    return by_file


def test_volumes_become_slices_masks_and_grounding_records(src: Path, tmp_path: Path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="medplib.data.readers.nifti"):
        assert convert_nifti(src, out) == []
    assert any("ct_func.nii.gz" in m and "first volume" in m for m in caplog.messages)

    images = sorted(p.name for p in (out / "images").iterdir())
    brain = [n for n in images if n.startswith("mr_00--nifti--brain01--z_")]
    func = [n for n in images if n.startswith("ct_00--nifti--ct-func--z_")]
    assert len(brain) + len(func) == len(images)
    assert len(brain) == 25 and len(func) <= 24 and func  # one per axial slice (blank ones skipped)
    # RAS orientation, axial slices shown upright: width = x (33 voxels), height = y (41 voxels)
    assert {Image.open(out / "images" / n).size for n in brain} == {(33, 41)}
    assert {Image.open(out / "images" / n).size for n in func} == {(128, 96)}

    grounding = [r for r in _records(out) if SEG_TOKEN in r["conversations"][1]["value"]]
    assert grounding and all(r["image"].startswith("images/mr_00--nifti--brain01--") for r in grounding)
    for r in grounding:
        question, answer = (t["value"] for t in r["conversations"])
        (mask_rel,) = MASK_RE.findall(answer)
        name = "white matter" if mask_rel.endswith("--white-matter.png") else "bright spot"
        assert question == f"<image>\nSegment the {name}."
        assert answer == f"It is the {name}. {SEG_TOKEN} <mask>{mask_rel}</mask>"
        mask = np.asarray(Image.open(out / mask_rel)) > 0
        image = np.asarray(Image.open(out / r["image"]))
        assert mask.shape == image.shape and mask.any()
        stem = r["image"][len("images/"):-len(".png")]
        labelled = np.any([np.asarray(Image.open(m)) > 0 for m in (out / "masks").glob(f"{stem}--*.png")], axis=0)
        # The labels mark the brightest voxels: if a mask were flipped or transposed against its image,
        # some masked pixel would be darker than some unlabelled one.
        assert image[mask].min() >= image[~labelled].max()


def test_label_names_from_the_argument_win_and_presence_questions_are_answered(src: Path, tmp_path: Path):
    out = tmp_path / "out"
    assert convert_nifti(src, out, labels={2: "hot spot"}) == []
    masks = sorted(p.name for p in (out / "masks").iterdir())
    assert any(m.endswith("--hot-spot.png") for m in masks) and not any("bright" in m for m in masks)
    assert any(m.endswith("--white-matter.png") for m in masks)
    answers = {}
    for r in _records(out):
        question = r["conversations"][0]["value"]
        if question == "<image>\nIs there a hot spot in this image?":
            assert r["answer_type"] == "closed"
            answers[r["image"]] = r["conversations"][1]["value"]
    with_mask = {"images/" + m.split("--hot-spot")[0] + ".png" for m in masks if m.endswith("--hot-spot.png")}
    assert {img for img, a in answers.items() if a == "yes"} == with_mask
    assert "no" in answers.values()  # slices without it, in a volume where it is labelled


def test_modality_json_overrides_the_default(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ANATOMICAL, src / "scan.nii")
    _save(np.random.default_rng(1).normal(size=(8, 8, 3)).astype(np.float32), src / "other.nii.gz")
    shutil.copy(ANATOMICAL, src / "wrong.nii")
    (src / "modality.json").write_text(json.dumps({"scan": "pet", "wrong": "banana"}))
    out = tmp_path / "out"
    by_file = _errors_by_file(convert_nifti(src, out))
    assert set(by_file) == {"modality.json"}
    assert by_file["modality.json"].field == "wrong" and by_file["modality.json"].value == "banana"
    cases = {p.name.split("--")[2]: p.name.split("_")[0] for p in (out / "images").iterdir()}
    assert cases == {"scan": "pet", "other": "mr"}  # "wrong" is not converted: its modality is unknown


def test_a_copy_of_a_volume_is_reported_not_duplicated(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ANATOMICAL, src / "a.nii")
    shutil.copy(ANATOMICAL, src / "b.nii")
    out = tmp_path / "out"
    by_file = _errors_by_file(convert_nifti(src, out))
    assert set(by_file) == {"b.nii"} and "identical to images already converted" in by_file["b.nii"].reason
    assert {p.name.split("--")[2] for p in (out / "images").iterdir()} == {"a"}


def test_each_bad_input_is_reported_and_the_rest_converts(src: Path, tmp_path: Path):
    anatomical = np.asanyarray(nib.load(ANATOMICAL).dataobj)
    (src / "broken.nii.gz").write_bytes(EXAMPLE_4D.read_bytes()[:5000])  # truncated gzip
    (src / "garbage.nii").write_bytes(b"not a nifti file at all")
    _save(np.zeros((6, 6, 4), np.int16), src / "empty.nii.gz")
    _save(np.arange(6 * 6 * 4, dtype=np.int16).reshape(6, 6, 4), src / "knee.nii.gz")
    _save(np.ones((6, 6, 5), np.uint8), src / "knee_seg.nii.gz")  # one slice too many
    _save(np.ones((3, 3, 3), np.uint8), src / "orphan_label.nii.gz")
    hip = np.random.default_rng(0).normal(size=anatomical.shape).astype(np.float32)
    _save(hip, src / "hip.nii.gz")
    label = _label_for(ANATOMICAL)
    label[0, 0, :] = 7  # a value without a name
    _save(label, src / "hip_label.nii.gz")
    out = tmp_path / "out"
    by_file = _errors_by_file(convert_nifti(src, out))

    assert set(by_file) == {"broken.nii.gz", "garbage.nii", "empty.nii.gz", "knee_seg.nii.gz",
                            "orphan_label.nii.gz", "hip_label.nii.gz"}
    assert by_file["broken.nii.gz"].field == "file" and "unreadable" in by_file["broken.nii.gz"].reason
    assert by_file["garbage.nii"].field == "file"
    assert "empty volume" in by_file["empty.nii.gz"].reason
    shape_error = by_file["knee_seg.nii.gz"]
    assert shape_error.field == "shape" and "(6, 6, 5)" in shape_error.reason and "(6, 6, 4)" in shape_error.reason
    assert "knee.nii.gz" in shape_error.reason
    assert "without an image" in by_file["orphan_label.nii.gz"].reason
    assert by_file["hip_label.nii.gz"].field == "label" and by_file["hip_label.nii.gz"].value == 7

    names = {p.name for p in (out / "images").iterdir()}
    cases = {n.split("--")[2] for n in names}
    assert cases == {"brain01", "ct-func", "knee", "hip"}  # images with bad labels still convert
    masks = {p.name.split("--")[2] for p in (out / "masks").iterdir()}
    assert masks == {"brain01", "hip"}  # hip keeps its named labels; knee's mismatched labels give none


def test_same_input_gives_the_same_bytes(src: Path, tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    convert_nifti(src, a)
    convert_nifti(src, b)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_bad_arguments_raise_value_error(src: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="does not exist"):
        convert_nifti(tmp_path / "missing", tmp_path / "o1")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("no volumes here")
    with pytest.raises(ValueError, match="no candidate files"):
        convert_nifti(tmp_path / "docs", tmp_path / "o2")
    with pytest.raises(ValueError, match="integer label value"):
        convert_nifti(src, tmp_path / "o3", labels={"1": "liver"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="test_fraction"):
        convert_nifti(src, tmp_path / "o4", test_fraction=1.5)


def test_converted_folder_ingests_without_quarantine(src: Path, tmp_path: Path):
    from medplib.data.ingest import build_dataset

    out = tmp_path / "out"
    assert convert_nifti(src, out) == []
    result = build_dataset(out, tmp_path / "data", "nifti", [], max_pixels=8192 * 8192)
    assert result.quarantined == 0 and result.valid == len(_records(out)) > 0
    assert result.by_task["grounding"] > 0 and set(result.by_modality) == {"mr", "ct"}
