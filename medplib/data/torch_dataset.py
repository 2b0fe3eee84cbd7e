"""A torch Dataset over normalised records; it is handed a tokenizer object and never builds a model.

Geometry: every image is padded to a square (centred) and resized, once for the CLIP tower and once for the SAM
encoder; prompt masks follow the CLIP geometry, target masks the SAM geometry. `unsquare` undoes it for outputs.
A record's context images (in-context examples, other views) reach the sample as what uses them. When its prompt
has an `<image>` placeholder for them (one per shown image, before the query's), the sample carries the images
the task shows for them (`Task.show_context`: the images, or example masks drawn in), which `collate` batches as
`context_pixel_values` with `context_counts` for the model; a prompt with one `<image>` shows none.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from medplib import tasks as registry
from medplib.data.images import read_image, read_mask
from medplib.data.schema import (
    IMAGE_TOKEN, MASK_RE, REGION_PLACEHOLDER, REGION_RE, REGION_TOKEN, SEG_TOKEN, Record, RecordError,
)

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SAM_MEAN, SAM_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IGNORE_INDEX = -100


class ConversationTokenizer(Protocol):
    """What the dataset needs from a tokenizer (medplib.model.MedTokenizer is one)."""

    pad_token_id: int

    def encode_conversation(self, turns: Sequence[dict]) -> tuple[list[int], list[int]]: ...


def _square(arr: np.ndarray, fill: float | tuple) -> np.ndarray:
    h, w = arr.shape[:2]
    side = max(h, w)
    if h == w:
        return arr
    out = np.empty((side, side) + arr.shape[2:], arr.dtype)
    out[...] = fill
    top, left = (side - h) // 2, (side - w) // 2
    out[top: top + h, left: left + w] = arr
    return out


def preprocess_image(image: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (H, W) or (H, W, 3) → float (3, size, size): padded square with the mean colour, resized, normalised."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    fill = tuple(int(round(m * 255)) for m in mean)
    sq = Image.fromarray(_square(image, fill)).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(sq, np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def preprocess_mask(mask: np.ndarray, size: int, keep_any: bool = False) -> torch.Tensor:
    """bool (H, W) → bool (size, size) in the padded-square geometry; `keep_any` keeps every covered pixel."""
    sq = _square(mask.astype(np.float32), 0.0)
    img = Image.fromarray(sq).resize((size, size), Image.BOX)
    arr = np.asarray(img)
    return torch.from_numpy(arr > (0.0 if keep_any else 0.5))


def unsquare(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Mask logits (..., S, S) in the padded-square geometry → (..., height, width) of the original image."""
    side = max(height, width)
    lead = logits.shape[:-2]
    x = F.interpolate(logits.reshape(-1, 1, *logits.shape[-2:]).float(), size=(side, side), mode="bilinear",
                      align_corners=False)
    top, left = (side - height) // 2, (side - width) // 2
    return x[:, 0, top: top + height, left: left + width].reshape(*lead, height, width)


def strip_paths(turns: Sequence[dict]) -> tuple[list[dict], list[str], list[str]]:
    """Conversation text for the model plus the region and mask paths it named, in order.

    `<region>PATH</region>` becomes `<region></region>` (the `<region>` embedding is replaced by the region's
    features); `<mask>PATH</mask>` is dropped: the mask is the `<SEG>` target, not text to generate.
    """
    regions: list[str] = []
    masks: list[str] = []
    out = []
    for t in turns:
        text = t["value"]
        regions += REGION_RE.findall(text)
        masks += MASK_RE.findall(text)
        text = REGION_RE.sub(REGION_PLACEHOLDER, text)
        text = MASK_RE.sub("", text)
        out.append({"from": t["from"], "value": re.sub(r" {2,}", " ", text).strip()})
    return out, regions, masks


