"""Contrastive image-caption pretraining of a randomly initialised CLIP vision tower (the tiny preset's stand-in for
the pre-trained CLIP that MedPLIB loads and freezes).

Trained through the language model's loss alone, the tiny tower learned which modality an image is but not which
structures it shows: closed "Is there a …?" questions sat at chance through every stage II variant tried. Trained
the way CLIP is (an image and its caption close, other captions far), the same tower retrieves the exact caption of
a held-out image (modality and structure set) 76% of the time, and frozen afterwards it lets stage II read presence.
Each image can be moved by a few pixels every time it is drawn (`shift`, `model.vision.pretrain_shift`), and the tiny
preset moves it by up to 4 each way. On the default data (every structure visible) that takes held-out exact caption
retrieval from 0.78 to 0.998 and each structure's presence, read from the retrieved caption, from 0.90 to 0.999
(the MR ventricle 0.53 → 1.00, ultrasound plaque and thyroid 0.75 → 1.00; 410 validation and test captions), and the
whole pipeline's closed VQA from 0.922 / 0.907 to 0.996 / 0.985 (validation / test), grounding 0.928 / 0.918 →
0.870 / 0.861. On the former data (an MR ventricle and an ultrasound cyst that could not be seen) the same shift
took retrieval 0.76 → 0.94 but left closed VQA at 0.90 and cost grounding (0.88 → 0.82).

The text side is a bag of words of the caption through a two-layer MLP, enough for captions that list what an image
shows; images with the same caption are each other's positives. The image side pools the patch features the LLM's
projector reads (the tower's selected layer) by mean and max through a linear head. Only the tower is kept.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

WORD_RE = re.compile(r"[a-z0-9]+")
EMBED_DIM = 64  # the shared image-text space
TEXT_HIDDEN = 128


@dataclass
class PretrainResult:
    steps: int
    pairs: int  # image-caption pairs trained on
    captions: int  # distinct captions among them
    first_loss: float
    last_loss: float
    retrieval: float  # share of training images whose best-scoring caption is their own (after training, unshifted)
    seconds: float
    max_shift: int = 0  # pixels each way an image moved, at most, each time it was drawn

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in vars(self).items()}


def words(text: str) -> list[str]:
    return WORD_RE.findall(text.lower())


def bag_of_words(captions: list[str]) -> tuple[torch.Tensor, list[str]]:
    """(len(captions), vocabulary) 0/1 matrix and the vocabulary (sorted words of all captions)."""
    vocab = sorted({w for c in captions for w in words(c)})
    index = {w: i for i, w in enumerate(vocab)}
    bow = torch.zeros(len(captions), len(vocab))
    for i, c in enumerate(captions):
        for w in words(c):
            bow[i, index[w]] = 1.0
    return bow, vocab


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, caption_ids: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, with every pair that shares a caption a positive (targets spread over them)."""
    logits = logit_scale.exp().clamp(max=100.0) * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.log_softmax(0).T).sum(1).mean())


