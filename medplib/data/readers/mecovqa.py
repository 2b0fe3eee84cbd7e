"""Reader for a folder in the real MeCoVQA layout (REFERENCE §4); every other source is converted to it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from medplib import tasks
from medplib.data.readers import Reader, register
from medplib.data.schema import RecordError

# Where a file sits and what its name says decide the split and the task family (the registered tasks say
# which words in a file name mean which family).
# A `val/` folder (MeCoVQA has none; a converted source with its own validation split, as LViT's Val_Folder or R2Gen's `val`, writes
# one) is kept as the validation split: ingest then carves none from train.
SPLIT_DIRS = {"train": "train", "val": "val", "test": "test", "zeroshot4grounding": "zeroshot"}


@dataclass
class RawItem:
    """One record as found in the source, with where it came from."""

    raw: object
    file: str  # source file, relative to the source root
    index: int  # position in that file
    split: str
    family: str  # a registered task's family: complex | region | grounding | caption | …

    @property
    def where(self) -> str:
        return f"{self.file}[{self.index}]"


def family_of(rel: Path) -> str | None:
    name = rel.name.lower()
    family = next((fam for word, fam in tasks.file_words() if word in name), None)
    if family is None and rel.parts[0] == "zeroshot4grounding":  # named by modality (pet.json): the zero-shot task
        family = next((t.family for t in tasks.all_tasks() if t.zeroshot), None)
    return family


def read_mecovqa(root: Path) -> Iterator[RawItem | RecordError]:
    """Yield every record of every annotation file under `root`, or a RecordError for a file that cannot be read."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MeCoVQA source {root} is not a folder")
    files = sorted(p for d in SPLIT_DIRS if (root / d).is_dir() for p in (root / d).rglob("*.json"))
    if not files:
        raise FileNotFoundError(
            f"MeCoVQA source {root} has no annotation files: expected train/*.json, val/*.json, test/*.json or "
            "zeroshot4grounding/*.json")
    for path in files:
        rel = path.relative_to(root)
        split = SPLIT_DIRS[rel.parts[0]]
        family = family_of(rel)
        if family is None:
            yield RecordError(str(rel), "file name", rel.name,
                              "cannot tell the task from the file name (expected one of "
                              f"{', '.join(w for w, _ in tasks.file_words())} in it)")
            continue
        raw_bytes = path.read_bytes()
        # Decode leniently so one bad string quarantines one record, not the whole file.
        text = raw_bytes.decode("utf-8", errors="surrogateescape")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            yield RecordError(str(rel), "json", f"line {e.lineno} column {e.colno}", f"malformed JSON: {e.msg}")
            continue
        if not isinstance(data, list):
            yield RecordError(str(rel), "json", type(data).__name__, "expected a JSON list of records")
            continue
        for i, raw in enumerate(data):
            yield RawItem(raw=raw, file=str(rel), index=i, split=split, family=family)


def stage_mecovqa(path: Path | None, ctx) -> tuple:
    """A MeCoVQA folder is already in the layout: ingest reads it in place."""
    return path, [], "mecovqa"


register(Reader("mecovqa", stage_mecovqa, describe="a folder in the MeCoVQA layout"))
