"""The data quality gate: a Great Expectations suite, defined in code, over the normalised dataset.

Three tables are built from `data/` as it is on disk now: one row per record (fields and values derived from the
conversation), one row per image and one row per (mask, image) pair, with statistics read from the files
themselves. Every image and mask of a record is in them: the query image, its masks and prompt masks, and the
record's context images and masks (a context mask is paired with its context image). A file that cannot be read becomes a flagged row, never an exception. Each table gets its own
expectation suite; Data Docs HTML for the run is written to the report folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import pandas as pd

from medplib.data.images import ImageReadError, read_image
from medplib import tasks
from medplib.data.schema import (
    IMAGE_TOKEN, MASK_RE, MODALITIES, REGION_RE, SEG_TOKEN, SPLITS, RecordError, modality_from_filename,
    parse_context,
)
from medplib.progress import track

log = logging.getLogger(__name__)

MIN_SIDE, MAX_SIDE = 16, 8192  # pixels per image side; smaller is not an image, larger is refused at read
N_EXAMPLES = 5
HELD_OUT = ("val", "test", "zeroshot")  # splits whose query images training must never see
SITE_NAME = "medplib"
# The key columns that name a row of each table in examples.
KEYS = {"records": ["line"], "images": ["path"], "masks": ["path", "image"]}


@dataclass
class ValidationReport:
    """Outcome of the gate: overall success, counts, one dict per expectation, and where the Data Docs are."""

    success: bool
    n_records: int
    n_images: int
    results: list[dict]
    data_docs: Path
    n_masks: int = 0

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.results if not r["success"]]

    def summary(self) -> str:
        head = (f"{self.n_records} records, {self.n_images} images, {self.n_masks} masks; "
                f"{len(self.results)} expectations")
        if self.success:
            return f"Validation passed: {head}, all met. Data Docs: {self.data_docs}"
        lines = [f"Validation FAILED: {len(self.failed)} of {len(self.results)} expectations not met ({head})."]
        for r in self.failed:
            target = f"{r['table']}.{r['column']}" if r["column"] else r["table"]
            what = r.get("error") or (f"{r['unexpected_count']} unexpected" if r["unexpected_count"]
                                      else f"observed {r['examples'][0]['observed_value']}" if r["examples"] else "")
            why = f" ({r['description']})" if r.get("description") else ""
            lines.append(f"  - {r['expectation']} on {target}{why}: {what}")
            lines += [f"      e.g. {json.dumps(e, ensure_ascii=False, default=str)}" for e in r["examples"]]
        lines.append(f"Data Docs: {self.data_docs}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"success": self.success, "n_records": self.n_records, "n_images": self.n_images,
                "n_masks": self.n_masks, "n_expectations": len(self.results), "n_failed": len(self.failed),
                "data_docs": str(self.data_docs), "results": self.results}


# ---------------------------------------------------------------------------------------------- tables from files

def _text(value: object) -> str:
    """Strings as they are, missing as '' and other JSON values as JSON text, so that set checks see them all
    (GX's set and range checks skip missing values)."""
    if value is None or isinstance(value, str):
        return value or ""
    return json.dumps(value, sort_keys=True, default=repr)


class _PathCheck:
    """Is a record's path safe (relative, inside the dataset folder: the gate never reads outside it) and there?"""

    def __init__(self, root: Path):
        self.root, self._cache = root, {}

    def status(self, rel: object) -> str:
        """'ok', 'unsafe' or 'missing'."""
        if not isinstance(rel, str):
            return "unsafe"
        if rel not in self._cache:
            p = PurePosixPath(rel)
            if (not rel.strip() or rel.startswith("\\") or (len(rel) > 1 and rel[1] == ":") or p.is_absolute()
                    or ".." in p.parts or not (self.root / p).resolve().is_relative_to(self.root)):
                self._cache[rel] = "unsafe"
            else:
                self._cache[rel] = "ok" if (self.root / p).is_file() else "missing"
        return self._cache[rel]


def _str_list(value: object) -> list:
    return value if isinstance(value, list) else []


def _record_row(line: int, text: str, paths: _PathCheck) -> dict:
    row: dict = {"line": line, "json_ok": False}
    try:
        rec = json.loads(text)
    except json.JSONDecodeError:
        return row
    if not isinstance(rec, dict):
        return row
    convs = rec.get("conversations")
    turns = convs if isinstance(convs, list) else []
    values = [t.get("value") if isinstance(t, dict) else None for t in turns]
    texts = [v if isinstance(v, str) else "" for v in values]
    roles = [t.get("from") if isinstance(t, dict) and isinstance(t.get("from"), str) else None for t in turns]
    image = rec.get("image")
    masks, regions = _str_list(rec.get("masks")), _str_list(rec.get("regions"))
    mask_tags = [p for t in texts for p in MASK_RE.findall(t)]
    region_tags = [p for t in texts for p in REGION_RE.findall(t)]
    try:
        context, context_ok = parse_context(rec.get("context"), f"line {line}"), True
    except RecordError:
        context, context_ok = [], False
    context_files = [p for c in context for p in (c["image"], c["mask"]) if p is not None]
    named = [image, *masks, *regions, *mask_tags, *region_tags, *context_files]
    unusable = {p for p in named if isinstance(p, str) and paths.status(p) != "ok"}
    task = rec.get("task")
    # The checks ingest runs too; an unregistered task is the task column's failure, not this one's.
    clean_turns = [t for t in turns if isinstance(t, dict)]
    target_ok = task not in tasks.names() or (tasks.get(task).check(clean_turns, mask_tags, region_tags) is None
                                              and tasks.get(task).check_context(context) is None)
    return {
        **row, "json_ok": True, "id": _text(rec.get("id")) or None, "image": _text(image),
        "modality": _text(rec.get("modality")),
        "image_modality": modality_from_filename(image) if isinstance(image, str) else None,
        "split": _text(rec.get("split")), "task": _text(task), "answer_type": _text(rec.get("answer_type")),
        "n_turns": len(turns),
        "roles_ok": all(r in ("human", "gpt") for r in roles) and {"human", "gpt"} <= set(roles),
        "min_turn_chars": min((len(t.strip()) for t in texts), default=None),  # no turns: n_turns says so
        "image_token": bool(texts) and IMAGE_TOKEN in texts[0],
        "n_seg": sum(t.count(SEG_TOKEN) for t in texts), "n_mask_tags": len(mask_tags),
        "n_region_tags": len(region_tags),
        "tags_listed": masks == mask_tags and regions == region_tags,
        "task_target": target_ok,
        "paths_safe": all(paths.status(p) != "unsafe" for p in named),
        "image_exists": paths.status(image) == "ok",
        "mask_files_exist": not any(p in unusable for p in mask_tags + masks if isinstance(p, str)),
        "region_files_exist": not any(p in unusable for p in region_tags + regions if isinstance(p, str)),
        "n_context": len(context), "context_ok": context_ok,
        "context_files_exist": all(isinstance(p, str) and p not in unusable for p in context_files),
        "missing_files": ", ".join(sorted(p for p in unusable if isinstance(p, str))) or None,
        "conversation_hash": hashlib.sha256(json.dumps(convs, sort_keys=True, default=repr).encode()).hexdigest()[:16],
        "context_hash": hashlib.sha256(json.dumps(context, sort_keys=True).encode()).hexdigest()[:16] if context
        else "",
        # not columns: the files the images and masks tables are built from
        "_mask_paths": list(dict.fromkeys(p for p in mask_tags + masks if isinstance(p, str))),
        "_region_paths": list(dict.fromkeys(p for p in region_tags + regions if isinstance(p, str))),
        "_context": [(c["image"], c["mask"]) for c in context if isinstance(c["image"], str)
                     and (c["mask"] is None or isinstance(c["mask"], str))],
    }


RECORD_COLUMNS = {  # column → dtype; rows whose line is not JSON leave everything after json_ok missing
    "line": "int64", "json_ok": "bool", "id": "object", "image": "object", "modality": "object",
    "image_modality": "object", "split": "object", "task": "object", "answer_type": "object", "n_turns": "Int64",
    "roles_ok": "boolean", "min_turn_chars": "Int64", "image_token": "boolean", "n_seg": "Int64",
    "n_mask_tags": "Int64", "n_region_tags": "Int64", "tags_listed": "boolean", "task_target": "boolean",
    "paths_safe": "boolean", "image_exists": "boolean", "mask_files_exist": "boolean",
    "region_files_exist": "boolean", "n_context": "Int64", "context_ok": "boolean", "context_files_exist": "boolean",
    "missing_files": "object", "conversation_hash": "object", "context_hash": "object",
    "zeroshot_held_out": "boolean",
}
IMAGE_COLUMNS = {"path": "object", "readable": "bool", "error": "object", "width": "Int64", "height": "Int64",
                 "channels": "Int64", "n_records": "int64", "n_splits": "int64", "splits": "object",
                 "context_splits": "object", "no_context_leak": "bool"}
MASK_COLUMNS = {"path": "object", "image": "object", "used_as": "object", "record": "object", "readable": "bool",
                "error": "object", "width": "Int64", "height": "Int64", "image_width": "Int64",
                "image_height": "Int64", "channels": "Int64", "binary": "boolean", "fg_fraction": "float64"}


def _frame(rows: list[dict], columns: dict[str, str]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(columns))
    return df.astype(columns) if len(df) else pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})


