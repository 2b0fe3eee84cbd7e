"""TISR's plug-in off and on (issue 18's must-show): one MLflow parent run, two report generators trained and
evaluated alike, the report metrics side by side.

    python benchmarks/tisr_plugin.py --home H --project P [--from STAGE1_FOLDER] [--epochs 30] [--workers 2]

Both start from the same stage-I model (`--from`, or a stage I trained here on the project's data, logged under the
parent run), then train stage II on the train split's reports only (`tasks: [report]`), the same seed, steps and
learning rate, through the platform's Ray Train stage; the one difference is `model.tisr.enabled` (pseudo-words
before the prompt, and the refinement loss). Each is evaluated on the validation and test reports (generation up
to the report task's 60 tokens): BLEU-1..4, METEOR, ROUGE-L and CIDEr. The parent run (experiment of `mlflow.yaml`,
name `tisr-plugin`) holds the table (`tisr_plugin.json` as an MLflow table, `.md`) and one metric per cell
(`off.test.bleu4`, …); the stage runs are its children. Last line: the rows as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medplib.config import RunContext  # noqa: E402
from medplib.eval.compare import comparison_run, log_comparison  # noqa: E402

METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")


def compare(ctx: RunContext, parent_run_id: str, base: Path | None, epochs: int, workers: int,
            splits: tuple[str, ...] = ("val", "test")) -> list[dict]:
    """Train stage II on the reports with the plug-in off, then on, from one stage-I model; evaluate both."""
    from medplib.eval.runner import evaluate
    from medplib.model import MedPLIB
    from medplib.train.runner import train_stage

    if base is None:
        base = train_stage(1, ctx, workers=workers, parent_run_id=parent_run_id, workspace="tisr-plugin").out_dir
    rows = []
    for variant, enabled in (("off", False), ("on", True)):
        variant_ctx = RunContext.resolve(preset=ctx.cfg.preset, config={"model": {"tisr": {"enabled": enabled}}},
                                         home=ctx.home, project=ctx.project, profile=ctx.profile,
                                         data_version=ctx.data_version)
        t0 = time.perf_counter()
        stage = train_stage(2, variant_ctx, workers=workers, base=base, parent_run_id=parent_run_id,
                            overrides={"tasks": ["report"], "epochs": epochs}, workspace=f"tisr-plugin-{variant}")
        seconds = time.perf_counter() - t0
        model = MedPLIB.from_pretrained(stage.out_dir)
        if (model.tisr is not None) != enabled:
            raise RuntimeError(f"The {variant} model {'lacks' if enabled else 'has'} TISR's plug-in")
        report = evaluate(model, ctx.data_dir, splits=splits, tasks=("report",))
        row = {"tisr": variant, "steps": stage.history[-1]["step"], "train_seconds": round(seconds, 1),
               "last_loss": round(stage.last_loss, 4), "stage_run_id": stage.mlflow_run_id}
        for split in splits:
            scores = report.tables[f"{split}/report"]["all"]
            row |= {f"{split}.{k}": round(float(scores[k]), 4) for k in METRICS}
            row[f"{split}.n"] = int(scores["n"])
        rows.append(row)
    return rows


def markdown(rows: list[dict], split: str = "test") -> str:
    off, on = rows
    lines = [f"| metric ({split}, {off[f'{split}.n']} reports) | TISR off | TISR on | on − off |",
             "|---|---|---|---|"]
    for k in METRICS:
        a, b = off[f"{split}.{k}"], on[f"{split}.{k}"]
        lines.append(f"| {k} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--project", type=Path, default=Path.cwd())
    parser.add_argument("--from", dest="base", type=Path, default=None, help="a stage-I model folder")
    parser.add_argument("--epochs", type=int, default=30, help="stage II epochs over the train reports")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from medplib.data.versioning import read_version
    from medplib.registry import Registry

    ctx = RunContext.resolve(home=args.home, project=args.project)
    ctx = ctx.with_data_version(read_version(ctx.project))
    registry = Registry(ctx.tracking)
    tags = {"medplib.data_version": ctx.data_version or "unversioned", "medplib.task": "report"}
    with comparison_run(registry, "tisr-plugin", tags) as run_id:
        registry.client.log_param(run_id, "epochs", args.epochs)
        registry.client.log_param(run_id, "base", str(args.base or "stage I trained here"))
        rows = compare(ctx, run_id, args.base, args.epochs, args.workers)
        tables = "\n\n".join(markdown(rows, split) for split in ("val", "test"))
        print(tables)
        log_comparison(registry.client, run_id, rows, "tisr_plugin", tables, key="tisr")
    print(json.dumps({"mlflow_run_id": run_id, "rows": rows, "load_1min": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
