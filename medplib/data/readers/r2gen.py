"""IU X-Ray / MIMIC-CXR in R2Gen's layout, `--source iuxray:DIR`, read as R2Gen's code reads it (REFERENCE §7).

Layout: `DIR/annotation.json` = `{"train": [...], "val": [...], "test": [...]}`, each record `{"id", "report",
"image_path": [view, ...], "split"}` with the views relative to `DIR/images/`. IU X-Ray: two views (`<id>/0.png`,
`<id>/1.png`); MIMIC-CXR: one `.jpg` and the record's `subject_id` / `study_id` besides.
- One report record per annotation record, modality x, for the one registered task with a `source_codes["iuxray"]`
  (its `question` is asked; the report, trimmed, is the answer). The first view is the query image, a
  second one its context image (`Record.context`).
- Split: the list the record is in (R2Gen reads `ann[split]`; the record's own `split` field is not consulted);
  `val` is staged as the validation split, and ingest keeps it rather than carving one from train.
- Source id: the record's `id`; for MIMIC-CXR `subject_id/study_id/id`, so a record leads back to its study.
- Quarantined here, naming the file (`annotation.json[split][i]`), the field and the value: a record that is not an
  object, a report that is missing or empty, `image_path` not a list of one or two paths, a view path that leaves
  `images/` (absolute, `..`, or through a link), a view file missing, a view that is not a PNG and cannot be
  decoded; a top-level key that is not a split R2Gen reads, and whatever the task's record check rejects.
- Staged in the MeCoVQA layout under the home (in the claiming task's files, one per split); a view
  `<dir>/<name>.<ext>` becomes `images/<dir>/x_<name>.png` (the `x_` prefix names the modality): a PNG hard-linked
  (copied across file systems), any other format (MIMIC-CXR's JPEG) decoded and written as PNG.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path, PurePosixPath

from medplib import tasks
from medplib.data.images import ImageReadError, link_or_copy, read_image, write_png
from medplib.data.readers import Reader, register, stage_by_converting
from medplib.data.schema import IMAGE_TOKEN, RecordError, path_problem
from medplib.progress import track

log = logging.getLogger(__name__)

KIND = "iuxray"
ANNOTATION = "annotation.json"
SPLITS = {"train": "train", "val": "val", "test": "test"}  # R2Gen's split lists → ours
MAX_VIEWS = 2  # IU X-Ray's frontal and lateral
TEXT_FIELD = "report"  # the annotation record's key for its findings text (R2Gen's name, not a task's)


def staged_image(view: str) -> str:
    """Where a view (relative to `images/`) is staged: its folder kept, its name prefixed `x_`, as PNG."""
    p = PurePosixPath(view)
    return str(PurePosixPath("images") / p.parent / f"x_{p.stem}.png")


class _Views:
    """Checks each view file once and stages it: a PNG is linked once a record using it is accepted (`link`), any
    other format decoded and written as PNG when checked. Failures are remembered, so every record naming a broken
    view fails alike."""

    def __init__(self, src: Path, out: Path):
        self.images, self.out = src / "images", out
        self.staged: dict[str, str | ImageReadError] = {}  # view → staged path, or why it cannot be staged
        self.owner: dict[str, str] = {}  # staged path → the view it came from

    def check(self, view: object, where: str, field: str) -> str:
        """The staged path of a view, or a RecordError naming the field and the view."""
        if not isinstance(view, str) or not view.strip():
            raise RecordError(where, field, view, "expected a view path relative to images/")
        problem = path_problem(view, self.images, "the images/ folder")
        if problem is not None:
            raise RecordError(where, field, view, problem)
        if view not in self.staged:
            self.staged[view] = self._check(view)
        staged = self.staged[view]
        if isinstance(staged, ImageReadError):
            raise RecordError(where, field, view, str(staged))
        return staged

    def _check(self, view: str) -> str | ImageReadError:
        path, rel = self.images / view, staged_image(view)
        if not path.is_file():
            return ImageReadError(f"missing view: images/{view} does not exist")
        if self.owner.setdefault(rel, view) != view:
            return ImageReadError(f"stages to the same file {rel} as images/{self.owner[rel]}; rename one of them")
        if path.suffix.lower() != ".png":  # decoded here, so an unreadable view is the reader's to quarantine
            try:
                write_png(self.out / rel, read_image(path))
            except ImageReadError as e:
                return ImageReadError(f"unreadable view: images/{view}: {e}")
        return rel

    def link(self, view: str) -> None:
        """Stage a checked PNG view (a hard link, else a copy); converted views are there already."""
        if PurePosixPath(view).suffix.lower() == ".png":
            link_or_copy(self.images / view, self.out / str(self.staged[view]))


def _source_id(raw: dict, where: str) -> str:
    rid = raw.get("id")
    rid = rid.strip() if isinstance(rid, str) and rid.strip() else where
    study = [str(raw[k]) for k in ("subject_id", "study_id") if raw.get(k) not in (None, "")]
    return "/".join([*study, rid])


def read_record(raw: object, where: str, task: tasks.Task, views: _Views) -> dict:
    """The staged MeCoVQA record of one R2Gen record, or a RecordError saying why not."""
    if not isinstance(raw, dict):
        raise RecordError(where, "record", raw, f"expected {{'id', '{TEXT_FIELD}', 'image_path': [view, ...], "
                                                "'split'}")
    report = raw.get(TEXT_FIELD)
    if not isinstance(report, str):
        raise RecordError(where, TEXT_FIELD, report, "expected the report text")
    if not report.strip():
        raise RecordError(where, TEXT_FIELD, report, "empty report")
    paths = raw.get("image_path")
    if not isinstance(paths, list) or not 1 <= len(paths) <= MAX_VIEWS:
        raise RecordError(where, "image_path", paths, f"expected a list of 1 to {MAX_VIEWS} view paths "
                                                      "relative to images/")
    staged = [views.check(view, where, f"image_path[{k}]") for k, view in enumerate(paths)]
    turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{task.question}"}, {"from": "gpt", "value": report.strip()}]
    problem = task.check(turns, [], [])
    if problem is not None:
        raise RecordError(where, TEXT_FIELD, *problem)
    for view in paths:
        views.link(view)
    record = {"id": _source_id(raw, where), "image": staged[0], "answer_type": "open", "conversations": turns}
    if len(staged) > 1:
        record["context"] = [{"image": rel, "mask": None} for rel in staged[1:]]
    return record


def convert_r2gen(src: Path, out: Path) -> list[RecordError]:
    """Stage the R2Gen folder `src` in the MeCoVQA layout under `out`; return the problems (module doc)."""
    src = Path(src)
    if not (src / ANNOTATION).is_file():
        raise FileNotFoundError(f"R2Gen source {src} has no {ANNOTATION}")
    if not (src / "images").is_dir():
        raise FileNotFoundError(f"R2Gen source {src} has no images/ folder")
    by_code = tasks.for_source(KIND)  # R2Gen holds one kind of record: the task that claims the source takes them all
    if len(by_code) != 1:
        raise ValueError(f"R2Gen records are of one kind, so exactly one registered task may set "
                         f"source_codes['{KIND}']; found {len(by_code)}: {sorted(t.name for t in by_code.values())}")
    task = next(iter(by_code.values()))
    try:
        data = json.loads((src / ANNOTATION).read_bytes().decode("utf-8", errors="replace"))
    except json.JSONDecodeError as e:
        return [RecordError(ANNOTATION, "json", f"line {e.lineno} column {e.colno}", f"malformed JSON: {e.msg}")]
    if not isinstance(data, dict):
        return [RecordError(ANNOTATION, "json", type(data).__name__,
                            "expected {'train': [...], 'val': [...], 'test': [...]}")]
    views = _Views(src, out)
    buckets: dict[str, list[dict]] = {}
    errors: list[RecordError] = []
    for key, records in data.items():
        if key not in SPLITS or not isinstance(records, list):
            errors.append(RecordError(ANNOTATION, key, records if key in SPLITS else key,
                                      "expected a list of records" if key in SPLITS else
                                      f"not a split R2Gen reads ({', '.join(SPLITS)})"))
            continue
        rel = task.file_for(SPLITS[key])
        for i, raw in enumerate(track(records, f"{KIND} {key}", "records", disable=len(records) < 2000)):
            try:
                buckets.setdefault(rel, []).append(read_record(raw, f"{ANNOTATION}[{key}][{i}]", task, views))
            except RecordError as e:
                errors.append(e)
    for rel, records in sorted(buckets.items()):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("R2Gen %s: %d record(s) staged, %d problem(s)", src, sum(len(r) for r in buckets.values()), len(errors))
    return errors


def write_annotation(path: Path, records: list[dict]) -> None:
    """R2Gen's `annotation.json` from records that carry their `split`: one list per split, train, val and test."""
    by_split: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for record in records:
        by_split[record["split"]].append(record)
    path.write_text(json.dumps(by_split, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_r2gen_synth(root: Path, folder: Path, files: dict[str, list[dict]]) -> None:
    """Write synthetic R2Gen files into `folder` (`Reader.write_synth`): each an `annotation.json` of the records
    given for it; their views are already under `folder/images/` (the claiming task's `synth_images` made them)."""
    for rel, records in sorted(files.items()):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        write_annotation(folder / rel, records)


register(Reader(KIND, stage_by_converting(KIND, convert_r2gen), convert=convert_r2gen,
                write_synth=write_r2gen_synth,
                describe="IU X-Ray / MIMIC-CXR in R2Gen's layout: annotation.json + images/"))
