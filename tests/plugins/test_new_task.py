"""A sixth task defined here alone runs through synth → ingest → GX gate → a stage's data mix → the eval table.

Nothing under medplib/ is edited: the task registers itself for the test and is removed afterwards.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medplib import tasks
from medplib.config import stage_spec
from medplib.data.expectations import validate_dataset
from medplib.data.ingest import build_dataset
from medplib.data.synth import generate
from medplib.data.torch_dataset import MedDataset, read_records
from medplib.eval.runner import aggregate, score_sample, summarise
from medplib.eval.metrics import tokenize
from tests.stub_tokenizer import LengthTokenizer


class CountMetric(tasks.Cumulative):
    """Accuracy (per-sample mean) plus mean absolute error of the parsed counts, per modality."""

    def aggregate(self):
        out = super().aggregate()
        errors: dict[str, list[float]] = {}
        for row in self.rows:
            err = row["abs_error"]
            for group in (row["modality"], "all"):
                errors.setdefault(group, []).append(err)
        for group, values in errors.items():
            out[group]["mae"] = float(np.mean(values))
        return out


def _number(text: str) -> float:
    digits = [t for t in tokenize(text) if t.replace(".", "", 1).isdigit()]
    return float(digits[0]) if digits else float("nan")


class CountStructures(tasks.Task):
    name = "count_structures"
    groups = ("vl",)
    family = "count"  # annotation files train/MeCoVQA-Count.json, test/MeCoVQA_Count_test.json
    summary = {"count_accuracy": ("test", "accuracy"), "count_mae": ("test", "mae")}
    max_new_tokens = 4

    def check(self, turns, masks, regions):
        answer = next(t["value"] for t in turns if t["from"] == "gpt")
        return None if answer.strip().isdigit() else (answer, "a count answer is a whole number")

    def synth(self, scene):
        if not scene.structures:
            return []
        return [scene.record("closed", "How many structures are in this image?", str(len(scene.structures)))]

    def score(self, prediction, reference, pred_masks, target):
        p, r = _number(prediction), _number(reference)
        return {"accuracy": float(p == r), "abs_error": abs(p - r) if p == p else r}

    def metric(self):
        return CountMetric()


@pytest.fixture
def count_task():
    task = tasks.register(CountStructures())
    yield task
    tasks.unregister(task.name)


def _by_id(data: Path) -> dict[str, dict]:
    return {r.id: r for r in read_records(data)}


def test_a_sixth_task_runs_through_synth_ingest_gate_mix_and_eval(tmp_path: Path, count_task):
    # synth + ingest: the new task's file appears and its records are normalised; the other tasks are untouched
    summary = generate(tmp_path / "src", n=24, seed=3, image_size=32)
    assert summary.files["train/MeCoVQA-Count.json"] > 0
    result = build_dataset(tmp_path / "src", tmp_path / "data", "synth", [], 10**7)
    assert result.quarantined == 0 and result.by_task["count_structures"] == (
        summary.files["train/MeCoVQA-Count.json"] + summary.files.get("test/MeCoVQA_Count_test.json", 0))
    records = _by_id(tmp_path / "data")
    counts = [r for r in records.values() if r.task == "count_structures"]
    assert {r.answer for r in counts} <= {"1", "2", "3"} and all(r.answer_type == "closed" for r in counts)
    tasks.unregister(count_task.name)
    generate(tmp_path / "src5", n=24, seed=3, image_size=32)
    build_dataset(tmp_path / "src5", tmp_path / "data5", "synth", [], 10**7)
    tasks.register(count_task)
    five = _by_id(tmp_path / "data5")
    assert {k: v for k, v in records.items() if v.task != "count_structures"} == five  # same ids, same records

    # the GX gate: valid as written; a count record with a non-number answer fails the task's own check
    report = validate_dataset(tmp_path / "data", tmp_path / "docs")
    assert report.success, report.summary()
    lines = (tmp_path / "data" / "records.jsonl").read_text().splitlines()
    bad = next(i for i, line in enumerate(lines) if '"count_structures"' in line)
    rec = json.loads(lines[bad])
    rec["conversations"][1]["value"] = "several"
    lines[bad] = json.dumps(rec, sort_keys=True)
    (tmp_path / "data" / "records.jsonl").write_text("\n".join(lines) + "\n")
    failed = validate_dataset(tmp_path / "data", tmp_path / "docs2").failed
    assert [r["column"] for r in failed] == ["task_target"]

    # a stage's data mix: stage 2 selects group `vl`, so it now reads count records too; stage 3 does not
    mix = MedDataset(tmp_path / "data", LengthTokenizer(), 32, 32, split="train",
                     tasks=stage_spec("tiny", 2).tasks, records=[*records.values()])
    assert "count_structures" in {r.task for r in mix.records}
    sample = mix[next(i for i, r in enumerate(mix.records) if r.task == "count_structures")]
    assert sample.region_masks.shape[0] == 0 and sample.seg_masks.shape[0] == 0
    grounding_mix = MedDataset(tmp_path / "data", LengthTokenizer(), 32, 32, split="train",
                               tasks=stage_spec("tiny", 3).tasks, records=[*records.values()])
    assert "count_structures" not in {r.task for r in grounding_mix.records}

    # the evaluation table: given predictions, the task scores, its Cumulative aggregates, summary keys appear
    test = [r for r in counts if r.split == "test"] or counts[:2]
    rows = []
    for i, r in enumerate(test):
        prediction = r.answer if i % 2 == 0 else str(int(r.answer) + 1)
        rows.append({"id": r.id, "split": "test", "task": r.task, "modality": r.modality,
                     **score_sample(r, prediction, [], r.answer, None)})
    tables = aggregate(rows, ["test"])
    expected_acc = np.mean([1.0 if i % 2 == 0 else 0.0 for i in range(len(test))])
    assert tables["test/count_structures"]["all"]["accuracy"] == pytest.approx(expected_acc)
    assert tables["test/count_structures"]["all"]["mae"] == pytest.approx(1 - expected_acc)
    assert summarise(tables) == {"count_accuracy": pytest.approx(expected_acc),
                                 "count_mae": pytest.approx(1 - expected_acc)}


def test_the_sixth_task_is_gone_after_the_fixture():
    assert "count_structures" not in tasks.names() and "count_structures" not in tasks.resolve(["vl"])


def test_stage_mixes_and_the_gate_are_checked_against_the_registry(count_task):
    from medplib.config import ConfigError, load_config

    assert tasks.resolve(["vl"]) == ("vqa_closed", "vqa_open", "region_vqa", "refer_ro", "refer_gc",
                                    "refer_mii", "report", "count_structures")
    cfg = load_config("tiny", {"train": {"stage4": {"tasks": ["count_structures", "grounding"]}}})
    assert cfg.train.stage4.tasks == ("count_structures", "grounding")
    with pytest.raises(ConfigError, match="train.stage2.tasks.*'counting' is neither a registered task"):
        load_config("tiny", {"train": {"stage2": {"tasks": ["vl", "counting"]}}})
    with pytest.raises(ValueError, match="already registered"):
        tasks.register(CountStructures())
    from medplib.eval.publish import gate_table

    assert gate_table("count_accuracy") == "val/count_structures" and gate_table("grounding_mdice") == "val/grounding"
    assert gate_table("count_accuracy", "test") == "test/count_structures"
