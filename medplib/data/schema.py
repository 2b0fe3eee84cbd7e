"""The normalised record: one JSON line per QA sample, paths relative to the data folder.

A record asks about one query image (`image`). It may also carry context images, each with an optional mask
(`context`): the example image/mask pairs of in-context segmentation, or the other view of a two-view X-ray
report. Records without context are written exactly as before the field existed (no `context` key).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

MODALITIES = ("ct", "mr", "x", "pet", "endoscopy", "dermoscopy", "fundus", "ultrasound")
MODALITY_NAMES = {
    "ct": "CT", "mr": "MRI", "x": "X-ray", "pet": "PET", "endoscopy": "endoscopy",
    "dermoscopy": "dermoscopy", "fundus": "fundus", "ultrasound": "ultrasound",
}
SPLITS = ("train", "val", "test", "zeroshot")  # val: the source's own, else carved from train by image at ingest

IMAGE_TOKEN = "<image>"
SEG_TOKEN = "<SEG>"
REGION_TOKEN = "<region>"  # a pixel prompt in the text: `<region>PATH</region>` in a record
REGION_RE = re.compile(r"<region>(.*?)</region>", re.S)
REGION_PLACEHOLDER = "<region></region>"  # a pixel prompt in a conversation the model reads (`strip_paths`' output)
MASK_RE = re.compile(r"<mask>(.*?)</mask>", re.S)


class RecordError(ValueError):
    """A record that cannot be used; carries where (file), what (field) and the offending value."""

    def __init__(self, file: str, field_name: str, value: object, reason: str):
        self.file, self.field, self.value, self.reason = file, field_name, value, reason
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        super().__init__(f"{file}: field '{field_name}' = {shown}: {reason}")

    def as_dict(self) -> dict:
        return {"file": self.file, "field": self.field, "value": _jsonable(self.value), "reason": self.reason}


def _jsonable(value: object) -> object:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def path_problem(rel: str, root: Path, folder: str = "the dataset folder") -> str | None:
    """Why the relative path `rel` (POSIX separators) does not stay inside `root`: absolute, `..`, or resolving outside
    through a link; None when it stays inside. `folder` names `root` in the reason."""
    p = PurePosixPath(rel)
    if p.is_absolute() or rel.startswith("\\") or (len(rel) > 1 and rel[1] == ":"):
        return f"absolute paths are not allowed; use a path inside {folder}"
    if ".." in p.parts:
        return f"path escapes {folder} ('..')"
    if not (Path(root) / p).resolve().is_relative_to(Path(root).resolve()):
        return f"path resolves outside {folder} (symlink?)"
    return None


def modality_from_filename(name: str) -> str:
    """MeCoVQA / SA-Med2D naming: the modality is the file name's part before the first '_'."""
    base = name.rsplit("/", 1)[-1]
    return base.split("_", 1)[0].lower()


@dataclass
class Record:
    """One QA sample. `image`, `masks`, `regions` and the context paths are relative to the data folder.

    `context` lists `{"image": path, "mask": path or None}` besides the query image, in the order a model sees
    them. A conversation with one `<image>` shows the query image alone; one with more shows, at the placeholders
    before the query's last one, the images its task shows for the context pairs (`Task.show_context`).
    """

    id: str
    image: str
    modality: str
    split: str
    task: str
    conversations: list[dict]
    masks: list[str] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)
    answer_type: str = ""
    source: str = ""
    source_id: str = ""
    context: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        d = asdict(self)
        if not d["context"]:  # a single-image record's line is byte-identical to one written before `context`
            del d["context"]
        return json.dumps(d, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Record":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def question(self) -> str:
        return next(t["value"] for t in self.conversations if t["from"] == "human")

    @property
    def answer(self) -> str:
        return next(t["value"] for t in self.conversations if t["from"] == "gpt")


def parse_context(value: object, where: str) -> list[dict]:
    """A raw record's `context` as `[{"image": path, "mask": path or None}, ...]` ([] when absent).

    Only the shape is checked here; whether the paths are safe and the files readable is ingest's job.
    """
    if value is None:
        return []
    if not isinstance(value, list):
        raise RecordError(where, "context", value, "expected a list of {'image': path, 'mask': path or null}")
    out = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or "image" not in entry or set(entry) - {"image", "mask"}:
            raise RecordError(where, f"context[{i}]", entry, "expected {'image': path, 'mask': path or null}")
        out.append({"image": entry["image"], "mask": entry.get("mask")})
    return out


def stable_id(image_digest: str, conversations: list[dict], split: str, task: str,
              context_digests: Sequence[tuple[str, str | None]] = ()) -> str:
    """Content-derived id: the same image content and conversation give the same id on any machine.

    `context_digests` ([image digest, mask digest or None] per context pair) only enter the payload when there
    are some, so a single-image record keeps the id it had before context existed.
    """
    parts: list = [image_digest, conversations, split, task]
    if context_digests:
        parts.append([list(pair) for pair in context_digests])
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]
