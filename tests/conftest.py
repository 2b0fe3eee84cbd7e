"""Shared fixtures: every test gets its own state folder; nothing touches the repository's .medplib/.

Tiers (markers, see pyproject.toml): a test is `unit` unless it is marked `integration` (real services, Ray,
training) or `e2e` (whole pipelines). `make test-fast` runs the unit tier, `make test` all three.
End-to-end tests that need a trained, registered model share `pipeline_runs`: one tiny pipeline per session.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

# Prefect reads its settings when first imported: give the suite its own PREFECT_HOME before that.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="medplib-prefect-home-")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
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


@pytest.fixture(scope="session")
def _ray_state(tmp_path_factory):
    """Where the session's local Ray keeps its temp files; Ray is stopped at the end of the session."""
    import ray

    from medplib.config import resolve_home

    yield resolve_home(tmp_path_factory.mktemp("ray-session") / "home").ensure()
    ray.shutdown()


def _session_ray(state) -> None:
    """The session's local Ray, started on first use (4-8 s each time, so tests share it): tests that train on Ray
    use it instead of starting and stopping their own. Ray's workers inherit the environment Ray starts with:
    PYTHONPATH names the repository, so they import tests.* recipes. A test that needs its own cluster (the
    two-node test) stops it; the next test that needs Ray starts it again."""
    import ray

    from medplib.config.home import REPO_ROOT
    from medplib.train.launcher import ensure_ray

    if ray.is_initialized():
        return
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", str(REPO_ROOT))
        ensure_ray(state)


@pytest.fixture
def ray_home(home, _ray_state):
    """A state folder for tests that train on the session's local Ray."""
    _session_ray(_ray_state)
    return home


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


TIERS = ("unit", "integration", "e2e")


# Session fixtures that train, and the test files that use them. `make test` runs the suite in 2 pytest-xdist
# processes; each of these groups runs in one process (SharedFixtureScheduling), so each fixture is built once, not
# once per process. (xdist's own `--dist loadgroup` does not group under pytest 9: it renames `Item._nodeid`, which
# pytest 9 no longer reads.) Collection fails when a test elsewhere asks for one of these fixtures.
SHARED = {
    "pipeline_runs": ("tests/flows/test_pipeline_flow.py", "tests/train/test_stage_recipe.py",
                      "tests/flows/test_ui_browser.py", "tests/flows/test_docs_commands.py"),
    "toy_clean_run": ("tests/reliability/test_worker_death.py", "tests/train/test_ray_deepspeed.py",
                      "tests/train/test_zero3.py"),
    # no fixture: medplib.eval.metrics keeps one METEOR process (~7 s to load its paraphrase table) per process
    "meteor": ("tests/eval/test_caption_metrics.py", "tests/eval/test_refer_tasks.py",
               "tests/eval/test_report_task.py"),
}


def pytest_collection_modifyitems(config, items):
    """Every test belongs to exactly one tier; an unmarked test is a unit test. A test that uses a shared trained
    fixture lives in one of that fixture's files."""
    for item in items:
        tiers = [t for t in TIERS if item.get_closest_marker(t)]
        if len(tiers) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked {tiers}: a test belongs to one tier")
        if not tiers:
            item.add_marker("unit")
        path = item.nodeid.split("::", 1)[0]
        for fixture, files in SHARED.items():
            if fixture in getattr(item, "fixturenames", ()) and path not in files:
                raise pytest.UsageError(f"{item.nodeid} uses the session fixture {fixture!r}: add {path} to "
                                        f"SHARED[{fixture!r}] in tests/conftest.py so its tests share one process")


def pytest_xdist_make_scheduler(config, log):
    """Under xdist: each SHARED group is one unit of work (largest first), every other test its own unit."""
    from xdist.scheduler import LoadScopeScheduling

    group = {path: fixture for fixture, files in SHARED.items() for path in files}

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group.get(nodeid.split("::", 1)[0], nodeid)

    return SharedFixtureScheduling(config, log)


def pytest_sessionstart(session):
    session.config._medplib_t0 = time.perf_counter()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    t0 = getattr(config, "_medplib_t0", None)
    if t0 is not None:
        markexpr = config.getoption("markexpr") or "all tiers"
        terminalreporter.write_line(f"medplib suite ({markexpr}): {time.perf_counter() - t0:.0f} s wall time")


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the session (entering it costs 10-15 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


ONE_EPOCH = {stage: {"epochs": 1} for stage in (1, 2, 3, 4)}


@pytest.fixture(scope="session")
def pipeline_runs(prefect_harness, _ray_state, tmp_path_factory):
    """The session's tiny pipeline, run twice on one home and project (48 synthetic images, one epoch a stage, one Ray
    worker): the first trains stages I-IV and registers version 1; the second finds ingest cached, trains stage I
    only and registers version 2 (a one-stage pipeline keeps `reproduce` of it cheap). Returns (home, project, first,
    second)."""
    from flows.pipeline import pipeline
    from medplib.config import resolve_home

    root = tmp_path_factory.mktemp("pipeline")
    home = resolve_home(root / "home").ensure()
    project = root / "project"
    project.mkdir()
    small = root / "small.yaml"
    # a stage key from the config file (train.stage4.lr) reaches the stage's MLflow run (tests/train)
    small.write_text("data:\n  synth_n: 48\ntrain:\n  stage4:\n    lr: 0.0005\n")
    _session_ray(_ray_state)
    saved = dict(os.environ)
    os.environ["MEDPLIB_HOME"] = str(home.root)
    os.environ["DVC_SITE_CACHE_DIR"] = str(home.root / "dvc-site-cache")
    try:
        # one Ray worker a stage: the distributed loop (2 workers, 2 nodes, a killed worker) is tested on the toy
        # recipe in tests/train and tests/reliability; here a second worker would only add its start-up to each job
        kwargs = dict(config=small, home=home.root, project=project, retries=0, workers=1)
        first = pipeline(**kwargs, stage_overrides=ONE_EPOCH)
        second = pipeline(**kwargs, stages=[1], stage_overrides={1: ONE_EPOCH[1]})
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return home, project, first, second


@pytest.fixture(scope="session")
def toy_clean_run(_ray_state, tmp_path_factory):
    """The undisturbed toy stage on 2 Ray workers (ZeRO-2): the reference the fault-resume and ZeRO-3 tests
    compare with. Returns (out_dir, Ray Train result)."""
    from medplib.config import resolve_home
    from medplib.train.launcher import run_stage
    from medplib.train.worker import LoopConfig
    from tests.train.toy_recipe import TOY_BASE

    root = tmp_path_factory.mktemp("toy")
    home = resolve_home(root / "home").ensure()
    _session_ray(_ray_state)
    result = run_stage(LoopConfig(**TOY_BASE, out_dir=str(root / "clean")), home, "toy-clean", workers=2)
    return root / "clean", result
