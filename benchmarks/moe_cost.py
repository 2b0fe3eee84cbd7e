"""Forward time of the top-1 2-expert MoE model ÷ the dense model on the same input (goal ≤ 1.10).

Both models are measured side by side in one run, in back-to-back pairs, for the tiny preset and a 512-hidden LLM;
the ratio is the median over pairs. The MoE
model is the dense one upcycled with a random router, so both experts get tokens. The last line printed is one
JSON object with the ratios (whole model, and the language model alone) and the goal.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from medplib.config.base import merge
from medplib.config.model import ModelConfig
from medplib.model import MedPLIB, MedTokenizer

GOAL = 1.10
TEXTS = ["Segment the liver.", "It is the liver.", "What is in the image?", "A CT image showing the kidney."] * 8
CONFIGS = {
    "tiny": {},
    "hidden512": {"llm": {"hidden_size": 512, "intermediate_size": 1376, "num_layers": 4, "num_heads": 8,
                          "num_kv_heads": 8}},
}


def _inputs(model: MedPLIB, batch: int) -> dict:
    tok = model.tokenizer
    ids, _ = tok.encode_conversation([{"from": "human", "value": "<image>\nSegment the liver in this CT image."},
                                      {"from": "gpt", "value": "It is the liver. <SEG>"}])
    size, sam_size = model.config.vision.image_size, model.config.sam.image_size
    return {"input_ids": torch.tensor([ids] * batch), "pixel_values": torch.randn(batch, 3, size, size),
            "sam_pixel_values": torch.randn(batch, 3, sam_size, sam_size)}


def _paired_ratio(dense_fn, moe_fn, pairs: int) -> tuple[float, float, float]:
    """Median of moe/dense over back-to-back pairs (order alternating), so load spikes on a shared machine hit both."""
    ratios, dense_times, moe_times = [], [], []
    for i in range(pairs):
        order = [(dense_fn, dense_times), (moe_fn, moe_times)]
        for fn, times in (order if i % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        ratios.append(moe_times[-1] / dense_times[-1])
    return statistics.median(ratios), statistics.median(dense_times), statistics.median(moe_times)


def measure(overrides: dict, batch: int, pairs: int) -> dict:
    cfg = merge(ModelConfig.tiny(), overrides)
    tok = MedTokenizer.train(TEXTS, cfg.llm.vocab_size, cfg.vision.num_patches)
    torch.manual_seed(0)
    dense = MedPLIB(cfg, tok).eval()
    moe = copy.deepcopy(dense)
    moe.upcycle([dense, dense])
    moe.eval()
    inputs = _inputs(dense, batch)
    with torch.inference_mode():
        embeds = dense.embed_inputs(inputs["input_ids"], dense.vision_tower(inputs["pixel_values"]))
        for model in (dense, moe, dense, moe):  # warm-up
            model(**inputs)
        ratio, dense_s, moe_s = _paired_ratio(lambda: dense(**inputs), lambda: moe(**inputs), pairs)
        llm_ratio, _, _ = _paired_ratio(lambda: dense.llm.model(inputs_embeds=embeds),
                                        lambda: moe.llm.model(inputs_embeds=embeds), pairs)
    used = [sorted(set(layer.last_expert_index.tolist())) for layer in moe.moe_layers()]
    return {"ratio": ratio, "llm_ratio": llm_ratio, "dense_ms": 1000 * dense_s, "moe_ms": 1000 * moe_s,
            "experts_used_per_layer": used, "tokens": int(inputs["input_ids"].numel())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=30, help="back-to-back dense/MoE timings per config")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for name, overrides in CONFIGS.items():
        results[name] = measure(overrides, args.batch, args.pairs)
        r = results[name]
        print(f"{name}: dense {r['dense_ms']:.1f} ms, MoE top-1 of 2 {r['moe_ms']:.1f} ms, ratio {r['ratio']:.3f} "
              f"(language model alone {r['llm_ratio']:.3f}); experts used per layer {r['experts_used_per_layer']}")
    ratios = {name: round(r["ratio"], 4) for name, r in results.items()}
    print(json.dumps({"benchmark": "moe_cost", "measure": "forward time, MoE top-1 2 experts / dense",
                      "ratios": ratios, "llm_only_ratios": {n: round(r["llm_ratio"], 4) for n, r in results.items()},
                      "goal": f"<= {GOAL}", "goal_max_ratio": GOAL,
                      "meets_goal": all(v <= GOAL for v in ratios.values()),
                      "batch": args.batch, "tokens": results["tiny"]["tokens"], "threads": args.threads}))


if __name__ == "__main__":
    main()
