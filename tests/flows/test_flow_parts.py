"""The pure parts of the flows: cache keys, fingerprints, stage checks, metric comparison, the run's report."""
from __future__ import annotations

from pathlib import Path

import pytest

from flows.ingest import ingest_cache_key, ingest_code_files, source_fingerprint
from flows.pipeline import report_markdown, summary_text
from flows.record import PipelineRequest
from flows.reproduce import compare
from flows.train import check_training
from medplib.config import ConfigError, load_config


def test_cache_key_names_source_project_and_data_version(tmp_path: Path):
    a = ingest_cache_key("f" * 64, tmp_path / "p", "abc.dir")
    assert a.startswith("ingest-" + "f" * 32) and a.endswith("-abc.dir")
    assert ingest_cache_key("f" * 64, tmp_path / "p", None).endswith("-none")
    assert ingest_cache_key("f" * 64, tmp_path / "q", "abc.dir") != a  # another project holds another data/
    assert ingest_cache_key("f" * 64, tmp_path / "p", "abc.dir-modified") != a


def test_fingerprint_follows_source_content_and_synth_parameters(tmp_path: Path):
    cfg = load_config("tiny")
    assert source_fingerprint("synth", cfg) == source_fingerprint("synth", cfg)
    assert source_fingerprint("synth", cfg, seed=7) != source_fingerprint("synth", cfg)
    smaller = load_config("tiny", {"data": {"synth_n": 12}})
    assert source_fingerprint("synth", smaller) != source_fingerprint("synth", cfg)
    src = tmp_path / "mecovqa"
    (src / "train").mkdir(parents=True)
    (src / "train" / "a.json").write_text("[]")
    before = source_fingerprint(f"mecovqa:{src}", cfg)
    assert source_fingerprint(f"mecovqa:{src}", cfg) == before
    (src / "train" / "a.json").write_text("[ ]")
    assert source_fingerprint(f"mecovqa:{src}", cfg) != before
    (src / "train" / "a.json").rename(src / "train" / "b.json")
    assert source_fingerprint(f"mecovqa:{src}", cfg) != before  # a renamed file is a change too


def test_fingerprint_covers_every_registered_reader_and_task(monkeypatch: pytest.MonkeyPatch):
    import medplib
    from medplib import tasks
    from medplib.data import readers

    package = Path(medplib.__file__).parent
    names = {p.relative_to(package).as_posix() for p in ingest_code_files()}
    assert {"data/readers/dicom.py", "data/readers/nifti.py", "tasks/grounding.py", "tasks/__init__.py"} <= names
    cfg = load_config("tiny")
    before = source_fingerprint("synth", cfg)
    this_file = Path(__file__).resolve()
    monkeypatch.setattr(readers, "code_files", lambda: [this_file])  # as if a reader module's source changed
    assert this_file in ingest_code_files() and source_fingerprint("synth", cfg) != before
    assert tasks.code_files()  # the tasks' modules are hashed too


def test_training_request_checks_fail_before_training():
    check_training([1, 2, 3, 4], "tiny", {1: {"epochs": 1}}, workers=2)
    with pytest.raises(ValueError, match="Stage 5 does not exist"):
        check_training([1, 5], "tiny", None, workers=2)
    with pytest.raises(ValueError, match="in order"):
        check_training([2, 1], "tiny", None, workers=2)
    with pytest.raises(ConfigError, match="train.stage4.epochz"):
        check_training([1, 2, 3, 4], "tiny", {4: {"epochz": 1}}, workers=2)
    with pytest.raises(ValueError, match="workers = 0"):
        check_training([1], "tiny", None, workers=0)


def test_request_round_trips_with_int_stage_keys():
    r = PipelineRequest("synth", "tiny", [1, 2], {1: {"epochs": 1}}, 2, seed=3)
    assert PipelineRequest.from_json(r.to_json()) == r


def test_compare_holds_each_metric_to_the_tolerance():
    rows = compare({"a": 0.50, "b": 0.20, "c": float("nan"), "only_recorded": 1.0},
                   {"a": 0.53, "b": 0.30, "c": float("nan"), "only_new": 0.0}, atol=0.05)
    by = {r["metric"]: r for r in rows}
    assert set(by) == {"a", "b", "c"}
    assert by["a"]["ok"] and by["a"]["diff"] == pytest.approx(0.03) and by["a"]["tolerance"] == "±0.05"
    assert not by["b"]["ok"] and by["b"]["diff"] == pytest.approx(0.10)
    assert by["c"]["ok"] and by["c"]["diff"] == 0.0
    assert compare({"a": 0.5}, {"a": 0.55}, atol=0.05)[0]["ok"]  # the boundary counts despite float rounding
    loss = compare({"stage1_final_loss": 5.0}, {"stage1_final_loss": 5.09}, rtol=0.02)[0]
    assert loss["ok"] and loss["tolerance"] == "±2%"
    assert not compare({"stage1_final_loss": 5.0}, {"stage1_final_loss": 5.11}, rtol=0.02)[0]["ok"]
    with pytest.raises(ValueError, match="No metric in common"):
        compare({"a": 1.0}, {"b": 1.0}, atol=0.1)


