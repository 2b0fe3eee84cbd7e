"""DICOM source: convert a folder of DICOM files into a staging folder in the MeCoVQA layout (REFERENCE §4).

Every file under the source folder (recursively; hidden files and DICOMDIR indexes skipped) is read with
pydicom. Pixel values get the header's rescale (modality LUT), then the header's window (first
WindowCenter/WindowWidth), else a modality default (CT: soft tissue 40/400 HU), else the file's min–max, and
become 8-bit PNG slices, one per frame. The modality comes from the header (0008,0060), see DICOM_MODALITIES.
A file's case is its series; files of one patient land in the same split (a stable hash of PatientID), so
no patient is in both train and test. Blank frames and frames identical to an image already converted (a cine
loop's frozen frames, a second copy of an instance) are skipped and logged. Problems (not DICOM, truncated, no
pixel data, unknown modality, undecodable compression, nothing new in a file) come back as RecordErrors; every
other file still converts.

The staging writer at the bottom of this module (`MeCoVQAStaging`) is shared with the NIfTI reader; the records
it writes for a slice come from the registered tasks (`Task.from_labels`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_rescale

from medplib.data.images import MAX_IMAGE_PIXELS, write_png
from medplib import tasks
from medplib.data.readers import Reader, register
from medplib.data.schema import IMAGE_TOKEN, MODALITIES, MODALITY_NAMES, RecordError
from medplib.progress import track

log = logging.getLogger(__name__)

# DICOM Modality (0008,0060) → MeCoVQA modality key. Projection radiography of every kind is X-ray; external
# camera photography (XC) of the skin is how dermoscopy was stored before DICOM added DMS.
DICOM_MODALITIES = {
    "CT": "ct", "MR": "mr", "PT": "pet",
    "CR": "x", "DX": "x", "DR": "x", "MG": "x", "RG": "x", "IO": "x", "PX": "x", "XA": "x", "RF": "x",
    "US": "ultrasound", "ES": "endoscopy", "OP": "fundus", "XC": "dermoscopy", "DMS": "dermoscopy",
}
# Window (centre, width) when the header has none; other modalities use the file's min–max.
DEFAULT_WINDOWS = {"ct": (40.0, 400.0)}  # soft tissue, in HU
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory: an index of files, not an image


@dataclass
class _DicomFile:
    """A file that passed the header checks, waiting for its pixels to be decoded."""

    rel: str
    ds: pydicom.Dataset
    modality: str
    patient: str
    series: str
    order: tuple


def convert_dicom(src: Path, out: Path, test_fraction: float = 0.2) -> list[RecordError]:
    """Convert every DICOM file under `src` into PNG slices and MeCoVQA records under `out`; return the problems."""
    src = Path(src)
    files = source_files(src, "DICOM")
    staging = MeCoVQAStaging(out, dataset="dicom", test_fraction=test_fraction, src=src)
    errors: list[RecordError] = []
    series: dict[tuple[str, str], list[_DicomFile]] = {}
    for path in track(files, "dicom headers", "files", disable=len(files) < 50):
        item = _read_header(path, src)
        if isinstance(item, RecordError):
            errors.append(item)
        elif item is not None:
            series.setdefault((item.patient, item.series), []).append(item)

    slices = 0
    todo = [(key, f) for key, group in sorted(series.items()) for f in sorted(group, key=lambda f: f.order)]
    next_index: dict[tuple[str, str], int] = {}
    converted: dict[str, str] = {}  # SOPInstanceUID -> the file it was converted from
    for (patient, series_uid), item in track(todo, "dicom pixels", "files", disable=len(todo) < 50):
        case = staging.case_name(f"{patient or 'anonymous'}-{_short_hash(series_uid)}", (patient, series_uid))
        try:
            frames = _frames_8bit(item)
        except RecordError as e:
            errors.append(e)
            continue
        # The same instance saved twice (another transfer syntax, a copy) would be a duplicate image; checked
        # after decoding so that a readable copy still converts when another copy is damaged.
        uid = str(item.ds.get("SOPInstanceUID", "") or "") or item.rel
        if uid in converted:
            errors.append(RecordError(item.rel, "SOPInstanceUID", uid,
                                      f"same DICOM instance as '{converted[uid]}', which is converted"))
            continue
        converted[uid] = item.rel
        first = next_index.get((patient, series_uid), 0)
        next_index[(patient, series_uid)] = first + len(frames)
        split = staging.split_of(patient or series_uid)
        written = staging.add_frames(item.rel, frames, modality=item.modality, case=case, first_index=first,
                                     split=split, subject=_body_part(item.ds), errors=errors)
        slices += written
    counts = staging.finish()
    log.info("DICOM %s: %d files, %d slices, %d records, %d problem(s)", src, len(files), slices,
             sum(counts.values()), len(errors))
    return errors


def _read_header(path: Path, src: Path) -> _DicomFile | RecordError | None:
    """Read one file lazily (pixels deferred) and check what can be checked from the header."""
    rel = path.relative_to(src).as_posix()
    try:
        # Deferred values are read from the file only when decoded, so headers of a big folder fit in memory.
        ds = pydicom.dcmread(path, force=False, defer_size="64 KB")
    except InvalidDicomError as e:
        return RecordError(rel, "file", rel, f"not a DICOM file ({e})")
    except Exception as e:  # pydicom raises many types on damaged files; each becomes a reported problem
        return RecordError(rel, "file", rel, f"unreadable DICOM file ({type(e).__name__}: {first_line(e)})")
    if str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS:
        log.info("%s: skipped, it is a DICOMDIR index, not an image", rel)
        return None
    raw = str(ds.get("Modality", "") or "").strip().upper()
    if raw not in DICOM_MODALITIES:
        reason = ("no Modality (0008,0060) in the header" if not raw else
                  f"unknown DICOM modality {raw!r}")
        return RecordError(rel, "Modality", raw, f"{reason}; medplib converts {', '.join(sorted(DICOM_MODALITIES))}")
    if not any(tag in ds for tag in PIXEL_TAGS):
        return RecordError(rel, "PixelData", None,
                           f"no pixel data (7FE0,0010) in this {raw} file: not an image, or the file is truncated")
    try:  # only orders the slices of a series; a malformed value must not stop the conversion
        instance = int(ds.get("InstanceNumber") or 0)
        position = ds.get("ImagePositionPatient")
        z = float(position[2]) if position is not None and len(position) == 3 else 0.0
    except (TypeError, ValueError):
        instance, z = 0, 0.0
    return _DicomFile(rel=rel, ds=ds, modality=DICOM_MODALITIES[raw], patient=str(ds.get("PatientID", "") or ""),
                      series=str(ds.get("SeriesInstanceUID", "") or rel), order=(instance, z, rel))


def _frames_8bit(item: _DicomFile) -> list[np.ndarray | None]:
    """Decode, rescale and window every frame to uint8; a constant (blank) frame is None."""
    ds = item.ds
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    described = f"{ds.get('Rows')}x{ds.get('Columns')}, {getattr(syntax, 'name', syntax) or 'no transfer syntax'}"
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        n_frames = int(ds.get("NumberOfFrames") or 1)
        if rows * cols > MAX_IMAGE_PIXELS:
            raise RecordError(item.rel, "PixelData", described,
                              f"image is {cols}x{rows} pixels, above the limit of {MAX_IMAGE_PIXELS}")
        arr = ds.pixel_array
        photometric = str(ds.get("PhotometricInterpretation", "")).upper()
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
        colour = photometric == "PALETTE COLOR" or int(ds.get("SamplesPerPixel") or 1) > 1
        if not colour:
            arr = apply_rescale(arr, ds)
    except RecordError:
        raise
    except Exception as e:  # truncated data, missing decoder plugins, inconsistent headers
        raise RecordError(item.rel, "PixelData", described,
                          f"cannot decode the pixel data ({type(e).__name__}: {first_line(e)})") from None
    if n_frames == 1:
        arr = arr[None]
    arr = np.asarray(arr, dtype=np.float64)
    if colour:
        # Colour is shown as stored; only more-than-8-bit colour (or a 16-bit palette) is scaled down.
        lo, hi = (0.0, 255.0) if arr.max() <= 255 else (float(arr.min()), float(arr.max()))
    else:
        lo, hi = _window(ds, item.modality) or (float(arr.min()), float(arr.max()))
    out = to_uint8(arr, lo, hi)
    if not colour and photometric == "MONOCHROME1":  # MONOCHROME1 shows low values as white
        out = 255 - out
    return [None if f.min() == f.max() else f for f in out]


def _window(ds: pydicom.Dataset, modality: str) -> tuple[float, float] | None:
    """(low, high) from the header's first window, else the modality default, else None (use min–max)."""
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    try:
        if centre is not None and width is not None:
            c = float(centre[0] if isinstance(centre, MultiValue) else centre)
            w = float(width[0] if isinstance(width, MultiValue) else width)
            if w > 0:
                return c - w / 2, c + w / 2
    except (TypeError, ValueError, IndexError):
        pass  # a malformed window is ignored: the modality default or min–max still gives a usable image
    if modality in DEFAULT_WINDOWS:
        c, w = DEFAULT_WINDOWS[modality]
        return c - w / 2, c + w / 2
    return None


