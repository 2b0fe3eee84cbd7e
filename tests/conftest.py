"""Shared fixtures: every test gets its own state folder; nothing touches the repository's .medplib/."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from medplib.config import resolve_home

    h = resolve_home(tmp_path / "home").ensure()
    monkeypatch.setenv("MEDPLIB_HOME", str(h.root))
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(h.root / "dvc-site-cache"))
    return h


@pytest.fixture
def ray_home(home, monkeypatch: pytest.MonkeyPatch):
    """A state folder for tests that start a local Ray cluster; Ray's workers can import tests.* recipes."""
    import ray

    from medplib.config.home import REPO_ROOT

    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    yield home
    ray.shutdown()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    p = tmp_path / "project"
    p.mkdir()
    return p


@pytest.fixture(autouse=True, scope="session")
def _mlflow_default_in_tmp(tmp_path_factory):
    """A stray fluent MLflow call (no explicit URI) writes to a temp sqlite, never into the repository."""
    d = tmp_path_factory.mktemp("mlflow-default")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{d}/mlflow.db"
    yield
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(autouse=True)
def _no_leaks_between_tests():
    """Whatever a test does to os.environ or MLflow's process-wide URIs is undone after it: one test's profile
    (PREFECT_API_URL) or registry URI must not steer the next test."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = dict(os.environ)
    uris = tracking_utils._tracking_uri, registry_utils._registry_uri
    yield
    for key in set(os.environ) - set(env):
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value
    tracking_utils._tracking_uri, registry_utils._registry_uri = uris
