"""The cluster tier's shared fixtures."""
from __future__ import annotations

import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on loopback, a bucket `medplib-data`, and the cluster profile's DVC remote pointed at it
    (MEDPLIB_S3_ENDPOINT, MEDPLIB_DVC_REMOTE); yields a boto3 client."""
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
