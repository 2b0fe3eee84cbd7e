"""Metrics as MedPLIB reports them (REFERENCE.md §5): per sample, then averaged per modality.

Conventions
- Masks: boolean (or 0/1) arrays of one shape, numpy or torch. `masks_from_logits` is MedPLIB's
  `sigmoid(logits) > threshold`.
- Dice = 2|P∩T| / (|P|+|T|), IoU = |P∩T| / |P∪T|, per sample. An empty union (nothing predicted, nothing to
  find) scores 0 by default, as MedPLIB does (its IoU is intersection / (union + eps)). `empty_score=1.0` is the
  other convention (MONAI's `ignore_empty=False`): a correct "nothing here" scores 1.
- mIoU / mDice: the mean of the per-sample values.
- gIoU / cIoU as LISA and MedPLIB compute them during training: gIoU = mean per-sample IoU, where their code
  counts an empty union as 1.0 (`acc_iou[union == 0] += 1.0`, "no-object target"), hence `empty_score=1.0`
  there; cIoU = Σ intersections / Σ unions over the samples.
- Text: lower-cased; tokens are runs of letters or digits (a decimal such as 3.5 stays one token);
  punctuation and whitespace are dropped. Closed VQA: exact match of the normalised texts.
- Open VQA, with token counts clipped as in SQuAD (overlap = Σ_w min(#w in prediction, #w in reference)):
  recall = overlap / |reference| (MedPLIB's "word-overlap exact match": the share of reference tokens found in
  the prediction), precision = overlap / |prediction|, F1 = their harmonic mean. If either side has no
  tokens, all three are 1.0 when both are empty, else 0.0.
- BLEU-n: nltk `sentence_bleu` against one reference with cumulative uniform weights (1,), (1/2, 1/2),
  (1/3,)*3, (1/4,)*4 and smoothing `SmoothingFunction().method1` (an epsilon of 0.1 in place of a zero n-gram
  match count). For answers shorter than n tokens BLEU-n is mostly that epsilon: read BLEU-1 there.
  (MedPLIB's script used no smoothing and single-order weights such as (0, 1, 0, 0); ours are the standard
  cumulative BLEU-n, so numbers are not interchangeable with its table.)
- Captions (BiRD's GC and MII): pycocoevalcap as its COCOEvalCap runs it, one reference per prediction: the Stanford
  PTB tokenizer (lower-cased, punctuation tokens dropped), then corpus BLEU-1..4 (its own BLEU, closest
  reference length), METEOR 1.5 (`-l en -norm`), ROUGE-L (β = 1.2, per-sample mean) and CIDEr-D (σ = 6, n-gram
  document frequencies from the corpus's own references, ×10, so it is not bounded by 1). SPICE is left out: it
  downloads Stanford CoreNLP models at run time. The tokenizer and METEOR run on Java.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

BLEU_WEIGHTS: dict[str, tuple[float, ...]] = {
    "bleu1": (1.0, 0.0, 0.0, 0.0),
    "bleu2": (0.5, 0.5, 0.0, 0.0),
    "bleu3": (1 / 3, 1 / 3, 1 / 3),
    "bleu4": (0.25, 0.25, 0.25, 0.25),
}
BLEU_SMOOTHING = SmoothingFunction().method1
_TOKEN_RE = re.compile(r"\d+(?:\.\d+)*|[^\W_]+")


# ---- masks -------------------------------------------------------------------------------------------------

def masks_from_logits(logits: Any, threshold: float = 0.5) -> np.ndarray:
    """MedPLIB's binarisation: `sigmoid(logits) > threshold`, as a boolean array."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold = {threshold} must be strictly between 0 and 1")
    x = _to_numpy(logits).astype(np.float64)
    # sigmoid(x) > t  <=>  x > logit(t); avoids overflow in exp for large |x|.
    return x > math.log(threshold / (1.0 - threshold))


def dice_iou(pred: Any, target: Any, *, empty_score: float = 0.0) -> tuple[float, float]:
    """(Dice, IoU) of one predicted mask against its target; an empty union scores `empty_score` (MedPLIB: 0)."""
    inter, p_sum, t_sum = _counts(pred, target)
    union = p_sum + t_sum - inter
    if union == 0:
        s = _check_empty_score(empty_score)
        return s, s
    return 2.0 * inter / (p_sum + t_sum), inter / union


def mean_dice_iou(preds: Iterable[Any], targets: Iterable[Any], *,
                  empty_score: float = 0.0) -> tuple[float, float]:
    """(mDice, mIoU): means over samples of the per-sample Dice and IoU (see `dice_iou`)."""
    pairs = [dice_iou(p, t, empty_score=empty_score) for p, t in _zip_same_length(preds, targets, "masks")]
    return float(np.mean([d for d, _ in pairs])), float(np.mean([i for _, i in pairs]))


