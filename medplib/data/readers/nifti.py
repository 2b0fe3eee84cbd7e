"""NIfTI source: convert a folder of NIfTI volumes (and label volumes) into the MeCoVQA layout (REFERENCE §4).

Conventions for the source folder (searched recursively for `*.nii` and `*.nii.gz`):
- `<case>.nii.gz` (or `.nii`) is an image volume; `<case>_label.nii.gz` or `<case>_seg.nii.gz` next to it is its
  label volume (integers, 0 = background). A label volume without its image is reported, not used.
- Label names: `labels.json` at the top of the folder, `{"1": "liver", "2": "tumor"}`; the `labels` argument
  adds to it and wins on conflicts. A label value present in a volume but without a name is reported and its
  masks are skipped (the image slices still convert).
- Modality: `modality.json` at the top of the folder, `{"<case>": "ct"}`; else the file-name prefix when the
  name starts with a modality key and "_" (`ct_liver01.nii.gz` → ct, as in MeCoVQA file names); else "mr".
  A case in a sub-folder is named by its relative path without extension (`site1/case01`).
Volumes are turned to RAS orientation (the label volume with the image's transform), then cut along the last
axis (axial, named "z"); intensities map from the volume's 0.5–99.5 percentiles to 8 bits. A 4D volume gives
its first volume, with a warning. Blank slices, and slices identical to one already converted, are skipped
(logged; a volume left with none is reported). Each label present in a slice gives a
mask PNG, a grounding question and a yes/no question; each case lands in train or test by a stable hash.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from medplib.data.images import MAX_IMAGE_PIXELS
from medplib.data.readers import Reader, register
from medplib.data.readers.dicom import MeCoVQAStaging, first_line, safe_name, source_files, to_uint8
from medplib.data.schema import MODALITIES, RecordError
from medplib.progress import track

log = logging.getLogger(__name__)

LABEL_SUFFIXES = ("_label", "_seg")
DEFAULT_MODALITY = "mr"
PERCENTILES = (0.5, 99.5)  # robust to a few hot voxels, unlike min–max


@dataclass
class _Case:
    name: str  # relative path without extension, POSIX
    image: Path
    label: Path | None = None


def convert_nifti(src: Path, out: Path, labels: dict[int, str] | None = None,
                  test_fraction: float = 0.2) -> list[RecordError]:
    """Convert every NIfTI volume under `src` into PNG slices, masks and MeCoVQA records under `out`."""
    src = Path(src)
    files = source_files(src, "NIfTI", ("*.nii", "*.nii.gz"))
    staging = MeCoVQAStaging(out, dataset="nifti", test_fraction=test_fraction, src=src)
    errors: list[RecordError] = []
    names = _label_names(src, labels, errors)
    modalities = _modality_map(src, errors)
    cases = _pair(files, src, errors)
    unknown = sorted(set(modalities) - set(cases))
    if unknown:
        log.warning("modality.json names cases that are not in %s: %s", src, ", ".join(unknown))
    slices = 0
    for case in track(sorted(cases.values(), key=lambda c: c.name), "nifti", "volumes", disable=len(cases) < 20):
        modality = _modality_of(case.name, modalities, errors)
        if modality is not None:
            slices += _convert_case(case, modality, names, src, staging, errors)
    counts = staging.finish()
    log.info("NIfTI %s: %d volumes, %d slices, %d records, %d problem(s)", src, len(cases), slices,
             sum(counts.values()), len(errors))
    return errors


def _case_name(path: Path, src: Path) -> str:
    rel = path.relative_to(src).as_posix()
    return rel[: -len(".nii.gz")] if rel.endswith(".nii.gz") else rel[: -len(".nii")]


def _pair(files: list[Path], src: Path, errors: list[RecordError]) -> dict[str, _Case]:
    """Images by case name, each with its label volume if there is one."""
    cases: dict[str, _Case] = {}
    label_files: list[tuple[str, Path]] = []
    for path in files:
        name = _case_name(path, src)
        suffix = next((s for s in LABEL_SUFFIXES if name.endswith(s)), None)
        if suffix:
            label_files.append((name[: -len(suffix)], path))
        elif name in cases:
            rel = path.relative_to(src).as_posix()
            errors.append(RecordError(rel, "file", rel, f"second image for case '{name}' (also "
                                      f"{cases[name].image.relative_to(src).as_posix()}); this one is not used"))
        else:
            cases[name] = _Case(name, path)
    for name, path in label_files:  # sorted, so `_label` is taken before `_seg` for the same case
        rel = path.relative_to(src).as_posix()
        if name not in cases:
            errors.append(RecordError(rel, "file", rel, f"label volume without an image: expected {name}.nii.gz "
                                      f"or {name}.nii next to it"))
        elif cases[name].label is not None:
            errors.append(RecordError(rel, "file", rel, f"second label volume for case '{name}' (using "
                                      f"{cases[name].label.relative_to(src).as_posix()}); this one is not used"))
        else:
            cases[name].label = path
    return cases


def _label_names(src: Path, labels: dict[int, str] | None, errors: list[RecordError]) -> dict[int, str]:
    """Label value → structure name, from `labels.json` then the `labels` argument."""
    given: dict[int, tuple[str, str]] = {}  # value -> (name, where it came from)
    path = src / "labels.json"
    if path.is_file():
        for key, value in sorted(_read_json_object(path, errors).items()):
            try:
                given[int(key)] = (_check_name(value), "labels.json")
            except ValueError as e:
                errors.append(RecordError("labels.json", str(key), value, f"{e}; this label is not named"))
    for key, value in (labels or {}).items():  # the caller's own argument: a mistake there is a ValueError
        if not isinstance(key, int) or isinstance(key, bool):
            raise ValueError(f"labels has key {key!r}: expected an integer label value")
        given[key] = (_check_name(value), "labels argument")
    names: dict[int, str] = {}
    by_file_name: dict[str, int] = {}
    for key, (name, where) in sorted(given.items()):
        if key == 0:  # background by convention: never a structure to segment
            continue
        other = by_file_name.setdefault(safe_name(name).lower(), key)
        if other != key:
            errors.append(RecordError(where, str(key), name, f"same mask file name as label {other} "
                                      f"({names[other]!r}); this label is not named"))
            continue
        names[key] = name
    return names


def _check_name(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"label name {value!r} is not a non-empty string")
    return " ".join(value.split())


def _modality_map(src: Path, errors: list[RecordError]) -> dict[str, str]:
    path = src / "modality.json"
    return {str(k): v for k, v in _read_json_object(path, errors).items()} if path.is_file() else {}


def _read_json_object(path: Path, errors: list[RecordError]) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        errors.append(RecordError(path.name, "json", path.name, f"malformed JSON ({e}); file ignored"))
        return {}
    if not isinstance(data, dict):
        errors.append(RecordError(path.name, "json", type(data).__name__, "expected a JSON object; file ignored"))
        return {}
    return data


def _modality_of(case: str, modalities: dict[str, str], errors: list[RecordError]) -> str | None:
    if case in modalities:
        key = modalities[case]
        if key in MODALITIES:
            return key
        errors.append(RecordError("modality.json", case, key,
                                  f"unknown modality; expected one of {list(MODALITIES)}; case not converted"))
        return None
    prefix = case.rsplit("/", 1)[-1].split("_", 1)
    return prefix[0] if len(prefix) == 2 and prefix[0] in MODALITIES else DEFAULT_MODALITY


def _load(path: Path, src: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The volume as float32 (X, Y, Z) and its affine; raises RecordError when the file cannot be used."""
    rel = path.relative_to(src).as_posix()
    try:
        img = nib.load(path)
        shape = img.shape
        if len(shape) == 4:
            if shape[3] > 1:
                log.warning("%s is 4D %s: using its first volume only", rel, shape)
            data = np.asarray(img.dataobj[..., 0], dtype=np.float32)
        elif len(shape) in (2, 3):
            data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape[:2] + (shape[2:] or (1,)))
        else:
            raise RecordError(rel, "shape", list(shape), f"{what} has {len(shape)} dimensions; expected 2, 3 or 4")
        affine = img.affine
    except RecordError:
        raise
    except Exception as e:  # nibabel and gzip raise many types on damaged files; each becomes a reported problem
        raise RecordError(rel, "file", rel, f"unreadable NIfTI {what} ({type(e).__name__}: {first_line(e)})") from None
    if data.shape[0] * data.shape[1] > MAX_IMAGE_PIXELS:
        raise RecordError(rel, "shape", list(data.shape), f"slices are above the limit of {MAX_IMAGE_PIXELS} pixels")
    return data, affine


