"""DVC push and pull against an S3-compatible endpoint on loopback: moto's S3 server (the most real S3 that installs
here: MinIO's server is not on PyPI, Debian or npm), through the cluster profile's remote settings."""
from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from medplib.config import load_config
from medplib.config.profile import load_profile
from medplib.data.ingest import ingest, verify_data
from medplib.data.versioning import checkout_version, data_status, read_version


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # credentials from the environment only, as the cluster profile wants (moto accepts any)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "medplib-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "medplib-test-key")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="medplib-data")
    monkeypatch.setenv("MEDPLIB_S3_ENDPOINT", endpoint)
    monkeypatch.setenv("MEDPLIB_DVC_REMOTE", "s3://medplib-data/dvc")
    yield boto3.client("s3", endpoint_url=endpoint)
    server.stop()


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
