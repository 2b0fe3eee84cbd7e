"""Peak host memory of the stage IV transition (stage II + stage III models → the 2-expert MoE), before and after
streaming, measured side by side in one run on a mid-size config, with the full preset's extrapolation.

- before: what the recipe did until this change: load both saved models whole (safetensors' `load_model`, which
  reads the state dict beside the model), deep-copy the VL model, upcycle (which copies every expert FFN), load the
  grounding path;
- after: `build_stage_model`'s way: the VL model read tensor by tensor, the grounding model's FFNs, SAM and
  `text_hidden_fcs` streamed from its safetensors file (`MedPLIB.upcycle_from_saved`), never built.
Each way runs in a fresh Python process: its peak anonymous memory (RssAnon sampled every 2 ms, minus the value after
imports; the peak RSS with the mmapped files' page cache is printed beside it); both give the same weights
(tests/model/test_moe.py). The full preset's peak is extrapolated from the measured peak per byte of the
resulting MoE model, whose size on the full preset is counted on the `meta` device. The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from medplib.config.base import merge
from medplib.config.model import ModelConfig
from medplib.model import MedPLIB, MedTokenizer

TEXTS = ["Segment the liver.", "It is the liver.", "What is in the image?", "A CT image showing the kidney."] * 8
MID = {"llm": {"hidden_size": 1024, "intermediate_size": 2816, "num_layers": 8, "num_heads": 16, "num_kv_heads": 16}}
POD_MEMORY_GIB = 64  # infra/k8s/rayjobs.yaml: a GPU worker pod's memory limit


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


class AnonPeak(threading.Thread):
    """Samples the process's anonymous RSS every 2 ms: the memory that must fit. (ru_maxrss also counts the pages
    of the mmapped safetensors files, page cache the kernel drops under pressure.)"""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = _status_bytes("RssAnon"), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, _status_bytes("RssAnon"))
            time.sleep(0.002)

    def stop(self) -> int:
        self.running = False
        self.join()
        self.peak = max(self.peak, _status_bytes("RssAnon"))
        return self.peak


def _before(vl: Path, grounding: Path) -> MedPLIB:
    """The in-memory way (the recipe's code before streaming), with the whole-file loader it used."""
    from safetensors.torch import load_model
    from transformers.initialization import no_init_weights

    from medplib.model.model import WEIGHTS_FILE, _read_config
    from medplib.model.tokenizer import MedTokenizer as Tok

    def load(path: Path) -> MedPLIB:
        with no_init_weights():
            m = MedPLIB(_read_config(path), Tok.from_pretrained(path / "tokenizer"))
        m.sam.tie_weights()
        load_model(m, str(path / WEIGHTS_FILE), strict=False)
        return m

    model = load(vl)
    g = load(grounding)
    model.upcycle([g, copy.deepcopy(model)])
    model.sam.load_state_dict(g.sam.state_dict())
    model.text_hidden_fcs.load_state_dict(g.text_hidden_fcs.state_dict())
    return model


def _after(vl: Path, grounding: Path) -> MedPLIB:
    from medplib.config.stages import tiny_stages
    from medplib.train.recipe import build_stage_model

    spec = tiny_stages()[4]
    spec.lora = None  # the transition alone
    return build_stage_model(spec, vl, grounding)


def _child(way: str, vl: Path, grounding: Path) -> None:
    base, base_anon = _status_bytes("VmRSS"), _status_bytes("RssAnon")
    sampler = AnonPeak()
    sampler.start()
    t0 = time.perf_counter()
    model = (_before if way == "before" else _after)(vl, grounding)
    seconds = time.perf_counter() - t0
    anon = sampler.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps({"way": way, "peak_bytes": anon - base_anon, "rss_peak_bytes": peak - base, "model_bytes": size,
                      "seconds": round(seconds, 2)}))


def _full_moe_bytes(dtype: torch.dtype) -> int:
    """The full preset's 2-expert MoE model's weights in `dtype`, counted on the meta device (nothing allocated)."""
    cfg = merge(ModelConfig.full(), {"moe": {"num_experts": 2}})
    tok = MedTokenizer.train(TEXTS, 512, cfg.vision.num_patches)
    with torch.device("meta"):
        model = MedPLIB(cfg, tok)
    n = sum(p.numel() for p in model.parameters())
    n += (cfg.llm.vocab_size - len(tok)) * cfg.llm.hidden_size * 2  # LLaVA's 32k vocabulary: embeddings + LM head
    return n * torch.tensor([], dtype=dtype).element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=["before", "after"], help=argparse.SUPPRESS)
    parser.add_argument("--vl", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--grounding", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.vl, args.grounding)
        return
    cfg = merge(ModelConfig.tiny(), MID)
    tok = MedTokenizer.train(TEXTS, cfg.llm.vocab_size, cfg.vision.num_patches)
    with tempfile.TemporaryDirectory(prefix="stage4-memory-") as tmp:
        dirs = {}
        for seed, name in ((2, "stage2"), (3, "stage3")):
            torch.manual_seed(seed)
            dirs[name] = MedPLIB(cfg, tok).save_pretrained(Path(tmp) / name)
        results = {}
        for way in ("before", "after", "before", "after"):  # twice each, interleaved; the lower peak is kept
            out = subprocess.run([sys.executable, __file__, "--child", way, "--vl", str(dirs["stage2"]),
                                  "--grounding", str(dirs["stage3"])], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if way not in results or r["peak_bytes"] < results[way]["peak_bytes"]:
                results[way] = r
    gib = 1024 ** 3
    model_bytes = results["after"]["model_bytes"]
    per_byte = {w: results[w]["peak_bytes"] / model_bytes for w in ("before", "after")}
    full = {str(d).replace("torch.", ""): _full_moe_bytes(d) for d in (torch.float32, torch.bfloat16)}
    print(f"mid-size config (LLM {MID['llm']}): the MoE model is {model_bytes / gib:.2f} GiB")
    for w in ("before", "after"):
        r = results[w]
        print(f"  {w:6s}: peak anonymous memory {r['peak_bytes'] / gib:.2f} GiB above the imports = "
              f"{per_byte[w]:.2f} x the MoE model (peak RSS with the mmapped files' pages "
              f"{r['rss_peak_bytes'] / gib:.2f} GiB; {r['seconds']:.1f} s)")
    ratio = results["after"]["peak_bytes"] / results["before"]["peak_bytes"]
    print(f"  after / before: {ratio:.2f}")
    for dtype, size in full.items():
        print(f"full preset, {dtype}: the MoE model is {size / gib:.1f} GiB; extrapolated peak before "
              f"{per_byte['before'] * size / gib:.0f} GiB, after {per_byte['after'] * size / gib:.0f} GiB "
              f"(a worker pod has {POD_MEMORY_GIB} GiB)")
    print(json.dumps({"mid_model_bytes": model_bytes, "before_peak_bytes": results["before"]["peak_bytes"],
                      "after_peak_bytes": results["after"]["peak_bytes"], "after_over_before": round(ratio, 3),
                      "peak_per_model_byte": {w: round(v, 3) for w, v in per_byte.items()},
                      "full_model_bytes": full,
                      "full_peak_gib": {d: {w: round(per_byte[w] * s / gib, 1) for w in per_byte}
                                        for d, s in full.items()}}))


if __name__ == "__main__":
    main()
