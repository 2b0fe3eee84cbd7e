"""Deterministic synthetic MeCoVQA: phantoms of the 8 modalities, each with 1–3 named structures and masks.

Written in the real MeCoVQA layout (REFERENCE §4) so that the real dataset can replace it:
images/, masks/ (pixel prompts), masks_merged/ (grounding targets), train/, test/, zeroshot4grounding/.
A task with a `synth_source` has its records written in that source's own layout in a subfolder of that name, by
that source's writer (`Reader.write_synth`), with the images it asks about linked under it (the refer tasks:
`medgrit/`, Med-GRIT-270k's JSON files and `images/`; text-guided segmentation: `lvit/`, one LViT dataset folder
per modality with `img/`, `labelcol/` and its sheets; reports: `iuxray/`, R2Gen's `annotation.json` and
`images/<id>/0.png, 1.png`, the second view made by the task itself, `Task.synth_images`), so that staging the
synthetic source runs the real reader.
Each structure has a fixed shape and brightness, so a question naming it picks one object among several:
a model must read the question to segment the right one.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from medplib.data.images import link_or_copy, write_png
from medplib import tasks
from medplib.data.schema import IMAGE_TOKEN, MODALITIES, MODALITY_NAMES
from medplib.progress import track

log = logging.getLogger(__name__)

# (name, shape, brightness) per modality; shapes differ within a modality so the name decides the object. Every
# structure stands out from its modality's field by at least MIN_CONTRAST speckle sigmas (`contrast`): a ventricle
# at 0.25 on a 0.2 brain and a cyst at 0.1 on a 0.15 fan under 0.12 speckle (0.8 and 0.4 sigma) could not be seen,
# yet "Is there a ventricle?" was answered "yes" from the labels. CSF is dark as on T1, a cyst anechoic.
STRUCTURES: dict[str, list[tuple[str, str, float]]] = {
    "ct": [("liver", "ellipse", 0.85), ("kidney", "rectangle", 0.55), ("spleen", "triangle", 0.7)],
    "mr": [("tumor", "ellipse", 0.9), ("ventricle", "rectangle", 0.02), ("edema", "triangle", 0.65)],
    "x": [("nodule", "ellipse", 0.9), ("heart", "rectangle", 0.6), ("fracture", "triangle", 0.75)],
    "pet": [("lesion", "ellipse", 1.0), ("bladder", "rectangle", 0.8), ("myocardium", "triangle", 0.6)],
    "endoscopy": [("polyp", "ellipse", 0.8), ("instrument", "rectangle", 0.95), ("ulcer", "triangle", 0.5)],
    "dermoscopy": [("melanoma", "ellipse", 0.2), ("nevus", "rectangle", 0.4), ("scar", "triangle", 0.75)],
    "fundus": [("optic disc", "ellipse", 0.95), ("exudate", "rectangle", 0.85), ("hemorrhage", "triangle", 0.3)],
    "ultrasound": [("cyst", "ellipse", 0.02), ("thyroid", "rectangle", 0.75), ("plaque", "triangle", 0.98)],
}
# Each modality's look: background tint (RGB) and whether the image is colour.
LOOKS: dict[str, tuple[tuple[float, float, float], bool]] = {
    "ct": ((0.3, 0.3, 0.3), False), "mr": ((0.2, 0.2, 0.2), False), "x": ((0.1, 0.1, 0.1), False),
    "pet": ((0.05, 0.05, 0.05), False), "endoscopy": ((0.7, 0.35, 0.3), True),
    "dermoscopy": ((0.85, 0.65, 0.55), True), "fundus": ((0.6, 0.2, 0.05), True),
    "ultrasound": ((0.45, 0.45, 0.45), False),
}
NOISE: dict[str, float] = {m: 0.12 if m == "ultrasound" else 0.06 for m in LOOKS}  # speckle sigma per modality
MIN_CONTRAST = 2.0  # sigmas of speckle between a structure and the field it lies on, in the channel that differs most


def structure_colour(modality: str, bright: float) -> np.ndarray:
    """The RGB a structure of brightness `bright` is drawn in (grey-scale modalities: equal channels)."""
    colour = LOOKS[modality][1]
    return np.array([bright, bright * (0.6 if colour else 1), bright * (0.5 if colour else 1)])


def contrast(modality: str, bright: float) -> float:
    """How many speckle sigmas a structure of brightness `bright` stands out from its modality's field (the body,
    fan or aperture it is placed on), in the channel where they differ most."""
    field = np.array(LOOKS[modality][0])
    return float(np.abs(structure_colour(modality, bright) - field).max() / NOISE[modality])


POINT_SIDE_AT_336 = 41  # MedPLIB: a point prompt becomes a 41x41 square at 336 px


def files() -> dict[tuple[str, str], str]:
    """(split, family) → the annotation file the registered tasks write, in the MeCoVQA layout."""
    return {(split, t.family): t.file_for(split) for t in tasks.all_tasks() for split in tasks.TRAIN_TEST}


FILES = files()  # the built-in tasks' files (the DICOM and NIfTI staging writes some of them)


@dataclass
class SynthSummary:
    out: Path
    images: int
    records: int
    files: dict[str, int]  # annotation file (relative to `out`) → records
    sources: list[str]  # source kinds whose own layout holds some tasks' records, each in `out/<kind>/`


def _shape_mask(kind: str, size: int, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if kind == "ellipse":
        return (u / r) ** 2 + (v / (0.7 * r)) ** 2 <= 1.0
    if kind == "rectangle":
        return (np.abs(u) <= r) & (np.abs(v) <= 0.6 * r)
    if kind == "triangle":  # apex up in the rotated frame
        h = 1.7 * r
        return (v >= -h / 2) & (v <= h / 2) & (np.abs(u) <= (v + h / 2) / h * r * 1.1)
    raise ValueError(f"unknown shape kind {kind!r}")


def _where(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    vert = "upper" if ys.mean() < h / 2 else "lower"
    horiz = "left" if xs.mean() < w / 2 else "right"
    return f"in the {vert} {horiz}"


def _render(modality: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """One phantom: image (uint8, HxW or HxWx3) and its structures as (name, mask)."""
    tint, colour = LOOKS[modality]
    k = int(rng.integers(1, 4))
    chosen = sorted(rng.choice(3, size=k, replace=False).tolist())
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.ones((size, size), np.float64)
    if modality in ("ct", "mr"):  # a body/head outline
        body = ((yy - size / 2) / (0.46 * size)) ** 2 + ((xx - size / 2) / (0.4 * size)) ** 2 <= 1
        base = np.where(body, 1.0, 0.3)
    elif modality == "ultrasound":  # fan-shaped field of view
        ang = np.arctan2(xx - size / 2, yy + 0.2 * size)
        base = np.where(np.abs(ang) < 0.6, 1.0, 0.0)
    elif modality in ("fundus", "endoscopy"):  # circular aperture
        base = np.where((yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (0.48 * size) ** 2, 1.0, 0.0)
    img = base[..., None] * np.array(tint)[None, None, :]
    structures: list[tuple[str, np.ndarray]] = []
    occupied = np.zeros((size, size), bool)
    for idx in chosen:
        name, kind, bright = STRUCTURES[modality][idx]
        for _ in range(30):  # place without overlap
            r = rng.uniform(0.11, 0.17) * size
            cy, cx = rng.uniform(0.25 * size, 0.75 * size, size=2)
            m = _shape_mask(kind, size, cy, cx, r, rng.uniform(-0.3, 0.3))
            if m.sum() >= 12 and not (m & occupied).any():
                break
        else:
            continue
        occupied |= m
        img[m] = structure_colour(modality, bright)
        structures.append((name, m))
    img = img + rng.normal(0, NOISE[modality], size=img.shape[:2])[..., None]  # speckle
    img = np.clip(img, 0, 1)
    out = (img * 255).round().astype(np.uint8)
    return (out if colour else out[..., 0]), structures


def _prompt_mask(kind: str, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = mask.shape[0]
    ys, xs = np.nonzero(mask)
    if kind == "point":
        i = int(rng.integers(len(ys)))
        half = max(1, round(POINT_SIDE_AT_336 * size / 336) // 2)
        p = np.zeros_like(mask)
        p[max(0, ys[i] - half): ys[i] + half + 1, max(0, xs[i] - half): xs[i] + half + 1] = True
        return p
    if kind == "box":
        p = np.zeros_like(mask)
        p[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1] = True
        return p
    # free-form: the structure itself with a ragged edge (a scribble around it)
    pad = np.pad(mask, 1)
    grown = pad[1:-1, 1:-1] | pad[:-2, 1:-1] | pad[2:, 1:-1] | pad[1:-1, :-2] | pad[1:-1, 2:]
    return np.where(rng.random(mask.shape) < 0.5, grown, mask)


@dataclass
class Scene:
    """One phantom as the tasks see it when they write their records: image, structures, split, a shared rng."""

    out: Path
    index: int
    modality: str
    stem: str
    split: str  # train | test | zeroshot
    structures: list[tuple[str, np.ndarray]]
    rng: np.random.Generator
    image: np.ndarray | None = None  # the phantom's pixels, as written at `image_rel`
    _focus: tuple[str, np.ndarray] | None = None

    @property
    def image_rel(self) -> str:
        return f"images/{self.stem}.png"

    @property
    def mod_name(self) -> str:
        return MODALITY_NAMES[self.modality]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.structures]

    @property
    def catalogue(self) -> list[tuple[str, str, float]]:
        """The modality's possible structures (name, shape, brightness), present or not."""
        return STRUCTURES[self.modality]

    @property
    def focus(self) -> tuple[str, np.ndarray]:
        """One structure, drawn once per phantom: the tasks that ask about "a structure" ask about the same one."""
        if self._focus is None:
            self._focus = self.structures[int(self.rng.integers(len(self.structures)))]
        return self._focus

    def record(self, answer_type: str, question: str, answer: str) -> dict:
        """A raw MeCoVQA record about this image."""
        return {"image": self.image_rel, "answer_type": answer_type, "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}, {"from": "gpt", "value": answer}]}

    def write(self, rel: str, arr: np.ndarray) -> str:
        """Write a mask or image file under the source folder; returns `rel`."""
        write_png(self.out / rel, arr)
        return rel

    def link(self, rel: str) -> str:
        """The phantom's image also at `rel` under the source folder (a hard link, else a copy); returns `rel`."""
        link_or_copy(self.out / self.image_rel, self.out / rel)
        return rel

    def where(self, mask: np.ndarray) -> str:
        return _where(mask)

    def prompt_mask(self, kind: str, mask: np.ndarray) -> np.ndarray:
        return _prompt_mask(kind, mask, self.rng)


def write_records(path: Path, records: list[dict]) -> None:
    """A JSON list of raw records, as the synthetic generator writes every annotation file (sorted keys, one space
    indent: the same records give the same bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _source_writer(kind: str) -> Callable[[Path, Path, dict[str, list[dict]]], None]:
    """The writer of source `kind`'s own layout (`Reader.write_synth`), or an error naming what is missing."""
    from medplib.data import readers  # the readers import this module's write_records: import them when writing

    reader = readers.get(kind)
    if reader.write_synth is None:
        raise ValueError(f"Tasks write synthetic records in the {kind!r} layout, but the {kind!r} reader "
                         f"({reader.module}) has no write_synth(root, folder, files) to write them")
    return reader.write_synth


def generate(out: Path, n: int = 240, seed: int = 42, image_size: int = 64,
             zeroshot_modalities: tuple[str, ...] = ("pet", "fundus"), test_fraction: float = 0.2) -> SynthSummary:
    """Write `n` phantoms and their QA records to `out` in the MeCoVQA layout; same arguments, same bytes."""
    out = Path(out)
    if n < 1:
        raise ValueError(f"n = {n}: need at least one image")
    bad = [m for m in zeroshot_modalities if m not in MODALITIES]
    if bad:
        raise ValueError(f"zeroshot_modalities has {bad[0]!r}, not one of {list(MODALITIES)}")
    # (source kind or None for the MeCoVQA layout, file) → records
    buckets: dict[tuple[str | None, str], list[dict]] = {}
    add = lambda key, rec: buckets.setdefault(key, []).append(rec)  # noqa: E731
    for i in track(range(n), "synth", "images", disable=n < 200):
        rng = np.random.default_rng([seed, i])
        modality = MODALITIES[i % len(MODALITIES)]
        img, structures = _render(modality, image_size, rng)
        stem = f"{modality}_00--synth{seed}--case{i:05d}--z_0000"
        image_rel = f"images/{stem}.png"
        write_png(out / image_rel, img)
        split = "test" if rng.random() < test_fraction else "train"
        # Zero-shot means held out: every image of a zero-shot modality goes to the zero-shot split and carries only
        # the tasks asked zero-shot; no record of those modalities' images is trained on.
        zeroshot = modality in zeroshot_modalities
        scene = Scene(out=out, index=i, modality=modality, stem=stem, split="zeroshot" if zeroshot else split,
                      structures=structures, rng=rng, image=img)
        for task in tasks.all_tasks():
            if zeroshot and not task.zeroshot:
                continue
            records = task.synth(scene)
            if task.synth_source:  # in that source's own layout, written by its reader's writer below
                key = (task.synth_source, task.synth_file(split, modality))
                if records:
                    task.synth_images(scene)  # images only this task's layout has (a second view), made now
            elif zeroshot:
                key = (None, f"zeroshot4grounding/{'xray' if modality == 'x' else modality}.json")
            else:
                key = (None, task.synth_file(split, modality))
            for rec in records:
                add(key, rec)
    own: dict[str, dict[str, list[dict]]] = {}  # source kind → {file in its folder: records}
    for (kind, rel), records in buckets.items():
        if kind is None:
            write_records(out / rel, records)
        else:
            own.setdefault(kind, {})[rel] = records
    for kind, files in sorted(own.items()):
        _source_writer(kind)(out, out / kind, files)
    counts = {(f"{kind}/{rel}" if kind else rel): len(r) for (kind, rel), r in buckets.items()}
    counts = dict(sorted(counts.items()))
    sources = sorted(own)
    log.info("synthetic MeCoVQA: %d images, %d records in %s (in their own layouts: %s)", n, sum(counts.values()), out,
             ", ".join(sources) or "none")
    return SynthSummary(out=out, images=n, records=sum(counts.values()), files=counts, sources=sources)

