"""`medplib …`: the command line. Every command accepts --home DIR and prints a JSON summary with --json.

This is the entry: the one place that reads $MEDPLIB_PROFILE, and where each command's RunContext (config, state
and project folders, profile, tracking settings for the model family) is resolved once and passed down."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from medplib.config import ConfigError, RunContext, load_config
from medplib.config.profile import PROFILE_ENV, Profile, load_profile
from medplib.run_log import console_logging, run_log

log = logging.getLogger("medplib")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", type=Path, default=None,
                   help="state folder (default: $MEDPLIB_HOME or .medplib/ in the repository)")
    p.add_argument("--project", type=Path, default=None,
                   help="folder holding data/, data.dvc and .dvc/ (default: the current folder)")
    p.add_argument("--preset", choices=["tiny", "full"], default="tiny", help="config preset (default: tiny)")
    p.add_argument("--config", type=Path, default=None, help="YAML file overriding preset keys")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--profile", default=None,
                   help="where the services are: local (default) | cluster | any profiles/NAME.yaml "
                        "(default: $MEDPLIB_PROFILE or local)")


def _device_option(p: argparse.ArgumentParser) -> None:
    """--device for the commands that evaluate, publish or predict with a model."""
    from medplib.device import DEVICE_HELP, device_name

    p.add_argument("--device", type=_argparse_type(device_name), default="auto", help=DEVICE_HELP)


def _argparse_type(check):
    """A checking function raising ValueError as an argparse type whose message argparse prints."""
    def parse(value: str):
        try:
            return check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = check.__name__
    return parse


def profile_name(flag: str | None) -> str:
    """--profile, else $MEDPLIB_PROFILE, else `local`: read here, at the entry, and nowhere below."""
    return flag or os.environ.get(PROFILE_ENV) or "local"


def apply_profile(name: str | None, project: Path | None = None) -> Profile:
    """Load the command's profile (the project folder's `profiles/NAME.yaml`, else the packaged one; a missing
    profile or environment variable fails here, naming it). Its MLflow URIs, DVC remote and Ray address travel in
    the RunContext; Prefect reads its API URL from PREFECT_API_URL (before Prefect is imported), the one setting
    handed over through the environment."""
    profile = load_profile(profile_name(name), project=project or Path.cwd())
    if profile.prefect_api_url:
        os.environ["PREFECT_API_URL"] = profile.prefect_api_url
    return profile


def _pipeline_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="synth",
                   help="synth, or KIND:DIR for a registered reader: mecovqa, dicom, nifti, … (default: synth)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers per stage (default: 2)")
    p.add_argument("--model", default="medplib", help="model family to train (default: medplib)")
    p.add_argument("--epochs", type=int, default=None, help="override every stage's epochs")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop every stage after this many optimiser steps (smoke runs; default: no cap)")
    p.add_argument("--stages", default=None,
                   help="comma-separated stages to train, in order (default: the family's plan, MedPLIB's 1,2,3,4); "
                        "the last one is evaluated")
    p.add_argument("--retries", type=int, default=1, help="retries of ingest and of each stage (default: 1)")
    _device_option(p)  # where the trained model is evaluated


MODEL_TO_LOAD_HELP = ("a model family NAME (its champion: models:/<its registered model>@champion), "
                      "models:/medplib@champion, models:/medplib/N (a registered model selects its family), "
                      "runs:/RUN_ID/medplib or a saved model folder (loaded as its format says)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medplib", description=__doc__)
    # `medplib --profile NAME COMMAND` (docs/scaling-out.md) as well as `medplib COMMAND --profile NAME`: its own dest,
    # since a subcommand's default would overwrite a shared one
    parser.add_argument("--profile", dest="global_profile", default=None, metavar="NAME",
                        help="where the services are, for any command (as COMMAND --profile NAME; that one wins)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pipeline", help="the whole pipeline as a Prefect flow: ingest → validate → train stages "
                                        "I-IV → evaluate → register → promote")
    _common(p)
    _pipeline_options(p)

    p = sub.add_parser("schedule", help="serve the retraining deployment on a cron against a Prefect server on "
                                        "127.0.0.1 (start one with `medplib ui`)")
    _common(p)
    _pipeline_options(p)
    p.add_argument("--cron", required=True, help='when to retrain, e.g. "0 3 * * *" (every day at 03:00)')
    p.add_argument("--on-data-change", action="store_true",
                   help="retrain only on a dataset version this model was never trained on (registered, rejected or "
                        "failed after training); `medplib data ingest` of a new version into this project also "
                        "starts a run (a Prefect deployment trigger)")
    p.add_argument("--name", default="retrain", help="deployment name (default: retrain)")

    p = sub.add_parser("retrain", help="run a served retraining deployment now (one tick, outside its cron)")
    _common(p)
    p.add_argument("--name", default="retrain", help="deployment name given to `medplib schedule` (default: retrain)")
    p.add_argument("--force", action="store_true",
                   help="retrain even when a data-triggered deployment's data version was already trained")

    p = sub.add_parser("ui", help="start the Prefect and MLflow UIs on 127.0.0.1 and print their URLs")
    _common(p)
    p.add_argument("--prefect-port", type=int, default=4200, help="Prefect server port (default: 4200)")
    p.add_argument("--mlflow-port", type=int, default=5000, help="MLflow UI port (default: 5000)")

    p = sub.add_parser("demo", help="serve a page on 127.0.0.1: draw a point, box or shape on an image, ask, and see "
                                    "the answer and the grounded mask of a registered model (alias or version)")
    _common(p)
    p.add_argument("--model", default=None, help="the model chosen first: models:/medplib@champion (default), "
                                                 "models:/medplib/N or a saved model folder; the page also "
                                                 "lists every alias and version of the registered model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit (default: 48)")
    _device_option(p)

    p = sub.add_parser("reproduce", help="restore a model version's recorded data and config, re-run, compare metrics")
    _common(p)
    p.add_argument("model", help="models:/medplib/N (or models:/medplib@champion)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest accepted |reproduced - recorded| per metric (default: flows.reproduce.TOLERANCE)")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: as recorded)")
    _device_option(p)

    p = sub.add_parser("train", help="train one MedPLIB stage as a Ray Train job (logged to MLflow)")
    _common(p)
    p.add_argument("--stage", type=int, required=True, choices=[1, 2, 3, 4],
                   help="1 align, 2 VL expert, 3 grounding expert, 4 MoE")
    p.add_argument("--model", default="medplib", help="model family (default: medplib)")
    p.add_argument("--from", dest="from_", default=None,
                   help="model folder (or MLflow run id) the stage starts from; default: the previous stage's output")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: 2)")
    p.add_argument("--epochs", type=int, default=None, help="override the stage's epochs")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")

    p = sub.add_parser("evaluate", help="evaluate a model on the validation, test and zero-shot splits of data/ "
                                        "(logged to MLflow)")
    _common(p)
    p.add_argument("--model", required=True, help=MODEL_TO_LOAD_HELP)
    p.add_argument("--split", default="val,test,zeroshot",
                   help="comma-separated splits (default: val,test,zeroshot; the gate's metrics are validation's)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    p.add_argument("--batch-size", type=int, default=16, help="records per generate call (default: 16)")
    _device_option(p)

    p = sub.add_parser("promote", help="gate the challenger (or --version N) against the champion on recorded "
                                       "metrics; moves `champion` only if it is better")
    _common(p)
    p.add_argument("--version", type=int, default=None, help="registered version to gate (default: the challenger)")

    p = sub.add_parser("rollback", help="point `champion` back at the previous champion")
    _common(p)
    p.add_argument("--reason", default="manual rollback", help="why, recorded with the decision")

    p = sub.add_parser("predict", help="answer one question about an image (+ optional pixel prompt) with a model")
    _common(p)
    p.add_argument("--model", required=True, help=MODEL_TO_LOAD_HELP)
    p.add_argument("--image", required=True, help="PNG image")
    p.add_argument("--question", required=True, help="question text; a pixel prompt adds <region> if absent")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--point", default=None, help="point prompt X,Y in image pixels")
    prompt.add_argument("--box", default=None, help="box prompt X1,Y1,X2,Y2 in image pixels (inclusive)")
    prompt.add_argument("--region", default=None, help="free-form prompt: a PNG mask the size of the image")
    p.add_argument("--example", action="append", default=None, metavar="IMG:MASK",
                   help="an in-context example: an image and its mask (PNG files); repeat for up to 3")
    p.add_argument("--example-style", choices=["overlay", "separate"], default="overlay",
                   help="how the examples are shown: the mask in blue over its image (default), or as an image")
    p.add_argument("--mask-out", type=Path, default=None, help="write the first predicted mask here as PNG")
    p.add_argument("--max-new-tokens", type=int, default=24, help="answer length limit (default: 24)")
    _device_option(p)

    config = sub.add_parser("config", help="the resolved configuration")
    csub = config.add_subparsers(dest="config_command", required=True)
    p = csub.add_parser("show", help="print the config a command would run with: the preset, then --config's "
                                     "overrides (stage specs included: train.stage1 … train.stage4), as YAML "
                                     "(or JSON with --json); with --model NAME of a family with its own section, "
                                     "that section resolved as families.NAME")
    _common(p)
    p.add_argument("--model", default=None, help="also resolve this model family's own section (e.g. reclmis)")

    data = sub.add_parser("data", help="synthesise, ingest, validate and version datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("synth", help="write a synthetic dataset in the MeCoVQA layout")
    _common(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--n", type=int, default=None, help="number of images (default: the preset's data.synth_n)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's data.synth_seed)")
    p = dsub.add_parser("ingest", help="normalise a source into data/, quarantine bad records, version with DVC")
    _common(p)
    p.add_argument("--source", default="synth",
                   help="synth, or KIND:DIR for a registered reader: mecovqa, dicom, nifti, … (default: synth)")
    p.add_argument("--seed", type=int, default=None, help="seed for the synth source")
    p = dsub.add_parser("validate", help="run the Great Expectations gate over data/; non-zero exit on failure")
    _common(p)
    p = dsub.add_parser("status", help="the dataset version and whether data/ and the remote hold it")
    _common(p)
    p = dsub.add_parser("pull", help="bring data/ to a dataset version from the DVC remote (what a cluster job runs "
                                     "first in its project folder)")
    _common(p)
    p.add_argument("--version", default=None,
                   help="the DVC hash to pull (writes data.dvc for it); default: the version data.dvc records")
    return parser


def _emit(args: argparse.Namespace, summary: dict, text: str) -> None:
    """The command's summary on stdout, naming the command's log file: the commands that start Ray (pipeline,
    train, reproduce) put it in `summary["logs"]` and their text; for the others a last line says it (on stderr
    with --json, whose summaries keep their keys)."""
    logs = getattr(args, "run_log", None)
    named = logs is None or "logs" in summary
    if args.json:  # the real stdout: with --json everything else printed goes to stderr (see main)
        print(json.dumps(summary, indent=1, default=str), file=getattr(args, "json_out", None) or sys.stdout)
        if not named:
            print(logs.text(), file=sys.stderr)
    else:
        print(text if named else f"{text}\n{logs.text()}")


def _ingest(args, ctx: RunContext) -> dict:
    from medplib.data.ingest import ingest

    r = ingest(args.source, ctx.project, ctx.home, ctx.cfg, seed=getattr(args, "seed", None), remote=ctx.profile.dvc)
    return r.to_dict()


def _validate(ctx: RunContext):
    from medplib.data.expectations import validate_dataset

    if not (ctx.data_dir / "records.jsonl").exists():
        raise FileNotFoundError(f"No dataset at {ctx.data_dir}: run `medplib data ingest` first")
    return validate_dataset(ctx.data_dir, ctx.home.reports / "data_docs")


# ---- orchestration: pipeline, schedule, ui, reproduce (the Prefect flows live in flows/, imported lazily) -----

PREFECT_API_DEFAULT = "http://127.0.0.1:4200/api"  # where `medplib ui` starts the Prefect server


def _prefect_setup(home) -> None:
    """Prefect's state under the home and its measured settings; must run before prefect is imported."""
    import os

    home.prefect.mkdir(parents=True, exist_ok=True)  # prefect creates only the last level, at import
    os.environ["PREFECT_HOME"] = str(home.prefect)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per Prefect API call otherwise


