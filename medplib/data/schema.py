"""The normalised record: one JSON line per QA sample, paths relative to the data folder."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field

MODALITIES = ("ct", "mr", "x", "pet", "endoscopy", "dermoscopy", "fundus", "ultrasound")
MODALITY_NAMES = {
    "ct": "CT", "mr": "MRI", "x": "X-ray", "pet": "PET", "endoscopy": "endoscopy",
    "dermoscopy": "dermoscopy", "fundus": "fundus", "ultrasound": "ultrasound",
}
SPLITS = ("train", "test", "zeroshot")

IMAGE_TOKEN = "<image>"
SEG_TOKEN = "<SEG>"
REGION_RE = re.compile(r"<region>(.*?)</region>", re.S)
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


def modality_from_filename(name: str) -> str:
    """MeCoVQA / SA-Med2D naming: the modality is the file name's part before the first '_'."""
    base = name.rsplit("/", 1)[-1]
    return base.split("_", 1)[0].lower()


@dataclass
class Record:
    """One QA sample. `image`, `masks` and `regions` are paths relative to the data folder."""

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

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Record":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def question(self) -> str:
        return next(t["value"] for t in self.conversations if t["from"] == "human")

    @property
    def answer(self) -> str:
        return next(t["value"] for t in self.conversations if t["from"] == "gpt")


def stable_id(image_digest: str, conversations: list[dict], split: str, task: str) -> str:
    """Content-derived id: the same image content and conversation give the same id on any machine."""
    payload = json.dumps([image_digest, conversations, split, task], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]
