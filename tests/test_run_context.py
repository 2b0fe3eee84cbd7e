"""One run context per command: resolved once at the entry (the command line or the top of a flow) and handed down;
the profile reaches MLflow, the DVC remote and Ray through it, never through $MEDPLIB_PROFILE below the entry."""
from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest

from medplib.config import RunContext
from medplib.config.home import REPO_ROOT
from medplib.config.profile import PROFILE_ENV, DvcProfile, Profile

EDGE_PROFILE = """
mlflow:
  tracking_uri: "sqlite:///{home}/edge.db"
  registry_uri: "sqlite:///{home}/edge.db"
dvc:
  url: "{home}/edge-remote"
ray_address: "ray://10.1.2.3:10001"
"""


@pytest.fixture
def edge_profiles(project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A profile `edge` that exists only in this test's project folder (`profiles/edge.yaml`, found before the
    packaged profiles), and no MEDPLIB_PROFILE anywhere."""
    folder = project / "profiles"
    folder.mkdir()
    (folder / "edge.yaml").write_text(EDGE_PROFILE)
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    return folder


def test_a_pipeline_command_resolves_its_context_once_and_every_step_gets_it(
        edge_profiles, home, project, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    import flows.pipeline as pipeline_module
    from medplib.config import context
    from medplib_cli.main import main

    resolved, loads = [], []
    original = RunContext.resolve.__func__

    def counting_resolve(cls, *a, **kw):
        resolved.append(original(cls, *a, **kw))
        return resolved[-1]

    def counting_load_config(*a, **kw):
        loads.append(a)
        return real_load_config(*a, **kw)

    real_load_config = context.load_config
    monkeypatch.setattr(RunContext, "resolve", classmethod(counting_resolve))
    monkeypatch.setattr(context, "load_config", counting_load_config)

    # the steps are stand-ins that record the context they are handed; the pipeline flow runs as a plain function
    seen: dict[str, RunContext] = {}

    def step(name, result):
        def run(*, context, **_):
            assert PROFILE_ENV not in __import__("os").environ  # nothing hands the profile over in the environment
            seen[name] = context
            return result
        return run

    class FakeRegistry:
        name = "medplib"

        def __init__(self, tracking):
            seen["registry"] = tracking

        def check_reachable(self):
            pass

        def experiment_id(self):
            return "1"

        def mark_trained(self, run_id, data_version):
            seen["trained"] = run_id, data_version

    ev = {"version": "1", "champion_version": "1", "metrics": {}, "promoted": True, "reason": "no champion yet"}
    stage = {"stage": 1, "name": "align", "out_dir": "/m/stage1", "first_loss": 2.0, "last_loss": 1.0}
    for name, value in (
            ("ingest_flow", step("ingest", {"version": "abc.dir", "source": "synth", "valid": 1, "quarantined": 0})),
            ("validate_flow", step("validate", {})),
            ("train_flow", step("train", [stage])),
            ("evaluate_flow", step("evaluate", ev)),
            ("Registry", FakeRegistry), ("get_run_logger", lambda: logging.getLogger("test")),
            ("_publish_artifact", lambda summary: None), ("mark_trained", pipeline_module.mark_trained.fn)):
        monkeypatch.setattr(pipeline_module, name, value)
    monkeypatch.setattr(pipeline_module.record, "start_run", lambda *a, **kw: "parent-run")
    monkeypatch.setattr(pipeline_module.record, "finish_run", lambda *a, **kw: None)
    monkeypatch.setattr(pipeline_module, "pipeline", pipeline_module.pipeline.fn)  # no Prefect server needed

    code = main(["pipeline", "--profile", "edge", "--home", str(home.root), "--project", str(project), "--stages",
                 "1", "--json"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["data_version"] == "abc.dir"
    assert len(resolved) == 1 and len(loads) == 1  # once per command, not once per step
    ctx = resolved[0]
    assert seen["ingest"] is ctx
    for name in ("validate", "train", "evaluate"):  # the same context, with the data version ingest produced
        assert seen[name].cfg is ctx.cfg and seen[name].profile is ctx.profile
        assert seen[name].data_version == "abc.dir"
    assert ctx.profile.name == "edge" and ctx.profile.ray_address == "ray://10.1.2.3:10001"
    assert seen["registry"].tracking_uri == f"sqlite:///{home.root}/edge.db"
    assert seen["trained"] == ("parent-run", "abc.dir")


def test_the_context_s_profile_reaches_the_dvc_remote_and_ray_without_the_environment(
        edge_profiles, home, project, monkeypatch: pytest.MonkeyPatch):
    from medplib.data.versioning import remote_config
    from medplib.train import runner

    ctx = RunContext.resolve(home=home, project=project, profile="edge")
    assert remote_config(ctx.home, ctx.profile.dvc) == {"url": str(home.root / "edge-remote")}
    assert remote_config(ctx.home) == {"url": str(home.dvc_remote)}  # no profile given: the local one

    start = tmp = project / "stage1"
    tmp.mkdir()
    (start / "config.json").write_text("{}")
    calls = {}

    def fake_run_stage(loop, home_, name, **kw):
        calls.update(kw, loop=loop)
        Path(loop.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(loop.out_dir) / "history.json").write_text('[{"step": 1, "loss": 1.0}]')

    monkeypatch.setattr(runner, "verify_data", lambda data_dir: 0)
    monkeypatch.setattr(runner, "run_stage", fake_run_stage)
    runner.train_stage(2, ctx, workers=1, base=start, track=False)
    assert calls["address"] == "ray://10.1.2.3:10001"
    runner.train_stage(2, ctx, workers=1, base=start, track=False, address="ray://other:10001")
    assert calls["address"] == "ray://other:10001"  # --ray-address wins over the profile


def test_a_context_built_by_hand_needs_no_files():
    ctx = RunContext.resolve(config={"data": {"synth_n": 12}}, home=Path("/tmp/medplib-ctx-test-home"),
                             profile=Profile(name="custom", dvc=DvcProfile(url="/srv/remote")))
    assert ctx.cfg.data.synth_n == 12 and ctx.profile.dvc.url == "/srv/remote"
    assert ctx.tracking.registered_model == "medplib" and ctx.tracking.gate.primary_metric == "grounding_mdice"
    assert ctx.with_data_version("v.dir").data_version == "v.dir" and ctx.data_version is None
    assert ctx.with_stage_overrides({3: {"epochs": 2}}).cfg.train.stage3.epochs == 2


def _code_files():
    for folder in ("medplib", "flows", "medplib_cli"):
        yield from sorted((REPO_ROOT / folder).rglob("*.py"))


def test_medplib_profile_is_read_only_at_the_command_line_entry():
    """$MEDPLIB_PROFILE is looked up in medplib_cli/main.py alone, and nothing calls load_profile() without a
    name (which once meant: whatever the environment says)."""
    readers, unnamed = set(), []
    for path in _code_files():
        rel = str(path.relative_to(REPO_ROOT))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            text = ast.unparse(node) if isinstance(node, (ast.Call, ast.Subscript)) else ""
            if ("environ" in text or "getenv" in text) and ("PROFILE_ENV" in text or "MEDPLIB_PROFILE" in text):
                readers.add(rel)
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == \
                    "load_profile" and not node.args and not node.keywords:
                unnamed.append(f"{rel}:{node.lineno}")
    assert readers == {"medplib_cli/main.py"}
    assert unnamed == []


def test_below_the_entry_nothing_re_resolves_the_config_or_tracking_settings():
    """load_config, load_tracking_config and load_profile are called by the context's resolution and the command
    line only (Registry.from_home stays a convenience for tests and scripts)."""
    allowed = {"medplib/config/context.py", "medplib/config/tracking.py", "medplib/config/stages.py",
               "medplib/config/presets.py", "medplib/config/profile.py", "medplib_cli/main.py", "medplib/registry.py"}
    callers = {}
    for path in _code_files():
        rel = str(path.relative_to(REPO_ROOT))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
                    "load_config", "load_tracking_config", "load_profile", "resolve_home"):
                callers.setdefault(rel, set()).add(node.func.id)
    assert set(callers) <= allowed, {k: v for k, v in callers.items() if k not in allowed}
