"""In-context segmentation (SegICL, REFERENCE §6): K = 0..3 example (image, mask) pairs in the prompt, then the query
image and the request; the answer is `<SEG>` with the query's mask, scored as grounding's.

An example is shown in one of the two ways MedPLIB's in-context variant shows one: its mask overlaid on its image in
blue at α 0.55 (task `icl`, one image an example), or the mask as an image of its own after the image (task
`icl_mask`, two). The prompt (`question`) has one `<image>` per shown image, then the query's; the model reads them
in that order (`Task.show_context`, `MedPLIB.embed_inputs`). The examples of a query are chosen when its sample is
made (`choose_examples`): grounding records of the same structure class and split, never on the query's image, drawn
by a generator seeded with the seed and the query's id, so an evaluation is repeatable; `icl_record` makes the
in-context record a dataset reads.

Not built yet (issue 17): in-context records of the training modalities in the grounding stages' data mixes, Dice
against K on the zero-shot modalities; until then the tasks are in group `icl` only, in no stage's mix, and the data
has no records of them. A request may bring examples already (`medplib predict --example`, the served `examples`
field): `prompt_with_examples` builds its prompt.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from typing import Sequence

import numpy as np

from medplib.data.schema import IMAGE_TOKEN, SEG_TOKEN, Record
from medplib.tasks import Task, register
from medplib.tasks.grounding import mask_scores

MAX_EXAMPLES = 3
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


def question(k: int, structure: str, style: str) -> str:
    """The request after `k` examples shown in `style`, with one `<image>` per shown image, then the query's."""
    if not 0 <= k <= MAX_EXAMPLES:
        raise ValueError(f"{k} examples: in-context segmentation takes 0 to {MAX_EXAMPLES}")
    if style not in STYLES:
        raise ValueError(f"example style {style!r}: use one of {sorted(STYLES)}")
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
    query's), each with one mask; the same seed and query give the same examples, in the same order."""
    if not 0 <= k <= MAX_EXAMPLES:
        raise ValueError(f"{k} examples: in-context segmentation takes 0 to {MAX_EXAMPLES}")
    structure = structure_of(query)
    if structure is None:
        raise ValueError(f"record {query.id}: its question names no structure (\"Segment the ….\")")
    candidates = sorted((r for r in pool if r.task == "grounding" and r.split == query.split
                         and r.image != query.image and len(r.masks) == 1 and structure_of(r) == structure),
                        key=lambda r: r.id)
    if k > len(candidates):
        raise ValueError(f"record {query.id}: {k} examples of the {structure} asked, {len(candidates)} other "
                         f"{query.split} image(s) have one")
    digest = hashlib.sha256(f"{seed}:{query.id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
    return [candidates[i] for i in rng.choice(len(candidates), size=k, replace=False)]


def icl_record(query: Record, examples: Sequence[Record], style: str) -> Record:
    """The in-context record of `query` with `examples` shown in `style`: their pairs as its context, the request as
    its question, the query's answer (its `<SEG>` and mask) as the answer."""
    structure = structure_of(query)
    answer = next(t["value"] for t in query.conversations if t.get("from") == "gpt")
    return replace(query, id=f"{query.id}-icl{len(examples)}-{style}", task=STYLES[style],
                   conversations=[{"from": "human", "value": question(len(examples), structure, style)},
                                  {"from": "gpt", "value": answer}],
                   context=[{"image": e.image, "mask": e.masks[0]} for e in examples])


class InContextSegmentation(Task):
    name = "icl"
    groups = ("icl",)  # in no stage's mix yet (see the module's docstring)
    family = "icl_overlay"
    max_context = MAX_EXAMPLES
    style = "overlay"

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

    def score(self, prediction, reference, pred_masks, target):
        return mask_scores(pred_masks, target)


class InContextMaskImages(InContextSegmentation):
    name = "icl_mask"
    family = "icl_maskimage"
    style = "separate"


register(InContextSegmentation())
register(InContextMaskImages())
