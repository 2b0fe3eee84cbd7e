"""Ingest: normalise a source into `data/` (records JSONL + files), quarantine what fails, version with DVC.

Every source is first brought into the MeCoVQA layout (synth generates it, DICOM/NIfTI are converted to it),
then one normalisation path checks each record. A record that fails any check goes to `quarantine.jsonl` with
the file, field, value and reason; counts always add up: total = valid + quarantined.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from medplib import tasks
from medplib.config import Config, Home
from medplib.config.profile import DvcProfile
from medplib.data import readers
from medplib.data.images import ImageReadError, read_image, read_mask, write_png
from medplib.data.readers.mecovqa import RawItem, read_mecovqa
from medplib.data.schema import (
    IMAGE_TOKEN, MASK_RE, MODALITIES, REGION_RE, SEG_TOKEN, Record, RecordError, modality_from_filename,
    parse_context, path_problem, stable_id,
)
from medplib.data.versioning import track_data
from medplib.progress import track

log = logging.getLogger(__name__)


@dataclass
class IngestResult:
    total: int
    valid: int
    quarantined: int
    version: str
    data_dir: Path
    source: str
    by_task: dict[str, int] = field(default_factory=dict)
    by_modality: dict[str, int] = field(default_factory=dict)
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    by_split: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"total": self.total, "valid": self.valid, "quarantined": self.quarantined, "version": self.version,
                "data_dir": str(self.data_dir), "source": self.source, "by_split": self.by_split,
                "by_task": self.by_task, "by_modality": self.by_modality,
                "quarantine_reasons": self.quarantine_reasons}


def parse_source(spec: str) -> tuple[str, Path | None]:
    """`KIND` or `KIND:DIR` with KIND a registered source reader (synth, mecovqa, dicom, nifti, …)."""
    reader, path = readers.parse_source(spec)
    return reader.kind, path


def stage_source(spec: str, home: Home, cfg: Config, seed: int | None = None) -> tuple[Path, list[RecordError], str]:
    """Bring a source into the MeCoVQA layout with its registered reader; returns (folder, conversion errors,
    canonical source name)."""
    reader, path = readers.parse_source(spec)
    return reader.stage(path, readers.StagingContext(home=home, cfg=cfg, seed=seed))


class _Files:
    """Reads each image/mask of the source once; remembers failures so every record that uses a file fails alike."""

    def __init__(self, root: Path, max_pixels: int):
        self.root, self.max_pixels = root, max_pixels
        self.cache: dict[tuple[str, str], np.ndarray | ImageReadError] = {}

    def safe_path(self, rel: object, where: str, field_name: str) -> str:
        if not isinstance(rel, str) or not rel.strip():
            raise RecordError(where, field_name, rel, "expected a non-empty relative path")
        rel = rel.strip()
        problem = path_problem(rel, self.root)
        if problem is not None:
            raise RecordError(where, field_name, rel, problem)
        return str(PurePosixPath(rel))

    def load(self, rel: str, kind: str, where: str, field_name: str) -> np.ndarray:
        key = (rel, kind)
        if key not in self.cache:
            path = self.root / rel
            try:
                if not path.is_file():
                    raise ImageReadError("file does not exist")
                self.cache[key] = read_mask(path, self.max_pixels) if kind == "mask" else read_image(path, self.max_pixels)
            except ImageReadError as e:
                self.cache[key] = ImageReadError(str(e).replace(str(self.root) + os.sep, ""))
        value = self.cache[key]
        if isinstance(value, ImageReadError):
            raise RecordError(where, field_name, rel, str(value))
        return value


def _check_text(value: object, where: str, field_name: str) -> str:
    if not isinstance(value, str):
        raise RecordError(where, field_name, value, "expected a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RecordError(where, field_name, value.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
                          "text is not valid UTF-8") from None
    return value


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes() + str(arr.shape).encode()).hexdigest()


def _load_mask(rel: object, image: np.ndarray, image_rel: str, files: _Files, where: str, field_name: str,
               ) -> tuple[str, np.ndarray]:
    """A mask path of the record, checked: safe, readable, as large as its image, not empty."""
    rel = files.safe_path(rel, where, field_name)
    m = files.load(rel, "mask", where, field_name)
    if m.shape != image.shape[:2]:
        raise RecordError(where, field_name, rel, f"mask is {m.shape[1]}x{m.shape[0]} but image '{image_rel}' is "
                                                  f"{image.shape[1]}x{image.shape[0]}")
    if not m.any():
        raise RecordError(where, field_name, rel, "mask is empty (no foreground pixel)")
    return rel, m


def _load_context(raw: dict, files: _Files, where: str, out_files: dict[str, np.ndarray],
                  ) -> tuple[list[dict], list[tuple[str, str | None]]]:
    """The record's context pairs with every image and mask checked as the query's are; and their digests."""
    context, digests = [], []
    for i, pair in enumerate(parse_context(raw.get("context"), where)):
        image_rel = files.safe_path(pair["image"], where, f"context[{i}].image")
        image = files.load(image_rel, "image", where, f"context[{i}].image")
        out_files[image_rel] = image
        mask_rel, mask_digest = None, None
        if pair["mask"] is not None:
            mask_rel, m = _load_mask(pair["mask"], image, image_rel, files, where, f"context[{i}].mask")
            out_files[mask_rel], mask_digest = m, _digest(m)
        context.append({"image": image_rel, "mask": mask_rel})
        digests.append((_digest(image), mask_digest))
    return context, digests


def in_val(image_digest: str, val_fraction: float) -> bool:
    """Whether a training image goes to the validation split: a fixed hash of its pixels' digest, so the same image
    lands in the same split on any machine, for any source and record order, and all its records go together."""
    if val_fraction <= 0:
        return False
    draw = int(hashlib.sha256(f"medplib-val:{image_digest}".encode()).hexdigest()[:12], 16) / 16 ** 12
    return draw < val_fraction


def normalise(item: RawItem, files: _Files, val_fraction: float = 0.0) -> tuple[Record, dict[str, np.ndarray]]:
    """Check one raw MeCoVQA record and return the normalised record and the files it needs."""
    where, raw = item.where, item.raw
    if not isinstance(raw, dict):
        raise RecordError(where, "record", raw, "expected a JSON object")
    image_rel = files.safe_path(raw.get("image"), where, "image")
    modality = modality_from_filename(image_rel)
    if modality not in MODALITIES:
        raise RecordError(where, "image", image_rel,
                          f"unknown modality {modality!r} (file-name prefix); expected one of {list(MODALITIES)}")
    image = files.load(image_rel, "image", where, "image")
    convs = raw.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise RecordError(where, "conversations", convs, "empty conversation: expected a non-empty list of turns")
    turns = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt"):
            raise RecordError(where, f"conversations[{i}]", turn, "expected {'from': 'human'|'gpt', 'value': text}")
        value = _check_text(turn.get("value"), where, f"conversations[{i}].value")
        if not value.strip():
            raise RecordError(where, f"conversations[{i}].value", value, "empty turn")
        turns.append({"from": turn["from"], "value": value})
    roles = [t["from"] for t in turns]
    if "human" not in roles or "gpt" not in roles:
        raise RecordError(where, "conversations", roles, "need at least one human and one gpt turn")
    if IMAGE_TOKEN not in turns[0]["value"]:
        raise RecordError(where, "conversations[0].value", turns[0]["value"], f"no {IMAGE_TOKEN} placeholder")
    out_files = {image_rel: image}
    masks, regions = [], []
    for i, t in enumerate(turns):
        fld = f"conversations[{i}].value"
        n_seg, mask_paths = t["value"].count(SEG_TOKEN), MASK_RE.findall(t["value"])
        if n_seg != len(mask_paths):
            raise RecordError(where, fld, t["value"], f"{n_seg} {SEG_TOKEN} token(s) but {len(mask_paths)} <mask> path(s)")
        for kind, paths, bucket in (("mask", mask_paths, masks), ("region", REGION_RE.findall(t["value"]), regions)):
            for rel in paths:
                rel, m = _load_mask(rel, image, image_rel, files, where, f"{fld} <{kind}>")
                bucket.append(rel)
                out_files[rel] = m
    context, context_digests = _load_context(raw, files, where, out_files)
    answer_type = raw.get("answer_type")
    answer = next(t["value"] for t in turns if t["from"] == "gpt")
    if answer_type is None:
        answer_type = "closed" if answer.strip().lower().rstrip(".") in ("yes", "no") else "open"
    if answer_type not in ("open", "closed"):
        raise RecordError(where, "answer_type", answer_type, "expected 'open' or 'closed'")
    task = tasks.for_family(item.family, answer_type)
    if task is None:
        raise RecordError(where, "file name", item.file, f"no registered task reads {item.family!r} records "
                          f"with answer_type {answer_type!r}; registered tasks: {tasks.names()}")
    problem = task.check(turns, masks, regions)
    if problem is not None:
        raise RecordError(where, "conversations", *problem)
    problem = task.check_context(context)
    if problem is not None:
        raise RecordError(where, "context", *problem)
    digest = _digest(image)
    split = "val" if item.split == "train" and in_val(digest, val_fraction) else item.split
    rid = stable_id(digest, turns, split, task.name, context_digests)
    source_id = raw.get("id") if isinstance(raw.get("id"), str) else where
    record = Record(id=rid, image=image_rel, modality=modality, split=split, task=task.name, conversations=turns,
                    masks=masks, regions=regions, answer_type=answer_type, source=item.file, source_id=source_id,
                    context=context)
    return record, out_files


def _quarantine_entry(err: RecordError, raw: object = None) -> dict:
    return {**err.as_dict(), "message": str(err), "record": raw}


def build_dataset(root: Path, data_dir: Path, source_name: str, pre_errors: list[RecordError],
                  max_pixels: int, val_fraction: float = 0.0) -> IngestResult:
    """Normalise a MeCoVQA-layout folder into `data_dir` (replaced atomically); no DVC here. With `val_fraction`,
    that share of the training images (by a hash of their pixels, `in_val`) becomes the validation split, unless the
    source has a validation split of its own (records under `val/`, e.g. LViT's Val_Folder, R2Gen's `val`): that one
    is kept and none is carved, so a source's published splits stay as published."""
    files = _Files(Path(root).resolve(), max_pixels)
    records: dict[str, Record] = {}
    quarantine = [_quarantine_entry(e) for e in pre_errors]
    to_write: dict[str, np.ndarray] = {}
    items = list(read_mecovqa(root))
    own_val = any(isinstance(item, RawItem) and item.split == "val" for item in items)
    if own_val and val_fraction > 0:
        log.info("%s has its own validation split: none is carved from train (val_fraction %s not used)", source_name,
                 val_fraction)
        val_fraction = 0.0
    for item in track(items, "ingest", "records", disable=len(items) < 2000):
        if isinstance(item, RecordError):
            quarantine.append(_quarantine_entry(item))
            continue
        try:
            rec, needed = normalise(item, files, val_fraction)
            if rec.id in records:
                first = records[rec.id]
                raise RecordError(item.where, "id", rec.id,
                                  f"duplicate of {first.source}[{first.source_id}]: same image, context, "
                                  "conversation, split and task")
        except RecordError as e:
            quarantine.append(_quarantine_entry(e, item.raw))
            continue
        records[rec.id] = rec
        to_write.update(needed)
    total = len(items) + len(pre_errors)
    if total != len(records) + len(quarantine):  # an invariant of this function, not user input
        raise RuntimeError(f"ingest lost records: total {total} != {len(records)} valid + {len(quarantine)} quarantined")

    data_dir = Path(data_dir)
    tmp = data_dir.with_name(f".{data_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for rel, arr in sorted(to_write.items()):
        write_png(tmp / rel, arr)
    ordered = [records[k] for k in sorted(records)]
    (tmp / "records.jsonl").write_text("".join(r.to_json() + "\n" for r in ordered), encoding="utf-8")
    (tmp / "quarantine.jsonl").write_text(
        # ASCII escapes keep raw records with invalid UTF-8 (lone surrogates) writable as they were found.
        "".join(json.dumps(q, ensure_ascii=True, sort_keys=True, default=repr) + "\n" for q in quarantine),
        encoding="utf-8")
    result = IngestResult(
        total=total, valid=len(records), quarantined=len(quarantine), version="", data_dir=data_dir,
        source=source_name, by_task=dict(sorted(Counter(r.task for r in ordered).items())),
        by_modality=dict(sorted(Counter(r.modality for r in ordered).items())),
        by_split=dict(sorted(Counter(r.split for r in ordered).items())),
        quarantine_reasons=dict(sorted(Counter(q["reason"].split(":")[0] for q in quarantine).items())),
    )
    manifest = {"source": source_name, "total": total, "valid": result.valid, "quarantined": result.quarantined,
                **({"val_fraction": val_fraction, "by_split": result.by_split} if val_fraction > 0 or own_val else {}),
                "by_task": result.by_task, "by_modality": result.by_modality,
                "files": {rel: file_sha256(tmp / rel) for rel in [*sorted(to_write), "records.jsonl"]}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    old = data_dir.with_name(f".{data_dir.name}.old-{os.getpid()}")
    if data_dir.exists():
        data_dir.rename(old)
    tmp.rename(data_dir)
    if old.exists():
        shutil.rmtree(old)
    return result


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class DataIntegrityError(ValueError):
    """A dataset file does not match the SHA-256 that ingest recorded for it in manifest.json."""


def verify_data(data_dir: Path) -> int:
    """Check every file that `manifest.json` lists against its SHA-256 before the data is used; returns the count."""
    data_dir = Path(data_dir)
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise DataIntegrityError(f"{manifest_path} does not exist: {data_dir} was not written by `medplib data "
                                 "ingest` (or was damaged); ingest it again")
    files = json.loads(manifest_path.read_text(encoding="utf-8")).get("files", {})
    for rel, expected in files.items():
        path = data_dir / rel
        if not path.is_file():
            raise DataIntegrityError(f"{path} is listed in {manifest_path} but missing; restore the data version "
                                     "with `medplib data status` / `dvc checkout`, or ingest again")
        actual = file_sha256(path)
        if actual != expected:
            raise DataIntegrityError(f"{path} is corrupted: its SHA-256 is {actual[:16]}… but {manifest_path} "
                                     f"recorded {expected[:16]}…; restore it with `dvc checkout` or ingest again")
    return len(files)


def ingest(spec: str, project: Path, home: Home, cfg: Config, seed: int | None = None,
           remote: DvcProfile | None = None) -> IngestResult:
    """Stage the source, normalise it into `<project>/data`, track it with DVC and push to the profile's remote
    (`remote`, a RunContext's `profile.dvc`; None: the local folder in the state folder)."""
    home.ensure()
    root, pre_errors, name = stage_source(spec, home, cfg, seed)
    result = build_dataset(root, Path(project) / "data", name, pre_errors, cfg.data.max_image_pixels,
                           cfg.data.val_fraction)
    result.version = track_data(Path(project), home, remote)
    log.info("ingested %s: %d total = %d valid + %d quarantined; version %s", name, result.total, result.valid,
             result.quarantined, result.version)
    return result