def _file_stats(path: Path, as_mask: bool) -> dict:
    """Size and channels of an image; for masks also whether only 0/255 occur and the foreground fraction."""
    try:
        arr = read_image(path)
    except ImageReadError as e:
        return {"readable": False, "error": str(e)}
    stats = {"readable": True, "height": arr.shape[0], "width": arr.shape[1],
             "channels": 1 if arr.ndim == 2 else arr.shape[2]}
    if as_mask:
        stats["binary"] = not bool(np.any((arr != 0) & (arr != 255)))
        fg = arr.max(axis=2) if arr.ndim == 3 else arr
        stats["fg_fraction"] = float(np.count_nonzero(fg)) / fg.size
    return stats


def _source(root: Path) -> str | None:
    """The source kind ingest recorded in `manifest.json` (`synth`, `mecovqa`, …), or None without a manifest."""
    try:
        return json.loads((root / "manifest.json").read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        return None


def build_tables(data_dir: Path) -> dict[str, pd.DataFrame]:
    """The three tables the suites check: records, images and masks, derived from `data_dir` as it is now."""
    root = Path(data_dir).resolve()
    records_path = root / "records.jsonl"
    if not records_path.is_file():
        raise FileNotFoundError(f"No records at {records_path}: run `medplib data ingest` first")
    paths = _PathCheck(root)
    lines = records_path.read_bytes().splitlines()
    rows = []
    for i, raw in enumerate(track(lines, "validate: records", "records", disable=len(lines) < 20000), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            rows.append({"line": i, "json_ok": False})
            continue
        if text.strip():
            rows.append(_record_row(i, text, paths))
    # Synthetic data knows its zero-shot modalities (those with zero-shot records): none of their grounding
    # records may be trained on. (Real MeCoVQA's zero-shot sets share modalities with training; the image-level
    # leak check below covers them.)
    held_out = {r.get("modality") for r in rows if r.get("split") == "zeroshot"} if _source(root) == "synth" else set()
    asked_zeroshot = {t.name for t in tasks.all_tasks() if t.zeroshot}
    for row in rows:
        if row.get("json_ok"):
            row["zeroshot_held_out"] = not (row.get("split") == "train" and row.get("task") in asked_zeroshot
                                            and row.get("modality") in held_out)
    records = _frame(rows, RECORD_COLUMNS)

    # The existing files each record uses, and in which splits an image is asked about (the query image) or shown
    # as context: what the leak checks need.
    image_splits: dict[str, set] = {}
    context_splits: dict[str, set] = {}
    n_uses: Counter = Counter()
    mask_uses: dict[tuple[str, str], dict] = {}

    def use_mask(path: str, image: str, kind: str, record: object) -> None:
        if paths.status(path) == "ok":
            mask_uses.setdefault((path, image), {"used_as": set(), "record": record})["used_as"].add(kind)

    for row in rows:
        context = [(image, mask) for image, mask in row.get("_context", []) if paths.status(image) == "ok"]
        for image, mask in context:
            context_splits.setdefault(image, set()).add(row["split"])
            if mask is not None:
                use_mask(mask, image, "context", row["id"])
        n_uses.update({image for image, _ in context} - {row.get("image")})
        if not row.get("image_exists"):
            continue
        n_uses[row["image"]] += 1
        image_splits.setdefault(row["image"], set()).add(row["split"])
        for kind in ("mask", "region"):
            for p in row[f"_{kind}_paths"]:
                use_mask(p, row["image"], kind, row["id"])
    image_files = sorted(set(image_splits) | set(context_splits))
    mask_files = sorted({p for p, _ in mask_uses})
    todo = [(p, False) for p in image_files] + [(p, True) for p in mask_files]
    stats = {(p, as_mask): _file_stats(root / p, as_mask)
             for p, as_mask in track(todo, "validate: reading files", "files", disable=len(todo) < 500)}

    def splits_text(splits: set) -> str:
        return ",".join(sorted(map(str, splits)))

    images = _frame([{"path": p, "error": None, **stats[(p, False)], "n_records": n_uses[p],
                      "n_splits": len(image_splits.get(p, ())), "splits": splits_text(image_splits.get(p, set())),
                      "context_splits": splits_text(context_splits.get(p, set())),
                      "no_context_leak": not (image_splits.get(p, set()) & set(HELD_OUT)
                                              and "train" in context_splits.get(p, ()))}
                     for p in image_files], IMAGE_COLUMNS)
    masks = _frame([{"path": p, "image": image, "used_as": ",".join(sorted(use["used_as"])), "record": use["record"],
                     "error": None, **stats[(p, True)], "image_width": stats[(image, False)].get("width"),
                     "image_height": stats[(image, False)].get("height")}
                    for (p, image), use in sorted(mask_uses.items())], MASK_COLUMNS)
    return {"records": records, "images": images, "masks": masks}


# ----------------------------------------------------------------------------------------------------- the suites

def build_suites() -> dict[str, list]:
    """The expectations per table, each with the sentence Data Docs and the summary show.

    `meta.show` names the extra columns an example row carries (the key columns and the checked ones always do).
    Descriptions avoid angle brackets: Data Docs put them into the HTML unescaped.
    """
    import great_expectations.expectations as gxe

    def show(*columns: str) -> dict:
        return {"show": list(columns)}

    def holds(column: str, description: str, *extra: str):  # a derived flag that must be true on every row
        return gxe.ExpectColumnValuesToBeInSet(column=column, value_set=[True], description=description,
                                               meta=show(*extra))

    def in_set(column: str, values, *extra: str):
        return gxe.ExpectColumnValuesToBeInSet(column=column, value_set=list(values), meta=show(*extra))

    def between(column: str, low=None, high=None, description: str | None = None, *extra: str, **kw):
        return gxe.ExpectColumnValuesToBeBetween(column=column, min_value=low, max_value=high,
                                                 description=description, meta=show(*extra), **kw)

    def equal(a: str, b: str, description: str, *extra: str):
        return gxe.ExpectColumnPairValuesToBeEqual(column_A=a, column_B=b, ignore_row_if="either_value_is_missing",
                                                   description=description, meta=show(*extra))

    records = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, description="The dataset has at least one record."),
        holds("json_ok", "Every line of records.jsonl is a JSON object."),
        gxe.ExpectColumnValuesToNotBeNull(column="id", description="Every record has an id."),
        gxe.ExpectColumnValuesToBeUnique(column="id", meta=show("image")),
        in_set("modality", MODALITIES, "id", "image"),
        equal("modality", "image_modality", "The modality is the image file name's prefix.", "id", "image"),
        in_set("split", SPLITS, "id"),
        in_set("task", tasks.names(), "id"),
        in_set("answer_type", ("open", "closed"), "id"),
        between("n_turns", 2, None, "The conversation is not empty: at least a question and an answer.", "id"),
        holds("roles_ok", "Turns come from 'human' or 'gpt', and both speak.", "id"),
        between("min_turn_chars", 1, None, "No turn is empty.", "id"),
        holds("image_token", "The first turn carries the image placeholder.", "id"),
        equal("n_seg", "n_mask_tags", "One mask path per SEG token.", "id"),
        holds("tags_listed", "The masks and regions fields list exactly the mask and region paths of "
                             "the conversation.", "id"),
        holds("task_target", "Each record passes its task's check, the one ingest runs (a grounding record "
                             "needs a mask, ...).", "id", "task"),
        holds("paths_safe", "Paths are relative and stay inside the dataset folder.", "id", "image"),
        holds("image_exists", "The image file exists.", "id", "missing_files"),
        holds("mask_files_exist", "Every mask tag names an existing mask file.", "id", "missing_files"),
        holds("region_files_exist", "Every region tag names an existing prompt mask.", "id", "missing_files"),
        holds("context_ok", "The context field, if any, is a list of image paths each with a mask path or null.",
              "id"),
        holds("context_files_exist", "Every context image and context mask exists.", "id", "missing_files"),
        holds("zeroshot_held_out", "Zero-shot means held out: in synthetic data, no record of a zero-shot task "
                                   "about a zero-shot modality is in train.", "id", "image", "modality", "task"),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["image", "conversation_hash", "context_hash"],
                                            meta=show("id"), description="No duplicate records: same image, same "
                                                                         "conversation and same context."),
    ]
    images = [
        holds("readable", "The image decodes (not truncated or corrupt, not a decompression bomb).", "error"),
        between("width", MIN_SIDE, MAX_SIDE),
        between("height", MIN_SIDE, MAX_SIDE),
        in_set("channels", (1, 3)),
        between("n_splits", 0, 1, "An image is asked about in one split only (no train/test leak); an image only "
                "shown as context is asked about in none.", "splits"),
        holds("no_context_leak", "No test or zero-shot image is shown as a context image in a training record "
                                 "(no train/test leak); a training image may be a test record's context example.",
              "splits", "context_splits"),
    ]
    masks = [
        holds("readable", "The mask decodes.", "error", "record"),
        equal("width", "image_width", "The mask is as wide as its image.", "height", "image_height", "record"),
        equal("height", "image_height", "The mask is as high as its image.", "width", "image_width", "record"),
        in_set("channels", (1,), "record"),
        holds("binary", "The mask is binary: only 0 and 255.", "record"),
        between("fg_fraction", 0, 1, "The mask is not empty: foreground fraction in (0, 1].", "record",
                strict_min=True),
    ]
    return {"records": records, "images": images, "masks": masks}


