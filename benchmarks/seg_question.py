"""Does the `<SEG>` path carry the question? Grounding mDice of a trained model on the test split, measured twice in
one run: as trained, and with the `<SEG>` state (the hidden state the grounding head reads, `model.seg_state`)
zeroed (a forward hook on `text_hidden_fcs` gives the mask decoder a zero prompt, so only the image is left to
choose the structure). An image has several structures, so a model whose masks follow the question loses Dice when
the question is taken away. Goal: a drop of at least 0.3.

    .venv/bin/python benchmarks/seg_question.py [--model models:/medplib@champion | FOLDER] [--data data]
        [--home .medplib] [--limit N]

Default model: the champion of the state folder. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOAL = 0.3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models:/medplib@champion", help="a models:/ URI, runs:/ URI or a folder")
    ap.add_argument("--data", type=Path, default=REPO / "data", help="an ingested data folder (records.jsonl)")
    ap.add_argument("--home", type=Path, default=None, help="state folder (default: MEDPLIB_HOME or .medplib)")
    ap.add_argument("--limit", type=int, default=None, help="the first N grounding records of the test split")
    args = ap.parse_args()

    import torch

    from medplib.config import load_tracking_config, resolve_home
    from medplib.eval.runner import evaluate
    from medplib.serve import load_model

    if not (args.data / "records.jsonl").is_file():
        raise SystemExit(f"No dataset at {args.data}: run `make run` (or `medplib data ingest`) first")
    tracking = load_tracking_config().resolved(resolve_home(args.home).ensure())
    model = load_model(args.model, tracking)
    torch.set_grad_enabled(False)

    def mdice() -> tuple[float, int, float]:
        start = time.perf_counter()
        report = evaluate(model, args.data, splits=("test",), tasks=["grounding"], limit=args.limit)
        table = report.tables["test/grounding"]["all"]
        return table["dice"], int(table["n"]), time.perf_counter() - start

    trained, n, seconds = mdice()
    hook = model.text_hidden_fcs.register_forward_hook(lambda module, inputs, out: torch.zeros_like(out))
    try:
        zeroed, _, _ = mdice()
    finally:
        hook.remove()
    drop = trained - zeroed
    print(f"grounding mDice on {n} test samples: {trained:.4f} as trained, {zeroed:.4f} with the <SEG> state zeroed")
    print(f"drop {drop:+.4f} (goal >= {GOAL}); {seconds:.0f} s per pass; model {args.model}")
    print(json.dumps({"benchmark": "seg_question", "mdice": round(trained, 4), "mdice_seg_zeroed": round(zeroed, 4),
                      "drop": round(drop, 4), "goal": f">= {GOAL}", "met": drop >= GOAL, "samples": n,
                      "model": args.model}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
