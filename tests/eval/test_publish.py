"""Publishing real (tiny) models against a real sqlite MLflow: evaluate → log → register with lineage → gate, the
champion re-evaluated when the data version changes, and `medplib evaluate / promote / rollback`."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from mlflow import MlflowClient

from medplib_cli.main import main
from medplib.config import load_tracking_config
from medplib.eval.publish import TAG_EVAL_RUN, eval_split, publish, report_metrics
from medplib.eval.runner import EvalReport
from medplib.registry import (
    TAG_CONFIG_DIGEST, TAG_DATA_VERSION, TAG_DECISION, TAG_GIT_COMMIT, TAG_PARENT_RUN, Registry, RegistryError,
    use_tracking,
)
from medplib.serve import model_folder
from tests.serve.tiny_grounder import one_thread, train_tiny_grounder, write_phantom_dataset

# validation (what the gate reads), test (reported) and zero-shot discs
DATA_A = {"val": [("ct", 28, 34), ("ct", 40, 24), ("mr", 24, 26), ("mr", 38, 40)],
          "test": [("ct", 30, 30), ("ct", 22, 38), ("mr", 36, 28), ("mr", 42, 44)], "zeroshot": [("pet", 28, 20)]}
DATA_B = {"val": [("ct", 32, 22), ("ct", 24, 40), ("mr", 40, 32), ("mr", 26, 24), ("x", 30, 36)],
          "test": [("ct", 26, 26), ("ct", 38, 36), ("mr", 30, 40), ("mr", 22, 30), ("x", 34, 24)],
          "zeroshot": [("pet", 24, 36)]}


def test_report_metrics_are_per_modality_and_name_the_split():
    tables = {"test/grounding": {"ct": {"dice": 0.8, "iou": 0.7, "n": 2}, "mr": {"dice": 0.6, "iou": 0.5, "n": 1},
                                 "all": {"dice": 0.7333, "iou": 0.6333, "n": 3}},
              "val/grounding": {"ct": {"dice": 0.9, "iou": 0.8, "n": 1}, "all": {"dice": 0.9, "iou": 0.8, "n": 1}},
              "zeroshot/grounding": {"pet": {"dice": 0.4, "iou": 0.3, "n": 1},
                                     "all": {"dice": 0.4, "iou": 0.3, "n": 1}},
              "test/vqa_closed": {"ct": {"accuracy": 1.0, "n": 4}, "all": {"accuracy": 1.0, "n": 4}}}
    report = EvalReport(rows=[], tables=tables, summary={"grounding_mdice": 0.7333, "closed_vqa_accuracy": 1.0})
    assert eval_split(None) == "val" and eval_split(50) == "val[:50]"
    # the gate's view: validation (zero-shot and test tables play no part)
    m = report_metrics(report, "abc.dir", eval_split(None), "grounding_mdice")
    assert (m.data_version, m.split) == ("abc.dir", "val")
    assert m.metrics == {"all": {"grounding_mdice": 0.9, "grounding_miou": 0.8, "n": 1.0},
                         "ct": {"grounding_mdice": 0.9, "grounding_miou": 0.8, "n": 1.0}}
    # the same report on test, as reported
    m = report_metrics(report, "abc.dir", "test", "grounding_mdice")
    assert m.metrics["all"] == {"grounding_mdice": 0.7333, "grounding_miou": 0.6333, "zeroshot_grounding_mdice": 0.4,
                                "zeroshot_grounding_miou": 0.3, "closed_vqa_accuracy": 1.0, "n": 3.0}
    assert m.metrics["ct"] == {"grounding_mdice": 0.8, "grounding_miou": 0.7, "closed_vqa_accuracy": 1.0, "n": 2.0}
    assert m.metrics["mr"] == {"grounding_mdice": 0.6, "grounding_miou": 0.5, "n": 1.0}
    assert m.metrics["pet"] == {"zeroshot_grounding_mdice": 0.4, "zeroshot_grounding_miou": 0.3}
    assert m.primary("grounding_mdice", "mr") == 0.6 and m.primary("grounding_mdice", "pet") is None


def test_version_of_reads_registry_uris_and_use_tracking_restores_globals(home, monkeypatch: pytest.MonkeyPatch):
    import mlflow

    registry = Registry(load_tracking_config().resolved(home))
    assert registry.version_of("runs:/abc/medplib") is None and registry.version_of("models:/other@champion") is None
    assert registry.version_of(str(home.root)) is None
    with pytest.raises(RegistryError, match="No alias 'champion' on registered model 'medplib' \\(aliases: none\\)"):
        registry.version_of("models:/medplib@champion")
    with pytest.raises(RegistryError, match="No version 7 of registered model 'medplib'"):
        registry.version_of("models:/medplib/7")

    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    # as in a fresh process: no URI set in code, the tracking URI from the environment
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    before = mlflow.get_tracking_uri()
    with use_tracking(registry.cfg):
        assert mlflow.get_tracking_uri() == registry.cfg.tracking_uri == mlflow.get_registry_uri()
    assert mlflow.get_tracking_uri() == before == "sqlite:////elsewhere.db"
    assert os.environ["MLFLOW_TRACKING_URI"] == before and "MLFLOW_REGISTRY_URI" not in os.environ
    assert tracking_utils._tracking_uri is None and registry_utils._registry_uri is None


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    # 4 steps: still answers no <SEG> (Dice 0); 30 steps: Dice ~0.9 on unseen discs
    return {"less": train_tiny_grounder(root / "less", steps=4), "more": train_tiny_grounder(root / "more", steps=30)}


def _cli(args: list[str], home, capsys: pytest.CaptureFixture) -> dict:
    code = main([*args, "--home", str(home.root), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


@pytest.mark.integration
def test_publish_promotes_better_rejects_less_trained_reevaluates_champion_and_cli_gates(
        models, home, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    data_a = write_phantom_dataset(tmp_path / "a" / "data", DATA_A)
    data_b = write_phantom_dataset(tmp_path / "b" / "data", DATA_B)
    tracking = load_tracking_config().resolved(home)
    registry = Registry(tracking)
    client = MlflowClient(tracking.tracking_uri)
    parent = client.create_run(registry.experiment_id(), run_name="pipeline").info.run_id
    common = dict(parent_run_id=parent, git_commit="c0ffee")
    # mlflow.yaml's floor keeps a Dice-0 model from becoming the first champion; this test wants one to roll back to
    no_floor = replace(tracking, gate=replace(tracking.gate, floor={}))

    with one_thread():
        s1 = publish(models["less"], data_a, "aaa.dir", config_digest="cfg-less", tracking=no_floor, **common)
        assert s1["promoted"] and s1["version"] == "1" and "no champion yet" in s1["reason"]
        assert s1["metrics"]["grounding_mdice"] == 0.0

        s2 = publish(models["more"], data_a, "aaa.dir", config_digest="cfg-more", tracking=tracking, **common)
        assert s2["promoted"] and s2["champion_version"] == "2" and s2["previous_champion_version"] == "1"
        # judged on validation by a paired bootstrap over the 4 discs both were scored on; test is reported beside it
        assert s2["eval_split"] == "val" and s2["val_metrics"]["grounding_mdice"] > 0.7
        assert s2["paired_samples"] == 4 and s2["interval"][0] > 0.5 and "90% interval" in s2["reason"]
        assert s2["champion_eval_run_id"] is None  # champion 1 was measured on the same data: nothing to redo
        assert s2["metrics"]["grounding_mdice"] > 0.7 and set(s2["per_modality"]) == {"ct", "mr"}
        assert s2["modality_deltas"] == pytest.approx(s2["per_modality"])  # the champion scored 0 everywhere

        # the version carries its lineage and its per-modality metrics; its run holds the report and the pyfunc
        tags = registry.version_tags("2")
        assert (tags[TAG_GIT_COMMIT], tags[TAG_DATA_VERSION], tags[TAG_CONFIG_DIGEST], tags[TAG_PARENT_RUN]) == (
            "c0ffee", "aaa.dir", "cfg-more", parent)
        assert tags[TAG_EVAL_RUN] == s2["eval_run_id"] and tags[TAG_DECISION] == "promoted"
        recorded = registry.eval_metrics("2")
        assert recorded.data_version == "aaa.dir" and recorded.split == "val"
        assert recorded.primary("grounding_mdice", "mr") == pytest.approx(s2["per_modality"]["mr"])
        assert recorded.metrics["ct"]["n"] == 2
        eval_run = client.get_run(s2["eval_run_id"])
        assert eval_run.data.tags["mlflow.parentRunId"] == parent and eval_run.info.status == "FINISHED"
        assert eval_run.data.metrics["grounding_mdice"] == pytest.approx(s2["metrics"]["grounding_mdice"])
        assert {"eval/tables.md", "eval/tables.json"} <= {f.path for f in client.list_artifacts(eval_run.info.run_id,
                                                                                                "eval")}
        with model_folder("models:/medplib/2", tracking) as folder:
            assert (folder / "model.safetensors").read_bytes() == (models["more"] / "model.safetensors").read_bytes()

        # new data: the champion is re-evaluated on it first, then the less-trained challenger loses
        s3 = publish(models["less"], data_b, "bbb.dir", config_digest="cfg-less", tracking=tracking, **common)
    assert not s3["promoted"] and s3["champion_version"] == "2"
    assert "0.0000 does not beat the champion's" in s3["reason"] and "modality 'x'" in s3["reason"]
    assert s3["champion_eval_run_id"] is not None
    champion_now = registry.eval_metrics("2")
    assert champion_now.data_version == "bbb.dir" and set(champion_now.metrics) == {"all", "ct", "mr", "x"}
    assert client.get_run(s3["champion_eval_run_id"]).data.tags["medplib.evaluated_version"] == "2"
    assert registry.aliases() == {"champion": "2", "previous-champion": "1", "challenger": "3"}

    # the CLI on a project holding data B: promote (rejected), rollback, stale metrics refuse to compare,
    # `medplib evaluate` of the champion records them on the new data, then the gate can decide
    project = tmp_path / "b"
    (project / "data.dvc").write_text("outs:\n- md5: bbb.dir\n  path: data\n")
    monkeypatch.chdir(project)
    with one_thread():
        out = _cli(["promote"], home, capsys)  # the challenger, version 3
        assert out["version"] == "3" and not out["promoted"] and out["champion_version"] == "2"
        out = _cli(["rollback", "--reason", "drill"], home, capsys)
        assert out == {"champion_version": "1", "rolled_back_version": "2", "previous_champion_version": None}
        out = _cli(["promote", "--version", "2"], home, capsys)
        assert not out["promoted"] and "not comparable" in out["reason"] and "aaa.dir" in out["reason"]
        out = _cli(["evaluate", "--model", "models:/medplib@champion"], home, capsys)
        assert out["version"] == "1" and out["recorded_on_version"] == "1" and out["data_version"] == "bbb.dir"
        assert out["metrics"]["grounding_mdice"] == 0.0 and set(out["tables"]) == {
            "val/grounding", "test/grounding", "zeroshot/grounding"}
        out = _cli(["promote", "--version", "2"], home, capsys)
        assert out["promoted"] and out["champion_version"] == "2" and out["previous_champion_version"] == "1"
        assert out["paired_samples"] == 5 and out["interval"][0] > 0.5  # both eval runs on data B: paired
        assert out["delta"] == pytest.approx(champion_now.primary("grounding_mdice"))

        # a folder (not a registered version) is evaluated and logged, but not recorded for the gate
        code = main(["evaluate", "--model", str(models["more"]), "--split", "test", "--limit", "3",
                     "--home", str(home.root)])
    text = capsys.readouterr().out
    assert code == 0 and "### test/grounding" in text and "| ct | 2 |" in text and "Not recorded" in text
