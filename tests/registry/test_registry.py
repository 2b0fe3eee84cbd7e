"""The promotion gate (pure) and the registry against a real sqlite MLflow in a temp home."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
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

# The point-delta rules (no bootstrap): min_delta and the per-modality regression.
GATE = GateConfig(primary_metric=P, min_delta=0.01, max_modality_regression=0.05, bootstrap_samples=0)


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
    tie = gate(_metrics(0.60, ct=0.6, mr=0.6), champion, GateConfig(P, 0.0, 0.05, bootstrap_samples=0))
    assert not tie.promote and "does not beat" in tie.reason  # min_delta 0 still needs a strict improvement
    worse = gate(_metrics(0.50, ct=0.5, mr=0.5), champion, GATE)
    assert not worse.promote and worse.delta == pytest.approx(-0.10) and "0.5000 does not beat" in worse.reason
    # exactly min_delta counts despite float rounding (0.75 - 0.70 = 0.04999999999999993)
    assert gate(_metrics(0.75), _metrics(0.70), GateConfig(P, 0.05, 0.05, bootstrap_samples=0)).promote


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


def _scored(dice: list[float], data: str = DATA, **headline: float) -> EvalMetrics:
    """Metrics with per-sample grounding rows (ids s0, s1, …; modality ct) and extra headline metrics."""
    rows = [{"id": f"s{i}", "split": "test", "task": "grounding", "modality": "ct", "dice": d, "iou": d / 2}
            for i, d in enumerate(dice)]
    mean = float(np.mean(dice))
    return EvalMetrics(data, {"all": {P: mean, **headline, "n": len(dice)}, "ct": {P: mean, "n": len(dice)}},
                       samples=rows)


STRICT = GateConfig(primary_metric=P, min_delta=0.0, max_modality_regression=0.05, guard_tolerance=0.02,
                    bootstrap_samples=1000, confidence=0.9)


def test_gate_rejects_a_better_grounding_that_costs_closed_vqa_beyond_tolerance():
    rng = np.random.default_rng(1)
    base = list(rng.uniform(0.4, 0.8, 40))
    champion = _scored(base, closed_vqa_accuracy=0.90, open_vqa_f1=0.70)
    challenger = _scored([d + 0.10 for d in base], closed_vqa_accuracy=0.85, open_vqa_f1=0.71)
    d = gate(challenger, champion, STRICT)
    assert not d.promote
    assert "guard closed_vqa_accuracy drops 0.9000 -> 0.8500 (-0.0500), more than its tolerance 0.02" in d.reason
    assert d.guard_deltas == pytest.approx({"closed_vqa_accuracy": -0.05, "open_vqa_f1": 0.01})
    # within tolerance it passes, and the reason lists every guard
    ok = gate(_scored([x + 0.10 for x in base], closed_vqa_accuracy=0.89, open_vqa_f1=0.70), champion, STRICT)
    assert ok.promote and "guards within tolerance: closed_vqa_accuracy -0.0100, open_vqa_f1 +0.0000" in ok.reason
    # a guard the champion has and the challenger lacks is a failure, not a pass
    missing = gate(_scored([x + 0.10 for x in base], open_vqa_f1=0.70), champion, STRICT)
    assert not missing.promote and "guard closed_vqa_accuracy is 0.9000 for the champion but missing" in missing.reason


def test_gate_rejects_a_gain_inside_the_bootstrap_noise_and_promotes_a_clear_one():
    rng = np.random.default_rng(2)
    base = rng.uniform(0.3, 0.9, 30)
    champion = _scored(list(base))
    # +0.01 on average, but per-sample changes of ±0.2: a positive point delta the interval cannot separate from 0
    noisy = np.clip(base + 0.01 + rng.normal(0, 0.2, 30), 0, 1)
    noisy += (float(base.mean()) + 0.01) - float(noisy.mean())  # exactly +0.01 overall
    d = gate(_scored(list(noisy)), champion, STRICT)
    assert not d.promote and d.delta == pytest.approx(0.01)
    low, high = d.interval
    assert low < 0 < 0.01 < high and d.confidence == 0.9 and d.paired_samples == 30
    assert "is within the noise: its 90% interval" in d.reason and "does not lie above min_delta 0.0" in d.reason
    # the same +0.01 on every sample is no noise: promoted, with the interval recorded
    clear = gate(_scored(list(base + 0.01)), champion, STRICT)
    assert clear.promote and clear.interval == pytest.approx((0.01, 0.01))
    # a clear gain of +0.1 with the same noise: promoted
    strong = np.clip(base + 0.10 + rng.normal(0, 0.05, 30), 0, 1)
    s = gate(_scored(list(strong)), champion, STRICT)
    assert s.promote and s.interval[0] > 0.05 and "90% interval [+0." in s.reason
    # different samples cannot be paired
    other = _scored(list(base + 0.1))
    other = EvalMetrics(DATA, other.metrics, samples=[{**r, "id": "x" + r["id"]} for r in other.samples])
    d = gate(other, champion, STRICT)
    assert not d.promote and "scored on different test/grounding samples" in d.reason


def test_paired_bootstrap_of_a_corpus_metric_reaggregates_each_resample():
    from pycocoevalcap.bleu.bleu import Bleu  # corpus BLEU without the Java tokenizer: plain words suffice here

    from medplib import tasks
    from medplib.registry import paired_bootstrap

    class CorpusBleu(tasks.Cumulative):
        def aggregate(self):
            refs = {i: [r["reference"]] for i, r in enumerate(self.rows)}
            hyps = {i: [r["prediction"]] for i, r in enumerate(self.rows)}
            return {"all": {"bleu1": Bleu(1).compute_score(refs, hyps, verbose=0)[0][0], "n": len(self.rows)}}

    class Report(tasks.Task):
        name, family, summary = "corpus_report", "report", {"report_bleu1": ("test", "bleu1")}

        def metric(self):
            return CorpusBleu()

    tasks.register(Report())
    try:
        rows = lambda preds: [{"id": f"c{i}", "split": "test", "task": "corpus_report", "modality": "x",
                               "prediction": p, "reference": "a round bright lesion in the liver"}
                              for i, p in enumerate(preds)]
        good, bad = rows(["a round bright lesion in the liver"] * 12), rows(["a dark region"] * 12)
        iv = paired_bootstrap(good, bad, "report_bleu1", resamples=50)
        assert iv.delta > 0.5 and iv.low > 0.5 and iv.n == 12
        with pytest.raises(ValueError, match="no per-sample 'dice' scores of test/grounding for the challenger"):
            paired_bootstrap(good, bad, P)
    finally:
        tasks.unregister("corpus_report")


def test_the_first_champion_must_reach_the_floor():
    floor = GateConfig(primary_metric=P, floor={P: 0.5, "closed_vqa_accuracy": 0.6})
    d = gate(_metrics(0.45), None, floor)
    assert not d.promote and "grounding_mdice 0.4500 is below the first champion's floor 0.5" in d.reason
    assert "closed_vqa_accuracy missing is below" in d.reason
    ok = gate(EvalMetrics(DATA, {"all": {P: 0.5, "closed_vqa_accuracy": 0.7}}), None, floor)
    assert ok.promote and "floors met: closed_vqa_accuracy >= 0.6, grounding_mdice >= 0.5" in ok.reason


def test_gate_config_rejects_unknown_guard_and_floor_metrics():
    from medplib.config.base import ConfigError, from_dict

    with pytest.raises(ConfigError, match="'gate.guards.vqa_acc' names no task's headline metric"):
        from_dict(GateConfig, {"guards": {"vqa_acc": 0.1}}, prefix="gate.")
    with pytest.raises(ConfigError, match="'gate.floor.grounding_mdice' = 2 must be a number in \\[0, 1\\]"):
        from_dict(GateConfig, {"floor": {"grounding_mdice": 2}}, prefix="gate.")
    with pytest.raises(ConfigError, match="'gate.confidence' = 1.0"):
        from_dict(GateConfig, {"confidence": 1.0}, prefix="gate.")
    # a metric with a range other than [0, 1] takes floors and guards in its own units (CIDEr: [0, 10])
    assert from_dict(GateConfig, {"floor": {"refer_gc_cider": 2}}, prefix="gate.").floor == {"refer_gc_cider": 2}
    with pytest.raises(ConfigError, match="'gate.floor.refer_gc_cider' = 11 must be a number in \\[0, 10\\]"):
        from_dict(GateConfig, {"floor": {"refer_gc_cider": 11}}, prefix="gate.")
    # by default every task's headline metric but the primary is guarded (a guard the champion was not measured on
    # is skipped by the gate), at guard_tolerance times the metric's range
    guards = GateConfig(primary_metric=P, guard_tolerance=0.02).guard_metrics()
    assert set(guards) == {"closed_vqa_accuracy", "open_vqa_f1", "region_vqa_recall", "caption_bleu1",
                           "refer_vg_recall", "refer_ro_accuracy", "refer_gc_cider", "refer_mii_bleu4",
                           "textseg_mdice", "report_bleu4"}
    assert guards["refer_gc_cider"] == pytest.approx(0.2) and guards["closed_vqa_accuracy"] == pytest.approx(0.02)


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
    cfg = replace(cfg, gate=replace(cfg.gate, floor={}))  # these tests start from low made-up metrics
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


def _evaluated(registry: Registry, version: str, metrics: EvalMetrics) -> str:
    """Record `metrics` on `version` as an evaluation run would: its per-sample rows as eval/samples.json."""
    import pandas as pd

    run_id = registry.client.create_run(registry.experiment_id(), run_name=f"evaluate-v{version}").info.run_id
    registry.client.log_table(run_id, pd.DataFrame(metrics.samples), "eval/samples.json")
    registry.client.set_terminated(run_id)
    registry.record_eval(version, metrics, eval_run_id=run_id)
    return run_id


def test_the_registry_gate_bootstraps_from_the_eval_runs_and_records_the_interval(registry: Registry):
    base = np.random.default_rng(3).uniform(0.5, 0.8, 25)
    v1 = _register(registry, "first")
    _evaluated(registry, v1, _scored(list(base), closed_vqa_accuracy=0.9))
    assert registry.promote_if_better(v1).promote
    assert registry.eval_samples(v1)[0] == {"id": "s0", "split": "test", "task": "grounding", "modality": "ct",
                                            "dice": pytest.approx(base[0]), "iou": pytest.approx(base[0] / 2)}
    v2 = _register(registry, "better")
    _evaluated(registry, v2, _scored(list(base + 0.05), closed_vqa_accuracy=0.9))
    d = registry.promote_if_better(v2)
    assert d.promote and d.interval == pytest.approx((0.05, 0.05)) and d.paired_samples == 25
    run = registry.client.get_run(registry.version_tags(v2)[TAG_DECISION_RUN])
    assert run.data.metrics["delta_low"] == pytest.approx(0.05) and run.data.metrics["paired_samples"] == 25
    assert run.data.metrics["guard_delta.closed_vqa_accuracy"] == 0.0
    assert run.data.params["confidence"] == "0.9" and run.data.params["guard.closed_vqa_accuracy"] == "0.02"
    path = registry.client.download_artifacts(run.info.run_id, "decision.json")
    assert json.loads(Path(path).read_text())["decision"]["interval"] == pytest.approx([0.05, 0.05])
    # metrics recorded by hand (no eval run behind them) drop the stale run: the point delta is judged, and said so
    v3 = _register(registry, "by-hand")
    registry.record_eval(v3, EvalMetrics(DATA, {"all": {P: 0.8, "closed_vqa_accuracy": 0.9}, "ct": {P: 0.8}}))
    d = registry.promote_if_better(v3)
    assert d.promote and d.interval is None and "point delta: no per-sample scores to bootstrap" in d.reason


def test_trained_on_sees_registered_versions_and_finished_trainings_of_this_model_only(registry: Registry):
    other = "0" * 32 + ".dir"
    assert registry.trained_on(DATA) is None  # nothing registered yet: no registered model at all
    v = _register(registry, "a")
    assert registry.trained_on(DATA) == f"version {v}" and registry.trained_on(other) is None

    # a pipeline run whose training finished but which registered nothing (evaluation failed after training)
    run_id = registry.client.create_run(registry.experiment_id(), run_name="pipeline").info.run_id
    registry.mark_trained(run_id, other)
    assert registry.trained_on(other) == f"pipeline run {run_id}"
    # another model family's registered model shares the experiment but not what was trained for it
    reclmis = Registry(replace(registry.cfg, registered_model="reclmis"))
    assert reclmis.trained_on(other) is None and reclmis.trained_on(DATA) is None


def test_the_experiment_is_marked_as_model_training_and_runs_record_their_dataset(registry: Registry, tmp_path):
    """MLflow's UI opens a `custom_model_development` experiment on its training runs; a run's dataset input is the
    DVC version it used (digest = the hash), with its records per split and task."""
    import json

    from medplib.config import resolve_home
    from medplib.data.versioning import DATASET_NAME, dataset_record
    from medplib.registry import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, log_dataset

    exp_id = registry.experiment_id()
    assert registry.client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    registry.client.delete_experiment_tag(exp_id, EXPERIMENT_KIND_TAG)  # an experiment made before the tag
    assert registry.experiment_id() == exp_id
    assert registry.client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    rows = [{"split": "train", "task": "grounding"}, {"split": "train", "task": "report"},
            {"split": "test", "task": "grounding"}]
    (project / "data" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    version = "0123456789abcdef0123456789abcdef.dir"
    dataset = dataset_record(project, resolve_home(tmp_path / "home"), version)
    run_id = registry.client.create_run(exp_id, run_name="stage1-align").info.run_id
    log_dataset(registry.client, run_id, dataset, "training")
    log_dataset(registry.client, run_id, None, "training")  # no version known: nothing logged
    [given] = registry.client.get_run(run_id).inputs.dataset_inputs
    assert (given.dataset.name, given.dataset.digest, given.dataset.source_type) == (DATASET_NAME, version, "dvc")
    assert json.loads(given.dataset.profile) == {"records": 3, "splits": {"test": 1, "train": 2},
                                                 "tasks": {"grounding": 2, "report": 1}}
    source = json.loads(given.dataset.source)
    assert source["path"] == "data" and source["pointer"] == str(project / "data.dvc")
    assert source["remote"].endswith("dvc-remote")
    assert [(t.key, t.value) for t in given.tags] == [("mlflow.data.context", "training")]
