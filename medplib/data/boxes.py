"""Boxes in text as BiRD (Qwen-VL) writes them: `<ref>liver</ref><box>(120,300),(480,720)</box>`.

The one place that reads and writes this format: the Med-GRIT reader, the refer-and-ground tasks' record checks and
scores (and the synthetic generator and prompts when they write boxes).
- Grid: top-left then bottom-right corner on a [0, 1000) grid, integers in Med-GRIT; floats are accepted, as BiRD's
  evaluator parses them. A box may be bare (`<box>…</box>`) or named by the `<ref>` just before it.
- Pixels: a pixel box is (x1, y1, x2, y2) with inclusive corners, the first and last column/row it covers, as a
  mask's bounding box is. To the grid: floor(pixel / side * 1000) (Qwen-VL's `int(x / w * 1000)`), so the last
  pixel of any side lands on 999 and no box leaves the grid. Back: the first pixel whose grid cell is x1, the last
  whose cell is x2, so an integer pixel box survives the round trip whenever the side is at most 1000 px.
- Masks: a model that grounds through `<SEG>` (MedPLIB) learns a run of boxes as one mask (their union, `as_masks`)
  and answers boxes as the bounding boxes of its mask's parts (`from_masks`).
- IoU: of the boxes as continuous rectangles, (x2 - x1) * (y2 - y1) areas, as BiRD's `box_iou`; no overlap or an
  empty union is 0.
Errors on record text are `BoxTextError`s whose reason starts with its kind ("malformed box text", "box corners
reversed", "coordinate outside the grid", "<ref>/<box> counts disagree") so a quarantine can count them.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

GRID = 1000  # coordinates live on [0, GRID)

_NUM = r"[-+]?\d+(?:\.\d*)?|[-+]?\.\d+"
_COORDS_RE = re.compile(rf"^\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*$")
_SPAN_RE = re.compile(r"<ref>(.*?)</ref>|<box>(.*?)</box>", re.S)
_TAG_RE = re.compile(r"</?(?:ref|box)>")
_BARE_RE = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")


class BoxTextError(ValueError):
    """Box text that cannot be used: the offending text (`value`) and why (`reason`, starting with its kind)."""

    def __init__(self, value: str, reason: str):
        self.value, self.reason = value, reason
        super().__init__(f"{value!r}: {reason}")


def _problem(x1: float, y1: float, x2: float, y2: float) -> str | None:
    outside = [v for v in (x1, y1, x2, y2) if not 0 <= v < GRID]
    if outside:
        return f"coordinate outside the grid: {_fmt(outside[0])} is not in [0, {GRID})"
    if x2 < x1:
        return f"box corners reversed: x2 {_fmt(x2)} < x1 {_fmt(x1)} (expected top-left, then bottom-right)"
    if y2 < y1:
        return f"box corners reversed: y2 {_fmt(y2)} < y1 {_fmt(y1)} (expected top-left, then bottom-right)"
    return None


@dataclass(frozen=True)
class Box:
    """A box on the [0, 1000) grid, top-left (x1, y1) to bottom-right (x2, y2); checked when made."""

    x1: float
    y1: float
    x2: float
    y2: float

    def __post_init__(self) -> None:
        problem = _problem(self.x1, self.y1, self.x2, self.y2)
        if problem is not None:
            raise BoxTextError(format_box(self), problem)

    @property
    def area(self) -> float:
        return (self.x2 - self.x1) * (self.y2 - self.y1)


def _fmt(v: float) -> str:
    """An integral coordinate as an integer (Med-GRIT's form), any other with up to 3 decimals."""
    return str(int(v)) if float(v).is_integer() else f"{v:.3f}".rstrip("0").rstrip(".")


def format_box(box: Box) -> str:
    """`<box>(x1,y1),(x2,y2)</box>`."""
    return f"<box>({_fmt(box.x1)},{_fmt(box.y1)}),({_fmt(box.x2)},{_fmt(box.y2)})</box>"


def write(pairs: Iterable[tuple[str | None, Box]]) -> str:
    """`<ref>name</ref><box>…</box>` for each (name, box), or the bare `<box>…</box>` when the name is None."""
    out = []
    for name, box in pairs:
        if name is not None:
            if not name.strip() or _TAG_RE.search(name):
                raise ValueError(f"Box name {name!r} must be non-empty text without <ref>/<box> tags")
            out.append(f"<ref>{name}</ref>")
        out.append(format_box(box))
    return "".join(out)


def parse_box(content: str) -> Box:
    """The box of `(x1,y1),(x2,y2)` (what sits between `<box>` and `</box>`), checked against the grid."""
    m = _COORDS_RE.match(content)
    if m is None:
        raise BoxTextError(f"<box>{content}</box>", "malformed box text: expected <box>(x1,y1),(x2,y2)</box> "
                                                    "with numbers")
    x1, y1, x2, y2 = (float(g) for g in m.groups())
    problem = _problem(x1, y1, x2, y2)
    if problem is not None:
        raise BoxTextError(f"<box>{content}</box>", problem)
    return Box(x1, y1, x2, y2)


def parse(text: str, paired: bool = False) -> list[tuple[str | None, Box]]:
    """Every box of `text` in order, with the name of the `<ref>` right before it (only whitespace between) or None.

    A `<ref>` without a box is allowed (a question naming what to find) unless `paired`: then every `<ref>` must be
    followed by its box and every box must have its `<ref>`.
    """
    out: list[tuple[str | None, Box]] = []
    pending: str | None = None  # the name of a <ref> not yet followed by anything but whitespace
    n_refs = 0
    pos = 0
    for m in _SPAN_RE.finditer(text):
        gap = text[pos:m.start()]
        stray = _TAG_RE.search(gap)
        if stray is not None:
            raise BoxTextError(text[stray.start():m.end()], f"malformed box text: unmatched {stray.group()}")
        if gap.strip():
            pending = None
        ref, content = m.group(1), m.group(2)
        if ref is not None:
            if _TAG_RE.search(ref):
                raise BoxTextError(m.group(), "malformed box text: a tag inside <ref>…</ref>")
            if not ref.strip():
                raise BoxTextError(m.group(), "malformed box text: empty <ref></ref>")
            n_refs += 1
            pending = ref.strip()
        else:
            out.append((pending, parse_box(content)))
            pending = None
        pos = m.end()
    stray = _TAG_RE.search(text, pos)
    if stray is not None:
        raise BoxTextError(text[stray.start():stray.start() + 60], f"malformed box text: unmatched {stray.group()}")
    if paired:
        named = sum(name is not None for name, _ in out)
        if not (n_refs == len(out) == named):
            raise BoxTextError(text, f"<ref>/<box> counts disagree: {n_refs} <ref> but {len(out)} <box> "
                                     f"({named} named by the <ref> just before it); each box needs its <ref>")
    return out


def has_box(text: str) -> bool:
    """Whether the text carries box markup at all (well-formed or not)."""
    return "<box>" in text or "</box>" in text


def strip(text: str) -> str:
    """The text without its `<ref>…</ref>` and `<box>…</box>` spans."""
    return _SPAN_RE.sub(" ", text)


def find_boxes(prediction: str) -> list[Box]:
    """The boxes a model answered, leniently as BiRD's evaluator reads them: every `<box>…</box>` that parses (a
    malformed or off-grid one is skipped: it finds nothing), or, when there is no `<box>` at all, bare
    `(x1,y1),(x2,y2)` pairs."""
    contents = [m.group(2) for m in _SPAN_RE.finditer(prediction) if m.group(2) is not None]
    if not contents and "<box>" not in prediction:
        contents = [m.group() for m in _BARE_RE.finditer(prediction)]
    out = []
    for content in contents:
        try:
            out.append(parse_box(content))
        except BoxTextError:
            continue
    return out


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two grid boxes as continuous rectangles; 0 when the union is empty."""
    w = min(a.x2, b.x2) - max(a.x1, b.x1)
    h = min(a.y2, b.y2) - max(a.y1, b.y1)
    inter = max(w, 0.0) * max(h, 0.0)
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


def to_grid(pixels: tuple[int, int, int, int], width: int, height: int) -> Box:
    """The grid box of a pixel box (inclusive corners) in a `width` x `height` image."""
    x1, y1, x2, y2 = pixels
    if not (0 <= x1 <= x2 < width and 0 <= y1 <= y2 < height):
        raise ValueError(f"Pixel box {pixels} is not inside a {width}x{height} image with x1 <= x2, y1 <= y2")
    return Box(*(math.floor(v * GRID / side) for v, side in ((x1, width), (y1, height), (x2, width), (y2, height))))


def _first_pixel(g: float, side: int) -> int:
    """The first pixel whose grid cell, floor(p * GRID / side), is at least g."""
    return min(-(-math.ceil(g) * side // GRID), side - 1)


def _last_pixel(g: float, side: int) -> int:
    """The last pixel whose grid cell is at most g: one before the first pixel of the next cell."""
    return min(-(-(math.floor(g) + 1) * side // GRID) - 1, side - 1)


def to_pixels(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """The pixel box (inclusive corners) a grid box covers in a `width` x `height` image; at least one pixel (a box
    thinner than a pixel's cell, possible when the side is under 1000 px, gets the pixel at its top-left)."""
    x1, y1 = _first_pixel(box.x1, width), _first_pixel(box.y1, height)
    return x1, y1, max(_last_pixel(box.x2, width), x1), max(_last_pixel(box.y2, height), y1)


def mask_box(mask: np.ndarray) -> Box | None:
    """The grid box of a mask's foreground (its pixel bounding box, inclusive); None for an empty mask."""
    ys, xs = np.nonzero(np.asarray(mask))
    if xs.size == 0:
        return None
    h, w = np.asarray(mask).shape[:2]
    return to_grid((int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())), w, h)


def box_mask(box: Box, width: int, height: int) -> np.ndarray:
    """A boolean `height` x `width` mask that is True on the pixels the grid box covers (a box prompt)."""
    x1, y1, x2, y2 = to_pixels(box, width, height)
    out = np.zeros((height, width), dtype=bool)
    out[y1:y2 + 1, x1:x2 + 1] = True
    return out


def random_box_hit_rate(width: float, height: float, truth: Box, above: float = 0.5, steps: int = 101) -> float:
    """How often a `width` x `height` box placed uniformly at random on the grid overlaps `truth` with IoU above
    `above`: the fraction of a `steps` x `steps` lattice of placements (top-left corners spread evenly over
    [0, GRID - 1 - side]) that do. The chance level of a grounding answer that knows only the boxes' usual size."""
    if width < 0 or height < 0:
        raise ValueError(f"A box of width {width} and height {height}: both must be >= 0")
    w, h = min(float(width), GRID - 1.0), min(float(height), GRID - 1.0)
    xs, ys = np.linspace(0.0, GRID - 1 - w, steps), np.linspace(0.0, GRID - 1 - h, steps)
    ix = np.clip(np.minimum(xs + w, truth.x2) - np.maximum(xs, truth.x1), 0.0, None)
    iy = np.clip(np.minimum(ys + h, truth.y2) - np.maximum(ys, truth.y1), 0.0, None)
    inter = iy[:, None] * ix[None, :]
    union = w * h + truth.area - inter
    overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return float((overlap > above).mean())


MIN_PART = 0.1  # a mask's part smaller than this fraction of its largest part is a speck, not a box (`mask_boxes`)


def as_masks(text: str, width: int, height: int, token: str, runs: bool = True,
             existing: Iterator[np.ndarray] | None = None) -> tuple[str, list[np.ndarray]] | None:
    """`text` with its boxes replaced by `token` (each run of boxes, boxes with only whitespace between them, by one
    `token` when `runs`, else each box by its own), and the mask of every `token` of the result in order (bool,
    `height` x `width`): a replaced run's is its boxes' union; a `token` already in the text takes the next mask of
    `existing`, the masks the record gives for those. A `<ref>` stays, so `<ref>liver</ref><box>…</box>` becomes
    `<ref>liver</ref><SEG>`. None when `text` has no box; malformed box text is a BoxTextError."""
    if not re.search(r"<box>.*?</box>", text, re.S):
        return None  # before a mask of `existing` is taken
    out: list[str] = []
    masks: list[np.ndarray] = []
    pos, run, replaced = 0, False, False
    for m in re.finditer(rf"{re.escape(token)}|<ref>.*?</ref>|<box>(.*?)</box>", text, re.S):
        gap = text[pos:m.start()]
        if m.group().startswith("<ref>"):  # it stays in the text, before the run it names
            continue
        if m.group(1) is None:  # a token the record already has
            if existing is None:
                raise ValueError(f"{token} in {text!r} has no mask: pass the record's masks as `existing`")
            out += [gap, token]
            masks.append(next(existing))
            run = False
        else:
            box = box_mask(parse_box(m.group(1)), width, height)
            if runs and run and not gap.strip():
                masks[-1] = masks[-1] | box  # the whitespace between a run's boxes goes with them
            else:
                out += [gap, token]
                masks.append(box)
            run, replaced = True, True
        pos = m.end()
    return ("".join(out) + text[pos:], masks) if replaced else None


def mask_boxes(mask: np.ndarray) -> list[Box]:
    """The grid boxes of a mask's parts (8-connected), largest first; parts under `MIN_PART` of the largest are
    left out."""
    from scipy import ndimage

    labels, n = ndimage.label(np.asarray(mask, bool), structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    sizes = ndimage.sum_labels(np.ones(labels.shape), labels, index=np.arange(1, n + 1))
    order = [int(i) for i in np.argsort(-sizes, kind="stable") if sizes[i] >= MIN_PART * sizes.max()]
    return [mask_box(labels == i + 1) for i in order]


def from_masks(text: str, masks: list[np.ndarray], token: str) -> str:
    """`text` with its k-th `token` replaced by the boxes of the k-th mask (`mask_boxes`; nothing for an empty
    mask): the answer a model that grounds through `<SEG>` gives in box text. A `token` past the masks stays."""
    parts = text.split(token)
    out = [parts[0]]
    for k, rest in enumerate(parts[1:]):
        out.append("".join(format_box(b) for b in mask_boxes(masks[k])) if k < len(masks) else token)
        out.append(rest)
    return "".join(out)
