"""LViT layout (QaTa-COV19, MosMedData+; what LViT and RecLMIS read), `--source lvit:DIR` (REFERENCE §7).

DIR is one dataset folder, `{Train_Folder, Val_Folder, Test_Folder}/{img/, labelcol/, *_text.xlsx}`, or a folder of
such dataset folders (as LViT's `datasets/`, holding `QaTa-COV19/` and `MosMedData+/`).
- Modality, from the dataset folder's name: `QaTa-COV19` → x, `MosMedData+` → ct (any name starting with "qata" or
  "mosmed", whatever the case and punctuation); any other dataset says its modality by a name that starts with a
  modality key and a separator or nothing else (`ct_lungs`, `x-chest`, `ultrasound`). A name that says neither is an
  error naming the folder and what to do. DIR given as a symlink is followed to its target, whose name is the one
  read: to name a dataset you cannot rename, link it under such a name inside a folder and pass that folder.
- Split, from the folder: Train_Folder → train, Val_Folder → val (a source's own validation split: ingest then
  carves none from train), Test_Folder → test.
- Sheets: every `*_text.xlsx` in a split folder; the first worksheet, a header row with `Image` and `Description`,
  one row per sample (blank rows skipped). A row's files are looked up in the split folders its sheet's name names
  (QaTa's `Train_Val_text.xlsx`, kept in Train_Folder, covers Train_Folder and Val_Folder: a row lands in the split
  whose `img/` holds its image), else in the folder the sheet is in. A sheet with the same bytes as one read before
  (the shared sheet copied into both folders) is read once.
- The Image cell: QaTa's holds the mask's name, `mask_<image name>` (mask `labelcol/<cell>`, image `img/<cell without
  mask_>`); MosMedData+'s the image's stem or name (image `img/<name>`, else the file of that stem, preferring .png;
  mask `labelcol/<stem>.png`). A cell without an extension gets `.png` for the mask.
- One record per row, of the task whose `source_codes["lvit"]` is "text" (text-guided segmentation), built by its
  `turns(note, mask)`. Staged in the MeCoVQA layout under the home: images as `images/<modality>_00--<dataset>--
  <split>--<name>` (a name that already starts with `<modality>_`, as the synthetic phantoms' SA-Med2D-style names,
  is kept), masks as `masks_merged/<staged image stem>--note_merged.png`, both hard-linked (copied across file
  systems); ingest normalises them as every other source.
- Quarantined, naming the sheet and row (`Train_Folder/Train_text.xlsx[row 7]`, Excel's row number), the field and
  the value: an empty Image cell, an empty description, a missing image or mask, a mask whose size differs from its
  image's, an unreadable image or mask, two different images staged under one name; an unreadable sheet, or one
  without the two columns, is one problem naming the file. Valid rows of the same sheet still flow.
"""
from __future__ import annotations

import hashlib
import logging
import re
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from io import BytesIO
from pathlib import Path, PurePosixPath

import openpyxl
from openpyxl.writer.excel import ExcelWriter
from PIL import Image

from medplib import tasks
from medplib.data.images import link_or_copy
from medplib.data.readers import Reader, register, stage_by_converting
from medplib.data.readers.dicom import first_line, safe_name
from medplib.data.schema import MODALITIES, RecordError, modality_from_filename
from medplib.data.synth import write_records
from medplib.progress import track

log = logging.getLogger(__name__)

KIND = "lvit"
TASK_CODE = "text"  # what a task's `source_codes["lvit"]` says when it takes the rows of LViT's sheets
SPLIT_FOLDERS = {"train_folder": "train", "val_folder": "val", "test_folder": "test"}  # folder name, any case
SPLIT_WORDS = ("train", "val", "test")  # words of a sheet's name that name the splits its rows are in
KNOWN_DATASETS = {"qata": "x", "mosmed": "ct"}  # start of a dataset folder's name (letters, digits) → modality
COLUMNS = ("Image", "Description")
QATA_PREFIX = "mask_"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_WORD_RE = re.compile(r"[_\-. +]+")


