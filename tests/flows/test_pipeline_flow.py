"""The whole pipeline flow for real: Prefect test harness, local Ray, sqlite MLflow, DVC and GX in a temp home.

The session's `pipeline_runs` (tests/conftest.py): two runs on the same small synthetic source; the second finds
ingest cached, trains stage I only, registers version 2 and records the gate's decision. Then `reproduce` re-runs
version 2 from its recorded data version, stages and config.
"""
from __future__ import annotations

import json
import shutil
from uuid import UUID

import pytest
from mlflow import MlflowClient

from medplib.config import load_config, load_tracking_config
from medplib.data.ingest import ingest
from medplib.data.versioning import data_status, read_version
from medplib.registry import (
    TAG_DATA_VERSION, TAG_DECISION, TAG_DECISION_REASON, TAG_DECISION_RUN, TAG_PARENT_RUN, Registry,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def two_runs(pipeline_runs):
    return pipeline_runs


@pytest.fixture
def registry(two_runs) -> Registry:
    return Registry(load_tracking_config().resolved(two_runs[0]))


@pytest.mark.timeout(1800)  # the session's two pipeline runs may happen in this test's set-up
def test_first_run_ingests_trains_four_stages_registers_and_promotes(two_runs, registry):
    _, project, first, _ = two_runs
    assert first["ingest"]["cached"] is False and first["ingest"]["valid"] > 0
    assert first["data_version"] == read_version(project) and first["data_version"].endswith(".dir")
    assert first["validation"]["n_records"] == first["ingest"]["valid"]
    assert [s["stage"] for s in first["stages"]] == [1, 2, 3, 4]
    assert all(s["steps"] > 0 for s in first["stages"])
    ev = first["evaluation"]
    # One epoch a stage on 48 images is a plumbing run: the model has not learned to answer or ground (Dice 0, as
    # an empty mask scores), so the gate's floor keeps it from becoming the first champion.
    assert ev["version"] == "1" and ev["promoted"] is False and ev["champion_version"] is None
    assert ev["metrics"]["grounding_mdice"] < 0.5
    assert "no champion yet, but grounding_mdice" in ev["reason"] and "below the first champion's floor 0.5" in ev["reason"]


def test_second_run_skips_ingest_registers_v2_and_records_the_decision(two_runs, registry):
    _, _, first, second = two_runs
    assert second["ingest"]["cached"] is True
    assert second["data_version"] == first["data_version"]
    assert [s["stage"] for s in second["stages"]] == [1]
    ev = second["evaluation"]
    assert ev["version"] == "2"
    tags = registry.version_tags("2")
    # still no champion (version 1 stayed below the floor), and stage I alone is no better: rejected
    assert ev["promoted"] is False and tags[TAG_DECISION] == "rejected"
    assert tags[TAG_DECISION_REASON] == ev["reason"] and "below the first champion's floor 0.5" in ev["reason"]
    assert registry.champion_version() is None and ev["champion_version"] is None
    decision = registry.client.get_run(tags[TAG_DECISION_RUN])
    assert decision.data.tags["mlflow.parentRunId"] == second["pipeline_run_id"]
    assert decision.data.params["champion_version"] == "none" and decision.data.params["floor.grounding_mdice"] == "0.5"


def test_mlflow_runs_hang_under_the_pipeline_run(two_runs, registry):
    _, _, first, second = two_runs
    client = MlflowClient(registry.cfg.tracking_uri)
    for version, summary in (("1", first), ("2", second)):
        parent = client.get_run(summary["pipeline_run_id"])
        assert parent.info.status == "FINISHED" and parent.data.tags["medplib.kind"] == "pipeline"
        assert parent.data.tags["medplib.prefect_flow_run_id"] == str(summary["flow_run_id"])
        artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "pipeline")}
        assert artifacts == {"pipeline/request.json", "pipeline/config.yaml", "pipeline/data.dvc"}
        children = [s["mlflow_run_id"] for s in summary["stages"]] + [summary["evaluation"]["eval_run_id"]]
        for run_id in children:
            assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == summary["pipeline_run_id"]
        # every run shows the DVC version it used as its dataset input (the MLflow UI's Dataset column)
        for run_id, context in ([(summary["pipeline_run_id"], "training")] + [(s["mlflow_run_id"], "training")
                                for s in summary["stages"]] + [(summary["evaluation"]["eval_run_id"], "evaluation")]):
            [given] = client.get_run(run_id).inputs.dataset_inputs
            assert given.dataset.digest == summary["data_version"], run_id
            assert json.loads(given.dataset.profile)["records"] == summary["ingest"]["valid"]
            assert {t.key: t.value for t in given.tags}["mlflow.data.context"] == context
        tags = registry.version_tags(version)
        assert tags[TAG_PARENT_RUN] == summary["pipeline_run_id"]
        assert tags[TAG_DATA_VERSION] == summary["data_version"]
        primary = summary["evaluation"]["primary_metric"]
        assert parent.data.metrics[primary] == pytest.approx(summary["evaluation"]["metrics"][primary])


def test_each_version_carries_its_model_card(two_runs, registry):
    """The registry's version page says what the version is and how good it is (its description)."""
    _, _, first, second = two_runs
    for summary in (first, second):
        ev = summary["evaluation"]
        card = registry.client.get_model_version(registry.name, ev["version"]).description
        assert card.startswith(f"**medplib version {ev['version']}** (tiny preset), trained and evaluated on data "
                               f"version `{summary['data_version']}`.")
        for s in summary["stages"]:
            assert f"- {s['stage']} {s['name']}: loss " in card
        p = ev["primary_metric"]
        assert f"| {p} (gate) | {ev['val_metrics'][p]:.3f} | {ev['metrics'][p]:.3f} | – |" in card
        assert f"Gate: **rejected**: {ev['reason']}" in card and "Known limits:" in card


