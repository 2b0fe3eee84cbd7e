"""The benchmarks' comparison runs (benchmarks/textseg_families.py, benchmarks/tisr_plugin.py): one MLflow run of kind
`comparison` holding the table, its markdown and one metric per numeric cell; FAILED when the comparison raises."""
from __future__ import annotations

import pytest

from medplib.config import load_tracking_config
from medplib.eval.compare import comparison_run, log_comparison
from medplib.registry import Registry


def test_a_comparison_run_holds_the_table_and_a_metric_per_cell(home):
    registry = Registry(load_tracking_config().resolved(home))
    rows = [{"tisr": "off", "test.bleu4": 0.67, "steps": 180, "stage_run_id": "abc"},
            {"tisr": "on (seed 1)", "test.bleu4": 0.63, "steps": 180, "stage_run_id": "def"}]
    with comparison_run(registry, "tisr-plugin", {"medplib.task": "report"}) as run_id:
        log_comparison(registry.client, run_id, rows, "tisr_plugin", "| table |", key="tisr")
    run = registry.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tisr-plugin"
    assert run.data.tags["medplib.kind"] == "comparison" and run.data.tags["medplib.task"] == "report"
    assert run.data.metrics == {"off.test.bleu4": 0.67, "off.steps": 180, "on _seed 1.test.bleu4": 0.63,
                                "on _seed 1.steps": 180}
    assert {f.path for f in registry.client.list_artifacts(run_id)} == {"tisr_plugin.json", "tisr_plugin.md"}

    with pytest.raises(RuntimeError, match="training failed"):
        with comparison_run(registry, "tisr-plugin", {}) as failed:
            raise RuntimeError("training failed")
    assert registry.client.get_run(failed).info.status == "FAILED"
