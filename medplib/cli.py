"""`medplib …`: the command line. Every command accepts --home DIR and prints a JSON summary with --json."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from medplib.config import ConfigError, load_config, resolve_home

log = logging.getLogger("medplib")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", type=Path, default=None,
                   help="state folder (default: $MEDPLIB_HOME or .medplib/ in the repository)")
    p.add_argument("--project", type=Path, default=None,
                   help="folder holding data/, data.dvc and .dvc/ (default: the current folder)")
    p.add_argument("--preset", choices=["tiny", "full"], default="tiny", help="config preset (default: tiny)")
    p.add_argument("--config", type=Path, default=None, help="YAML file overriding preset keys")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medplib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pipeline", help="the whole pipeline on a source (today: ingest → validate)")
    _common(p)
    p.add_argument("--source", default="synth", help="synth | mecovqa:DIR | dicom:DIR | nifti:DIR (default: synth)")

    p = sub.add_parser("train", help="train one MedPLIB stage as a Ray Train job (logged to MLflow)")
    _common(p)
    p.add_argument("--stage", type=int, required=True, choices=[1, 2, 3, 4],
                   help="1 align, 2 VL expert, 3 grounding expert, 4 MoE")
    p.add_argument("--from", dest="from_", default=None,
                   help="model folder (or MLflow run id) the stage starts from; default: the previous stage's output")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: 2)")
    p.add_argument("--epochs", type=int, default=None, help="override the stage's epochs")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")

    data = sub.add_parser("data", help="synthesise, ingest, validate and version datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("synth", help="write a synthetic dataset in the MeCoVQA layout")
    _common(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--n", type=int, default=None, help="number of images (default: the preset's data.synth_n)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's data.synth_seed)")
    p = dsub.add_parser("ingest", help="normalise a source into data/, quarantine bad records, version with DVC")
    _common(p)
    p.add_argument("--source", default="synth", help="synth | mecovqa:DIR | dicom:DIR | nifti:DIR (default: synth)")
    p.add_argument("--seed", type=int, default=None, help="seed for the synth source")
    p = dsub.add_parser("validate", help="run the Great Expectations gate over data/; non-zero exit on failure")
    _common(p)
    p = dsub.add_parser("status", help="the dataset version and whether data/ and the remote hold it")
    _common(p)
    return parser


def _emit(args: argparse.Namespace, summary: dict, text: str) -> None:
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        print(text)


def _ingest(args, cfg, home, project) -> dict:
    from medplib.data.ingest import ingest

    r = ingest(args.source, project, home, cfg, seed=getattr(args, "seed", None))
    return r.to_dict()


def _validate(cfg, home, project):
    from medplib.data.expectations import validate_dataset

    data_dir = project / "data"
    if not (data_dir / "records.jsonl").exists():
        raise FileNotFoundError(f"No dataset at {data_dir}: run `medplib data ingest` first")
    return validate_dataset(data_dir, home.reports / "data_docs")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.preset, args.config)
    home = resolve_home(args.home).ensure()
    project = (args.project or Path.cwd()).resolve()
    cmd = args.command if args.command != "data" else f"data {args.data_command}"

    if cmd == "data synth":
        from medplib.data.synth import generate

        s = generate(args.out, n=args.n or cfg.data.synth_n, seed=cfg.data.synth_seed if args.seed is None else args.seed,
                     image_size=cfg.data.image_size, zeroshot_modalities=cfg.data.zeroshot_modalities,
                     test_fraction=cfg.data.test_fraction)
        summary = {"out": str(s.out), "images": s.images, "records": s.records, "files": s.files}
        _emit(args, summary, f"Wrote {s.images} images and {s.records} records in the MeCoVQA layout to {s.out}")
        return 0
    if cmd == "data ingest":
        r = _ingest(args, cfg, home, project)
        _emit(args, r, f"Ingested {r['source']}: {r['total']} records = {r['valid']} valid + {r['quarantined']} "
                       f"quarantined (see {r['data_dir']}/quarantine.jsonl); dataset version {r['version']}")
        return 0
    if cmd == "data validate":
        report = _validate(cfg, home, project)
        _emit(args, report.to_dict(), report.summary())
        return 0 if report.success else 1
    if cmd == "data status":
        from medplib.data.versioning import data_status

        st = data_status(project, home)
        _emit(args, st, f"dataset version {st['version']} (data/ in sync: {st['in_sync']}, "
                        f"pushed to remote: {st['pushed']})")
        return 0
    if cmd == "train":
        from medplib.train.runner import resolve_start, train_stage

        if args.workers < 1:
            raise ValueError(f"--workers {args.workers}: need at least 1 worker")
        if not (project / "data" / "records.jsonl").exists():
            raise FileNotFoundError(f"No dataset at {project / 'data'}: run `medplib data ingest` first")
        overrides = {"epochs": args.epochs} if args.epochs else None
        r = train_stage(args.stage, cfg, home, project, workers=args.workers, overrides=overrides,
                        base=resolve_start(args.from_, home), address=args.ray_address)
        d = r.to_dict()
        _emit(args, d, f"Stage {d['stage']} ({d['name']}): {d['steps']} steps in {d['seconds']} s, loss "
                       f"{d['first_loss']:.3f} → {d['last_loss']:.3f}; saved to {d['out_dir']} "
                       f"(MLflow run {d['mlflow_run_id']})")
        return 0
    if cmd == "pipeline":
        r = _ingest(args, cfg, home, project)
        report = _validate(cfg, home, project)
        summary = {"ingest": r, "validation": report.to_dict(), "version": r["version"],
                   "steps_run": ["ingest", "validate"],
                   "steps_missing": ["train stages I-IV", "evaluate", "register/promote"]}
        text = (f"Pipeline (data steps): ingested {r['total']} records = {r['valid']} valid + {r['quarantined']} "
                f"quarantined; dataset version {r['version']}\n{report.summary()}\n"
                "Training, evaluation and promotion are not built yet (issues 5-7).")
        _emit(args, summary, text)
        return 0 if report.success else 1
    raise AssertionError(f"unhandled command {cmd}")  # argparse only lets known commands through


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return run(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"medplib: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
