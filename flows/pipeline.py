"""`pipeline`: ingest → validate → train the model family's stages (MedPLIB's I-IV) → evaluate, register, promote;
the step flows in order.

A parent MLflow run records the request, config and data pointer (for `medplib reproduce`); the stage runs and
the eval run are its children. Each pipeline run leaves a Prefect markdown artifact (`medplib-pipeline`) with the
data version, the metrics, the promotion decision and the MLflow run ids.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from prefect import Flow, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from flows import record
from flows.evaluate import evaluate_flow
from flows.ingest import ingest_flow
from flows.train import check_training, train_flow
from flows.validate import validate_flow
from medplib.config import RunContext
from medplib.registry import Registry, ui_url

ARTIFACT_KEY = "medplib-pipeline"
MLFLOW_UI_PORT = 5000  # where `medplib ui` serves MLflow
PREFECT_UI_PORT = 4200


@task(name="trained-before", cache_policy=NONE)
def trained_before(registry: Registry, data_version: str) -> str | None:
    """What already trained this registered model on `data_version` (`version N`, `pipeline run ID`), or None."""
    return registry.trained_on(data_version)


@task(name="mark-trained", cache_policy=NONE)
def mark_trained(registry: Registry, run_id: str, data_version: str) -> None:
    """Training on `data_version` finished: a data-triggered run will not train on it again, whatever the gate says."""
    registry.mark_trained(run_id, data_version)


@flow(name="medplib-pipeline")
def pipeline(source: str = "synth", preset: Literal["tiny", "full"] = "tiny", config: Path | None = None,
             workers: int = 2, home: Path | None = None, project: Path | None = None,
             stages: list[int] | None = None, stage_overrides: dict[int, dict[str, Any]] | None = None,
             seed: int | None = None, retries: int = 1, retry_delay_seconds: float = 10.0,
             only_if_data_changed: bool = False, force: bool = False, model: str = "medplib",
             profile: str = "local", device: str = "auto", context: RunContext | None = None) -> dict:
    """The whole pipeline on `source`. `stage_overrides` maps a stage to StageSpec keys (e.g. {1: {"epochs": 1}});
    `retries` applies to ingest and to each training stage, not to evaluate (a retry after registering would
    register twice). With `only_if_data_changed`, stop after ingest when this registered model was already trained on
    the dataset version (a version registered from it, or a run whose training on it finished: promoted, rejected or
    failed in evaluation alike), unless `force`. The parameters stay plain (a schedule's deployment stores them):
    the run context is resolved once here from preset, config, home, project, profile, model and device (where the
    evaluation runs), unless the caller resolved it (`context`, what `medplib pipeline` passes; those parameters are
    then not read), and handed to every step."""
    t0 = time.perf_counter()
    ctx = context or RunContext.resolve(preset, Path(config).resolve() if config else None, home, project, profile,
                                        model, device=device)
    stages = list(ctx.family.stages) if stages is None else list(stages)  # default: the family's whole plan
    check_training(stages, ctx.cfg, stage_overrides, workers, ctx.model)  # a typo must not cost three stages
    logger = get_run_logger()
    retry = dict(retries=retries, retry_delay_seconds=retry_delay_seconds)
    registry = Registry(ctx.tracking)
    registry.check_reachable()  # an unreachable MLflow server stops the run here, not after four stages
    summary: dict[str, Any] = {"flow_run": flow_run.get_name(), "flow_run_id": flow_run.get_id(),
                               "tracking_uri": ctx.tracking.tracking_uri, "experiment_id": registry.experiment_id(),
                               "registered_model": registry.name,
                               "home": str(ctx.home.root), "project": str(ctx.project)}

    # the subflow runs are named after this one (`<run>-ingest`, ...): the Prefect UI's run list reads as one pipeline
    ingest, validate, train, evaluate = (_subflow(f, summary["flow_run"])
                                         for f in (ingest_flow, validate_flow, train_flow, evaluate_flow))
    summary["ingest"] = ingest(source=source, seed=seed, context=ctx, **retry)
    summary["data_version"] = summary["ingest"]["version"]
    ctx = ctx.with_data_version(summary["data_version"])
    if only_if_data_changed and not force:
        trained_by = trained_before(registry, summary["data_version"])
        if trained_by is not None:
            logger.info("Dataset %s was already trained (%s): nothing to retrain", summary["data_version"],
                        trained_by)
            summary |= {"skipped": True, "trained_by": trained_by, "seconds": round(time.perf_counter() - t0, 1)}
            _publish_artifact(summary)
            return summary
    elif only_if_data_changed:
        logger.info("force: retraining on dataset %s whether or not it was trained", summary["data_version"])

    request = record.PipelineRequest(source, ctx.cfg.preset, list(stages), dict(stage_overrides or {}), workers, seed,
                                     ctx.model)
    parent = record.start_run(registry, f"pipeline-{summary['flow_run']}", "pipeline", request, ctx.cfg,
                              summary["data_version"], ctx.project,
                              tags={"medplib.prefect_flow_run_id": str(summary["flow_run_id"])},
                              dataset=ctx.dataset())
    summary["pipeline_run_id"] = parent
    status = "FAILED"
    try:
        summary["validation"] = validate(context=ctx)
        # Each run trains in its own folder under <home>/models/runs/: pipelines sharing a home never mix stages.
        summary["workspace"] = f"runs/{summary['flow_run']}-{str(summary['flow_run_id'])[:8]}"
        summary["stages"] = train(stages=stages, workers=workers, stage_overrides=stage_overrides,
                                  parent_run_id=parent, workspace=summary["workspace"], context=ctx, **retry)
        mark_trained(registry, parent, summary["data_version"])
        summary["evaluation"] = evaluate(model_dir=Path(summary["stages"][-1]["out_dir"]), parent_run_id=parent,
                                         stage_overrides=stage_overrides, context=ctx)
        summary["champion_version"] = summary["evaluation"]["champion_version"]
        summary["skipped"] = False
        status = "FINISHED"
    except BaseException as e:
        summary["error"] = f"{type(e).__name__}: {e}"
        _publish_artifact(summary)
        raise
    finally:
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        ev = summary.get("evaluation", {})
        record.finish_run(registry, parent, status, metrics=ev.get("metrics"),
                          tags={"medplib.registered_version": ev["version"]} if ev else None)
    _publish_artifact(summary)
    return summary


def _subflow(step, run_name: str | None):
    """The step flow, its runs named `<pipeline run>-<step>`; a plain function (a test's stand-in) as it is."""
    return step.with_options(flow_run_name=f"{run_name}-{step.name}") if isinstance(step, Flow) else step


def _publish_artifact(summary: dict) -> None:
    create_markdown_artifact(markdown=report_markdown(summary), key=ARTIFACT_KEY,
                             description=f"medplib pipeline: data {summary['data_version']}")


def _mlflow_link(summary: dict, run_id: str | None) -> str:
    if not run_id:
        return "-"
    url = ui_url(f"http://127.0.0.1:{MLFLOW_UI_PORT}", summary["experiment_id"], run_id)
    return f"[`{run_id}`]({url})"


def report_markdown(summary: dict) -> str:
    """The run's artifact: data version, metrics table, promotion decision, MLflow run ids and links."""
    ing = summary["ingest"]
    how = "ingest skipped: cached" if ing.get("cached") else "ingested"
    lines = [f"# medplib pipeline `{summary['flow_run']}`", "",
             f"**Data version** `{summary['data_version']}` from `{ing['source']}`: {ing['valid']} valid + "
             f"{ing['quarantined']} quarantined records ({how})."]
    if summary.get("skipped"):
        lines += ["", f"**Not retrained**: this data version was already trained ({summary['trained_by']}; "
                      "data-triggered mode, `force` retrains anyway)."]
        return "\n".join(lines) + "\n"
    ev = summary.get("evaluation") or {}
    if "error" in summary:
        done = [step for step in ("validation", "stages", "evaluation") if step in summary]
        lines += ["", f"**Failed** after {', '.join(['ingest', *done])}:", "", "```", summary["error"][:4000], "```"]
    if "validation" in summary:
        v = summary["validation"]
        lines += ["", f"**Validation** passed: {v['n_records']} records, {v['n_images']} images, "
                      f"{v['n_expectations']} expectations ([Data Docs]({Path(v['data_docs']).as_uri()}))."]
    if ev:
        val = ev.get("val_metrics") or {}
        lines += ["", f"## Metrics of version {ev['version']}", "",
                  "The gate reads validation; test (and zero-shot) is reported, never used to choose.", "",
                  "| metric | validation | test |", "|---|---|---|"]
        lines += [f"| {k}{' (gate)' if k == ev['primary_metric'] else ''} | "
                  f"{'-' if val.get(k) is None else f'{val[k]:.4f}'} | {v:.4f} |" for k, v in sorted(ev["metrics"].items())]
        verdict = "**promoted** to champion" if ev["promoted"] else "**not promoted**"
        lines += ["", "## Promotion", "", f"Version {ev['version']} {verdict}: {ev['reason']}.",
                  f"Champion is now version {ev['champion_version']} "
                  f"(`models:/{summary.get('registered_model', 'medplib')}@champion`)."]
        if ev.get("champion_metric") is not None:  # a comparison was made: show every part of it
            lines += ["", "| comparison | challenger − champion | limit |", "|---|---|---|",
                      f"| {ev['primary_metric']} (primary) | {ev['delta']:+.4f} | > 0 |"]
            if ev.get("interval"):
                low, high = ev["interval"]
                lines.append(f"| {ev['primary_metric']} {ev['confidence']:.0%} bootstrap interval "
                             f"({ev['paired_samples']} paired samples) | [{low:+.4f}, {high:+.4f}] | low end > min_delta |")
            lines += [f"| guard {m} | {d:+.4f} | ≥ −tolerance |" for m, d in (ev.get("guard_deltas") or {}).items()]
            lines += [f"| {ev['primary_metric']} on {m} | {d:+.4f} | ≥ −max_modality_regression |"
                      for m, d in (ev.get("modality_deltas") or {}).items()]
    lines += ["", "## MLflow", "", f"Tracking URI `{summary['tracking_uri']}`, experiment {summary['experiment_id']}"
              f" (open with `medplib ui`).", "", "| run | id |", "|---|---|",
              f"| pipeline (parent) | {_mlflow_link(summary, summary.get('pipeline_run_id'))} |"]
    lines += [f"| stage {s['stage']} {s['name']}{' (skipped: ' + s['skipped'] + ')' if s.get('skipped') else ''} | "
              f"{_mlflow_link(summary, s['mlflow_run_id'])} |" for s in summary.get("stages", [])]
    if ev:
        lines += [f"| evaluation | {_mlflow_link(summary, ev['eval_run_id'])} |",
                  f"| promotion decision | {_mlflow_link(summary, ev.get('decision_run_id'))} |"]
    return "\n".join(lines) + "\n"


def _stage_words(stage: dict) -> str:
    if stage.get("skipped"):
        return f"{stage['stage']} {stage['name']} skipped ({stage['skipped']})"
    return f"{stage['stage']} {stage['name']} loss {stage['first_loss']:.2f}→{stage['last_loss']:.2f}"


def summary_text(summary: dict) -> str:
    """The few lines `medplib pipeline` ends with: data version, metrics, champion, where to look."""
    ing = summary["ingest"]
    lines = [f"Pipeline {summary['flow_run']} finished in {summary['seconds']:.0f} s",
             f"  data version   {summary['data_version']} ({ing['valid']} valid + {ing['quarantined']} quarantined; "
             f"{'ingest cached' if ing.get('cached') else 'ingested'})"]
    if summary.get("skipped"):
        lines.append(f"  not retrained  already trained on this data version ({summary['trained_by']})")
    else:
        ev = summary["evaluation"]
        lines += ["  stages         " + ", ".join(_stage_words(s) for s in summary["stages"]),
                  "  val metrics    " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(ev.get("val_metrics", {}).items())),
                  "  test metrics   " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(ev["metrics"].items())),
                  f"  version {ev['version']}      {'promoted' if ev['promoted'] else 'not promoted'}: {ev['reason']}",
                  f"  champion       models:/{summary.get('registered_model', 'medplib')}@champion = version "
                  f"{ev['champion_version']}"]
    home = summary["home"]
    runs_url = ui_url(f"http://127.0.0.1:{MLFLOW_UI_PORT}", summary["experiment_id"], summary.get("pipeline_run_id"))
    lines += ["Where to look:",
              f"  medplib ui --home {home}        Prefect UI (runs, artifact '{ARTIFACT_KEY}') and MLflow UI on "
              "127.0.0.1",
              f"  mlflow ui --backend-store-uri {summary['tracking_uri']} --host 127.0.0.1 --port {MLFLOW_UI_PORT}",
              f"    then {runs_url}"
              + ("   (this pipeline run; its stage and evaluation runs nested)" if summary.get("pipeline_run_id")
                 else "   (the training runs)"),
              f"  PREFECT_HOME={home}/prefect prefect server start --host 127.0.0.1 --port {PREFECT_UI_PORT}"]
    logs = summary.get("logs") or {}  # set by `medplib pipeline` (medplib.run_log)
    if logs.get("log_file"):
        lines.append(f"  {logs['log_file']}   the full log (Prefect, Ray, MLflow, warnings)")
    if logs.get("ray_logs"):
        lines.append(f"  {logs['ray_logs']}   Ray's session logs (training workers, Ray Train, DeepSpeed)")
    return "\n".join(lines)
