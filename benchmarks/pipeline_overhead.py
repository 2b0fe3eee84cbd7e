"""Wall time of the Prefect pipeline flow ÷ the sum of the same steps called as plain medplib functions.

By default the pipeline `make run` runs (tiny preset, its synthetic source and stage epochs; ~8 min a side on 2
quiet cores); `--quick` shrinks it to 48 images and 1 epoch a stage, where Prefect's fixed cost weighs more.
Each side runs in its own fresh process and temp state folder (nothing cached): ingest, validate, train stages
I-IV (Ray Train jobs, then Ray shut down), evaluate + register + promote.
Both processes import torch, Ray and MLflow before the clock starts; the flow side's clock then includes what
Prefect adds: importing it, the ephemeral API server, flow/task runs, the parent MLflow run and the artifact.
Last line: one JSON object with the ratio and the goal (<= 1.25).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEPS = ("ingest", "validate", "stage 1", "stage 2", "stage 3", "stage 4", "ray shutdown", "evaluate+register+promote")


def _environment(root: Path) -> Path:
    home = root / "home"
    (home / "prefect").mkdir(parents=True, exist_ok=True)
    os.environ.update(MEDPLIB_HOME=str(home), PREFECT_HOME=str(home / "prefect"),
                      DVC_SITE_CACHE_DIR=str(home / "dvc-site-cache"), RAY_AUTH_MODE="disabled",
                      PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    return home


def run_plain(root: Path, config: Path, epochs: int, workers: int) -> dict:
    home_dir = _environment(root)
    import mlflow  # noqa: F401  (both sides import the heavy libraries before the clock)
    import ray
    import torch  # noqa: F401

    from medplib.config import RunContext
    from medplib.data.expectations import validate_dataset
    from medplib.data.ingest import ingest
    from medplib.data.versioning import read_version
    from medplib.eval.publish import config_digest, publish
    from medplib.train.runner import stage_dir, train_stage

    project = root / "project"
    project.mkdir()
    ctx = RunContext.resolve("tiny", config, home_dir, project)
    cfg, home = ctx.cfg, ctx.home
    times = {}

    def timed(name, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        times[name] = time.perf_counter() - t
        return out

    timed("ingest", ingest, "synth", project, home, cfg)
    report = timed("validate", validate_dataset, project / "data", home.reports / "data_docs")
    if not report.success:
        raise SystemExit(report.summary())
    for s in (1, 2, 3, 4):
        timed(f"stage {s}", train_stage, s, ctx, workers=workers,
              overrides={"epochs": epochs} if epochs else None)
    timed("ray shutdown", ray.shutdown)
    timed("evaluate+register+promote", publish, stage_dir(home, 4), project / "data", read_version(project),
          ctx.tracking, config_digest=config_digest(cfg))
    return {"steps": times, "total": sum(times.values())}


def run_flow(root: Path, config: Path, epochs: int, workers: int) -> dict:
    home_dir = _environment(root)
    import mlflow  # noqa: F401
    import ray  # noqa: F401
    import torch  # noqa: F401

    project = root / "project"
    project.mkdir()
    t = time.perf_counter()
    from flows.pipeline import pipeline

    summary = pipeline(config=config, workers=workers, home=home_dir, project=project, retries=0,
                       stage_overrides={s: {"epochs": epochs} for s in (1, 2, 3, 4)} if epochs else None)
    total = time.perf_counter() - t
    inside = {f"stage {s['stage']}": s["seconds"] for s in summary["stages"]}
    return {"steps": inside, "total": total, "flow_seconds": summary["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="48 synthetic images and 1 epoch a stage")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--side", choices=["plain", "flow"], help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--epochs", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:  # one side, in its own process; prints its timings as the last line
        fn = run_plain if args.side == "plain" else run_flow
        print(json.dumps(fn(args.root, args.config, args.epochs, args.workers)))
        return

    from medplib.config import load_config

    synth_n, epochs = (48, 1) if args.quick else (load_config("tiny").data.synth_n, 0)
    results = {}
    with tempfile.TemporaryDirectory(prefix="medplib-bench-") as tmp:
        config = Path(tmp) / "data.yaml"
        config.write_text(f"data:\n  synth_n: {synth_n}\n")
        for side in ("plain", "flow"):
            root = Path(tmp) / side
            root.mkdir()
            p = subprocess.run([sys.executable, __file__, "--side", side, "--root", str(root), "--config", str(config),
                                "--epochs", str(epochs), "--workers", str(args.workers)],
                               capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"{side} side failed:\n{p.stderr[-4000:]}")
            results[side] = json.loads(p.stdout.strip().splitlines()[-1])

    plain, flow = results["plain"], results["flow"]
    print(f"Pipeline on synth n={synth_n}, {f'every stage {epochs} epoch' if epochs else 'preset stage epochs'}, "
          f"{args.workers} Ray workers, {os.cpu_count()} cores")
    print(f"{'step':<28}{'plain (s)':>12}{'flow (s)':>12}")
    for step in STEPS:
        f = flow["steps"].get(step)
        print(f"{step:<28}{plain['steps'][step]:>12.1f}{'' if f is None else format(f, '.1f'):>12}")
    print(f"{'total wall time':<28}{plain['total']:>12.1f}{flow['total']:>12.1f}"
          f"   (flow body {flow['flow_seconds']:.1f} s; the rest is Prefect start-up)")
    ratio = flow["total"] / plain["total"]
    print(json.dumps({"benchmark": "pipeline_overhead", "ratio": round(ratio, 3), "goal": "<= 1.25",
                      "met": ratio <= 1.25, "flow_s": round(flow["total"], 1), "plain_s": round(plain["total"], 1),
                      "synth_n": synth_n, "epochs": epochs or "preset", "workers": args.workers}))


if __name__ == "__main__":
    main()