def _convert_case(case: _Case, modality: str, names: dict[int, str], src: Path, staging: MeCoVQAStaging,
                  errors: list[RecordError]) -> int:
    """Write one case's slices; problems go to `errors`. Returns the number of slices written."""
    rel = case.image.relative_to(src).as_posix()
    try:
        volume, affine = _load(case.image, src, "image")
    except RecordError as e:
        errors.append(e)
        return 0
    finite = volume[np.isfinite(volume)]
    if finite.size == 0 or finite.min() == finite.max():
        shown = "no finite voxel" if finite.size == 0 else f"constant {float(finite.min()):g}"
        errors.append(RecordError(rel, "data", shown, "empty volume: no intensity variation to show"))
        return 0
    lo, hi = (float(v) for v in np.percentile(finite, PERCENTILES))
    if hi <= lo:  # mostly one value (e.g. background): fall back to the full range
        lo, hi = float(finite.min()), float(finite.max())
    pixels = to_uint8(np.where(np.isfinite(volume), volume, lo), lo, hi)
    label = _case_labels(case, volume.shape, affine, names, src, errors)
    # RAS orientation makes the last axis axial and the picture upright after rot90, whatever the file's layout.
    to_ras = ornt_transform(io_orientation(affine), axcodes2ornt("RAS"))
    pixels = apply_orientation(pixels, to_ras)
    if label is not None:
        label = apply_orientation(label, to_ras)
    present = [] if label is None else [v for v in sorted(names) if np.any(label == v)]
    case_name = staging.case_name(case.name, case.name)
    split = staging.split_of(case.name)
    written = blank = repeats = 0
    for k in range(pixels.shape[2]):
        image = np.ascontiguousarray(np.rot90(pixels[:, :, k]))
        if image.min() == image.max():
            blank += 1
            continue
        if staging.seen(image) is not None:  # a duplicate image would be a duplicate record
            repeats += 1
            continue
        masks = {}
        for value in present:
            mask = np.rot90(label[:, :, k] == value)
            if mask.any():
                masks[names[value]] = np.ascontiguousarray(mask)
        absent = [names[v] for v in present if names[v] not in masks]
        staging.add_slice(modality=modality, case=case_name, index=k, pixels=image, split=split, masks=masks,
                          absent=absent)
        written += 1
    if blank or repeats:
        log.info("%s: skipped %d blank and %d repeated slice(s) of %d", rel, blank, repeats, pixels.shape[2])
    if not written:
        errors.append(RecordError(rel, "data", f"{pixels.shape[2]} slices", f"nothing to convert: {blank} blank "
                                  f"slice(s), {repeats} identical to images already converted"))
    return written