def encode_within(turns: Sequence[dict], regions: Sequence, tokenizer: ConversationTokenizer,
                  max_len: int | None, record_id: str) -> tuple[list[int], list[int], list]:
    """Ids, labels and region prompts (paths or masks, one per `<region>` in order) of a conversation (`strip_paths`'
    output) in at most `max_len` positions.

    A length counts the positions the LLM sees: text tokens with `<image>` expanded to its patch positions (LLaVA
    cuts at `model_max_length` after that expansion too). Only the context side is cut, never an answer's `<SEG>`:
    first the earliest question/answer pairs whose answer has no `<SEG>` (the last pair stays; the `<image>` moves to
    the next question, a dropped question's region prompts go with it), then words from the middle of the questions,
    longest first (placeholders such as `<region></region>` stay). A record that still does not fit (its answers,
    `<SEG>`s and image alone overflow) is a RecordError naming it and the lengths.
    """
    ids, labels = tokenizer.encode_conversation(turns)
    if max_len is None or len(ids) <= max_len:
        return ids, labels, list(regions)
    full = len(ids)
    pairs = [[dict(turns[k]), dict(turns[k + 1])] for k in range(0, len(turns), 2)]
    counts = [sum(t["value"].count(REGION_TOKEN) for t in pair) for pair in pairs]
    owned = [list(regions[sum(counts[:k]): sum(counts[:k + 1])]) for k in range(len(pairs))]  # each pair's regions

    def encode() -> tuple[list[int], list[int]]:
        return tokenizer.encode_conversation([t for pair in pairs for t in pair])

    while len(ids) > max_len:
        droppable = [k for k, (_, answer) in enumerate(pairs[:-1]) if SEG_TOKEN not in answer["value"]]
        if not droppable:
            break
        k = droppable[0]
        question, _ = pairs.pop(k)
        owned.pop(k)
        if IMAGE_TOKEN in question["value"] and IMAGE_TOKEN not in pairs[k][0]["value"]:
            pairs[k][0]["value"] = f"{IMAGE_TOKEN}\n{pairs[k][0]['value']}"
        ids, labels = encode()

    while len(ids) > max_len:
        k = max(range(len(pairs)), key=lambda j: len(_cuttable(pairs[j][0]["value"])))
        question = pairs[k][0]["value"]
        if not _cuttable(question):
            answer = sum(lab != IGNORE_INDEX for lab in labels)
            raise RecordError(f"record {record_id}", "conversations", f"{full} positions",
                              f"with its context cut it still takes {len(ids)} positions ({answer} of them answer "
                              f"tokens, the rest its image and template), more than max_len {max_len}: raise the "
                              "stage's max_len or leave the record out")
        lo, hi = 1, len(_cuttable(question))  # the fewest words to cut, by bisection on the encoded length
        while lo < hi:
            mid = (lo + hi) // 2
            pairs[k][0]["value"] = _without_middle(question, mid)
            lo, hi = (lo, mid) if len(encode()[0]) <= max_len else (mid + 1, hi)
        pairs[k][0]["value"] = _without_middle(question, lo)
        ids, labels = encode()
    return ids, labels, [path for paths in owned for path in paths]


def _cuttable(question: str) -> list[int]:
    """Indices of the words (split at spaces) of `question` that may be cut: not a placeholder such as `<image>`."""
    return [i for i, w in enumerate(question.split(" ")) if "<" not in w]


def _without_middle(question: str, n: int) -> str:
    """`question` without the middle `n` of its cuttable words (no marker: it would cost tokens)."""
    cuttable = _cuttable(question)
    start = (len(cuttable) - n) // 2
    gone = set(cuttable[start: start + n])
    return " ".join(w for i, w in enumerate(question.split(" ")) if i not in gone)


