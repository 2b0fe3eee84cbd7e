"""p50 latency of the served pyfunc ÷ p50 of a direct `MedPLIB.generate` on the same request (goal ≤ 1.20).

The served side is the whole path a client sees: an HTTP POST of one `dataframe_split` row (base64 PNG image,
question, point prompt) to `mlflow models serve -m models:/medplib@champion --env-manager local` on 127.0.0.1
over a kept-alive connection (as a client library would), MLflow's schema check, request parsing, generation,
PNG encoding of the mask and the JSON answer. The direct side is `generate` on the
already-decoded image, question and prompt mask in this process. Both use the same weights and torch thread count,
are warmed up, then measured interleaved (served, direct, served, ...) so that load on the machine hits both alike.
The model is a tiny one overfit in seconds to answer with `<SEG>` (so the served answer carries a mask), or --model.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

GOAL = 1.20
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="saved MedPLIB folder (default: overfit the tiny grounder of tests/serve for 30 steps)")
    parser.add_argument("--requests", type=int, default=30, help="measured requests per side (default: 30)")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured requests per side first (default: 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on both sides (default: 1; on a shared 2-core machine 2 threads "
                             "swing wildly)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported; the server inherits it
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    sys.path.insert(0, str(REPO))  # tests.serve.tiny_grounder

    import mlflow
    import torch

    from medplib.config import load_tracking_config, resolve_home
    from medplib.model import MedPLIB
    from medplib.registry import Registry, use_tracking
    from medplib.serve import ScoringClient, encode_png, log_pyfunc, parse_request, served
    from tests.serve.tiny_grounder import QUESTION, phantom, train_tiny_grounder

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="serve-overhead-") as tmp:
        tmp = Path(tmp)
        folder = args.model or train_tiny_grounder(tmp / "model", steps=30)
        home = resolve_home(tmp / "home").ensure()
        tracking = load_tracking_config().resolved(home)
        registry = Registry(tracking)
        run_id = registry.client.create_run(registry.experiment_id(), run_name="serve-overhead").info.run_id
        image = phantom(30, 34)[0]
        with use_tracking(tracking), mlflow.start_run(run_id=run_id):
            log_pyfunc(folder, "medplib", example_image=image)
        version = registry.register(run_id, "medplib", git_commit="benchmark", data_version="none",
                                    config_digest="none")
        registry.client.set_registered_model_alias(registry.name, "champion", version)

        row = {"image": encode_png(image), "question": QUESTION, "point": "30,34"}
        params = {"max_new_tokens": args.max_new_tokens}
        img, question, regions = parse_request(row)
        model = MedPLIB.from_pretrained(folder).eval()
        torch.set_grad_enabled(False)

        def direct() -> str:
            return model.generate([img], [question], [regions], max_new_tokens=args.max_new_tokens)[0].text

        t0 = time.perf_counter()
        with served("models:/medplib@champion", tracking, env={"OMP_NUM_THREADS": str(args.threads)},
                    log_file=tmp / "server.log") as url:
            startup = time.perf_counter() - t0
            client = ScoringClient(url)

            def serve() -> str:
                return client.invoke([row], params)[0]["answer"]

            answers = {serve(), direct()}
            if len(answers) != 1:
                raise SystemExit(f"served and direct answers differ: {answers}")
            for _ in range(args.warmup):
                serve()
                direct()
            times: dict[str, list[float]] = {"served": [], "direct": []}
            for _ in range(args.requests):
                for name, fn in (("served", serve), ("direct", direct)):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)

    p50 = {k: statistics.median(v) for k, v in times.items()}
    p90 = {k: statistics.quantiles(v, n=10)[-1] for k, v in times.items()}
    ratio = p50["served"] / p50["direct"]
    print(f"answer: {answers.pop()!r} (with a mask); server start-up {startup:.1f} s")
    for name in ("served", "direct"):
        print(f"{name:>6}: p50 {1000 * p50[name]:.1f} ms, p90 {1000 * p90[name]:.1f} ms over {args.requests}")
    overhead_ms = 1000 * (p50["served"] - p50["direct"])
    print(f"served / direct p50 = {ratio:.3f} (goal <= {GOAL}); overhead {overhead_ms:.1f} ms per request")
    print(json.dumps({"benchmark": "serve_overhead", "p50_served_s": round(p50["served"], 5),
                      "p50_direct_s": round(p50["direct"], 5), "ratio": round(ratio, 4), "goal": f"<= {GOAL}",
                      "met": ratio <= GOAL, "p90_served_s": round(p90["served"], 5),
                      "p90_direct_s": round(p90["direct"], 5), "requests": args.requests, "threads": args.threads,
                      "max_new_tokens": args.max_new_tokens}))


if __name__ == "__main__":
    main()