def _case_labels(case: _Case, shape: tuple[int, ...], image_affine: np.ndarray, names: dict[int, str], src: Path,
                 errors: list[RecordError]) -> np.ndarray | None:
    """The case's label volume as int32 (X, Y, Z), or None when it is absent or unusable (reported)."""
    if case.label is None:
        return None
    rel = case.label.relative_to(src).as_posix()
    try:
        data, affine = _load(case.label, src, "label volume")
    except RecordError as e:
        errors.append(e)
        return None
    if nib.aff2axcodes(affine) != nib.aff2axcodes(image_affine):  # masks follow the image's orientation
        log.warning("%s is oriented %s but its image %s; using the image's", rel, "".join(nib.aff2axcodes(affine)),
                    "".join(nib.aff2axcodes(image_affine)))
    if data.shape != shape:
        errors.append(RecordError(rel, "shape", list(data.shape),
                                  f"label volume shape {tuple(data.shape)} does not match image shape {tuple(shape)} "
                                  f"of '{case.image.relative_to(src).as_posix()}'; its masks are skipped"))
        return None
    label = np.rint(np.nan_to_num(data)).astype(np.int32)
    if not np.allclose(label, np.nan_to_num(data)):
        errors.append(RecordError(rel, "data", "non-integer values",
                                  "a label volume must hold integer label values; its masks are skipped"))
        return None
    for value in sorted(set(np.unique(label).tolist()) - {0} - set(names)):
        errors.append(RecordError(rel, "label", value,
                                  f"label value {value} has no name: add it to labels.json "
                                  f"({{\"{value}\": \"<name>\"}}) or pass labels=...; its masks are skipped"))
    return label


def stage_nifti(path: Path | None, ctx) -> tuple:
    out = ctx.fresh_dir("nifti", str(path))
    return out, convert_nifti(path, out, test_fraction=ctx.cfg.data.test_fraction), "nifti"


register(Reader("nifti", stage_nifti, describe="a folder of NIfTI volumes with label maps"))