def read_records(data_dir: Path) -> list[Record]:
    path = Path(data_dir) / "records.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `medplib data ingest` first")
    return [Record.from_dict(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line]


def context_pairs(rec: Record, data_dir: Path) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """The record's context pairs as read: (image uint8, mask bool or None), in order (what `Task.show_context` takes)."""
    return [(read_image(Path(data_dir) / p["image"]), read_mask(Path(data_dir) / p["mask"]) if p.get("mask") else None)
            for p in rec.context]


def example_tensors(pairs: Sequence[tuple[np.ndarray, np.ndarray]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """In-context examples, (image, mask) pairs, in the SAM geometry a mask decoder reads them in: pixels
    (K, 3, size, size) and bool masks (K, size, size) (the dataset's samples and `MedPLIB.generate` alike)."""
    return (torch.stack([preprocess_image(image, size, SAM_MEAN, SAM_STD) for image, _ in pairs]),
            torch.stack([preprocess_mask(np.asarray(mask, bool), size) for _, mask in pairs]))


@dataclass
class Sample:
    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,)
    pixel_values: torch.Tensor  # (3, Sv, Sv) CLIP input
    sam_pixel_values: torch.Tensor  # (3, Ss, Ss) SAM input
    region_masks: torch.Tensor  # (R, Sv, Sv) bool, one per <region>
    seg_masks: torch.Tensor  # (S, Ss, Ss) float, one per <SEG>
    record: Record  # its context pairs (`record.context`) are read only as the two fields below need them
    # What the prompt shows of the record's context pairs, one image per `<image>` placeholder before the query's
    # (Task.show_context); None when the prompt shows none. `collate` batches these for the model.
    shown_context: torch.Tensor | None = None  # (N, 3, Sv, Sv)
    # A task whose context pairs are examples of the mask to produce (`Task.mask_examples`): the pairs in the SAM
    # geometry, for a model whose mask decoder reads examples; None otherwise. `collate` batches these too.
    example_pixel_values: torch.Tensor | None = None  # (K, 3, Ss, Ss)
    example_masks: torch.Tensor | None = None  # (K, Ss, Ss) bool


class MedDataset(Dataset):
    """Records of `data_dir/records.jsonl` (optionally one split / some tasks or task groups) as model-ready tensors."""

    def __init__(self, data_dir: Path, tokenizer: ConversationTokenizer, image_size: int, sam_image_size: int,
                 split: str | None = None, tasks: Sequence[str] | None = None,
                 records: Sequence[Record] | None = None, max_len: int | None = None, seed: int = 0):
        """`max_len`: at most this many positions a sample (see `encode_within`); None keeps every conversation.
        Derived tasks named in `tasks` (in-context segmentation, or a group holding it) get their records made from the
        split's with `seed`; `tasks` None takes the records as they are."""
        self.data_dir = Path(data_dir)
        self.tokenizer, self.max_len = tokenizer, max_len
        self.image_size, self.sam_image_size = image_size, sam_image_size
        recs = list(records) if records is not None else read_records(self.data_dir)
        chosen = None if tasks is None else registry.resolve(tasks)  # task names and/or groups (`vl`)
        pool = [r for r in recs if split is None or r.split == split]
        self.records = pool if chosen is None else registry.with_derived(
            [r for r in pool if r.task in chosen], chosen, "train", seed, pool=pool)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Sample:
        rec = self.records[i]
        image = read_image(self.data_dir / rec.image)
        turns, region_paths, mask_paths = strip_paths(rec.conversations)
        regions = [read_mask(self.data_dir / p) for p in region_paths]
        targets = [read_mask(self.data_dir / p) for p in mask_paths]
        task = registry.get(rec.task)
        form = task.pixel_form(turns, regions, targets, *image.shape[:2])  # boxes in text, as
        if form is not None:  # box prompts and <SEG> answers
            turns, regions, targets = form
        ids, labels, regions = encode_within(turns, regions, self.tokenizer, self.max_len, rec.id)
        placeholders = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
        region_masks = [preprocess_mask(m, self.image_size, keep_any=True) for m in regions]
        seg_masks = [preprocess_mask(m, self.sam_image_size).float() for m in targets]
        # the context pairs, read once, when the prompt shows them or the task hands them over as examples
        pairs = context_pairs(rec, self.data_dir) if rec.context and (placeholders > 1 or task.mask_examples) else []
        return Sample(
            input_ids=torch.tensor(ids), labels=torch.tensor(labels),
            pixel_values=preprocess_image(image, self.image_size, CLIP_MEAN, CLIP_STD),
            sam_pixel_values=preprocess_image(image, self.sam_image_size, SAM_MEAN, SAM_STD),
            region_masks=torch.stack(region_masks) if region_masks else
            torch.zeros(0, self.image_size, self.image_size, dtype=torch.bool),
            seg_masks=torch.stack(seg_masks) if seg_masks else torch.zeros(0, self.sam_image_size, self.sam_image_size),
            record=rec,
            **(self._examples(rec, pairs) if pairs and task.mask_examples else {}),
            **({"shown_context": self._shown(rec, pairs, placeholders - 1)} if placeholders > 1 else {}),
        )

    def _shown(self, rec: Record, pairs: list, n: int) -> torch.Tensor:
        """The `n` images the record's prompt shows before its query image, as its task shows its context pairs."""
        shown = registry.get(rec.task).show_context(pairs)
        if len(shown) != n:
            raise RecordError(f"record {rec.id}", "conversations", f"{n + 1} {IMAGE_TOKEN}",
                              f"the prompt has {n + 1} {IMAGE_TOKEN} placeholders, but task {rec.task!r} shows "
                              f"{len(shown)} image(s) for its {len(pairs)} context pair(s), and one is the query's")
        return torch.stack([preprocess_image(im, self.image_size, CLIP_MEAN, CLIP_STD) for im in shown])

    def _examples(self, rec: Record, pairs: list) -> dict[str, torch.Tensor]:
        missing = [i for i, (_, mask) in enumerate(pairs) if mask is None]
        if missing:
            raise RecordError(f"record {rec.id}", f"context[{missing[0]}].mask", None,
                              f"task {rec.task!r} takes its context pairs as examples of the mask to produce; "
                              "every example needs its mask")
        pixels, masks = example_tensors(pairs, self.sam_image_size)
        return {"example_pixel_values": pixels, "example_masks": masks}

    def collate(self, samples: Sequence[Sample]) -> dict:
        """Right-padded batch; regions and SEG targets are concatenated in batch order, with their sample index."""
        return collate(samples, self.tokenizer.pad_token_id)


def collate(samples: Sequence[Sample], pad_token_id: int) -> dict:
    """Right-padded batch; regions and SEG targets are concatenated in batch order, with their sample index."""
    length = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(samples), length), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        ids[b, :n], labels[b, :n], attn[b, :n] = s.input_ids, s.labels, 1
    return {
        "input_ids": ids, "labels": labels, "attention_mask": attn,
        "pixel_values": torch.stack([s.pixel_values for s in samples]),
        "sam_pixel_values": torch.stack([s.sam_pixel_values for s in samples]),
        "region_masks": torch.cat([s.region_masks for s in samples]),
        "region_batch_index": torch.tensor([b for b, s in enumerate(samples) for _ in range(len(s.region_masks))],
                                           dtype=torch.long),
        "seg_masks": torch.cat([s.seg_masks for s in samples]),
        "records": [s.record for s in samples],
        **_shown_batch(samples),
        **_example_batch(samples),
    }


def _shown_batch(samples: Sequence[Sample]) -> dict:
    """The context images the batch's prompts show, in batch order, and how many each sample shows; nothing when no
    prompt shows any (the batch is then exactly what it was before context images)."""
    shown = [s.shown_context for s in samples]
    if all(x is None for x in shown):
        return {}
    return {"context_pixel_values": torch.cat([x for x in shown if x is not None]),
            "context_counts": torch.tensor([0 if x is None else len(x) for x in shown], dtype=torch.long)}


def _example_batch(samples: Sequence[Sample]) -> dict:
    """The batch's in-context examples for the mask decoder, in batch order, and how many each sample has; nothing
    when no sample has any."""
    pixels = [s.example_pixel_values for s in samples]
    if all(x is None for x in pixels):
        return {}
    return {"example_pixel_values": torch.cat([x for x in pixels if x is not None]),
            "example_masks": torch.cat([s.example_masks for s in samples if s.example_masks is not None]),
            "example_counts": torch.tensor([0 if x is None else len(x) for x in pixels], dtype=torch.long)}


@dataclass
class SegmentationSample:
    pixel_values: torch.Tensor  # (3, S, S)
    question: str  # the human turn, `<image>` removed
    mask: torch.Tensor  # (S, S) float target, in the image's padded-square geometry
    record: Record


class SegmentationDataset(Dataset):
    """Records whose answer is one mask (text-guided segmentation: a note → its mask) as an image, the question and
    the target, for models that segment without generating text (RecLMIS). Tokenizing the question is the model's
    job (its collate): this dataset needs no tokenizer."""

    def __init__(self, data_dir: Path, image_size: int, mean: Sequence[float] = SAM_MEAN,
                 std: Sequence[float] = SAM_STD, split: str | None = None, tasks: Sequence[str] | None = None,
                 records: Sequence[Record] | None = None):
        self.data_dir, self.image_size, self.mean, self.std = Path(data_dir), image_size, mean, std
        recs = list(records) if records is not None else read_records(self.data_dir)
        chosen = None if tasks is None else registry.resolve(tasks)
        self.records = [r for r in recs if (split is None or r.split == split) and (chosen is None or r.task in chosen)]
        for r in self.records:
            if len(r.masks) != 1:
                raise ValueError(f"Record {r.id} ({r.task}) has {len(r.masks)} masks: a segmentation dataset takes "
                                 "records with exactly one target mask")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> SegmentationSample:
        rec = self.records[i]
        turns, _, masks = strip_paths(rec.conversations)
        question = next(t["value"] for t in turns if t["from"] == "human").replace(IMAGE_TOKEN, " ").strip()
        return SegmentationSample(
            pixel_values=preprocess_image(read_image(self.data_dir / rec.image), self.image_size, self.mean, self.std),
            question=question, mask=preprocess_mask(read_mask(self.data_dir / masks[0]), self.image_size).float(),
            record=rec)
