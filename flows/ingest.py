"""The ingest step: source → `data/` (normalised, quarantined, DVC-versioned), skipped when nothing changed.

The ingest task is cached on the source's content fingerprint *and* the dataset version `data/` holds now, so a
cache hit means "this source was ingested and `data/` still holds that result". A real ingest changes the data
version, so it also stores its result under the key of the state it leaves behind: the next run on the same
source and untouched `data/` finds it. Results persist under `<MEDPLIB_HOME>/prefect/storage`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.context import TaskRunContext
from prefect.results import get_result_store

from medplib import tasks
from medplib.config import Config, RunContext, to_dict
from medplib.data import readers
from medplib.data.ingest import ingest, parse_source
from medplib.data.versioning import data_status

# The code that decides what a source turns into: a change to it must not be served from the cache. The source
# readers and the tasks (record checks, synthetic records) come from their registries, so a new one counts too.
_INGEST_CODE = ("data/ingest.py", "data/schema.py", "data/synth.py", "data/images.py")


def ingest_code_files() -> list[Path]:
    """Every source file whose change can change what ingest writes: ingest itself, the registered readers and
    the registered tasks."""
    import medplib

    package = Path(medplib.__file__).parent
    return sorted({*(package / rel for rel in _INGEST_CODE), *readers.code_files(), *tasks.code_files()})


def source_fingerprint(spec: str, cfg: Config, seed: int | None = None) -> str:
    """SHA-256 over what determines the ingested dataset: the source's files (or, for the deterministic
    synthetic generator, its parameters), the data config and medplib's ingest code."""
    import medplib

    kind, path = parse_source(spec)
    h = hashlib.sha256()
    data_cfg = to_dict(cfg.data)
    h.update(json.dumps({"kind": kind, "data": data_cfg,
                         "seed": data_cfg["synth_seed"] if seed is None else seed}, sort_keys=True).encode())
    package = Path(medplib.__file__).parent
    for f in ingest_code_files():
        name = f.relative_to(package).as_posix() if f.is_relative_to(package) else f.name
        h.update(name.encode() + f.read_bytes())
    if path is not None:
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            with f.open("rb") as fh:
                h.update(f.relative_to(path).as_posix().encode() + b"\0" + hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def ingest_cache_key(fingerprint: str, project: Path, data_version: str | None) -> str:
    """`ingest-<source>-<project>-<version in data/>`; `data_version` None means no dataset yet."""
    where = hashlib.sha256(str(Path(project).resolve()).encode()).hexdigest()[:12]
    return f"ingest-{fingerprint[:32]}-{where}-{data_version or 'none'}"


def _cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return ingest_cache_key(parameters["fingerprint"], parameters["ctx"].project, parameters["data_version"])


@task(name="fingerprint-source", cache_policy=NONE)
def fingerprint_source(source: str, ctx: RunContext, seed: int | None = None) -> str:
    return source_fingerprint(source, ctx.cfg, seed)


@task(name="current-data-version", cache_policy=NONE)
def current_data_version(ctx: RunContext) -> str | None:
    """The DVC version `data/` holds, with a `-modified` suffix when its files no longer match `data.dvc`."""
    status = data_status(ctx.project, ctx.home, ctx.profile.dvc)
    if status["version"] is None:
        return None
    return status["version"] if status["in_sync"] else f"{status['version']}-modified"


@task(name="ingest", cache_key_fn=_cache_key, persist_result=True)
def ingest_source(source: str, fingerprint: str, data_version: str | None, ctx: RunContext,
                  seed: int | None = None) -> dict:
    """medplib's ingest; on success its result is also cached under the key of the dataset it wrote."""
    result = ingest(source, ctx.project, ctx.home, ctx.cfg, seed=seed, remote=ctx.profile.dvc).to_dict()
    if result["version"] != data_version:
        get_result_store().write(result, key=ingest_cache_key(fingerprint, ctx.project, result["version"]))
    return result


@flow(name="ingest")
def ingest_flow(source: str = "synth", preset: str = "tiny", config: Path | None = None, home: Path | None = None,
                project: Path | None = None, seed: int | None = None, retries: int = 1,
                retry_delay_seconds: float = 10.0, profile: str = "local", context: RunContext | None = None) -> dict:
    """Ingest `source` into `<project>/data` unless it already holds this source's result; adds `cached`. A
    `context` (the pipeline's) is used as given; without one, it is resolved here from the other parameters."""
    ctx = context or RunContext.resolve(preset, config, home, project, profile)
    fingerprint = fingerprint_source(source, ctx, seed)
    before = current_data_version(ctx)
    state = ingest_source.with_options(
        retries=retries, retry_delay_seconds=retry_delay_seconds, result_storage=ctx.home.prefect / "storage",
    )(source, fingerprint, before, ctx, seed, return_state=True)
    result = {**state.result(), "cached": state.name == "Cached"}
    logger = get_run_logger()
    if result["cached"]:
        logger.info("Source %s unchanged and data/ still holds its dataset %s: ingest skipped (cached)",
                    result["source"], result["version"])
    else:
        logger.info("Ingested %s: %d records = %d valid + %d quarantined; dataset version %s", result["source"],
                    result["total"], result["valid"], result["quarantined"], result["version"])
    return result