def _body_part(ds: pydicom.Dataset) -> str | None:
    part = str(ds.get("BodyPartExamined", "") or "").strip().lower()
    return part if re.fullmatch(r"[a-z][a-z ]{1,30}", part) else None


def source_files(src: Path, kind: str, patterns: tuple[str, ...] = ("*",)) -> list[Path]:
    """Non-hidden files under `src` matching `patterns`, sorted; ValueError when there is nothing to read."""
    if not src.exists():
        raise ValueError(f"{kind} source {src} does not exist")
    if not src.is_dir():
        raise ValueError(f"{kind} source {src} is not a folder")
    files = sorted({p for pattern in patterns for p in src.rglob(pattern)
                    if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts)})
    if not files:
        wanted = " or ".join(patterns)
        raise ValueError(f"{kind} source {src} holds no candidate files ({wanted})")
    return files


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def to_uint8(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly to 0..255, clipping outside; lo == hi gives zeros."""
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    scaled = (np.asarray(arr, dtype=np.float64) - lo) * 255.0 / (hi - lo)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def safe_name(text: str, max_len: int = 64) -> str:
    """A file-name part: letters, digits, '.' and single '-' only, so no '/', '..', or the '--' separator."""
    name = re.sub(r"[^A-Za-z0-9.]+", "-", text)
    name = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", name)).strip("-.")
    if len(name) > max_len:
        name = name[: max_len - 9].rstrip("-.") + "-" + _short_hash(text)
    return name or "x" + _short_hash(text)


# ---- The MeCoVQA staging layout, shared by the DICOM and NIfTI readers ----

def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}, {"from": "gpt", "value": answer}]


def staged_files() -> dict[tuple[str, str], str]:
    """(split, family) → annotation file, for every task that asks about real labelled slices. The readers always
    write all of them (an empty list when a split has no record), so the ingest step finds the layout even when
    every source file was bad and reports the problems instead."""
    return {(split, t.family): t.file_for(split) for t in tasks.labelled_tasks() for split in tasks.TRAIN_TEST}


def _pixel_digest(pixels: np.ndarray) -> str:
    return hashlib.sha256(str(pixels.shape).encode() + np.ascontiguousarray(pixels).tobytes()).hexdigest()


@dataclass
class LabelledSlice:
    """One converted slice as the tasks see it when they write their records (`Task.from_labels`)."""

    out: Path
    stem: str
    modality: str
    subject: str | None  # what the volume shows, from its labels file ("brain"), if known
    masks: dict[str, np.ndarray]  # structure → non-empty boolean mask in this slice
    absent: tuple[str, ...]  # structures labelled elsewhere in the volume but not in this slice

    @property
    def image_rel(self) -> str:
        return f"images/{self.stem}.png"

    @property
    def mod_name(self) -> str:
        return MODALITY_NAMES[self.modality]

    @property
    def is_slice(self) -> bool:
        """A cross-section of a volume (CT, MR, PET) rather than a projection or photograph."""
        return self.modality in ("ct", "mr", "pet")

    @property
    def other_modality(self) -> str:
        """Another modality, fixed by the slice's name (the "no" of a modality question)."""
        others = [m for m in MODALITIES if m != self.modality]
        return others[int(hashlib.sha256(self.stem.encode("utf-8")).hexdigest(), 16) % len(others)]

    def record(self, answer_type: str, question: str, answer: str) -> dict:
        return {"image": self.image_rel, "answer_type": answer_type, "conversations": _turns(question, answer)}

    def write_mask(self, structure: str, mask: np.ndarray) -> str:
        """Write a structure's mask next to the image; returns its path relative to the staging folder."""
        rel = f"masks/{self.stem}--{safe_name(structure)}.png"
        write_png(self.out / rel, np.asarray(mask, dtype=bool))
        return rel


class MeCoVQAStaging:
    """Collects slices with their masks and writes images, masks and QA records in the MeCoVQA layout."""

    def __init__(self, out: Path, dataset: str, test_fraction: float, src: Path | None = None):
        self.out, self.dataset = Path(out), safe_name(dataset)
        if not 0.0 <= test_fraction <= 1.0:
            raise ValueError(f"test_fraction = {test_fraction}: expected a number between 0 and 1")
        self.test_fraction = test_fraction
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise ValueError(f"output folder {self.out} exists and is not empty; give a new or empty folder")
        if src is not None and self.out.resolve().is_relative_to(Path(src).resolve()):
            raise ValueError(f"output folder {self.out} is inside the source folder {src}; put it elsewhere")
        self.out.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, list[dict]] = {rel: [] for rel in staged_files().values()}
        self._case_owner: dict[str, object] = {}
        self._digests: dict[str, str] = {}  # pixel digest -> image written with those pixels

    def split_of(self, key: str) -> str:
        """'test' for a stable `test_fraction` share of keys (same key, same split, on any machine)."""
        digest = hashlib.sha256(f"{self.dataset}\0{key}".encode("utf-8")).digest()
        return "test" if int.from_bytes(digest[:8], "big") / 2**64 < self.test_fraction else "train"

    def case_name(self, wanted: str, owner: object) -> str:
        """A safe, unique case name for `owner`; two owners whose names sanitise alike get a hash suffix."""
        name = safe_name(wanted)
        if self._case_owner.setdefault(name, owner) != owner:
            name = safe_name(f"{name}-{_short_hash(repr(owner))}")
            self._case_owner.setdefault(name, owner)
        return name

    def seen(self, pixels: np.ndarray) -> str | None:
        """The image already written with exactly these pixels, if any."""
        return self._digests.get(_pixel_digest(pixels))

    def add_frames(self, file: str, frames: list[np.ndarray | None], modality: str, case: str, first_index: int,
                   split: str, subject: str | None, errors: list[RecordError]) -> int:
        """Add the frames of one source file (None = blank), skipping repeats; an unusable file goes to `errors`.

        A frame identical to an image already written (a cine loop's frozen frames, a copied file) is skipped:
        it would be a duplicate record. Returns how many slices were written.
        """
        blank = sum(f is None for f in frames)
        if blank == len(frames):
            errors.append(RecordError(file, "PixelData", "constant value",
                                      "image is empty: every frame has a single constant value"))
            return 0
        written, repeats, earlier = 0, 0, None
        for i, frame in enumerate(frames):
            if frame is None:
                continue
            earlier = self.seen(frame)
            if earlier is not None:
                repeats += 1
                continue
            self.add_slice(modality=modality, case=case, index=first_index + i, pixels=frame, split=split,
                           subject=subject)
            written += 1
        if not written:
            errors.append(RecordError(file, "PixelData", earlier, "same pixels as an image already converted"))
        elif blank or repeats:
            log.info("%s: skipped %d blank and %d repeated frame(s) of %d", file, blank, repeats, len(frames))
        return written

    def add_slice(self, modality: str, case: str, index: int, pixels: np.ndarray, split: str,
                  subject: str | None = None, masks: dict[str, np.ndarray] | None = None,
                  absent: tuple[str, ...] | list[str] = ()) -> str:
        """Write one slice (and its label masks) and the records every task asks about it; return the stem.

        `masks` maps a structure name to its boolean mask in this slice (non-empty); `absent` names structures
        labelled elsewhere in the same volume but not in this slice (they give "no" answers).
        """
        if modality not in MODALITIES:  # callers map modalities first; this guards the file-name contract
            raise ValueError(f"modality {modality!r} is not one of {list(MODALITIES)}")
        stem = f"{modality}_00--{self.dataset}--{case}--z_{index:04d}"
        image_rel = f"images/{stem}.png"
        write_png(self.out / image_rel, pixels)
        self._digests.setdefault(_pixel_digest(pixels), image_rel)
        labelled = LabelledSlice(out=self.out, stem=stem, modality=modality, subject=subject, masks=masks or {},
                                 absent=tuple(absent))
        for task in tasks.labelled_tasks():
            self.records.setdefault(task.file_for(split), []).extend(task.from_labels(labelled))
        return stem

    def finish(self) -> dict[str, int]:
        """Write every annotation file (sorted records, fixed indent); return records per file."""
        counts = {}
        for rel in sorted(self.records):
            records = sorted(self.records[rel], key=lambda r: json.dumps(r, sort_keys=True, ensure_ascii=False))
            path = self.out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(records, indent=1, sort_keys=True, ensure_ascii=False) + "\n",
                            encoding="utf-8")
            counts[rel] = len(records)
        return counts


def stage_dicom(path: Path | None, ctx) -> tuple:
    out = ctx.fresh_dir("dicom", str(path))
    return out, convert_dicom(path, out, test_fraction=ctx.cfg.data.test_fraction), "dicom"


register(Reader("dicom", stage_dicom, describe="a folder of DICOM files"))