def giou_ciou(preds: Iterable[Any], targets: Iterable[Any], *, empty_score: float = 1.0) -> tuple[float, float]:
    """(gIoU, cIoU) as LISA/MedPLIB validate: mean per-sample IoU (empty union = 1.0 there), and
    cumulative intersection / cumulative union (`empty_score` if every union is empty)."""
    s = _check_empty_score(empty_score)
    ious, inter_total, union_total = [], 0, 0
    for p, t in _zip_same_length(preds, targets, "masks"):
        inter, p_sum, t_sum = _counts(p, t)
        union = p_sum + t_sum - inter
        ious.append(inter / union if union else s)
        inter_total += inter
        union_total += union
    return float(np.mean(ious)), (inter_total / union_total if union_total else s)


# ---- text --------------------------------------------------------------------------------------------------

def tokenize(text: str) -> list[str]:
    """Lower-cased word/number tokens; punctuation and whitespace dropped."""
    return _TOKEN_RE.findall(str(text).lower())


def normalize_text(text: str) -> str:
    """The normalised form closed-VQA answers are compared in: tokens joined by one space."""
    return " ".join(tokenize(text))


def closed_vqa_correct(prediction: str, reference: str) -> float:
    """1.0 if the normalised texts are equal (`Yes.` == `yes`), else 0.0."""
    return float(normalize_text(prediction) == normalize_text(reference))


def closed_vqa_accuracy(predictions: Iterable[str], references: Iterable[str]) -> float:
    """Exact-match accuracy over samples on normalised text."""
    hits = [closed_vqa_correct(p, r) for p, r in _zip_same_length(predictions, references, "answers")]
    return float(np.mean(hits))


def vqa_open_scores(prediction: str, reference: str) -> dict[str, float]:
    """Token recall / precision / F1 (clipped counts) and BLEU-1..4 of one open answer; see the module doc."""
    pred, ref = tokenize(prediction), tokenize(reference)
    if not pred or not ref:
        same = float(not pred and not ref)
        recall = precision = f1 = same
    else:
        overlap = sum((Counter(pred) & Counter(ref)).values())
        recall, precision = overlap / len(ref), overlap / len(pred)
        f1 = 2 * precision * recall / (precision + recall) if overlap else 0.0
    scores = {"recall": recall, "precision": precision, "f1": f1}
    for name, weights in BLEU_WEIGHTS.items():
        scores[name] = float(sentence_bleu([ref], pred, weights=weights, smoothing_function=BLEU_SMOOTHING))
    return scores


# ---- captions (pycocoevalcap) -----------------------------------------------------------------------------

CAPTION_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
_PTB_TOKENS: dict[str, str] = {}  # text → its PTB tokens: a bootstrap re-scores the same texts many times
_PTB_CACHE_LIMIT = 500_000
_meteor: Meteor | None = None  # one METEOR process (seconds to load its paraphrase table) serves the session


def caption_scores(predictions: Iterable[str], references: Iterable[str],
                   groups: Iterable[str]) -> dict[str, dict[str, float]]:
    """{group: {bleu1..4, meteor, rouge_l, cider}}, each group's corpus scored as pycocoevalcap's COCOEvalCap scores
    it (see the module doc); all texts are tokenized in one Java call."""
    pairs = _zip_same_length(predictions, references, "captions")
    groups = [str(g) for g in groups]
    if len(groups) != len(pairs):
        raise ValueError(f"{len(pairs)} captions but {len(groups)} group labels")
    tokens = ptb_tokenize([p for p, _ in pairs] + [r for _, r in pairs])
    n = len(pairs)
    corpora: dict[str, tuple[dict[int, list[str]], dict[int, list[str]]]] = {}
    for i, group in enumerate(groups):
        refs, hyps = corpora.setdefault(group, ({}, {}))
        refs[i], hyps[i] = [tokens[n + i]], [tokens[i]]
    out = {}
    for group, (refs, hyps) in sorted(corpora.items()):
        bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
        out[group] = {**{f"bleu{k}": float(b) for k, b in enumerate(bleu, 1)},
                      "meteor": _meteor_score(refs, hyps),
                      "rouge_l": float(Rouge().compute_score(refs, hyps)[0]),
                      "cider": float(Cider().compute_score(refs, hyps)[0])}
    return out


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """pycocoevalcap's tokens of each text, space-joined: Stanford's PTBTokenizer (`-preserveLines -lowerCase`) with
    its punctuation tokens dropped; one Java call for the texts not tokenized before."""
    # One line per text: Java also ends a line at \r and \u2028, which would shift every later text by one.
    lines = [" ".join(str(t).split()) for t in texts]
    new = sorted({t for t in lines if t not in _PTB_TOKENS})
    if new:
        if len(_PTB_TOKENS) + len(new) > _PTB_CACHE_LIMIT:
            _PTB_TOKENS.clear()
        _PTB_TOKENS.update(zip(new, _run_ptb_tokenizer(new)))
    return [_PTB_TOKENS[t] for t in lines]