def _flows(module: str):
    """`flows.<module>`, imported late: Prefect must be set up (`_prefect_setup`) before it is imported."""
    import importlib

    try:
        return importlib.import_module(f"flows.{module}")
    except ModuleNotFoundError as e:
        if e.name != "flows":
            raise
        raise FileNotFoundError("The `flows` package is not importable from this install (an editable install made "
                                "before flows/ existed): run `rm .venv/.medplib-installed && make setup`") from None


def _stage_overrides(args) -> dict | None:
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs {args.epochs}: need at least 1")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps {args.max_steps}: need at least 1")
    keys = {k: v for k, v in (("epochs", args.epochs), ("max_steps", args.max_steps)) if v is not None}
    return {s: dict(keys) for s in _stages(args)} if keys else None


def _stages(args) -> list[int]:
    if args.stages is None:
        from medplib.model.family import get_family

        return list(get_family(args.model).stages)
    try:
        stages = [int(s) for s in args.stages.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--stages {args.stages!r}: give stage numbers separated by commas, e.g. 1,2,3,4") from None
    if not stages:
        raise ValueError(f"--stages {args.stages!r}: name at least one stage")
    return stages


def _pipeline(args, ctx: RunContext) -> int:
    _prefect_setup(ctx.home)
    pipeline, validate = _flows("pipeline"), _flows("validate")
    try:
        summary = pipeline.pipeline(source=args.source, workers=args.workers, stages=_stages(args),
                                    stage_overrides=_stage_overrides(args), retries=args.retries, context=ctx)
    except validate.DataValidationError as e:
        print(f"medplib: the dataset failed the validation gate; nothing was trained.\n{e}", file=sys.stderr)
        return 1
    summary["logs"] = args.run_log.to_dict()
    _emit(args, summary, pipeline.summary_text(summary))
    return 0


def _healthy(url: str, timeout: float = 3.0) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _prefect_server(ctx: RunContext) -> str:
    """The Prefect server's API URL (PREFECT_API_URL, default 127.0.0.1:4200), checked to answer; Prefect set up."""
    import os

    _prefect_setup(ctx.home)
    api = os.environ.get("PREFECT_API_URL") or PREFECT_API_DEFAULT
    if not _healthy(f"{api.rstrip('/')}/health"):
        raise ValueError(f"No Prefect server answers at {api}. Start one on loopback with `medplib ui` (another "
                         "terminal; it prints the URL) or `prefect server start --host 127.0.0.1`, then set "
                         "PREFECT_API_URL to its /api URL if it is not " + PREFECT_API_DEFAULT)
    os.environ["PREFECT_API_URL"] = api
    return api


def _schedule(args, ctx: RunContext) -> int:
    api = _prefect_server(ctx)
    schedule = _flows("schedule")
    # plain values only: the deployment stores them, and each scheduled run resolves its context from them
    source = _flows("events").source_spec(args.source)  # its folder absolute: runs do not depend on a working directory
    params = dict(source=source, preset=args.preset, config=args.config.resolve() if args.config else None,
                  workers=args.workers, home=ctx.home.root, project=ctx.project, stages=_stages(args),
                  stage_overrides=_stage_overrides(args), retries=args.retries,
                  only_if_data_changed=args.on_data_change, model=ctx.model, profile=ctx.profile.name,
                  device=ctx.device)
    deployment = schedule.retraining_deployment(args.name, args.cron, params)
    info = {"deployment": f"{deployment.flow_name}/{deployment.name}", "cron": args.cron, "api": api,
            "on_data_change": args.on_data_change, "parameters": params}
    triggered = (" and on ingest events (retrains only on a data version not trained yet)" if args.on_data_change
                 else "")
    _emit(args, info, f"Deployment '{info['deployment']}' on cron '{args.cron}'{triggered} at {api}; serving it here "
                      "until Ctrl-C, which pauses the schedule.")
    schedule.serve_deployments(deployment)
    return 0


def _retrain(args, ctx: RunContext) -> int:
    api = _prefect_server(ctx)
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    name = f"medplib-pipeline/{args.name}"  # the pipeline flow's name, as `medplib schedule` deployed it
    try:
        run = run_deployment(name, parameters={"force": True} if args.force else None, timeout=0)
    except ObjectNotFound:
        raise ValueError(f"No deployment '{name}' on the Prefect server at {api}: serve it first with `medplib "
                         f"schedule --name {args.name} --cron ...`") from None
    summary = {"deployment": name, "flow_run": run.name, "flow_run_id": str(run.id), "force": args.force, "api": api}
    forced = " (force: it retrains whatever the data version)" if args.force else ""
    _emit(args, summary, f"Flow run {run.name} of '{name}' created{forced}; the process serving it (`medplib "
                         f"schedule --name {args.name}`) runs it next.")
    return 0


def _announce_ingest(result: dict, ctx: RunContext, source: str, previous: str | None) -> str | None:
    """Emit `medplib.data.ingested` to the Prefect server PREFECT_API_URL names (the profile's or the environment's)
    when ingest changed the dataset version; the event id, or None (no change, no server configured)."""
    import os

    api = os.environ.get("PREFECT_API_URL")
    if not api or result["version"] == previous:
        return None
    if not _healthy(f"{api.rstrip('/')}/health"):
        print(f"medplib: warning: no Prefect server answers at {api}: no `medplib.data.ingested` event was sent, so "
              "no deployment trigger runs on this version (a data-triggered cron tick still will)", file=sys.stderr)
        return None
    _prefect_setup(ctx.home)
    return _flows("events").emit_data_ingested(result, ctx.project, source, previous)


def _ui(args, ctx: RunContext) -> int:
    import os
    import subprocess
    import time

    from medplib.registry import Registry, ui_url

    home, t = ctx.home, ctx.tracking
    _prefect_setup(home)
    bin_dir = Path(sys.executable).parent
    servers = {
        "Prefect": ([str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                     str(args.prefect_port)], f"http://127.0.0.1:{args.prefect_port}", "/api/health"),
        "MLflow": ([str(bin_dir / "mlflow"), "server", "--backend-store-uri", t.tracking_uri,
                    "--default-artifact-root", t.artifact_location, "--no-serve-artifacts", "--workers", "1",
                    "--host", "127.0.0.1", "--port", str(args.mlflow_port)], f"http://127.0.0.1:{args.mlflow_port}",
                   "/health"),
    }
    for name, (_, url, health) in servers.items():
        if _healthy(url + health, timeout=1):
            raise ValueError(f"Something already answers at {url} ({name} port): stop it or choose another port")
    logs = home.logs
    logs.mkdir(exist_ok=True)
    procs = {}
    # the Prefect UI calls the API where it is told to, 127.0.0.1:4200 unless PREFECT_UI_API_URL says otherwise
    envs = {"Prefect": {"PREFECT_UI_API_URL": f"http://127.0.0.1:{args.prefect_port}/api"}, "MLflow": {}}
    for name, (cmd, _, _) in servers.items():
        with open(logs / f"{name.lower()}-ui.log", "ab") as out:  # the child keeps its own handle
            procs[name] = subprocess.Popen(cmd, env={**envs[name], **os.environ}, stdout=out,
                                           stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        for name, (_, url, health) in servers.items():
            while not _healthy(url + health, timeout=1):
                if procs[name].poll() is not None:
                    print(f"medplib: error: the {name} server exited with code {procs[name].returncode}; see "
                          f"{logs / (name.lower() + '-ui.log')}", file=sys.stderr)
                    return 1
                if time.monotonic() > deadline:
                    print(f"medplib: error: the {name} server did not answer at {url} within 120 s", file=sys.stderr)
                    return 1
                time.sleep(0.5)
        urls = {name: url for name, (_, url, _) in servers.items()}
        runs = ui_url(urls["MLflow"], Registry(t).experiment_id())
        _emit(args, {"prefect_ui": urls["Prefect"], "prefect_api": urls["Prefect"] + "/api",
                     "mlflow_ui": urls["MLflow"], "mlflow_training_runs": runs, "home": str(home.root)},
              f"Prefect UI  {urls['Prefect']}   (flow runs, artifacts, deployments; state in {home.prefect})\n"
              f"MLflow UI   {runs}\n"
              f"            (experiment '{t.experiment}', its training runs; registered model "
              f"'{t.registered_model}')\n"
              f"To run or schedule pipelines against this server:  export PREFECT_API_URL={urls['Prefect']}/api\n"
              f"Server logs in {logs}. Ctrl-C stops both.")
        sys.stdout.flush()
        while all(p.poll() is None for p in procs.values()):
            time.sleep(1)
        gone = [name for name, p in procs.items() if p.poll() is not None]
        print(f"medplib: error: the {' and '.join(gone)} server stopped", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def _reproduce(args, ctx: RunContext) -> int:
    _prefect_setup(ctx.home)
    reproduce = _flows("reproduce")
    out = reproduce.reproduce(model_uri=args.model, workers=args.workers, context=ctx,
                              tolerance=reproduce.TOLERANCE if args.tolerance is None else args.tolerance)
    out["logs"] = args.run_log.to_dict()
    _emit(args, out, f"{reproduce.comparison_text(out)}\n{args.run_log.text()}")
    return 0 if out["within_tolerance"] else 1


# ---- models: evaluate, promote, rollback, predict (medplib.eval.publish, medplib.registry, medplib.serve) ---------

def _registry(ctx: RunContext):
    from medplib.registry import Registry

    return Registry(ctx.tracking)


def _quiet_downloads() -> None:
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar line per file otherwise


def _model_to_load(value: str, profile: Profile, project: Path | None = None) -> tuple[str, str | None, str | None]:
    """`--model` of evaluate, predict and reproduce: (the model family of the run context, what to load, the family
    the loaded folder must belong to). A family NAME loads its champion (None here: the context knows its registered
    model); `models:/NAME…` selects the family whose registered model NAME is; a folder is its format's family; a
    `runs:/` URI (or a registered model no family claims) loads as its folder says, with MedPLIB's registry settings."""
    import re

    from medplib.config import load_tracking_config
    from medplib.model.family import family_names, family_of

    if value in family_names():
        return value, None, value
    path = Path(value).expanduser()
    if (path / "config.json").is_file():  # a saved model folder (a logged pyfunc folder is read as MLflow's)
        return family_of(path).name, str(path), None
    named = re.match(r"models:/([^/@]+)", value)
    if named:
        # mlflow.yaml read once (the project folder's, else the packaged one), each family applied
        settings = load_tracking_config(profile=profile, family=None, project=project or Path.cwd())
        for family in family_names():
            if settings.for_family(family).registered_model == named.group(1):
                return family, value, family
    return "medplib", value, None


def _evaluate(args, ctx: RunContext) -> int:
    from medplib.data.versioning import read_version
    from medplib.eval.publish import eval_split, evaluate_and_log, report_metrics
    from medplib.eval.runner import report_markdown
    from medplib.serve import load_model

    splits = tuple(s.strip() for s in args.split.split(",") if s.strip())
    if not splits or any(s not in ("val", "test", "zeroshot") for s in splits):
        raise ValueError(f"--split {args.split!r}: use one or more of val, test, zeroshot (comma-separated)")
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: need at least 1")
    data_dir = ctx.data_dir
    if not (data_dir / "records.jsonl").exists():
        raise FileNotFoundError(f"No dataset at {data_dir}: run `medplib data ingest` first")
    _quiet_downloads()
    data_version = read_version(ctx.project)
    registry = _registry(ctx)
    wanted = args.load or f"models:/{registry.name}@{registry.cfg.aliases.champion}"
    version = registry.version_of(wanted)  # a registered version gets the metrics recorded for the gate
    model_ref = f"models:/{registry.name}/{version}" if version else wanted
    model = load_model(model_ref, registry.cfg, family=args.load_family, device=ctx.device)
    report, run_id = evaluate_and_log(model, data_dir, data_version, registry, run_name="evaluate",
                                      model_ref=model_ref, splits=splits, limit=args.limit, batch_size=args.batch_size,
                                      tags={"medplib.evaluated_version": version} if version else None,
                                      max_new_tokens=ctx.cfg.eval.max_new_tokens,
                                      dataset=ctx.with_data_version(data_version).dataset())
    recorded = None
    if version and data_version and "val" in splits:  # the gate reads validation
        metrics = report_metrics(report, data_version, eval_split(args.limit),
                                 primary=registry.cfg.gate.primary_metric)
        if metrics.primary(registry.cfg.gate.primary_metric) is not None:
            registry.record_eval(version, metrics, eval_run_id=run_id)
            recorded = version
    summary = {"model": model_ref, "version": version, "data_version": data_version, "splits": list(splits),
               "limit": args.limit, "samples": len(report.rows), "metrics": report.summary,
               "val_metrics": report.val_summary, "tables": report.tables,
               "mlflow_run_id": run_id, "recorded_on_version": recorded}
    note = (f"Recorded on version {recorded} for the promotion gate (data {data_version}, split "
            f"'{eval_split(args.limit)}')." if recorded else "Not recorded for the gate (only a registered version "
            "evaluated on the validation split of DVC-versioned data is).")
    _emit(args, summary, f"{report_markdown(report)}\n{len(report.rows)} samples of {model_ref} on data "
                         f"{data_version or 'unversioned'}; MLflow run {run_id}. {note}")
    return 0


def _promote(args, ctx: RunContext) -> int:
    from medplib.registry import TAG_DECISION_RUN

    registry = _registry(ctx)
    challenger = registry.cfg.aliases.challenger
    version = str(args.version) if args.version is not None else registry.aliases().get(challenger)
    if version is None:
        raise ValueError(f"No --version given and no '{challenger}' alias on '{registry.name}': register a model "
                         "first (medplib pipeline)")
    before = registry.champion_version()
    d = registry.promote_if_better(version)
    summary = {"version": version, "promoted": d.promote, "reason": d.reason, "primary_metric": d.primary_metric,
               "challenger_metric": d.challenger, "champion_metric": d.champion, "delta": d.delta,
               "modality_deltas": d.modality_deltas, "interval": d.interval, "confidence": d.confidence,
               "paired_samples": d.paired_samples, "guard_deltas": d.guard_deltas, "previous_champion_version": before,
               "champion_version": registry.champion_version(),
               "decision_run_id": registry.version_tags(version).get(TAG_DECISION_RUN)}
    _emit(args, summary, f"Version {version} {'promoted to champion' if d.promote else 'not promoted'}: {d.reason}"
                         f"\nChampion: version {summary['champion_version']} (was {before or 'none'}).")
    return 0


def _rollback(args, ctx: RunContext) -> int:
    registry = _registry(ctx)
    before = registry.champion_version()
    restored = registry.rollback(args.reason)
    summary = {"champion_version": restored, "rolled_back_version": before,
               "previous_champion_version": registry.aliases().get(registry.cfg.aliases.previous_champion)}
    _emit(args, summary, f"Champion rolled back from version {before} to version {restored} ({args.reason}).")
    return 0


def _predict(args, ctx: RunContext) -> int:
    import base64
    import time

    from medplib.serve import load_model, parse_examples, parse_request, predict

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: need at least 1")
    for flag, value in (("--image", args.image), ("--region", args.region)):
        if value is not None and not Path(value).is_file():
            raise FileNotFoundError(f"{flag} '{value}': no such file")
    examples = []
    for given in args.example or []:
        image, sep, mask = given.rpartition(":")
        if not sep or not image or not mask:
            raise ValueError(f"--example {given!r}: give IMAGE:MASK, two PNG files")
        for what, path in (("image", image), ("mask", mask)):
            if not Path(path).is_file():
                raise FileNotFoundError(f"--example {given!r}: its {what} '{path}' is no such file")
        examples.append({"image": image, "mask": mask})
    request = {"image": args.image, "question": args.question, "point": args.point, "box": args.box,
               "region": args.region, "examples": examples or None, "example_style": args.example_style}
    question = parse_request(request)[1]
    parse_examples(request, 0, question)  # bad prompts, images and examples fail here, before a model is fetched
    _quiet_downloads()
    t0 = time.perf_counter()
    t = ctx.tracking
    wanted = args.load or f"models:/{t.registered_model}@{t.aliases.champion}"
    model = load_model(wanted, t, family=args.load_family, device=ctx.device)
    t1 = time.perf_counter()
    out = predict(model, **request, max_new_tokens=args.max_new_tokens)
    summary = {"model": wanted, "answer": out["answer"], "masks": len(out["masks"]), "mask_out": None,
               "load_seconds": round(t1 - t0, 3), "predict_seconds": round(time.perf_counter() - t1, 3)}
    if args.mask_out is not None:
        if out["masks"]:
            args.mask_out.parent.mkdir(parents=True, exist_ok=True)
            args.mask_out.write_bytes(base64.b64decode(out["masks"][0]))
            summary["mask_out"] = str(args.mask_out)
        else:
            print(f"medplib: warning: the answer has no <SEG>, so no mask was written to {args.mask_out}",
                  file=sys.stderr)
    written = f", first written to {summary['mask_out']}" if summary["mask_out"] else ""
    masks = f"{len(out['masks'])} mask(s){written}"
    _emit(args, summary, f"{out['answer']}\n[{masks}]")
    return 0


def _demo(args, ctx: RunContext) -> int:
    import uvicorn

    from medplib.demo import Demo, build_app
    from medplib.registry import Registry
    from medplib.serve import load_model

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: need at least 1")
    t = ctx.tracking
    registry = Registry(t)
    model = getattr(args, "load", None) or f"models:/{t.registered_model}@{t.aliases.champion}"
    if not model.startswith(("models:/", "runs:/")) and not Path(model).is_dir():
        raise FileNotFoundError(f"--model '{model}' is neither an MLflow URI nor a folder")
    _quiet_downloads()
    demo = Demo(model, registry, ctx.data_dir, lambda uri: load_model(uri, t, device=ctx.device), args.max_new_tokens)
    print(f"medplib demo on http://{args.host}:{args.port} (model {model}; {len(demo.samples)} sample images from "
          f"{ctx.data_dir}); Ctrl-C stops it", file=sys.stderr)
    uvicorn.run(build_app(demo), host=args.host, port=args.port, log_level="warning")
    return 0


def run(args: argparse.Namespace) -> int:
    profile = apply_profile(getattr(args, "profile", None) or getattr(args, "global_profile", None),
                            getattr(args, "project", None))
    cmd = " ".join([args.command] + [getattr(args, f"{args.command}_command", None) or ""]).strip()
    if cmd == "config show":  # reads and prints: no state folder, nothing to log
        return _config_show(args, load_config(args.preset, args.config))
    model = getattr(args, "model", None) or "medplib"
    if cmd in ("evaluate", "predict", "reproduce") or (cmd == "demo" and args.model):
        # --model names what to load, which selects the family
        model, args.load, args.load_family = _model_to_load(args.model, profile, args.project)
    ctx = RunContext.resolve(args.preset, args.config, args.home, args.project, profile, model,  # once per command
                             device=getattr(args, "device", "auto"))
    with run_log(ctx.home, cmd) as args.run_log:
        return _run_command(args, cmd, ctx)


def _config_show(args: argparse.Namespace, cfg) -> int:
    import yaml

    from medplib.config import family_settings, to_dict

    resolved = to_dict(cfg)
    if getattr(args, "model", None):
        from medplib.model.family import get_family

        family = get_family(args.model)
        if family.settings is not None:
            resolved["families"][family.name] = to_dict(family_settings(cfg, family))
    if args.json:
        print(json.dumps(resolved, indent=1), file=getattr(args, "json_out", None) or sys.stdout)
    else:
        source = f"preset {args.preset}" + (f" + {args.config}" if args.config else "")
        print(f"# medplib config: {source}\n" + yaml.safe_dump(resolved, sort_keys=False), end="")
    return 0


def _run_command(args: argparse.Namespace, cmd: str, ctx: RunContext) -> int:
    cfg = ctx.cfg
    if cmd == "data synth":
        from medplib.data.synth import generate

        s = generate(args.out, n=args.n or cfg.data.synth_n, seed=cfg.data.synth_seed if args.seed is None else args.seed,
                     image_size=cfg.data.image_size, zeroshot_modalities=cfg.data.zeroshot_modalities,
                     test_fraction=cfg.data.test_fraction)
        summary = {"out": str(s.out), "images": s.images, "records": s.records, "files": s.files, "sources": s.sources}
        own = "".join(f"; the records of tasks kept in {k}'s own layout are in {s.out / k} (alone: --source "
                      f"{k}:{s.out / k})" for k in s.sources)
        _emit(args, summary, f"Wrote {s.images} images and {s.records} records in the MeCoVQA layout to {s.out}{own}")
        return 0
    if cmd == "data ingest":
        from medplib.data.versioning import read_version

        previous = read_version(ctx.project)
        r = _ingest(args, ctx)
        r["event_id"] = _announce_ingest(r, ctx, args.source, previous)
        event = f"; event medplib.data.ingested sent ({r['event_id']})" if r["event_id"] else ""
        _emit(args, r, f"Ingested {r['source']}: {r['total']} records = {r['valid']} valid + {r['quarantined']} "
                       f"quarantined (see {r['data_dir']}/quarantine.jsonl); dataset version {r['version']}{event}")
        return 0
    if cmd == "data validate":
        report = _validate(ctx)
        _emit(args, report.to_dict(), report.summary())
        return 0 if report.success else 1
    if cmd == "data status":
        from medplib.data.versioning import data_status

        st = data_status(ctx.project, ctx.home, ctx.profile.dvc)
        _emit(args, st, f"dataset version {st['version']} (data/ in sync: {st['in_sync']}, "
                        f"pushed to remote: {st['pushed']})")
        return 0
    if cmd == "data pull":
        from medplib.data.ingest import verify_data
        from medplib.data.versioning import pull_version

        version = pull_version(ctx.project, ctx.home, ctx.profile.dvc, args.version)
        files = verify_data(ctx.data_dir)  # every file as ingest recorded it (manifest checksums)
        _emit(args, {"version": version, "data_dir": str(ctx.data_dir), "files": files},
              f"dataset version {version} in {ctx.data_dir} ({files} files checked against its manifest)")
        return 0
    if cmd == "train":
        from medplib.train.runner import resolve_start, train_stage

        if args.workers < 1:
            raise ValueError(f"--workers {args.workers}: need at least 1 worker")
        if not (ctx.data_dir / "records.jsonl").exists():
            raise FileNotFoundError(f"No dataset at {ctx.data_dir}: run `medplib data ingest` first, or `medplib "
                                    "data pull` to fetch the version data.dvc records")
        overrides = {"epochs": args.epochs} if args.epochs else None
        r = train_stage(args.stage, ctx, workers=args.workers, overrides=overrides,
                        base=resolve_start(args.from_, ctx), address=args.ray_address)
        d = r.to_dict() | {"logs": args.run_log.to_dict()}
        done = (f"skipped: {d['skipped']}; the initial model" if d["skipped"] else
                f"{d['steps']} steps in {d['seconds']} s, loss {d['first_loss']:.3f} → {d['last_loss']:.3f}")
        _emit(args, d, f"Stage {d['stage']} ({d['name']}): {done}; saved to {d['out_dir']} "
                       f"(MLflow run {d['mlflow_run_id']})\n{args.run_log.text()}")
        return 0
    if cmd == "pipeline":
        return _pipeline(args, ctx)
    if cmd == "schedule":
        return _schedule(args, ctx)
    if cmd == "retrain":
        return _retrain(args, ctx)
    if cmd == "ui":
        return _ui(args, ctx)
    if cmd == "reproduce":
        return _reproduce(args, ctx)
    if cmd == "evaluate":
        return _evaluate(args, ctx)
    if cmd == "promote":
        return _promote(args, ctx)
    if cmd == "rollback":
        return _rollback(args, ctx)
    if cmd == "predict":
        return _predict(args, ctx)
    if cmd == "demo":
        return _demo(args, ctx)
    raise AssertionError(f"unhandled command {cmd}")  # argparse only lets known commands through


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # no stderr handler of its own: see medplib.run_log
    if not sys.stderr.isatty():  # its download bar would land in a redirected log as one long line
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        with console_logging(sys.stderr):
            if getattr(args, "json", False):
                # stdout carries the JSON summary alone: what libraries print there (DVC its progress) goes to
                # stderr instead
                args.json_out = sys.stdout
                with contextlib.redirect_stdout(sys.stderr):
                    return run(args)
            return run(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"medplib: error: {e}", file=sys.stderr)
        _name_log(args)
        return 2
    except BaseException:
        _name_log(args)
        raise


def _name_log(args: argparse.Namespace) -> None:
    """After a failure: where the whole story is (the log file exists once the state folder was resolved)."""
    if getattr(args, "run_log", None) is not None:
        print(f"medplib: {args.run_log.text()}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