SUMMARY = {
    "flow_run": "brave-otter", "flow_run_id": "f-1", "tracking_uri": "sqlite:////h/mlflow.db", "experiment_id": "1",
    "home": "/h", "project": "/p", "data_version": "abc.dir", "pipeline_run_id": "p" * 32, "seconds": 321.0,
    "ingest": {"source": "synth(n=48)", "valid": 406, "quarantined": 0, "cached": True},
    "validation": {"n_records": 406, "n_images": 48, "n_expectations": 30, "data_docs": "/h/reports/index.html"},
    "stages": [{"stage": 1, "name": "align", "first_loss": 6.3, "last_loss": 6.2, "mlflow_run_id": "s" * 32}],
    "evaluation": {"version": "2", "metrics": {"grounding_mdice": 0.25, "closed_vqa_accuracy": 0.5},
                   "val_metrics": {"grounding_mdice": 0.27, "closed_vqa_accuracy": 0.55},
                   "primary_metric": "grounding_mdice", "promoted": False, "champion_version": "1",
                   "reason": "grounding_mdice 0.2700 does not beat the champion's 0.3000", "eval_run_id": "e" * 32,
                   "champion_metric": 0.30, "delta": -0.03, "interval": None, "guard_deltas":
                   {"closed_vqa_accuracy": 0.01}, "modality_deltas": {"ct": -0.04}, "decision_run_id": "d" * 32},
    "champion_version": "1", "skipped": False,
}


def test_report_has_data_version_metrics_decision_and_run_links():
    md = report_markdown(SUMMARY)
    assert "`abc.dir`" in md and "ingest skipped: cached" in md
    # validation (what the gate read) beside test (reported), and every comparison the gate made
    assert "| grounding_mdice (gate) | 0.2700 | 0.2500 |" in md and "| closed_vqa_accuracy | 0.5500 | 0.5000 |" in md
    assert "Version 2 **not promoted**: grounding_mdice 0.2700 does not beat" in md and "version 1" in md
    assert "| grounding_mdice (primary) | -0.0300 | > 0 |" in md and "| guard closed_vqa_accuracy | +0.0100 |" in md
    assert "| grounding_mdice on ct | -0.0400 |" in md
    assert "sqlite:////h/mlflow.db" in md
    for run_id in ("p" * 32, "s" * 32, "e" * 32, "d" * 32):
        assert f"http://127.0.0.1:5000/#/experiments/1/runs/{run_id}" in md
    text = summary_text(SUMMARY)
    assert "abc.dir" in text and "version 1" in text and "medplib ui" in text and "mlflow ui" in text
    assert "prefect server start --host 127.0.0.1" in text


def test_a_skipped_stage_shows_why_in_the_report_and_the_summary():
    why = "no train records of tasks ['alignment'] in the data"
    stages = [{"stage": 1, "name": "align", "first_loss": None, "last_loss": None, "mlflow_run_id": "s" * 32,
               "skipped": why}, {"stage": 2, "name": "vl_expert", "first_loss": 2.5, "last_loss": 1.25,
                                 "mlflow_run_id": "t" * 32, "skipped": None}]
    summary = SUMMARY | {"stages": stages}
    assert f"| stage 1 align (skipped: {why}) | [`{'s' * 32}`]" in report_markdown(summary)
    assert f"stages         1 align skipped ({why}), 2 vl_expert loss 2.50→1.25" in summary_text(summary)


def test_report_of_a_skipped_retraining():
    keys = ("flow_run", "flow_run_id", "tracking_uri", "experiment_id", "home", "project", "data_version", "ingest",
            "seconds")
    skipped = {k: SUMMARY[k] for k in keys} | {"skipped": True, "trained_by": "version 4"}
    assert "**Not retrained**: this data version was already trained (version 4;" in report_markdown(skipped)
    assert "not retrained  already trained on this data version (version 4)" in summary_text(skipped)


def test_report_of_a_failed_run_says_where_it_stopped():
    failed = {k: v for k, v in SUMMARY.items() if k not in ("stages", "evaluation", "champion_version", "skipped")}
    md = report_markdown(failed | {"error": "RuntimeError: Ray worker died"})
    assert "**Failed** after ingest, validation:" in md and "RuntimeError: Ray worker died" in md
    assert "## Promotion" not in md and "p" * 32 in md


def test_the_full_preset_refuses_to_train_without_its_weight_folders(tmp_path: Path):
    """`--preset full` names every weight key left unset before any stage runs (it never random-initialises 7B)."""
    from medplib.train.runner import build_init_model

    full = load_config("full")
    with pytest.raises(ConfigError, match=r"set model\.vision\.weights, model\.llm\.weights, model\.sam\.weights"):
        check_training([1, 2, 3, 4], full, None, 2)
    with pytest.raises(ConfigError, match=r"set model\.sam\.weights in a --config file"):
        build_init_model(load_config("full", {"model": {"vision": {"weights": "/w/clip"},
                                                         "llm": {"weights": "/w/llava"}}}),
                         tmp_path / "data", tmp_path / "init")
    check_training([2, 3], full, None, 2)  # later stages start from a saved model, not from the weight folders
    check_training([1], load_config("tiny"), None, 2)
