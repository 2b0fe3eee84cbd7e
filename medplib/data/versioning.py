"""DVC versioning of `data/`: the top-level `data.dvc` pointer, a local default remote in the state folder.

The dataset version is the DVC hash of `data/` (the `md5` in `data.dvc`, ending in `.dir`): the same files give
the same hash on any machine.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from medplib.config import Home
from medplib.config.profile import DvcProfile

REMOTE_NAME = "local"
DATASET_NAME = "medplib-data"  # how MLflow runs name the dataset they used (its digest is the version)


def _dvc_env(home: Home) -> None:
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    # DVC writes a site cache to /var/tmp/dvc otherwise; keep everything under the state folder.
    os.environ.setdefault("DVC_SITE_CACHE_DIR", str(home.root / "dvc-site-cache"))


@contextmanager
def open_repo(project: Path, home: Home, remote: DvcProfile | None = None) -> Iterator["object"]:
    """The DVC repo at `project`, created if absent, with its default remote set to the profile's `remote` (None:
    the local profile's folder in the state folder)."""
    from dvc.repo import Repo

    _dvc_env(home)
    project = Path(project).resolve()
    # DVC logs hints ("git add data.dvc", its greeting) at INFO, some through a stdout handler, and stdout holds
    # our --json output: keep its warnings and errors only while medplib drives it.
    dvc_log = logging.getLogger("dvc")
    level = dvc_log.level
    dvc_log.setLevel(logging.WARNING)
    if not (project / ".dvc").is_dir():
        Repo.init(str(project), no_scm=not (project / ".git").exists()).close()
    home.dvc_remote.mkdir(parents=True, exist_ok=True)
    repo = Repo(str(project))
    try:
        # config.local (not committed) points the default remote at this home's folder; the committed
        # .dvc/config holds the default for the repository's own `.medplib/`.
        with repo.config.edit(level="local") as conf:
            conf["remote"][REMOTE_NAME] = remote_config(home, remote)
            conf["core"]["remote"] = REMOTE_NAME
        yield repo
    finally:
        repo.close()
        dvc_log.setLevel(level)


def remote_config(home: Home, remote: DvcProfile | None = None) -> dict:
    """The profile's default remote (`RunContext.profile.dvc`; None: the local profile's): a folder in the state
    folder (local) or an S3-compatible bucket (cluster; credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in
    the environment)."""
    d = remote or DvcProfile()
    url = d.url.replace("{home}", str(home.root))
    conf = {"url": url if "://" in url else str(Path(url))}
    if d.endpoint_url:
        conf["endpointurl"] = d.endpoint_url
    return conf


def read_version(project: Path) -> str | None:
    """The dataset version recorded in `<project>/data.dvc`, or None if data was never ingested."""
    pointer = Path(project) / "data.dvc"
    if not pointer.exists():
        return None
    return yaml.safe_load(pointer.read_text(encoding="utf-8"))["outs"][0]["md5"]


def track_data(project: Path, home: Home, remote: DvcProfile | None = None) -> str:
    """`dvc add data` + `dvc push` to the default remote; returns the new version."""
    project = Path(project).resolve()
    with open_repo(project, home, remote) as repo:
        repo.add(str(project / "data"))
        repo.push()
    version = read_version(project)
    if version is None:
        raise RuntimeError(f"DVC did not write {project / 'data.dvc'}")
    return version


def data_status(project: Path, home: Home, remote: DvcProfile | None = None) -> dict:
    """Version, whether `data/` matches `data.dvc`, and whether the remote holds that version."""
    project = Path(project).resolve()
    version = read_version(project)
    if version is None:
        return {"version": None, "in_sync": False, "pushed": False, "data_dir": str(project / "data")}
    with open_repo(project, home, remote) as repo:
        local = repo.status(targets=[str(project / "data.dvc")])
        remote = repo.status(targets=[str(project / "data.dvc")], cloud=True)
    return {"version": version, "in_sync": not local, "pushed": not remote, "data_dir": str(project / "data")}


def checkout_version(project: Path, home: Home, remote: DvcProfile | None = None) -> None:
    """Restore `data/` to what `data.dvc` records, pulling from the remote if the cache lacks it."""
    project = Path(project).resolve()
    with open_repo(project, home, remote) as repo:
        repo.pull(targets=[str(project / "data.dvc")], force=True)


VERSION_RE = re.compile(r"[0-9a-f]{32}\.dir")


def pull_version(project: Path, home: Home, remote: DvcProfile | None = None, version: str | None = None) -> str:
    """Bring `<project>/data` to a dataset version from the remote: `version` (a DVC hash; `data.dvc` is written for
    it, so an empty folder will do), else the one `data.dvc` records. What a training job on a cluster runs first in
    its project folder on the shared volume. Returns the version; errors name what is missing."""
    project = Path(project).resolve()
    pointer = project / "data.dvc"
    if version is not None:
        if not VERSION_RE.fullmatch(version):
            raise ValueError(f"--version {version!r}: a dataset version is a DVC hash, 32 hex digits and '.dir' "
                             "(the digest MLflow shows for medplib-data, or `medplib data status`)")
        if read_version(project) != version:
            project.mkdir(parents=True, exist_ok=True)
            # DVC 3's pointer: `hash: md5` (without it DVC reads a 2.x hash and looks elsewhere in the remote)
            out = {"md5": version, "hash": "md5", "path": "data"}
            pointer.write_text(yaml.safe_dump({"outs": [out]}, sort_keys=False), encoding="utf-8")
    elif read_version(project) is None:
        raise FileNotFoundError(f"No {pointer}: name the dataset version to pull (--version HASH)")
    try:
        checkout_version(project, home, remote)
    except Exception as e:  # DVC's own errors: missing from the remote, unreachable remote
        raise FileNotFoundError(f"Could not pull dataset {read_version(project)} into {project / 'data'} from "
                                f"{remote_config(home, remote)['url']}: {type(e).__name__}: {e}") from e
    return read_version(project)


def dataset_record(project: Path, home: Home, data_version: str, remote: DvcProfile | None = None) -> dict:
    """The DVC version of `<project>/data` as an MLflow dataset input: name, digest (the DVC hash), source (the DVC
    remote, the path it versions, the pointer file) and profile (records per split and per task, from
    `records.jsonl`), for `medplib.registry.log_dataset`."""
    project = Path(project)
    splits: Counter[str] = Counter()
    tasks: Counter[str] = Counter()
    records = project / "data" / "records.jsonl"
    if records.is_file():
        for line in records.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                splits[r.get("split", "?")] += 1
                tasks[r.get("task", "?")] += 1
    source = {"remote": remote_config(home, remote)["url"], "path": "data", "pointer": str(project / "data.dvc")}
    profile = {"records": sum(splits.values()), "splits": dict(sorted(splits.items())),
               "tasks": dict(sorted(tasks.items()))}
    return {"name": DATASET_NAME, "digest": data_version, "source_type": "dvc", "source": json.dumps(source),
            "profile": json.dumps(profile)}
