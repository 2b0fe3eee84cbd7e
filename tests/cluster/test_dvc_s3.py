"""DVC push and pull against an S3-compatible endpoint on loopback: moto's S3 server (the most real S3 that installs
here: MinIO's server is not on PyPI, Debian or npm), through the cluster profile's remote settings."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from medplib.config import load_config
from medplib.config.profile import load_profile
from medplib.data.ingest import ingest, verify_data
from medplib.data.versioning import checkout_version, data_status, read_version


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_push_then_pull_a_data_version_through_s3(s3, home, project, tmp_path: Path):
    remote = load_profile("cluster").dvc  # what a RunContext of `--profile cluster` hands down
    v1 = ingest("synth", project, home, load_config("tiny", {"data": {"synth_n": 8}}), seed=1, remote=remote).version
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="medplib-data", Prefix="dvc/").get("Contents", [])]
    assert keys and all(k.startswith("dvc/files/md5/") for k in keys)  # pushed to the bucket
    assert data_status(project, home, remote)["pushed"] is True
    pointer_v1 = (project / "data.dvc").read_text()
    ingest("synth", project, home, load_config("tiny", {"data": {"synth_n": 8}}), seed=2, remote=remote)  # moves on

    # a fresh clone elsewhere: only data.dvc, no local cache, pulls version 1 from S3
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "data.dvc").write_text(pointer_v1)
    shutil.rmtree(home.root / "dvc-site-cache", ignore_errors=True)
    checkout_version(clone, home, remote)
    assert read_version(clone) == v1
    assert verify_data(clone / "data") > 0  # every file as ingest recorded it
