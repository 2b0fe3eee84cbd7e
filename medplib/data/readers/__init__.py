"""Source readers: each module registers a `Reader` that brings its source kind into the MeCoVQA layout.

`medplib data ingest --source KIND:DIR` (or `synth`) looks the kind up here; ingest then normalises the staged
folder with one code path. A new source is one module that calls `register(Reader(...))`, imported at the bottom
of this file (a plug-in or a test may register from anywhere and `unregister` when done).
"""
from __future__ import annotations

import hashlib
import inspect
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from medplib.data.schema import RecordError

if TYPE_CHECKING:
    from medplib.config import Config, Home


@dataclass
class StagingContext:
    """What a reader may use: the state home (for its staging folder), the config and the synth seed."""

    home: "Home"
    cfg: "Config"
    seed: int | None = None

    def fresh_dir(self, kind: str, key: str) -> Path:
        """An empty staging folder under the home, the same one for the same kind and key."""
        out = self.home.sources / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        if out.exists():
            shutil.rmtree(out)
        return out


# (folder in the MeCoVQA layout, problems found while converting, the canonical source name)
Staged = tuple[Path, list[RecordError], str]


@dataclass(frozen=True)
class Reader:
    """A source kind: `stage(folder or None, context)` returns the source in the MeCoVQA layout."""

    kind: str
    stage: Callable[[Path | None, StagingContext], Staged]
    takes_folder: bool = True  # KIND:DIR; False for a generated source named by its kind alone (synth)
    describe: str = ""
    # `convert(folder, out)`: write the source at `folder` into the MeCoVQA layout under `out`, which may already
    # hold other records and images; returns the problems. A kind with one and a `write_synth` can be part of the
    # synthetic source (tasks whose `synth_source` is this kind).
    convert: Callable[[Path, Path], list[RecordError]] | None = None
    # `write_synth(root, folder, files)`: write the synthetic records of the tasks kept in this kind's layout into
    # `folder` (`root/<kind>`): `files` maps each file (relative to `folder`, as `Task.synth_file` names it) to the
    # records the tasks' `synth` returned for it, in the shape this writer documents; the images and masks they
    # use are under `root`. The layout's own files (JSON lists, spreadsheets, image folders) are this writer's job.
    write_synth: Callable[[Path, Path, dict[str, list[dict]]], None] | None = None

    @property
    def module(self) -> str:
        return self.stage.__module__


def stage_by_converting(kind: str, convert: Callable[[Path, Path], list[RecordError]]
                        ) -> Callable[[Path | None, StagingContext], Staged]:
    """The `stage` of a kind that has a `convert`: convert the folder into a fresh staging folder of its own. The
    function counts as `convert`'s module's (`Reader.module`, whose source the ingest cache key hashes)."""
    def stage(path: Path | None, ctx: StagingContext) -> Staged:
        out = ctx.fresh_dir(kind, str(path))
        out.mkdir(parents=True)
        return out, convert(path, out), kind

    stage.__module__ = convert.__module__
    return stage


_READERS: dict[str, Reader] = {}


def register(reader: Reader) -> Reader:
    if reader.kind in _READERS:
        raise ValueError(f"Source kind {reader.kind!r} is already registered (by {_READERS[reader.kind].module})")
    _READERS[reader.kind] = reader
    return reader


def unregister(kind: str) -> None:
    _READERS.pop(kind, None)


def get(kind: str) -> Reader:
    if kind not in _READERS:
        raise KeyError(f"Source kind {kind!r} is not registered; registered kinds are {kinds()}")
    return _READERS[kind]


def kinds() -> list[str]:
    return list(_READERS)


def usage() -> str:
    """'synth | mecovqa:DIR | …' for help texts and errors."""
    return " | ".join(k + (":DIR" if r.takes_folder else "") for k, r in _READERS.items())


def parse_source(spec: str) -> tuple[Reader, Path | None]:
    """`KIND` (a generated source) or `KIND:DIR` with a registered kind; the folder must exist."""
    kind, sep, path = spec.partition(":")
    reader = _READERS.get(kind)
    if reader is None or (reader.takes_folder and not (sep and path)) or (not reader.takes_folder and sep):
        raise ValueError(f"Source {spec!r} is not understood: use one of {usage()}")
    if not reader.takes_folder:
        return reader, None
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"Source {spec!r}: folder {p} does not exist")
    return reader, p.resolve()


def code_files() -> list[Path]:
    """The source files of this registry and every registered reader (a cache key over them sees a reader fix)."""
    mods = {r.module for r in _READERS.values()} | {__name__}
    return sorted(Path(inspect.getsourcefile(sys.modules[m])) for m in mods)


# The built-in readers.
from medplib.data.readers import synthetic, mecovqa, dicom, nifti, medgrit, lvit, r2gen  # noqa: E402,F401
