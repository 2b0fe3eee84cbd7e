"""The promotion gate (pure) and the registry against a real sqlite MLflow in a temp home."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from medplib.config import load_tracking_config
from medplib.config.tracking import GateConfig
from medplib.registry import (
    TAG_CONFIG_DIGEST, TAG_DATA_VERSION, TAG_DECISION, TAG_DECISION_REASON, TAG_DECISION_RUN, TAG_GIT_COMMIT,
    TAG_PARENT_RUN, EvalMetrics, Registry, RegistryError, gate,
)

P = "grounding_mdice"
DATA = "3f2a9c0e5b1d4e7f8a6b2c1d0e9f8a7b.dir"


def _metrics(overall: float, data: str = DATA, **per_modality: float) -> EvalMetrics:
    rows = {m: {P: v, "n": 10} for m, v in per_modality.items()}
    return EvalMetrics(data_version=data, metrics={**rows, "all": {P: overall, "n": 10 * len(rows)}})


# ---- the gate, pure ---------------------------------------------------------------------------------------

GATE = GateConfig(primary_metric=P, min_delta=0.01, max_modality_regression=0.05)


def test_gate_promotes_without_champion():
    d = gate(_metrics(0.3, ct=0.3), None, GATE)
    assert d.promote and "no champion" in d.reason and "0.3000" in d.reason


def test_gate_needs_an_improvement_of_at_least_min_delta():
    champion = _metrics(0.60, ct=0.6, mr=0.6)
    better = gate(_metrics(0.65, ct=0.71, mr=0.59), champion, GATE)
    assert better.promote and better.delta == pytest.approx(0.05)
    assert "0.6500 vs champion 0.6000" in better.reason and "smallest modality change mr -0.0100" in better.reason
    assert better.modality_deltas == pytest.approx({"ct": 0.11, "mr": -0.01})

    small = gate(_metrics(0.605, ct=0.6, mr=0.61), champion, GATE)
    assert not small.promote and "less than min_delta 0.01" in small.reason
    tie = gate(_metrics(0.60, ct=0.6, mr=0.6), champion, GateConfig(P, 0.0, 0.05))
    assert not tie.promote and "does not beat" in tie.reason  # min_delta 0 still needs a strict improvement
    worse = gate(_metrics(0.50, ct=0.5, mr=0.5), champion, GATE)
    assert not worse.promote and worse.delta == pytest.approx(-0.10) and "0.5000 does not beat" in worse.reason
    # exactly min_delta counts despite float rounding (0.75 - 0.70 = 0.04999999999999993)
    assert gate(_metrics(0.75), _metrics(0.70), GateConfig(P, 0.05, 0.05)).promote


def test_gate_rejects_a_modality_regression_beyond_tolerance():
    champion = _metrics(0.60, ct=0.80, mr=0.40)
    # overall much better, but CT drops 0.08 > 0.05
    d = gate(_metrics(0.70, ct=0.72, mr=0.68), champion, GATE)
    assert not d.promote
    assert "modality 'ct' grounding_mdice drops 0.8000 -> 0.7200 (-0.0800)" in d.reason
    assert d.modality_deltas == pytest.approx({"ct": -0.08, "mr": 0.28})
    # a drop within tolerance is accepted
    assert gate(_metrics(0.70, ct=0.76, mr=0.64), champion, GATE).promote
    # a modality the champion was measured on but the challenger was not is a regression
    d = gate(_metrics(0.70, mr=0.7), champion, GATE)
    assert not d.promote and "'ct' has grounding_mdice 0.8000 for the champion but none" in d.reason


def test_gate_refuses_to_compare_different_eval_data():
    d = gate(_metrics(0.9, data="aaaa.dir"), _metrics(0.1, data="bbbb.dir"), GATE)
    assert not d.promote and "not comparable" in d.reason and "aaaa.dir" in d.reason and "bbbb.dir" in d.reason
    other_split = EvalMetrics(DATA, _metrics(0.9).metrics, split="zeroshot")
    assert not gate(other_split, _metrics(0.1), GATE).promote


def test_gate_names_a_missing_primary_metric():
    with pytest.raises(ValueError, match="no 'grounding_mdice'.*has: \\['dice', 'n'\\]"):
        gate(EvalMetrics(DATA, {"all": {"dice": 0.5, "n": 3}}), None, GATE)


# ---- the registry on a real sqlite MLflow ---------------------------------------------------------------------

class Echo(mlflow.pyfunc.PythonModel):
    """A stand-in for a trained model: enough for MLflow to log, register and load."""

    def __init__(self, tag: str = ""):
        self.tag = tag

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return [f"{self.tag}:{x}" for x in list(model_input)]


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Building the schema (alembic migrations) is the slow part, and concurrent first use collides:
    # create it once, copy it per test.
    folder = tmp_path_factory.mktemp("mlflow-template")
    uri = f"sqlite:///{folder}/mlflow.db"
    MlflowClient(uri, uri).search_experiments()
    return folder / "mlflow.db"


@pytest.fixture
def registry(home, template_db: Path):
    shutil.copy(template_db, home.mlflow_db)
    cfg = load_tracking_config().resolved(home)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(cfg.tracking_uri)  # the fluent log_model / load_model calls in these tests
    try:
        yield Registry(cfg)
    finally:
        mlflow.set_tracking_uri(previous)


def _train_run(registry: Registry, tag: str, parent_run_id: str | None = None) -> str:
    """A run that logged a tiny pyfunc model at 'model' (MLflow 3 LoggedModel)."""
    with mlflow.start_run(experiment_id=registry.experiment_id(), run_name=f"train-{tag}",
                          parent_run_id=parent_run_id) as run:
        mlflow.pyfunc.log_model(name="model", python_model=Echo(tag), pip_requirements=[])
    return run.info.run_id


def _register(registry: Registry, tag: str) -> str:
    return registry.register(_train_run(registry, tag), "model", git_commit=f"commit-{tag}", data_version=DATA,
                             config_digest=f"cfg-{tag}", parent_run_id=f"pipeline-{tag}")


def _decision_runs(registry: Registry) -> list:
    return MlflowClient(registry.cfg.tracking_uri).search_runs(
        [registry.experiment_id()], "tags.`medplib.kind` != ''", order_by=["attributes.start_time ASC"])


def test_register_tags_lineage_sets_challenger_and_loads(registry: Registry):
    with mlflow.start_run(experiment_id=registry.experiment_id(), run_name="pipeline") as parent:
        pass
    run_id = _train_run(registry, "a", parent_run_id=parent.info.run_id)
    v = registry.register(run_id, "model", git_commit="abc123", data_version=DATA, config_digest="d1g",
                          tags={"preset": "tiny"})
    assert v == "1"
    tags = registry.version_tags(v)
    assert tags[TAG_GIT_COMMIT] == "abc123" and tags[TAG_DATA_VERSION] == DATA and tags[TAG_CONFIG_DIGEST] == "d1g"
    assert tags[TAG_PARENT_RUN] == parent.info.run_id and tags["preset"] == "tiny"  # parent read from the run
    assert registry.aliases() == {"challenger": "1"} and registry.champion_version() is None
    model = mlflow.pyfunc.load_model("models:/medplib@challenger")
    assert model.predict(["x"]) == ["a:x"]

    with pytest.raises(ValueError, match="config_digest must be non-empty"):
        registry.register(run_id, "model", git_commit="abc", data_version=DATA, config_digest="")
    with pytest.raises(RegistryError, match="no model at 'weights'"):
        registry.register(run_id, "weights", git_commit="abc", data_version=DATA, config_digest="d")


def test_register_a_model_logged_as_plain_artifacts(registry: Registry, tmp_path: Path):
    mlflow.pyfunc.save_model(tmp_path / "saved", python_model=Echo("plain"), pip_requirements=[])
    with mlflow.start_run(experiment_id=registry.experiment_id()) as run:
        mlflow.log_artifacts(str(tmp_path / "saved"), "model")
    v = registry.register(run.info.run_id, "model", git_commit="c", data_version=DATA, config_digest="d")
    assert mlflow.pyfunc.load_model(f"models:/medplib/{v}").predict(["y"]) == ["plain:y"]


def test_worse_is_rejected_better_is_promoted_and_rollback_restores(registry: Registry):
    v1 = _register(registry, "first")
    d = registry.promote_if_better(v1, _metrics(0.40, ct=0.40, mr=0.40))
    assert d.promote and registry.champion_version() == v1

    v2 = _register(registry, "less-trained")
    assert registry.aliases()["challenger"] == v2
    d = registry.promote_if_better(v2, _metrics(0.30, ct=0.30, mr=0.30))
    assert not d.promote and registry.champion_version() == v1
    tags = registry.version_tags(v2)
    assert tags[TAG_DECISION] == "rejected" and "0.3000 does not beat the champion's 0.4000" in tags[TAG_DECISION_REASON]

    v3 = _register(registry, "better-overall-worse-ct")  # better overall, but CT regresses by 0.10
    d = registry.promote_if_better(v3, _metrics(0.50, ct=0.30, mr=0.70))
    assert not d.promote and "modality 'ct'" in d.reason and registry.champion_version() == v1

    v4 = _register(registry, "better")
    d = registry.promote_if_better(v4, _metrics(0.55, ct=0.50, mr=0.60))
    assert d.promote and d.delta == pytest.approx(0.15)
    assert registry.aliases() == {"champion": v4, "previous-champion": v1, "challenger": v4}
    assert mlflow.pyfunc.load_model("models:/medplib@champion").predict(["q"]) == ["better:q"]
    assert registry.eval_metrics(v4).primary(P, "mr") == pytest.approx(0.60)
    assert registry.promote_if_better(v4).reason == f"version {v4} is already the champion"

    assert registry.rollback("Dice fell in production") == v1
    assert registry.champion_version() == v1
    assert "previous-champion" not in registry.aliases()  # v1 replaced no one: nothing further back
    assert mlflow.pyfunc.load_model("models:/medplib@champion").predict(["q"]) == ["first:q"]
    with pytest.raises(RegistryError, match="no 'previous-champion' alias \\(champion is version 1\\)"):
        registry.rollback()

    # versions are never deleted
    assert len(registry.client.search_model_versions("name = 'medplib'")) == 4
    # every decision is a finished run with its reason, and a version tag points at it
    runs = _decision_runs(registry)
    assert [r.data.tags["medplib.decision"] for r in runs] == [
        "promoted", "rejected", "rejected", "promoted", "rejected", "rolled-back"]
    assert all(r.info.status == "FINISHED" and r.data.tags["medplib.reason"] for r in runs)
    promoted = runs[3]
    assert promoted.data.params["champion_version"] == v1 and promoted.data.params["eval_data_version"] == DATA
    assert promoted.data.metrics["delta"] == pytest.approx(0.15)
    assert promoted.data.metrics["modality_delta.ct"] == pytest.approx(0.10)
    assert registry.version_tags(v2)[TAG_DECISION_RUN] == runs[1].info.run_id
    assert registry.version_tags(v4)[TAG_DECISION_RUN] == runs[4].info.run_id  # its latest decision
    record = json.loads(Path(registry.client.download_artifacts(promoted.info.run_id, "decision.json")).read_text())
    assert record["decision"]["promote"] is True and record["version"] == v4
    assert runs[-1].data.params == {"from_version": v4, "to_version": v1, "new_previous_champion": "none"}
    assert "Dice fell in production" in runs[-1].data.tags["medplib.reason"]


def test_rollback_walks_back_through_successive_champions(registry: Registry):
    versions = [_register(registry, t) for t in ("a", "b", "c")]
    for v, score in zip(versions, (0.2, 0.3, 0.4)):
        assert registry.promote_if_better(v, _metrics(score, ct=score)).promote
    assert registry.aliases()["previous-champion"] == versions[1]
    assert registry.rollback() == versions[1]
    assert registry.aliases()["previous-champion"] == versions[0]
    assert registry.rollback() == versions[0]
    assert registry.champion_version() == versions[0] and "previous-champion" not in registry.aliases()


def test_metrics_on_other_eval_data_are_not_compared(registry: Registry):
    v1 = _register(registry, "a")
    registry.promote_if_better(v1, _metrics(0.2, ct=0.2, data="old0.dir"))
    v2 = _register(registry, "b")
    d = registry.promote_if_better(v2, _metrics(0.9, ct=0.9, data="new1.dir"))
    assert not d.promote and "not comparable" in d.reason and registry.champion_version() == v1


def test_errors_name_what_is_missing(registry: Registry):
    with pytest.raises(RegistryError, match="no 'previous-champion' alias \\(champion is not set\\)"):
        registry.rollback()
    v = _register(registry, "a")
    with pytest.raises(RegistryError, match=f"Version {v} of 'medplib' has no recorded eval metrics"):
        registry.promote_if_better(v)
    with pytest.raises(RegistryError, match="No version 7 of registered model 'medplib'"):
        registry.promote_if_better("7", _metrics(0.5))