def _run_ptb_tokenizer(lines: list[str]) -> list[str]:
    # pycocoevalcap's PTBTokenizer.tokenize runs this command, but writes its input file next to the jar (read-only
    # site-packages in our image) and ignores the exit status; same jar, flags and punctuation list here.
    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.TemporaryDirectory(prefix="medplib-ptb-") as tmp:
        source = Path(tmp) / "captions.txt"
        source.write_text("\n".join(lines), encoding="utf-8")
        done = subprocess.run([_java(), "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", str(source)], capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"The PTB tokenizer (java -cp {jar.name}) exited with {done.returncode}: "
                           f"{done.stderr.decode(errors='replace').strip()[-2000:]}")
    out = done.stdout.decode(errors="replace").split("\n")
    if len(out) < len(lines) or any(extra.strip() for extra in out[len(lines):]):
        raise RuntimeError(f"The PTB tokenizer returned {len(out)} lines for {len(lines)} texts")
    punctuation = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punctuation) for line in out[:len(lines)]]


def _meteor_score(refs: dict[int, list[str]], hyps: dict[int, list[str]]) -> float:
    global _meteor
    if _meteor is None or _meteor.meteor_p.poll() is not None:
        _java()
        _meteor = Meteor()
    # "|||" separates fields of METEOR's line protocol; pycocoevalcap strips it from the hypothesis only
    refs = {i: [r.replace("|||", " ") for r in rs] for i, rs in refs.items()}
    hyps = {i: [h.replace("|||", " ") for h in hs] for i, hs in hyps.items()}
    try:
        return float(_meteor.compute_score(refs, hyps)[0])
    except (ValueError, OSError) as e:  # the process died or answered out of step: start a new one next time
        failed, _meteor = _meteor, None
        if failed.lock.locked():
            failed.lock.release()  # compute_score raised holding it, and Meteor.__del__ waits for it
        failed.meteor_p.kill()
        raise RuntimeError(f"METEOR (java -jar meteor-1.5.jar) failed: {e}; its stderr: "
                           f"{failed.meteor_p.stderr.read().decode(errors='replace').strip()[-2000:]}") from e


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("Caption scores (pycocoevalcap's PTB tokenizer and METEOR) need Java, and there is no "
                           "`java` on PATH: `make setup` installs it (apt-get install -y --no-install-recommends "
                           "default-jre-headless)")
    return java


# ---- aggregation -------------------------------------------------------------------------------------------

def aggregate_by_modality(rows: Iterable[Mapping[str, Any]], *, modality_key: str = "modality",
                          metrics: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """{modality: {metric: mean, "n": rows}, ..., "all": {...}} from per-sample rows.

    A metric's mean is over the rows that carry it (a VQA row has no Dice); None values are skipped.
    Without `metrics`, every numeric (int, float, bool) field except the modality is a metric.
    """
    sums: dict[str, dict[str, list[float]]] = {}
    counts: Counter[str] = Counter()
    for i, row in enumerate(rows):
        if modality_key not in row:
            raise ValueError(f"Row {i} has no '{modality_key}' field (fields: {sorted(row)})")
        modality = str(row[modality_key])
        if modality == "all":
            raise ValueError(f"Row {i}: modality 'all' is reserved for the overall row")
        keys = metrics if metrics is not None else [
            k for k, v in row.items()
            if k != modality_key and isinstance(v, (int, float, bool, np.number, np.bool_))]
        for key in keys:
            if key == "n":
                raise ValueError(f"Row {i}: metric name 'n' is reserved for the sample count")
            value = row.get(key)
            if value is None:
                continue
            for group in (modality, "all"):
                sums.setdefault(group, {}).setdefault(key, []).append(float(value))
        counts[modality] += 1
        counts["all"] += 1
    out: dict[str, dict[str, float]] = {}
    for group in sorted(g for g in counts if g != "all") + ["all"]:
        values = sums.get(group, {})
        out[group] = {k: float(np.mean(v)) for k, v in sorted(values.items())}
        out[group]["n"] = counts[group]
    return out


# ---- helpers -----------------------------------------------------------------------------------------------

def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, possibly on GPU or requiring grad
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_mask(x: Any, name: str) -> np.ndarray:
    a = _to_numpy(x)
    if a.dtype == bool:
        return a
    if a.size and not np.isin(a, (0, 1)).all():
        raise ValueError(f"{name} mask has values other than 0/1 (min {a.min()}, max {a.max()}): "
                         "binarise logits with masks_from_logits first")
    return a.astype(bool)


def _counts(pred: Any, target: Any) -> tuple[int, int, int]:
    p, t = _as_mask(pred, "pred"), _as_mask(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred mask is {p.shape} but target mask is {t.shape}")
    return int(np.count_nonzero(p & t)), int(np.count_nonzero(p)), int(np.count_nonzero(t))


def _check_empty_score(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"empty_score = {value} must be in [0, 1] (0: MedPLIB, 1: MONAI ignore_empty=False)")
    return float(value)


def _zip_same_length(a: Iterable[Any], b: Iterable[Any], what: str) -> list[tuple[Any, Any]]:
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predicted {what} but {len(b)} references")
    if not a:
        raise ValueError(f"No {what} to score")
    return list(zip(a, b))
