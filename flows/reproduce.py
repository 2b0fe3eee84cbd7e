"""`reproduce`: re-run the pipeline that produced a registered model version and compare its metrics.

From the version's lineage (its parent pipeline run) it restores the recorded DVC data version and config,
re-trains the recorded stages with the recorded overrides and worker count, evaluates on the same splits, and
compares each headline metric with the recorded one. The version is not re-registered; the re-run is an MLflow
run of its own (kind `reproduce`). `data/` is put back to the version it held before. Stage outputs go to a
folder of their own, `<home>/models/runs/reproduce-v<N>-<run>/`.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows import record
from flows.train import train_flow
from flows.validate import validate_flow
from medplib import tasks
from medplib.config import RunContext
from medplib.data.versioning import checkout_version, data_status, read_version
from medplib.eval.publish import current_git_commit, evaluate_and_log
from medplib.registry import TAG_GIT_COMMIT, TAG_PARENT_RUN, Registry

# Largest accepted |reproduced - recorded| of an eval metric (all lie in [0, 1]), and relative difference of each
# stage's final training loss. Seeds fix the data order, initialisation and sampling (two runs on one machine gave
# bit-identical losses), but CPU float sums need not be bit-stable across machines and thread counts, and a tiny
# model's greedy answers can flip on such differences.
TOLERANCE = 0.05
LOSS_RTOL = 0.02

def compare(recorded: dict[str, float], reproduced: dict[str, float], atol: float = 0.0,
            rtol: float = 0.0) -> list[dict]:
    """One row per metric both runs have: recorded, reproduced, difference, and whether
    |difference| <= atol + rtol * |recorded|."""
    rows = []
    for name in sorted(set(recorded) & set(reproduced)):
        a, b = float(recorded[name]), float(reproduced[name])
        same_nan = math.isnan(a) and math.isnan(b)
        diff = 0.0 if same_nan else b - a
        rows.append({"metric": name, "recorded": a, "reproduced": b, "diff": diff,
                     "tolerance": f"±{atol:g}" if not rtol else f"±{rtol:.0%}" + (f" + {atol:g}" if atol else ""),
                     "ok": same_nan or abs(diff) <= atol + rtol * abs(a) + 1e-12})
    if not rows:
        raise ValueError(f"No metric in common: recorded {sorted(recorded)}, reproduced {sorted(reproduced)}")
    return rows


def stage_final_losses(registry: Registry, parent_run_id: str) -> dict[str, float]:
    """`stage<N>_final_loss` of the finished stage runs under a pipeline run (the last try of a retried stage)."""
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'FINISHED'"
    runs = registry.client.search_runs([registry.experiment_id()], query, order_by=["attributes.start_time ASC"])
    return {f"stage{r.data.tags['medplib.stage']}_final_loss": r.data.metrics["loss"]
            for r in runs if "medplib.stage" in r.data.tags and "loss" in r.data.metrics}


def registered_eval_metrics(registry: Registry, version: str) -> dict:
    """The headline metrics of the evaluation that registered `version` (the run that logged the model): the
    version's `medplib.eval` tag may since hold a re-evaluation of a champion on newer data."""
    run_id = registry.client.get_model_version(registry.name, version).run_id
    run = registry.client.get_run(run_id)
    metrics = {k: v for k, v in run.data.metrics.items() if k in tasks.summary_keys()}
    if not metrics:
        raise ValueError(f"Version {version} was logged by run {run_id}, which has no eval metrics to compare with")
    return {"run_id": run_id, "metrics": metrics, "data_version": run.data.tags.get("medplib.data_version")}


@task(name="restore-data", cache_policy=NONE)
def restore_data(pointer: str, ctx: RunContext) -> str:
    """Write the recorded `data.dvc` and check `data/` out from the DVC remote; returns the version it holds."""
    (ctx.project / "data.dvc").write_text(pointer, encoding="utf-8")
    checkout_version(ctx.project, ctx.home, ctx.profile.dvc)
    status = data_status(ctx.project, ctx.home, ctx.profile.dvc)
    if not status["in_sync"]:
        raise RuntimeError(f"data/ does not match the restored pointer {status['version']} after a DVC checkout")
    get_run_logger().info("data/ restored to version %s", status["version"])
    return status["version"]


@task(name="evaluate", cache_policy=NONE)
def evaluate_model(model_dir: Path, ctx: RunContext, parent_run_id: str) -> dict:
    """Evaluate on the test and zero-shot splits into a child run of `parent_run_id`; no registration."""
    from medplib.serve import load_model

    ctx = ctx.with_data_version(ctx.data_version or read_version(ctx.project))
    report, run_id = evaluate_and_log(load_model(model_dir, device=ctx.device), ctx.data_dir, ctx.data_version,
                                      Registry(ctx.tracking), run_name="evaluate-reproduction",
                                      model_ref=str(model_dir), parent_run_id=parent_run_id,
                                      max_new_tokens=ctx.cfg.eval.max_new_tokens, dataset=ctx.dataset())
    return {"metrics": dict(report.summary), "eval_run_id": run_id}