def modality_of(dataset: Path) -> str:
    """The modality of a dataset folder, from its name (module doc); ValueError saying how to name it otherwise."""
    name = dataset.name
    letters = re.sub(r"[^a-z0-9]", "", name.lower())
    for start, modality in KNOWN_DATASETS.items():
        if letters.startswith(start):
            return modality
    first = _WORD_RE.split(name.lower())[0]
    if first in MODALITIES:
        return first
    raise ValueError(
        f"LViT dataset folder {dataset}: cannot tell its modality from its name {name!r}. Known datasets are "
        f"QaTa-COV19 (x) and MosMedData+ (ct); name any other one with its modality first, e.g. 'ct_{name}' or "
        f"'x-{name}', one of {list(MODALITIES)} (or link it under such a name in a folder and pass that folder)")


def _split_folders(dataset: Path) -> dict[str, Path]:
    """split → its folder in a dataset folder (Train_Folder, Val_Folder, Test_Folder, any case)."""
    out = {}
    for child in sorted(dataset.iterdir()) if dataset.is_dir() else ():
        split = SPLIT_FOLDERS.get(child.name.lower())
        if split and child.is_dir():
            out[split] = child
    return out


def datasets(src: Path) -> list[Path]:
    """The dataset folders of `src`: itself when it holds split folders, else its sub-folders that do."""
    if _split_folders(src):
        return [src]
    found = [p for p in sorted(src.iterdir()) if _split_folders(p)]
    if not found:
        raise FileNotFoundError(f"LViT source {src} has no Train_Folder, Val_Folder or Test_Folder, nor a dataset "
                                "folder holding them (e.g. QaTa-COV19/Train_Folder/)")
    return found


@dataclass
class _Folder:
    """One split folder's files, listed once: image names (and by stem) in img/, mask names in labelcol/."""

    path: Path
    split: str
    images: set[str] = field(default_factory=set)
    stems: dict[str, list[str]] = field(default_factory=dict)
    masks: set[str] = field(default_factory=set)

    @classmethod
    def list(cls, path: Path, split: str) -> "_Folder":
        folder = cls(path, split)
        if (path / "img").is_dir():
            folder.images = {p.name for p in (path / "img").iterdir() if p.is_file()}
            for name in sorted(folder.images, key=lambda n: (PurePosixPath(n).suffix.lower() != ".png", n)):
                folder.stems.setdefault(PurePosixPath(name).stem, []).append(name)
        if (path / "labelcol").is_dir():
            folder.masks = {p.name for p in (path / "labelcol").iterdir() if p.is_file()}
        return folder


def _cell_text(value: object) -> str:
    """A cell as text: a whole number stored as a float (a numeric stem) loses its '.0'; None is ''."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def read_sheet(path: Path, rel: str) -> list[tuple[int, str, str]]:
    """(Excel row number, Image cell, Description cell) of every non-blank row; RecordError for an unreadable sheet."""
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # openpyxl and zipfile raise many types on damaged files; each becomes a reported problem
        raise RecordError(rel, "sheet", path.name, f"unreadable sheet ({type(e).__name__}: {first_line(e)})") from None
    try:
        if not book.worksheets:
            raise RecordError(rel, "sheet", path.name, "unreadable sheet (no worksheet in the workbook)")
        rows = book.worksheets[0].iter_rows(values_only=True)
        header = [_cell_text(v) for v in next(rows, ())]
        columns = {v.lower(): i for i, v in reversed(list(enumerate(header)))}
        if any(c.lower() not in columns for c in COLUMNS):
            raise RecordError(rel, "header", header, f"expected the columns {' | '.join(COLUMNS)} in the first row")
        image_col, note_col = (columns[c.lower()] for c in COLUMNS)
        out = []
        for number, row in enumerate(rows, start=2):
            image = _cell_text(row[image_col]) if image_col < len(row) else ""
            note = _cell_text(row[note_col]) if note_col < len(row) else ""
            if image or note:
                out.append((number, image, note))
        return out
    except RecordError:
        raise
    except Exception as e:  # a damaged part of the workbook found while reading its rows
        raise RecordError(rel, "sheet", path.name, f"unreadable sheet ({type(e).__name__}: {first_line(e)})") from None
    finally:
        book.close()


def _sheet_folders(sheet: Path, own: _Folder, folders: dict[str, _Folder]) -> list[_Folder]:
    """The split folders a sheet's rows are looked up in: those its name names, else its own."""
    words = set(_WORD_RE.split(sheet.stem.lower()))
    named = [folders[s] for s in SPLIT_WORDS if s in words and s in folders]
    return named or [own]