def test_each_run_left_a_markdown_report(two_runs):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    for summary in two_runs[2:]:
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(str(summary["flow_run_id"]))])))
        report = next(a for a in artifacts if a.key == "medplib-pipeline")
        assert report.type == "markdown"
        ev = summary["evaluation"]
        assert f"`{summary['data_version']}`" in report.data
        p = ev["primary_metric"]
        assert f"| {p} (gate) | {ev['val_metrics'][p]:.4f} | {ev['metrics'][p]:.4f} |" in report.data
        assert f"Version {ev['version']} **{'promoted' if ev['promoted'] else 'not promoted'}" in report.data
        assert summary["pipeline_run_id"] in report.data and ev["eval_run_id"] in report.data
        assert summary["tracking_uri"] in report.data


@pytest.mark.timeout(1200)
def test_reproduce_version_2_within_tolerance(two_runs, registry):
    from flows.reproduce import LOSS_RTOL, TOLERANCE, comparison_text, reproduce

    home, project, _, second = two_runs
    # data/ moves on to another version first: reproduce must fetch version 2's data from the DVC remote
    ingest("synth", project, home, load_config("tiny", {"data": {"synth_n": 48}}), seed=7)
    before = read_version(project)
    assert before != second["data_version"]
    out = reproduce(model_uri="models:/medplib/2", home=home.root, project=project)
    print(comparison_text(out))
    assert out["restored_data_version"] == second["data_version"] and out["tolerance"] == TOLERANCE
    recorded = second["evaluation"]["metrics"]
    rows = {r["metric"]: r for r in out["rows"]}
    assert set(rows) == set(recorded) | {"stage1_final_loss"}  # version 2's pipeline trained stage I only
    for name, value in recorded.items():
        assert rows[name]["recorded"] == pytest.approx(value)
        assert abs(rows[name]["reproduced"] - value) <= TOLERANCE, comparison_text(out)
    for s in (1,):
        row = rows[f"stage{s}_final_loss"]
        assert row["recorded"] > 0 and abs(row["diff"]) <= LOSS_RTOL * row["recorded"], comparison_text(out)
    assert out["within_tolerance"] is True
    assert read_version(project) == before  # data/ put back
    assert data_status(project, home)["in_sync"] is True
    run = registry.client.get_run(out["reproduce_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["medplib.reproduces_version"] == "2"
    assert set(registry.aliases().values()) <= {"1", "2"}  # reproducing registers nothing


def test_validation_gate_stops_on_bad_data(two_runs, tmp_path):
    from flows.validate import DataValidationError, validate_flow

    home, shared, _, _ = two_runs
    project = tmp_path / "project"  # a copy: the session's project stays intact for other tests
    shutil.copytree(shared / "data", project / "data")
    records = project / "data" / "records.jsonl"
    lines = records.read_text().splitlines()
    records.write_text("\n".join(lines[1:] + ['{"id": "x", "image": "../escape.png"}']) + "\n")
    with pytest.raises(DataValidationError, match="Validation FAILED"):
        validate_flow(home=home.root, project=project)


@pytest.mark.timeout(600)
def test_the_readme_serving_lines_serve_a_registered_version(two_runs, registry, tmp_path):
    """The README's serving lines, run as written (bash, from a folder laid out as the repository: `.venv` and the
    default state folder `.medplib`, here the session pipeline's; only the port is swapped for a free one), answer
    the README's request format as the model answers in-process. Version 1 is `champion` for the test alone (the
    session's versions stayed below the gate's floor); the alias is put back as it was."""
    import base64
    import re
    import sys
    import urllib.request

    from medplib.config.home import REPO_ROOT
    from medplib.serve import free_port, load_model, predict, scoring_server

    home, project, _, _ = two_runs
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    lines = re.search(r"\nServing, from the repository.*?```bash\n(.*?)```", readme, re.S).group(1)
    assert "mlflow models serve -m models:/medplib@champion" in lines and "--port 5001" in lines
    request = re.search(r'`(\{"dataframe_split": .*?\]\]\}\})`', readme, re.S).group(1).replace("\n", " ")
    image = next((project / "data" / "images").glob("*.png"))
    body = json.loads(request.replace("PNG_BASE64", json.dumps(base64.b64encode(image.read_bytes()).decode())))
    row = dict(zip(body["dataframe_split"]["columns"], body["dataframe_split"]["data"][0]))

    repo_like = tmp_path / "repo"
    repo_like.mkdir()
    (repo_like / ".venv").symlink_to(sys.prefix)
    (repo_like / ".medplib").symlink_to(home.root)
    port = free_port()
    champion = registry.champion_version()
    registry.client.set_registered_model_alias(registry.name, "champion", "1")
    try:
        expected = predict(load_model("models:/medplib@champion", registry.cfg), **row)
        with scoring_server(["bash", "-c", lines.replace("--port 5001", f"--port {port}")],
                            f"http://127.0.0.1:{port}", cwd=repo_like, log_file=tmp_path / "serve.log") as url:
            post = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                          headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(post, timeout=120) as response:
                [answer] = json.loads(response.read())["predictions"]
    finally:  # the session's registry as it was
        if champion:
            registry.client.set_registered_model_alias(registry.name, "champion", champion)
        else:
            registry.client.delete_registered_model_alias(registry.name, "champion")
    assert answer == expected and isinstance(answer["answer"], str)