@flow(name="reproduce")
def reproduce(model_uri: str, home: Path | None = None, project: Path | None = None, workers: int | None = None,
              tolerance: float = TOLERANCE, profile: str = "local", model: str = "medplib",
              context: RunContext | None = None) -> dict:
    """Restore the data version and config recorded for `model_uri` (a version of family `model`'s registered
    model), re-train, re-evaluate, and compare. The run context is the caller's (`context`) or resolved here from
    home, project, profile and model; the re-run swaps in the recorded config and family."""
    t0 = time.perf_counter()
    if tolerance < 0:
        raise ValueError(f"tolerance = {tolerance}: must be >= 0")
    ctx = context or RunContext.resolve(home=home, project=project, profile=profile, model=model)
    tracking = ctx.tracking
    registry = Registry(tracking)
    version = registry.version_of(model_uri)
    if version is None:
        raise ValueError(f"Model {model_uri!r} is not a version of '{registry.name}': use models:/{registry.name}/N "
                         f"or models:/{registry.name}@champion")
    tags = registry.version_tags(version)
    recorded_metrics = registered_eval_metrics(registry, version)
    parent_id = tags.get(TAG_PARENT_RUN)
    if not parent_id or parent_id == "none":
        raise ValueError(f"Version {version} records no parent pipeline run: it was not registered by a pipeline")
    recorded = record.load_run(tracking, parent_id)
    request = recorded.request
    ctx = RunContext.resolve(request.preset, recorded.config, ctx.home, ctx.project, ctx.profile, request.model,
                             device=ctx.device)
    logger = get_run_logger()
    commit_now, commit_then = current_git_commit()[0], tags.get(TAG_GIT_COMMIT)
    if commit_now != commit_then:
        logger.warning("Code differs from the recorded commit %s (now %s): a mismatch may be the code's",
                       commit_then, commit_now)

    pointer_file = ctx.project / "data.dvc"
    previous = pointer_file.read_text(encoding="utf-8") if pointer_file.exists() else None
    out = {"model": model_uri, "version": version, "recorded_run_id": parent_id, "tolerance": tolerance,
           "data_version": recorded.data_version, "git_commit_recorded": commit_then, "git_commit_now": commit_now,
           "eval_run_id_recorded": recorded_metrics["run_id"]}
    try:
        out["restored_data_version"] = restore_data(recorded.data_pointer, ctx)
        ctx = ctx.with_data_version(out["restored_data_version"])
        run_id = record.start_run(registry, f"reproduce-v{version}", "reproduce", request, ctx.cfg,
                                  out["restored_data_version"], ctx.project,
                                  tags={"medplib.reproduces_version": version, "medplib.reproduces_run": parent_id},
                                  dataset=ctx.dataset())
        out["reproduce_run_id"] = run_id
        status = "FAILED"
        try:
            validate_flow(context=ctx)
            stages = train_flow(stages=request.stages, workers=workers or request.workers,
                                stage_overrides=request.stage_overrides, parent_run_id=run_id,
                                workspace=f"runs/reproduce-v{version}-{run_id[:8]}", context=ctx)
            out |= evaluate_model(Path(stages[-1]["out_dir"]), ctx, run_id)
            status = "FINISHED"
        finally:
            record.finish_run(registry, run_id, status, metrics=out.get("metrics"))
    finally:
        if previous is not None and previous != recorded.data_pointer:
            pointer_file.write_text(previous, encoding="utf-8")
            checkout_version(ctx.project, ctx.home, ctx.profile.dvc)
            logger.info("data/ put back to version %s", read_version(ctx.project))
    out["rows"] = (compare(recorded_metrics["metrics"], out["metrics"], atol=tolerance)
                   + compare(stage_final_losses(registry, parent_id), stage_final_losses(registry, run_id),
                             rtol=LOSS_RTOL))
    out["within_tolerance"] = all(r["ok"] for r in out["rows"])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def comparison_text(out: dict) -> str:
    """Recorded vs reproduced metrics, the tolerance and the verdict."""
    lines = [f"Reproduced {out['model']} (version {out['version']}) on data {out['restored_data_version']} in "
             f"{out['seconds']:.0f} s. Held to: eval metrics within ±{out['tolerance']}, stage losses within "
             f"±{LOSS_RTOL:.0%}.",
             f"  {'metric':<28}{'recorded':>10}{'reproduced':>12}{'diff':>10}{'tolerance':>11}"]
    lines += [f"  {r['metric']:<28}{r['recorded']:>10.4f}{r['reproduced']:>12.4f}{r['diff']:>+10.4f}"
              f"{r['tolerance']:>11}{'' if r['ok'] else '   OUT OF TOLERANCE'}" for r in out["rows"]]
    bad = [r["metric"] for r in out["rows"] if not r["ok"]]
    lines.append("All metrics within tolerance." if not bad else f"Not reproduced within tolerance: {', '.join(bad)}")
    if out["git_commit_recorded"] != out["git_commit_now"]:
        lines.append(f"Note: recorded at commit {out['git_commit_recorded']}, re-run at {out['git_commit_now']}.")
    lines.append(f"MLflow: recorded pipeline run {out['recorded_run_id']}, reproduction run {out['reproduce_run_id']}")
    return "\n".join(lines)