def _row_files(cell: str, folders: list[_Folder], where: str) -> tuple[_Folder, str, str]:
    """(folder, image name, mask name) of a row's Image cell (module doc); RecordError when a file is missing."""
    if cell.lower().startswith(QATA_PREFIX):  # QaTa: the mask's name
        mask = cell if PurePosixPath(cell).suffix else f"{cell}.png"
        wanted = mask[len(QATA_PREFIX):]
        found = next(((f, wanted) for f in folders if wanted in f.images), None)
    else:  # MosMedData+: the image's stem or name
        has_suffix = PurePosixPath(cell).suffix.lower() in IMAGE_SUFFIXES
        stem = PurePosixPath(cell).stem if has_suffix else cell
        mask, wanted = f"{stem}.png", cell if has_suffix else f"{stem}.*"
        found = next(((f, cell if cell in f.images else f.stems[stem][0]) for f in folders
                      if cell in f.images or stem in f.stems), None)
    if found is None:
        where_looked = " or ".join(f"{f.path.name}/img/" for f in folders)
        raise RecordError(where, "Image", cell, f"missing image: no {wanted} in {where_looked}")
    folder, image = found
    if mask not in folder.masks:
        raise RecordError(where, "Image", cell, f"missing mask: {folder.path.name}/labelcol/{mask} does not exist")
    return folder, image, mask


def _size(path: Path, what: str, where: str, cell: str) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise RecordError(where, "Image", cell, f"unreadable {what} {path.parent.name}/{path.name} "
                                                f"({type(e).__name__}: {first_line(e)})") from None


@dataclass
class _Staging:
    """The MeCoVQA folder being written: records per annotation file, and which source file each staged name is."""

    out: Path
    task: tasks.Task
    records: dict[str, list[dict]] = field(default_factory=dict)
    sources: dict[str, Path] = field(default_factory=dict)

    def add(self, dataset: str, modality: str, folder: _Folder, image: str, mask: str, note: str, where: str,
            cell: str) -> None:
        image_src, mask_src = folder.path / "img" / image, folder.path / "labelcol" / mask
        (w, h), (mw, mh) = _size(image_src, "image", where, cell), _size(mask_src, "mask", where, cell)
        if (mw, mh) != (w, h):
            raise RecordError(where, "Image", cell, f"mask labelcol/{mask} is {mw}x{mh} but its image img/{image} is "
                                                    f"{w}x{h}")
        keep = modality_from_filename(image) == modality
        staged = f"images/{image if keep else f'{modality}_00--{safe_name(dataset)}--{folder.split}--{image}'}"
        other = self.sources.setdefault(staged, image_src)
        if other != image_src:
            raise RecordError(where, "Image", cell, f"image name clash: {image_src.name} would be staged as {staged}, "
                                                    f"which is already {other}")
        mask_rel = f"masks_merged/{PurePosixPath(staged).stem}--note_merged{PurePosixPath(mask).suffix.lower()}"
        link_or_copy(image_src, self.out / staged)
        link_or_copy(mask_src, self.out / mask_rel)
        record = {"id": where, "image": staged, "answer_type": "open", "conversations": self.task.turns(note, mask_rel)}
        self.records.setdefault(self.task.file_for(folder.split), []).append(record)


def _task() -> tasks.Task:
    by_code = tasks.for_source(KIND)
    if TASK_CODE not in by_code:
        raise ValueError(f"No registered task takes LViT rows: none has source_codes[{KIND!r}] == {TASK_CODE!r} "
                         f"(registered tasks: {tasks.names()})")
    return by_code[TASK_CODE]


