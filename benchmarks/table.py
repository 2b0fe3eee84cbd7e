"""Write docs/benchmarks.md by running the benchmarks: one row per script in benchmarks/, its result as it printed it.

    .venv/bin/python benchmarks/table.py                       # run every benchmark that runs alone, write the table
    .venv/bin/python benchmarks/table.py --only moe_cost       # run one again; the other rows are kept
    .venv/bin/python benchmarks/table.py --home H --data D     # also seg_question, on the champion of the home H
    .venv/bin/python benchmarks/table.py --check               # exit 1 if the table is not the rendering of the results

Each benchmark runs in its own process (`python benchmarks/NAME.py ARGS`); its last line (one JSON object, or the
sentence a GPU benchmark prints without a GPU) is kept verbatim with the command, exit code, seconds, date, commit and
the 1-minute load average before it in docs/benchmarks.json; docs/benchmarks.md is rendered from that file alone.
The comparison benchmarks that need models trained for them (textseg_families, tisr_plugin) are listed with what
they need, not run: their tables are logged to MLflow by their own runs (the README quotes them).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "benchmarks.json"
DOC = REPO / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Bench:
    name: str
    measures: str
    goal: str
    args: Callable[[argparse.Namespace], list[str] | None] = lambda a: []
    summary: Callable[[dict], str] = lambda r: ""
    needs: str = ""  # why it is not run here when args() gives None


def _fmt_gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def _moe(r: dict) -> str:
    parts = [f"{n}: {v:.3f} (LLM alone {r['llm_only_ratios'][n]:.3f})" for n, v in r["ratios"].items()]
    return "MoE ÷ dense forward time " + "; ".join(parts)


def _stage4(r: dict) -> str:
    full = r["full_peak_gib"]
    ext = "; ".join(f"{d}: {v['before']:.0f} → {v['after']:.0f} GiB" for d, v in full.items())
    return (f"mid-size peak {_fmt_gib(r['before_peak_bytes'])} → {_fmt_gib(r['after_peak_bytes'])} "
            f"({r['after_over_before']:.2f} ×); full preset extrapolated {ext}")


BENCHES = [
    Bench("moe_cost", "forward time of the top-1 2-expert MoE ÷ the dense model", "≤ 1.10",
          args=lambda a: ["--pairs", "20"], summary=_moe),
    Bench("train_throughput", "samples/s of a stage on Ray Train + DeepSpeed (2 workers) ÷ a plain torch loop",
          "≥ 0.90", summary=lambda r: f"{r['ray_deepspeed_samples_per_s']} ÷ {r['plain_torch_samples_per_s']} "
                                      f"samples/s = {r['ratio']:.3f}"),
    Bench("serve_overhead", "p50 latency of `mlflow models serve` ÷ a direct `generate`", "≤ 1.20",
          summary=lambda r: f"{1000 * r['p50_served_s']:.1f} ÷ {1000 * r['p50_direct_s']:.1f} ms = "
                            f"{r['ratio']:.3f} ({r['requests']} requests a side)"),
    Bench("pipeline_overhead", "wall time of the Prefect pipeline flow ÷ the same steps as plain calls (`--quick`: "
          "48 images, 1 epoch a stage)", "≤ 1.25", args=lambda a: ["--quick"],
          summary=lambda r: f"{r['flow_s']} ÷ {r['plain_s']} s = {r['ratio']:.3f}"),
    Bench("stage4_memory", "peak host memory building stage IV's MoE: in memory (before) vs streamed (after)",
          "fits a 64 GiB worker pod", summary=_stage4),
    Bench("seg_question", "grounding mDice on test as trained vs with the `<SEG>` state zeroed", "drop ≥ 0.3",
          args=lambda a: None if a.home is None else
          ["--home", str(a.home), "--data", str(a.data), "--model", a.model],
          summary=lambda r: f"{r['mdice']:.3f} → {r['mdice_seg_zeroed']:.3f}, drop {r['drop']:+.3f} "
                            f"({r['samples']} samples)",
          needs="a trained champion: `--home H --data D`"),
    Bench("gpu_smoke", "the four stages, evaluation and serving on one GPU through the worker loop", "runs"),
    Bench("gpu_mfu", "model FLOPs utilisation of a stage on one GPU", "measured",
          summary=lambda r: (f"{r['device']}: {r['model_tflops_per_s']} TFLOP/s, MFU {r['mfu']}"
                             if r.get("ran") else f"not measured: {r['reason']}")),
    Bench("textseg_families", "RecLMIS, RecLMIS without reconstruction and MedPLIB's `<SEG>` on text-guided "
          "segmentation", "a table in MLflow", args=lambda a: None,
          needs="RecLMIS and MedPLIB models trained for it (`--model NAME=REF`); its run logs the table to MLflow"),
    Bench("tisr_plugin", "report metrics with TISR's plug-in off and on, trained alike", "a table in MLflow",
          args=lambda a: None,
          needs="about an hour of training on the default data; its run logs the table to MLflow (README: TISR)"),
]
SKIP = {"table"}  # this script


def git_commit() -> str:
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return p.stdout.strip() or "unknown"


def run_one(bench: Bench, argv: list[str]) -> dict:
    cmd = [sys.executable, f"benchmarks/{bench.name}.py", *argv]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    print(f"[{dt.datetime.now():%H:%M:%S}] {' '.join(cmd[1:])}", flush=True)
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - t0
    lines = [line for line in p.stdout.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    try:
        result: dict | str = json.loads(last)
    except json.JSONDecodeError:
        result = last
    if p.returncode != 0:
        tail = "\n".join((p.stderr or p.stdout).splitlines()[-15:])
        print(f"  {bench.name} exited {p.returncode}:\n{tail}", flush=True)
    else:
        print(f"  {seconds:.0f} s: {last[:200]}", flush=True)
    return {"command": " ".join(["python", *cmd[1:]]), "exit_code": p.returncode, "seconds": round(seconds, 1),
            "date": dt.date.today().isoformat(), "commit": git_commit(), "load_1min_before": round(load, 2),
            "cores": os.cpu_count(), "result": result}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(results: dict) -> str:
    """The markdown page, from the results file alone."""
    out = ["# Benchmarks", "",
           "Generated by `benchmarks/table.py`, which runs each script in `benchmarks/` in its own process and keeps "
           "its last line (the JSON object every benchmark prints; the sentence a GPU benchmark prints without a "
           "GPU) in `docs/benchmarks.json`; this page is rendered from that file (`--check` verifies it). Each "
           "ratio is measured side by side in one run; the cores are shared, so the load average before the run "
           "is given with it. Re-run one with `benchmarks/table.py --only NAME`.", "",
           "| benchmark | measures | goal | result | met | when (commit, cores, load) | seconds |",
           "|---|---|---|---|---|---|---|"]
    for bench in BENCHES:
        r = results.get(bench.name)
        if r is None:
            out.append(f"| `{bench.name}` | {_cell(bench.measures)} | {bench.goal} | not run: "
                       f"{_cell(bench.needs or 'not yet run')} | | | |")
            continue
        res = r["result"]
        if r["exit_code"] != 0:
            text, met = f"failed (exit {r['exit_code']})", "no"
        elif isinstance(res, str):
            text, met = res, ""
        else:
            text = bench.summary(res) if bench.summary(res) else json.dumps(res)
            met = {True: "yes", False: "no"}.get(res.get("met", res.get("meets_goal")), "")
        when = f"{r['date']} ({r['commit']}, {r['cores']} cores, load {r['load_1min_before']})"
        out.append(f"| `{bench.name}` | {_cell(bench.measures)} | {bench.goal} | {_cell(text)} | {met} | {when} | "
                   f"{r['seconds']:.0f} |")
    out += ["", "Commands, as run:", ""]
    out += [f"- `{results[b.name]['command']}`" for b in BENCHES if b.name in results]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=None, help="run this benchmark (repeatable); keep the rest")
    ap.add_argument("--home", type=Path, default=None, help="a state folder with a champion, for seg_question")
    ap.add_argument("--data", type=Path, default=REPO / "data", help="that pipeline's data folder (records.jsonl)")
    ap.add_argument("--model", default="models:/medplib@champion")
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md is not the rendering")
    args = ap.parse_args(argv)
    names = {b.name for b in BENCHES}
    scripts = {p.stem for p in (REPO / "benchmarks").glob("*.py")} - SKIP
    if scripts != names:
        raise SystemExit(f"benchmarks/table.py lists {sorted(names)}, benchmarks/ holds {sorted(scripts)}: "
                         "add the new benchmark to BENCHES")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.check:
        if not DOC.exists() or DOC.read_text(encoding="utf-8") != render(results):
            print(f"{DOC.relative_to(REPO)} is not the rendering of {RESULTS.relative_to(REPO)}: "
                  "run benchmarks/table.py", file=sys.stderr)
            return 1
        return 0
    unknown = set(args.only or ()) - names
    if unknown:
        raise SystemExit(f"--only {sorted(unknown)}: not a benchmark ({', '.join(sorted(names))})")
    failed = []
    for bench in BENCHES:
        if args.only and bench.name not in args.only:
            continue
        argv_b = bench.args(args)
        if argv_b is None:
            print(f"{bench.name}: not run ({bench.needs}); its earlier result, if any, is kept")
            continue
        results[bench.name] = run_one(bench, argv_b)
        if results[bench.name]["exit_code"] != 0:
            failed.append(bench.name)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        DOC.write_text(render(results), encoding="utf-8")
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    DOC.write_text(render(results), encoding="utf-8")
    print(f"wrote {DOC.relative_to(REPO)}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