class ContrastiveHeads(nn.Module):
    """What reads the tower and the captions into the shared space while pretraining (dropped afterwards)."""

    def __init__(self, vision_width: int, vocab: int):
        super().__init__()
        self.image = nn.Linear(2 * vision_width, EMBED_DIM)
        self.text = nn.Sequential(nn.Linear(vocab, TEXT_HIDDEN), nn.GELU(), nn.Linear(TEXT_HIDDEN, EMBED_DIM))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_images(self, tower: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        feats = tower(pixels)  # (B, patches, width): what the projector reads
        return self.image(torch.cat([feats.mean(1), feats.amax(1)], -1))


def shift(pixels: torch.Tensor, most: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of (N, C, H, W) moved by its own random offset of -`most`..`most` pixels in y and x, the edge
    pixels replicated into the space it leaves (0: unchanged)."""
    if most <= 0:
        return pixels
    n, _, h, w = pixels.shape
    padded = F.pad(pixels, (most, most, most, most), mode="replicate")
    dy, dx = torch.randint(0, 2 * most + 1, (2, n), generator=generator).tolist()
    return torch.stack([padded[i, :, y:y + h, x:x + w] for i, (y, x) in enumerate(zip(dy, dx))])


def pretrain_tower(tower: nn.Module, pixels: torch.Tensor, captions: list[str], epochs: int, batch: int, lr: float,
                   seed: int = 42, progress: bool = True, heads: ContrastiveHeads | None = None,
                   max_shift: int = 0) -> PretrainResult:
    """Train `tower` (a VisionTower) in place on (pixels[i], captions[i]) pairs for `epochs` passes of `batch` pairs,
    each image moved by up to `max_shift` pixels each way (`shift`) every time it is drawn.

    `pixels` are CLIP-normalised (N, 3, H, W). The tower's parameters train whatever their `requires_grad` was and
    are left as they were found. `heads` (default: new, seeded) take `bag_of_words` of the distinct captions."""
    import time

    from medplib.progress import StepProgress, training_detail

    if len(pixels) != len(captions) or not captions:
        raise ValueError(f"Vision pretraining needs image-caption pairs: got {len(pixels)} images and "
                         f"{len(captions)} captions")
    t0 = time.monotonic()
    generator = torch.Generator().manual_seed(seed)
    distinct = sorted(set(captions))
    index = {c: i for i, c in enumerate(distinct)}
    ids = torch.tensor([index[c] for c in captions])
    bow, vocab = bag_of_words(distinct)
    if heads is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            heads = ContrastiveHeads(tower.clip.config.hidden_size, len(vocab))
    was = {n: p.requires_grad for n, p in tower.named_parameters()}
    trainable = [p for b in tower.clip.encoder.layers[: tower.num_blocks] for p in b.parameters()]
    trainable += list(tower.clip.embeddings.parameters()) + list(tower.clip.pre_layrnorm.parameters())
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable + list(heads.parameters()), lr=lr, weight_decay=0.01)
    steps = max(1, math.ceil(epochs * len(captions) / batch))
    size = min(batch, len(captions))
    losses: list[float] = []
    tower.train()
    try:
        with StepProgress("vision pretraining", steps, disable=not progress) as bar:
            for _ in range(steps):
                idx = torch.randint(len(captions), (size,), generator=generator)
                images = shift(pixels[idx], max_shift, generator)
                loss = contrastive_loss(heads.embed_images(tower, images), heads.text(bow[ids[idx]]), ids[idx],
                                        heads.logit_scale)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                elapsed = time.monotonic() - t0
                bar.set(len(losses), detail=training_detail(len(losses), steps, 0, losses[-1],
                                                            len(losses) * size / elapsed, elapsed))
        tower.eval()
        with torch.no_grad():
            text = F.normalize(heads.text(bow), dim=-1)
            hits = 0
            for i in range(0, len(captions), 256):
                image = F.normalize(heads.embed_images(tower, pixels[i:i + 256]), dim=-1)
                hits += int((image @ text.T).argmax(1).eq(ids[i:i + 256]).sum())
    finally:
        for n, p in tower.named_parameters():
            p.requires_grad_(was[n])
    k = max(1, steps // 10)
    result = PretrainResult(steps=steps, pairs=len(captions), captions=len(distinct),
                            first_loss=float(np.mean(losses[:k])), last_loss=float(np.mean(losses[-k:])),
                            retrieval=hits / len(captions), seconds=time.monotonic() - t0, max_shift=max_shift)
    log.info("Vision pretraining: %d steps on %d image-caption pairs (%d captions), loss %.3f -> %.3f, training "
             "caption retrieval %.2f (chance %.3f), %.0f s", result.steps, result.pairs, result.captions,
             result.first_loss, result.last_loss, result.retrieval, 1 / len(distinct), result.seconds)
    return result


def caption_pairs(data_dir: Path, tasks: tuple[str, ...] = ("alignment",)) -> list[tuple[str, str]]:
    """(image path, caption) of every train-split record of `tasks` (names or groups): the first answer turn is the
    caption (MedPLIB's alignment data: a request, then the description)."""
    from medplib.data.torch_dataset import read_records
    from medplib.tasks import resolve

    chosen = resolve(tasks)
    pairs = []
    for r in read_records(data_dir):
        if r.split != "train" or r.task not in chosen or not r.image:
            continue
        if words(r.answer):
            pairs.append((r.image, r.answer))
    return pairs


def pretrain_vision(model, data_dir: Path, seed: int = 42) -> PretrainResult:
    """Pretrain `model.vision_tower` (a MedPLIB) on the train split's captions in `data_dir`, as its config's
    `vision.pretrain_*` keys say (epochs, batch, lr, shift)."""
    from medplib.data.images import read_image
    from medplib.data.torch_dataset import CLIP_MEAN, CLIP_STD, preprocess_image

    vision = model.config.vision
    pairs = caption_pairs(Path(data_dir))
    if not pairs:
        raise ValueError(f"model.vision.pretrain_epochs = {vision.pretrain_epochs} but {data_dir}/records.jsonl has "
                         "no train-split caption (alignment) record to pretrain the vision tower on: add caption "
                         "records, or set model.vision.pretrain_epochs: 0 (and model.vision.freeze: false, so the "
                         "tower trains in the stages)")
    pixels = torch.stack([preprocess_image(read_image(Path(data_dir) / image), vision.image_size, CLIP_MEAN, CLIP_STD)
                          for image, _ in pairs])
    return pretrain_tower(model.vision_tower, pixels, [c for _, c in pairs], vision.pretrain_epochs,
                          vision.pretrain_batch, vision.pretrain_lr, seed=seed, max_shift=vision.pretrain_shift)