def convert_lvit(src: Path, out: Path) -> list[RecordError]:
    """Stage the LViT folder `src` (a dataset or a folder of datasets) in the MeCoVQA layout under `out`; return the
    problems (module doc)."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"LViT source {src} is not a folder")
    found = [(d, modality_of(d), _split_folders(d)) for d in datasets(src)]  # every name checked before any work
    staging = _Staging(out, _task())
    errors: list[RecordError] = []
    seen: dict[str, str] = {}  # sheet digest → the sheet read with those bytes
    n_rows = 0
    for dataset, modality, split_dirs in found:
        folders = {split: _Folder.list(path, split) for split, path in split_dirs.items()}
        sheets = [(sheet, folder) for folder in folders.values() for sheet in sorted(folder.path.glob("*_text.xlsx"))
                  if not sheet.name.startswith(("~$", "."))]  # Excel's lock files
        if not sheets:
            log.warning("LViT dataset %s has no *_text.xlsx sheet in %s: nothing to read", dataset,
                        ", ".join(p.name for p in split_dirs.values()))
        for sheet, own in sheets:
            rel = sheet.relative_to(src).as_posix()
            digest = hashlib.sha256(sheet.read_bytes()).hexdigest()
            if digest in seen:
                log.info("LViT sheet %s has the same bytes as %s: read once", rel, seen[digest])
                continue
            seen[digest] = rel
            try:
                rows = read_sheet(sheet, rel)
            except RecordError as e:
                errors.append(e)
                continue
            look_in = _sheet_folders(sheet, own, folders)
            n_rows += len(rows)
            for number, cell, note in track(rows, "lvit", "rows", disable=len(rows) < 2000):
                where = f"{rel}[row {number}]"
                try:
                    if not cell:
                        raise RecordError(where, "Image", cell, "empty Image cell: no image or mask named")
                    if not note:
                        raise RecordError(where, "Description", note, "empty description")
                    folder, image, mask = _row_files(cell, look_in, where)
                    staging.add(dataset.name, modality, folder, image, mask, " ".join(note.split()), where, cell)
                except RecordError as e:
                    errors.append(e)
    for rel, records in sorted(staging.records.items()):
        write_records(out / rel, records)
    log.info("LViT %s: %d dataset(s), %d row(s), %d staged, %d problem(s)", src, len(found), n_rows,
             sum(len(r) for r in staging.records.values()), len(errors))
    return errors


class _FixedDateZip(zipfile.ZipFile):
    """A zip whose members carry one fixed date, so the same sheet is the same bytes (the synthetic generator's
    promise); openpyxl would stamp each member with the time of writing (or its temporary file's)."""

    def writestr(self, zinfo_or_arcname, data, *args, **kwargs):
        if isinstance(zinfo_or_arcname, str):
            zinfo_or_arcname = zipfile.ZipInfo(zinfo_or_arcname, date_time=(1980, 1, 1, 0, 0, 0))
            zinfo_or_arcname.compress_type = self.compression
        return super().writestr(zinfo_or_arcname, data, *args, **kwargs)

    def write(self, filename, arcname=None, *args, **kwargs):
        return self.writestr(str(arcname or filename), Path(filename).read_bytes())


FIXED_DATE = datetime(2000, 1, 1)


def write_sheet(path: Path, rows: list[tuple[str, str]]) -> None:
    """An LViT sheet: `Sheet1` with the header `Image | Description` and one row per (image cell, description),
    written deterministically."""
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "Sheet1"
    sheet.append(list(COLUMNS))
    for row in rows:
        sheet.append(list(row))
    book.properties.created = book.properties.modified = FIXED_DATE
    buffer = BytesIO()
    with _FixedDateZip(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        ExcelWriter(book, archive).save()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())


def write_lvit_synth(root: Path, folder: Path, files: dict[str, list[dict]]) -> None:
    """Write synthetic LViT datasets into `folder`. `files` maps a sheet (`<dataset>/<Split>_Folder/<name>.xlsx`) to
    its rows, each `{"Image": cell, "Description": note, "files": {path in the sheet's folder: path under root}}`:
    the rows become the sheet, and each file (`img/…`, `labelcol/…`) is linked from `root`."""
    for rel, rows in sorted(files.items()):
        sheet = folder / rel
        for row in rows:
            for dest, source in sorted(row["files"].items()):
                link_or_copy(root / source, sheet.parent / dest)
        write_sheet(sheet, [(row["Image"], row["Description"]) for row in rows])


register(Reader(KIND, stage_by_converting(KIND, convert_lvit), convert=convert_lvit,
                write_synth=write_lvit_synth,
                describe="LViT layout (QaTa-COV19, MosMedData+): {Train,Val,Test}_Folder/{img,labelcol,*_text.xlsx}"))
