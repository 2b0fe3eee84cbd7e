"""One MLflow table, on the same test split: text-guided segmentation by RecLMIS, RecLMIS without its reconstruction
losses (the paper's central claim), and MedPLIB's `<SEG>` path; Dice, IoU, parameters and forward FLOPs, beside the
Dice of an all-foreground and an empty mask (issue 23's must-show).

    python benchmarks/textseg_families.py --home H --project P \
        --model reclmis=models:/reclmis@champion --model "reclmis, no reconstruction=PATH" \
        --model "medplib <SEG>=models:/medplib@champion"

Each `--model NAME=REF` is a saved folder or an MLflow URI of any family. The run (experiment of `mlflow.yaml`, run name
`textseg-families`) holds the table as `textseg_families.json` (an MLflow table) and `.md`, and one metric per cell.
Last line: the rows as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medplib.config import RunContext  # noqa: E402
from medplib.eval.compare import (  # noqa: E402
    comparison_markdown, comparison_run, compare_segmenters, log_comparison,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--project", type=Path, default=Path.cwd())
    parser.add_argument("--model", action="append", required=True, help="NAME=REF (folder or MLflow URI)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--task", default="textseg")
    args = parser.parse_args()

    from medplib.data.versioning import read_version
    from medplib.registry import Registry
    from medplib.serve import load_model

    ctx = RunContext.resolve(home=args.home, project=args.project)
    registry = Registry(ctx.tracking)
    models = {}
    for item in args.model:
        name, sep, ref = item.partition("=")
        if not sep:
            raise SystemExit(f"--model {item!r}: give NAME=REF")
        models[name.strip()] = load_model(ref.strip(), ctx.tracking)
    rows = compare_segmenters(models, ctx.data_dir, args.split, args.task)
    table = comparison_markdown(rows, args.split, args.task)
    print(table)

    tags = {"medplib.data_version": read_version(ctx.project) or "unversioned", "medplib.split": args.split,
            "medplib.task": args.task}
    with comparison_run(registry, "textseg-families", tags) as run_id:
        for i, item in enumerate(args.model):
            registry.client.log_param(run_id, f"model.{i}", item[:6000])
        log_comparison(registry.client, run_id, rows, "textseg_families", table, key="model")
    print(json.dumps({"mlflow_run_id": run_id, "rows": rows, "load_1min": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
