"""A tiny MedPLIB overfit in seconds to answer point-prompted questions with "It is the liver. <SEG>" and a mask,
and a matching little dataset of bright discs in the normalised record layout.

Enough for evaluation, registry and serving plumbing (a real answer with a real mask); not a model test.
Shared by tests/serve, tests/eval and `benchmarks/serve_overhead.py`.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from medplib.config.base import merge
from medplib.config.model import ModelConfig
from medplib.data.images import write_png
from medplib.data.schema import Record
from medplib.data.torch_dataset import (
    CLIP_MEAN, CLIP_STD, SAM_MEAN, SAM_STD, Sample, collate, preprocess_image, preprocess_mask,
)
from medplib.model import MedPLIB, MedTokenizer, point_prompt_mask

SIZE = 64
QUESTION = "What is at <region>? Segment it."
ANSWER = "It is the liver. <SEG>"
TEXTS = [QUESTION, ANSWER, "Segment the liver.", "What is in <region>?", "It is the kidney.", "yes", "no"] * 4
TRAIN_CENTRES = [(20, 20), (44, 40), (24, 44), (40, 22)]


def phantom(cx: int, cy: int, r: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """A bright disc centred at (cx, cy) on a dark noisy background, and its mask."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    noise = np.random.default_rng(cx * 100 + cy).integers(0, 40, (SIZE, SIZE))
    return np.where(mask, 200, noise).astype(np.uint8), mask


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread: on a shared 2-core machine two OpenMP threads can be 5x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_tiny_grounder(out: Path, steps: int = 30, seed: int = 0) -> Path:
    """A seeded tiny model trained `steps` full-batch AdamW steps on four point-prompted discs, saved to `out`
    (steps=0: the random initial model)."""
    # trained here, not from build_init_model's pretrained tower: the tower trains with the rest
    cfg = merge(ModelConfig.tiny(), {"vision": {"freeze": False, "pretrain_epochs": 0}})
    tok = MedTokenizer.train(TEXTS, cfg.llm.vocab_size, cfg.vision.num_patches)
    torch.manual_seed(seed)
    model = MedPLIB(cfg, tok)
    samples = []
    for cx, cy in TRAIN_CENTRES:
        image, mask = phantom(cx, cy)
        ids, labels = tok.encode_conversation([{"from": "human", "value": "<image>\n" + QUESTION},
                                               {"from": "gpt", "value": ANSWER}])
        samples.append(Sample(
            input_ids=torch.tensor(ids), labels=torch.tensor(labels),
            pixel_values=preprocess_image(image, cfg.vision.image_size, CLIP_MEAN, CLIP_STD),
            sam_pixel_values=preprocess_image(image, cfg.sam.image_size, SAM_MEAN, SAM_STD),
            region_masks=preprocess_mask(point_prompt_mask(cx, cy, SIZE, SIZE), cfg.vision.image_size,
                                         keep_any=True)[None],
            seg_masks=preprocess_mask(mask, cfg.sam.image_size).float()[None], record=None))
    batch = collate(samples, tok.pad_token_id)
    batch.pop("records")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    with one_thread():
        for _ in range(steps):
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval().save_pretrained(out)


def write_phantom_dataset(data_dir: Path, samples: dict[str, list[tuple[str, int, int]]]) -> Path:
    """`records.jsonl` + images, point-prompt regions and masks for {split: [(modality, cx, cy), ...]}: grounding
    records asking QUESTION about the disc at (cx, cy)."""
    data_dir = Path(data_dir)
    lines = []
    for split, items in samples.items():
        for modality, cx, cy in items:
            stem = f"{modality}_{split}_{cx}_{cy}"
            image, mask = phantom(cx, cy)
            write_png(data_dir / f"images/{stem}.png", image)
            write_png(data_dir / f"masks/{stem}.png", mask)
            write_png(data_dir / f"regions/{stem}.png", point_prompt_mask(cx, cy, SIZE, SIZE))
            question = "<image>\n" + QUESTION.replace("<region>", f"<region>regions/{stem}.png</region>")
            rec = Record(id=stem, image=f"images/{stem}.png", modality=modality, split=split, task="grounding",
                         conversations=[{"from": "human", "value": question},
                                        {"from": "gpt", "value": f"{ANSWER} <mask>masks/{stem}.png</mask>"}],
                         masks=[f"masks/{stem}.png"], regions=[f"regions/{stem}.png"], source="phantom")
            lines.append(rec.to_json())
    (data_dir / "records.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data_dir
