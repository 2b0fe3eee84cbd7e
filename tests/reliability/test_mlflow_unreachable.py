"""Faults (issue 9): the MLflow server is unreachable: bounded retries, then a clear failure, nothing registered."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from medplib.config import load_tracking_config
from medplib.registry import Registry, RegistryError


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def _unreachable(tmp_path: Path) -> Registry:
    uri = f"http://127.0.0.1:{_closed_port()}"
    cfg = load_tracking_config()
    return Registry(type(cfg)(**{**vars(cfg), "tracking_uri": uri, "registry_uri": uri,
                                 "artifact_location": str(tmp_path / "artifacts")}))


def test_an_unreachable_server_fails_after_bounded_retries_naming_it(tmp_path: Path):
    registry = _unreachable(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(RegistryError, match=rf"MLflow server at {registry.cfg.tracking_uri} is unreachable after 3 "
                                            r"tries \(ConnectError.*Nothing was run or registered"):
        registry.check_reachable(tries=3, backoff=0.2)
    assert 0.6 <= time.monotonic() - t0 < 10  # it waited between tries (0.2 + 0.4 s), and not for long


def test_publish_stops_before_evaluating_or_registering(tmp_path: Path, home):
    from medplib.eval.publish import publish

    registry = _unreachable(tmp_path)
    with pytest.raises(RegistryError, match="unreachable"):
        # the model folder does not even exist: the check comes before anything reads or writes
        publish(tmp_path / "no-model", tmp_path / "no-data", "0" * 32 + ".dir", registry.cfg, config_digest="x")
    assert not (tmp_path / "artifacts").exists()


def test_a_local_sqlite_store_needs_no_server(home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import httpx

    asked: list[str] = []
    monkeypatch.setattr(httpx, "get", lambda url, **kw: asked.append(url) or httpx.Response(503))
    local = Registry(load_tracking_config().resolved(home))
    assert local.cfg.tracking_uri.startswith("sqlite:///")
    assert local.check_reachable(tries=1) is None and asked == []  # no server asked, nothing raised
    # the same call on a server URI does ask it (and a 503 fails): the check above was not vacuous
    with pytest.raises(RegistryError, match="/health did not answer 200"):
        _unreachable(tmp_path).check_reachable(tries=1)
    assert len(asked) == 1 and asked[0].endswith("/health")
