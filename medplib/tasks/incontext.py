"""In-context segmentation (SegICL, REFERENCE §6): K = 0..3 example (image, mask) pairs in the prompt, then the query
image and the request; the answer is `<SEG>` with the query's mask, scored as grounding's.

An example is shown in one of the two ways MedPLIB's in-context variant shows one: its mask overlaid on its image in
blue at α 0.55 (task `icl`, one image an example), or the mask as an image of its own after the image (task
`icl_mask`, two). The prompt (`question`) has one `<image>` per shown image, then the query's; the model reads them
in that order (`Task.show_context`, `MedPLIB.embed_inputs`). The examples of a query are chosen when its records are
made (`choose_examples`): grounding records of the same structure class and split, never on the query's image, drawn
by a generator seeded with the seed and the query's id (K examples are the first K of one seeded order, so K + 1
examples include the K), so an evaluation is repeatable; `icl_record` makes the in-context record a dataset reads.

Both tasks are derived (`Task.derive`): ingest writes none; their records are made from the grounding records of the
split a stage or an evaluation loads.
- Training, when a stage's mix names them (group "incontext": the tiny preset's stages III and IV do; `full` keeps
  MedPLIB's mixes, and a config file adds them: `train: {stage3: {tasks: [pixel, incontext]}, …}`): a seeded quarter
  of the train split's grounding records per style, K = 1..3. The train split holds the training modalities only
  (every zero-shot image is in the zero-shot split, and the GX gate fails a dataset where one is not). Half of them
  do not name the structure (`question(k, None, …)`), so the examples, not the name, say what to segment; the answer
  names it. Half of the named ones call it by a made-up name (`made_up_name`, `alias`) in the question and the
  answer, and a quarter of the train grounding records alone on their image are asked with a made-up name and no
  example (K = 0, `icl` only): a held-out structure's name is one the model never read, spelled in pieces of words it
  has, and without these records it answered such a request with a trained name and often no `<SEG>`, which is what
  K = 0 measured most.
- Evaluation (every MedPLIB evaluation): up to `EVAL_QUERIES` grounding records of the test split (in distribution)
  and of the zero-shot split (held out), and at most one in `EVAL_SHARE` of the split's (so a small dataset's
  evaluation stays cheap), each asked with K = 0, 1, 2, 3 examples overlaid (`icl`) and K = 1, 2, 3 as
  mask images (`icl_mask`: its K = 0 prompt is `icl`'s). The tables carry Dice and IoU per K (`dice_k0` …); the
  summary keys `icl_dice_k0` … `icl_dice_k3` are the held-out ones; `figures` draws Dice against K.
The examples reach the model twice: shown to the LLM in the prompt, and, with `model.sam.example_prompt` (the tiny
preset's), given to the mask decoder as prototypes and similarity maps (`Task.mask_examples`, medplib/model/examples.py).
Shown to the LLM alone, training on them cost grounding 0.05-0.08 Dice and Dice did not rise with K beyond the spread
between two seeds; with the decoder reading them and the made-up names it rises by more than the spread between two
whole-pipeline seeds (README, "In-context training, measured").
A request may bring examples already (`medplib predict --example`, the served `examples` field):
`prompt_with_examples` builds its prompt.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import replace
from typing import Sequence

import numpy as np

from medplib.data.schema import IMAGE_TOKEN, SEG_TOKEN, Record
from medplib.tasks import Cumulative, Task, register
from medplib.tasks.grounding import mask_scores

MAX_EXAMPLES = 3
TRAIN_SHARE = 0.25  # of the train split's grounding records, per style, made in-context records of a stage's mix
UNNAMED_SHARE = 0.5  # of those, asked without the structure's name
ALIAS_SHARE = 0.5  # of the named ones, asked with a made-up name (`alias`) in place of the structure's
ALONE_SHARE = 0.25  # of the train grounding records alone on their image, asked with a made-up name and no example
EVAL_QUERIES = 128  # grounding records per evaluated split asked with K = 0..3 examples, at most
EVAL_SHARE = 8  # and at most one in this many of the split's grounding records: the sweep costs < grounding's
EVAL_SPLITS = ("test", "zeroshot")  # in distribution, held out
BLUE, ALPHA = (0, 0, 255), 0.55  # MedPLIB's in-context variant: the example's mask in blue over its image
STYLES = {"overlay": "icl", "separate": "icl_mask"}  # how an example is shown → the task that shows it so
_STRUCTURE = re.compile(r"Segment the (.+?)\.")


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) image → (H, W, 3) with the mask's pixels blended towards blue by `alpha`."""
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
    out = rgb.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(BLUE, np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def show_examples(pairs: Sequence[tuple[np.ndarray, np.ndarray | None]], style: str) -> list[np.ndarray]:
    """The images a prompt shows for its example pairs: the overlay of each, or each image then its mask (0/255)."""
    if style not in STYLES:
        raise ValueError(f"example style {style!r}: use one of {sorted(STYLES)}")
    out = []
    for i, (image, mask) in enumerate(pairs):
        if mask is None:
            raise ValueError(f"example {i + 1} has no mask: an in-context example is an image and its mask")
        out += [overlay(image, mask)] if style == "overlay" else [image, mask.astype(np.uint8) * 255]
    return out


def question(k: int, structure: str | None, style: str) -> str:
    """The request after `k` examples shown in `style`, with one `<image>` per shown image, then the query's;
    `structure` None: a request that does not name it (the examples say what to segment; K >= 1)."""
    if not 0 <= k <= MAX_EXAMPLES:
        raise ValueError(f"{k} examples: in-context segmentation takes 0 to {MAX_EXAMPLES}")
    if style not in STYLES:
        raise ValueError(f"example style {style!r}: use one of {sorted(STYLES)}")
    if structure is None:
        if k == 0:
            raise ValueError("a request without examples must name the structure to segment")
        if style == "overlay":
            lines = [f"Example {i + 1}: {IMAGE_TOKEN}" for i in range(k)]
            return "\n".join(lines + [f"The examples show a structure in blue. Find it in this image: {IMAGE_TOKEN}"])
        lines = [f"Example {i + 1}: {IMAGE_TOKEN} and its mask: {IMAGE_TOKEN}" for i in range(k)]
        return "\n".join(lines + [f"Find what the example masks show in this image: {IMAGE_TOKEN}"])
    if k == 0:
        return f"{IMAGE_TOKEN}\nSegment the {structure}."
    if style == "overlay":
        lines = [f"Example {i + 1}: {IMAGE_TOKEN}" for i in range(k)]
        lines.append(f"The examples show the {structure} in blue. Segment the {structure} in this image: "
                     f"{IMAGE_TOKEN}")
    else:
        lines = [f"Example {i + 1}: {IMAGE_TOKEN} and its {structure} mask: {IMAGE_TOKEN}" for i in range(k)]
        lines.append(f"Segment the {structure} in this image as in the examples: {IMAGE_TOKEN}")
    return "\n".join(lines)


def prompt_with_examples(request: str, k: int, style: str) -> str:
    """A user's request made into an in-context prompt for `k` examples shown in `style`: "Segment the X." becomes
    `question(k, X, style)`; any other request follows the example placeholders, then the query's `<image>`."""
    m = _STRUCTURE.search(request)
    if m:
        return question(k, m.group(1), style)
    if k == 0:
        return request
    if not 0 < k <= MAX_EXAMPLES or style not in STYLES:
        question(k, "structure", style)  # raises the error that names the count or the style
    shown = (f"{IMAGE_TOKEN}" if style == "overlay" else f"{IMAGE_TOKEN} and its mask: {IMAGE_TOKEN}")
    return "\n".join([f"Example {i + 1}: {shown}" for i in range(k)] + [f"{request.strip()} {IMAGE_TOKEN}"])


def structure_of(record: Record) -> str | None:
    """The structure a grounding record asks for ("Segment the liver." → liver), or None."""
    for turn in record.conversations:
        if turn.get("from") == "human":
            m = _STRUCTURE.search(turn.get("value", ""))
            if m:
                return m.group(1)
    return None


def choose_examples(query: Record, pool: Sequence[Record], k: int, seed: int) -> list[Record]:
    """`k` example records for `query`: grounding records of its structure class and split, on other images (never the
    query's), each with one mask; the same seed and query give the same examples, in the same order, and `k + 1`
    examples begin with the `k`."""
    if not 0 <= k <= MAX_EXAMPLES:
        raise ValueError(f"{k} examples: in-context segmentation takes 0 to {MAX_EXAMPLES}")
    structure = structure_of(query)
    if structure is None:
        raise ValueError(f"record {query.id}: its question names no structure (\"Segment the ….\")")
    candidates = [r for r in _examples_by_class(pool).get((query.split, structure), []) if r.image != query.image]
    if k > len(candidates):
        raise ValueError(f"record {query.id}: {k} examples of the {structure} asked, {len(candidates)} other "
                         f"{query.split} image(s) have one")
    return _pick(query, candidates, k, seed)


def _pick(query: Record, candidates: Sequence[Record], k: int, seed: int) -> list[Record]:
    """The first `k` of `candidates` (the query's possible examples, by id) in the order seeded by seed and query."""
    return [candidates[i] for i in _rng(seed, query.id).permutation(len(candidates))[:k]]


def _examples_by_class(pool: Sequence[Record]) -> dict[tuple[str, str], list[Record]]:
    """(split, structure) → the grounding records with one mask that can be examples, by id."""
    out: dict[tuple[str, str], list[Record]] = {}
    for r in sorted(pool, key=lambda r: r.id):
        structure = structure_of(r) if r.task == "grounding" and len(r.masks) == 1 else None
        if structure is not None:
            out.setdefault((r.split, structure), []).append(r)
    return out


def _rng(seed: int, *keys: str) -> np.random.Generator:
    digest = hashlib.sha256(":".join([str(seed), *keys]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def icl_record(query: Record, examples: Sequence[Record], style: str, named: bool = True,
               alias: str | None = None) -> Record:
    """The in-context record of `query` with `examples` shown in `style`: their pairs as its context, the request as
    its question (not naming the structure unless `named`), the query's answer (its `<SEG>` and mask) as the answer.
    `alias`: a name the structure is called by instead of its own, in the question and the answer."""
    structure = structure_of(query)
    answer = next(t["value"] for t in query.conversations if t.get("from") == "gpt")
    suffix = "" if named else "-unnamed"
    if alias is not None:
        if not named:
            raise ValueError("an alias names the structure: a request without its name takes none")
        answer, structure, suffix = answer.replace(f"the {structure}", f"the {alias}"), alias, "-alias"
    return replace(query, id=f"{query.id}-icl{len(examples)}-{style}{suffix}", task=STYLES[style],
                   conversations=[{"from": "human",
                                   "value": question(len(examples), structure if named else None, style)},
                                  {"from": "gpt", "value": answer}],
                   context=[{"image": e.image, "mask": e.masks[0]} for e in examples])


_CONSONANTS, _VOWELS = tuple("bdfgklmnprstvz"), tuple("aeiou")


def made_up_name(rng: np.random.Generator, taken: set[str]) -> str:
    """A pronounceable word of 2-4 syllables that is none of `taken` (the dataset's structure names), sometimes two:
    a name the model has never read, spelled in pieces of words it has, as a held-out structure's name is."""
    while True:
        words = ["".join(str(rng.choice(_CONSONANTS)) + str(rng.choice(_VOWELS))
                         for _ in range(int(rng.integers(2, 5)))) for _ in range(1 + int(rng.random() < 0.2))]
        name = " ".join(words)
        if name not in taken:
            return name


class ByExamples(Cumulative):
    """Grounding's Dice and IoU per modality, over all its rows and per number of examples (`dice_k0` …): a row's
    `context` is its example count."""

    def aggregate(self):
        from medplib.eval.metrics import aggregate_by_modality

        rows = [{"modality": r["modality"], "dice": r["dice"], "iou": r["iou"], "seg_generated": r["seg_generated"],
                 f"dice_k{r.get('context', 0)}": r["dice"], f"iou_k{r.get('context', 0)}": r["iou"]}
                for r in self.rows]
        return aggregate_by_modality(rows)


class InContextSegmentation(Task):
    name = "icl"
    groups = ("incontext",)  # a stage mix that names it trains it (derived from its train records): tiny III and IV
    family = "icl_overlay"
    max_context = MAX_EXAMPLES
    mask_examples = True
    derived = True
    style = "overlay"
    eval_ks: tuple[int, ...] = (0, 1, 2, 3)
    summary = {f"icl_dice_k{k}": ("zeroshot", f"dice_k{k}") for k in range(MAX_EXAMPLES + 1)}

    def check(self, turns, masks, regions):
        if not masks:
            answer = next((t.get("value") for t in turns if t.get("from") == "gpt"), None)
            return answer, f"an in-context segmentation record needs a {SEG_TOKEN} with a <mask>"
        return None

    def check_context(self, context):
        problem = super().check_context(context)
        if problem is None and any(not pair.get("mask") for pair in context):
            return [p.get("image") for p in context], "every in-context example needs its mask"
        return problem

    def show_context(self, pairs):
        return show_examples(pairs, self.style)

    def derive(self, pool, purpose, seed):
        by_class = _examples_by_class(pool)
        queries = sorted((r for r in pool if r.task == "grounding" and len(r.masks) == 1 and structure_of(r)),
                         key=lambda r: r.id)
        out = []
        if purpose == "train":
            taken = {name for (_, name) in by_class}
            on_image = Counter(q.image for q in queries)  # grounding queries per image: its structures
            for query in (q for q in queries if q.split == "train"):
                rng = _rng(seed, query.id, self.name)
                take, named = rng.random() < TRAIN_SHARE, rng.random() >= UNNAMED_SHARE
                aliased, alone = rng.random() < ALIAS_SHARE, rng.random() < ALONE_SHARE
                alias = made_up_name(rng, taken)  # drawn for every query: the stream does not depend on the shares
                if alone and self.style == "overlay" and on_image[query.image] == 1:
                    out.append(icl_record(query, [], self.style, alias=alias))  # K = 0: the only structure there
                if not take:
                    continue
                others = [r for r in by_class[("train", structure_of(query))] if r.image != query.image]
                k = min(int(rng.integers(1, MAX_EXAMPLES + 1)), len(others))
                if k:
                    out.append(icl_record(query, _pick(query, others, k, seed), self.style, named,
                                          alias if named and aliased else None))
            return out
        for split in EVAL_SPLITS:
            # the first EVAL_QUERIES of a seeded order over the split's queries with MAX_EXAMPLES examples to draw on
            others = {q.id: [r for r in by_class[(split, structure_of(q))] if r.image != q.image]
                      for q in queries if q.split == split}
            ready = sorted((q for q in queries if len(others.get(q.id, ())) >= MAX_EXAMPLES),
                           key=lambda q: hashlib.sha256(f"{seed}:{q.id}".encode()).digest())
            limit = min(EVAL_QUERIES, max(1, sum(q.split == split for q in queries) // EVAL_SHARE))
            for query in ready[:limit]:
                order = _pick(query, others[query.id], MAX_EXAMPLES, seed)
                out += [icl_record(query, order[:k], self.style) for k in self.eval_ks]
        return out

    def score(self, prediction, reference, pred_masks, target):
        return mask_scores(pred_masks, target)

    def metric(self):
        return ByExamples()

    def figures(self, tables):
        """Dice against K, in distribution (test) and held out (zero-shot), both example styles: one line chart."""
        lines = {}
        for name in STYLES.values():
            for split, label in (("test", "in distribution"), ("zeroshot", "held out")):
                row = tables.get(f"{split}/{name}", {}).get("all", {})
                ks = [k for k in range(MAX_EXAMPLES + 1) if f"dice_k{k}" in row]
                if ks:
                    lines[f"{label}, {'overlaid' if name == 'icl' else 'mask images'}"] = (
                        ks, [row[f"dice_k{k}"] for k in ks])
        if not lines:
            return {}
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5, 3.5))
        ax = fig.add_subplot()
        for label, (ks, dice) in lines.items():
            ax.plot(ks, dice, marker="o", linestyle="-" if "held out" in label else "--", label=label)
        ax.set(xlabel="examples in the prompt (K)", ylabel="mean Dice", xticks=range(MAX_EXAMPLES + 1),
               ylim=(0, 1), title="In-context segmentation: Dice against K")
        ax.legend(fontsize=7)
        fig.tight_layout()
        return {"icl_dice_vs_k": fig}


class InContextMaskImages(InContextSegmentation):
    name = "icl_mask"
    family = "icl_maskimage"
    style = "separate"
    eval_ks = (1, 2, 3)  # its K = 0 prompt is `icl`'s
    summary = {}

    def figures(self, tables):
        return {}  # `icl` draws both styles


register(InContextSegmentation())
register(InContextMaskImages())