@contextmanager
def _quiet_gx() -> Iterator[None]:
    """GX logs at INFO about its in-memory stores; keep the gate's output to what failed."""
    logger = logging.getLogger("great_expectations")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    return value if isinstance(value, (str, int, float, bool)) else str(value)


def _result_dict(table: str, result, df: pd.DataFrame, row_of: dict[tuple, int]) -> dict:
    cfg = result.expectation_config
    kw = cfg.kwargs
    columns = [kw["column"]] if "column" in kw else (
        [kw["column_A"], kw["column_B"]] if "column_A" in kw else list(kw.get("column_list", [])))
    show = [c for c in KEYS[table] + columns + list((cfg.meta or {}).get("show", [])) if c in df.columns]
    examples = []
    for hit in (result.result or {}).get("partial_unexpected_index_list") or []:
        i = row_of.get(tuple(_jsonable(hit.get(k)) for k in KEYS[table]))
        if i is not None:
            examples.append({c: _jsonable(df.iloc[i][c]) for c in dict.fromkeys(show)})
    if not examples and "observed_value" in (result.result or {}):
        examples = [{"observed_value": _jsonable(result.result["observed_value"])}]
    out = {"table": table, "expectation": cfg.type, "column": ",".join(columns) or None,
           "description": cfg.description,
           "success": bool(result.success), "unexpected_count": int((result.result or {}).get("unexpected_count") or 0),
           "examples": examples[:N_EXAMPLES]}
    info = result.exception_info or {}  # one dict, or one per metric when a metric raised
    errors = [i.get("exception_message") for i in ([info] if "raised_exception" in info else info.values())
              if isinstance(i, dict) and i.get("raised_exception")]
    if errors:
        out["error"] = "; ".join(map(str, errors))
    return out


