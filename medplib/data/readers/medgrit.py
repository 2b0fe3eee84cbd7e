"""Med-GRIT-270k (BiRD) source, `--source medgrit:DIR`, read as BiRD's code reads it (REFERENCE §7).

Layout: every `*.json` under DIR (outside `images/`) is a JSON list of `{"id": "<image name without .png>",
"conversations": [[user, assistant], …]}`; the image is named in the first question as `<img>NAME.png</img>`
(possibly after `Picture 1: `), else it is `<id>.png`; its file is `DIR/images/NAME.png`.
- One record per conversation pair: the question with its `<img>…</img>` replaced by the `<image>` placeholder
  in front, the answer as it is; its source id is `FILE[i].conversations[j]`.
- Split, from the words of the file name (split on `_ - . space`): `test` → test (BiRD's
  `…_test_chatlm_VG_img_coord_OneConv.json`), `train` → train, a number after either allowed (its combined
  `…_train1_chatlm_img_coord2.json`); a file with neither word, or both, is reported, not guessed. Validation is carved from train by image at ingest
  (`ingest.in_val`), as for every source without validation files of its own.
- Task: the word `VG`, `RO`, `GC` or `MII` in the file name (BiRD's test files), mapped to the registered task
  whose `source_codes["medgrit"]` it is. Without one (the combined training file) each pair is recognised from its
  text: a box in the question → RO; a box in the answer → VG when the question names the object with `<ref>` or the
  answer is nothing but `<ref>`/`<box>` pairs, else GC; no box → MII.
- Quarantined here, naming the file, the field (`[i].conversations[j]`) and the value: a record or pair not in
  this shape, a missing image, an unknown modality (the image name's prefix), and whatever the task's record check
  rejects (malformed box text, x2 < x1 or y2 < y1, a coordinate outside the [0, 1000) grid, `<ref>`/`<box>` counts
  that disagree where the task pairs them, a box missing where the task needs one). Valid pairs are staged in the
  MeCoVQA layout under the home (the tasks' files, e.g. `test/MedGRIT_VG_test.json`) with the images they use
  hard-linked (copied across file systems), and ingest normalises them as every other source.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path, PurePosixPath

from medplib import tasks
from medplib.data import boxes
from medplib.data.readers import Reader, register, stage_by_converting
from medplib.data.images import link_or_copy
from medplib.data.schema import IMAGE_TOKEN, MODALITIES, RecordError, modality_from_filename
from medplib.data.synth import write_records
from medplib.progress import track

log = logging.getLogger(__name__)

KIND = "medgrit"
_SPLIT_WORD_RE = re.compile(r"(train|test)\d*")  # BiRD's training file says 'train1'
_IMG_RE = re.compile(r"(?:Picture \d+:\s*)?<img>(.*?)</img>\s*", re.S)
_WORD_RE = re.compile(r"[_\-. ]+")


def split_and_code(name: str, by_code: dict[str, tasks.Task] | None = None) -> tuple[str | None, str | None]:
    """(split, task code) that a Med-GRIT file name says; None for what it does not say. Codes are the registry's
    (`by_code`, looked up when not given)."""
    by_code = tasks.for_source(KIND) if by_code is None else by_code
    words = _WORD_RE.split(name)
    splits = {m.group(1) for m in (_SPLIT_WORD_RE.fullmatch(w.lower()) for w in words) if m}
    codes = [w for w in words if w in by_code]
    return (splits.pop() if len(splits) == 1 else None), (codes[0] if len(set(codes)) == 1 else None)


def recognise(question: str, answer: str) -> str:
    """The Med-GRIT task code of a pair of the combined training file, from where its boxes are (module doc)."""
    if boxes.has_box(question):
        return "RO"
    if boxes.has_box(answer):
        return "VG" if "<ref>" in question or not boxes.strip(answer).strip(" \n.,;") else "GC"
    return "MII"


def _image_name(question: str, record_id: object, where: str, field: str) -> str:
    named = _IMG_RE.findall(question)
    if len(named) > 1:
        raise RecordError(where, field, named, f"{len(named)} images in one question; a Med-GRIT record has one")
    if named:
        return PurePosixPath(named[0].strip()).name
    if isinstance(record_id, str) and record_id.strip():
        return f"{record_id.strip()}.png"
    raise RecordError(where, field, question, "no <img>NAME.png</img> in the question and no 'id' to name the image")


def _record_image(raw: dict, root: Path, where: str) -> str:
    """The image a record asks about (named in its first question, else its id), checked to exist."""
    first = raw["conversations"][0]
    question = first[0] if isinstance(first, list) and first and isinstance(first[0], str) else ""
    image = _image_name(question, raw.get("id"), where, "conversations[0][0]")
    modality = modality_from_filename(image)
    if modality not in MODALITIES:
        raise RecordError(where, "conversations[0][0]", image, f"unknown modality {modality!r} (image name prefix); "
                                                               f"expected one of {list(MODALITIES)}")
    if not (root / "images" / image).is_file():
        raise RecordError(where, "conversations[0][0]", image, f"missing image: images/{image} does not exist")
    return image


def _pair(pair: object, image: str, code: str | None, by_code: dict[str, tasks.Task], raw: dict, where: str,
          field: str) -> tuple[tasks.Task, list]:
    """The task and the MeCoVQA turns of one [user, assistant] pair, or a RecordError saying why not."""
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
        raise RecordError(where, field, pair, "expected a [user, assistant] pair of strings")
    question, answer = pair
    if not answer.strip():
        raise RecordError(where, f"{field}[1]", answer, "empty answer")
    if _IMG_RE.search(question) and _image_name(question, raw.get("id"), where, f"{field}[0]") != image:
        raise RecordError(where, f"{field}[0]", question, f"names another image than the record's {image!r}")
    text = _IMG_RE.sub("", question).strip()
    turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{text}"}, {"from": "gpt", "value": answer}]
    pair_code = code or recognise(text, answer)
    if pair_code not in by_code:
        raise RecordError(where, field, pair_code, f"no registered task takes Med-GRIT {pair_code!r} records "
                                                   f"(registered: {sorted(by_code)})")
    task = by_code[pair_code]
    problem = task.check(turns, [], [])
    if problem is not None:
        raise RecordError(where, field, *problem)
    return task, turns


def read_file(path: Path, rel: str, root: Path) -> tuple[list[tuple[str, dict]], list[RecordError]]:
    """The staged records of one Med-GRIT file as (MeCoVQA file, record), and one problem per unusable pair."""
    by_code = tasks.for_source(KIND)  # the registry's Med-GRIT codes, once per file, not per pair
    split, code = split_and_code(path.name, by_code)
    if split is None:
        return [], [RecordError(rel, "file name", path.name, "cannot tell the split: expected either the word "
                                                              "'train' or 'test' in the file name")]
    try:
        data = json.loads(path.read_bytes().decode("utf-8", errors="replace"))
    except json.JSONDecodeError as e:
        return [], [RecordError(rel, "json", f"line {e.lineno} column {e.colno}", f"malformed JSON: {e.msg}")]
    if not isinstance(data, list):
        return [], [RecordError(rel, "json", type(data).__name__, "expected a JSON list of records")]
    out, errors = [], []
    for i, raw in enumerate(data):
        where = f"{rel}[{i}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("conversations"), list) or not raw["conversations"]:
            errors.append(RecordError(where, "conversations", raw.get("conversations") if isinstance(raw, dict)
                                      else raw, "expected {'id', 'conversations': [[user, assistant], …]}"))
            continue
        pairs = raw["conversations"]
        try:
            image = _record_image(raw, root, where)
        except RecordError as e:  # no pair of the record is usable without its image: one problem per pair
            errors += [e] + [RecordError(where, f"conversations[{j}]", e.value, e.reason) for j in range(1, len(pairs))]
            continue
        for j, pair in enumerate(pairs):
            try:
                task, turns = _pair(pair, image, code, by_code, raw, where, f"conversations[{j}]")
            except RecordError as e:
                errors.append(e)
                continue
            out.append((task.file_for(split), {"id": f"{where}.conversations[{j}]", "image": f"images/{image}",
                                               "answer_type": "open", "conversations": turns}))
    return out, errors


def convert_medgrit(src: Path, out: Path) -> list[RecordError]:
    """Stage the Med-GRIT folder `src` in the MeCoVQA layout under `out`; return the problems (module doc)."""
    src = Path(src)
    files = sorted(p for p in src.rglob("*.json") if "images" not in p.relative_to(src).parts[:1])
    if not files:
        raise FileNotFoundError(f"Med-GRIT source {src} has no *.json annotation files")
    if not (src / "images").is_dir():
        raise FileNotFoundError(f"Med-GRIT source {src} has no images/ folder")
    buckets: dict[str, list[dict]] = {}
    errors: list[RecordError] = []
    for path in track(files, "medgrit", "files", disable=len(files) < 10):
        staged, problems = read_file(path, path.relative_to(src).as_posix(), src)
        errors += problems
        for rel, record in staged:
            buckets.setdefault(rel, []).append(record)
    for image in sorted({r["image"] for records in buckets.values() for r in records}):
        link_or_copy(src / image, out / image)
    for rel, records in sorted(buckets.items()):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("Med-GRIT %s: %d file(s), %d pair(s) staged, %d problem(s)", src, len(files),
             sum(len(r) for r in buckets.values()), len(errors))
    return errors


def write_medgrit_synth(root: Path, folder: Path, files: dict[str, list[dict]]) -> None:
    """Write synthetic Med-GRIT files into `folder`: each a JSON list of `{"id", "conversations"}` records, and the
    image each record's id names (`root/images/<id>.png`) linked under `folder/images/`, as Med-GRIT keeps them."""
    for rel, records in files.items():
        for record in records:
            image = f"images/{record['id']}.png"
            link_or_copy(root / image, folder / image)
        write_records(folder / rel, records)


register(Reader(KIND, stage_by_converting(KIND, convert_medgrit), convert=convert_medgrit,
                write_synth=write_medgrit_synth,
                describe="Med-GRIT-270k (BiRD): JSON lists of [user, assistant] pairs + images/"))