def validate_dataset(data_dir: Path, report_dir: Path) -> ValidationReport:
    """Run the gate on `data_dir`; write Data Docs HTML under `report_dir`; never raises on bad data."""
    tables = build_tables(data_dir)
    report_dir = Path(report_dir).resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_gx():
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig, InMemoryStoreBackendDefaults, ProgressBarsConfig,
        )

        # In-memory stores, no temporary docs site, no progress bars; one filesystem Data Docs site: report_dir.
        context = gx.get_context(mode="ephemeral", project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            data_docs_sites={SITE_NAME: {
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(report_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}}},
            analytics_enabled=False, progress_bars=ProgressBarsConfig(globally=False)))
        source = context.data_sources.add_pandas("medplib_data")
        results = []
        for table, expectations in build_suites().items():
            df = tables[table]
            suite = context.suites.add(gx.ExpectationSuite(name=f"medplib_{table}"))
            for expectation in expectations:
                suite.add_expectation(expectation)
            batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
            run = context.validation_definitions.add(gx.ValidationDefinition(name=table, data=batch, suite=suite))
            outcome = run.run(batch_parameters={"dataframe": df}, result_format={
                "result_format": "SUMMARY", "partial_unexpected_count": N_EXAMPLES,
                "unexpected_index_column_names": KEYS[table], "return_unexpected_index_query": False})
            row_of = {tuple(_jsonable(v) for v in key): i
                      for i, key in enumerate(df[KEYS[table]].itertuples(index=False, name=None))}
            results += [_result_dict(table, r, df, row_of) for r in outcome.results]
        context.build_data_docs(site_names=[SITE_NAME])
    report = ValidationReport(
        success=all(r["success"] for r in results), n_records=len(tables["records"]),
        n_images=len(tables["images"]), n_masks=len(tables["masks"]), results=results,
        data_docs=report_dir / "index.html")
    log.debug("validation %s: %d/%d expectations met; Data Docs at %s", "passed" if report.success else "FAILED",
             len(results) - len(report.failed), len(results), report.data_docs)
    return report
