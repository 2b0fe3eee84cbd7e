"""Metrics agree with MONAI (Dice, IoU) and nltk (BLEU) on random cases; hand-computed cases for the rest."""
from __future__ import annotations

import math

import monai.metrics as monai_metrics  # slow (~10-20 s): MONAI imports all its submodules
import numpy as np
import pytest
import torch
from nltk.translate.bleu_score import sentence_bleu

from medplib.eval.metrics import (
    BLEU_SMOOTHING, BLEU_WEIGHTS, aggregate_by_modality, closed_vqa_accuracy, closed_vqa_correct,
    dice_iou, giou_ciou, masks_from_logits, mean_dice_iou, normalize_text, tokenize,
    vqa_open_scores,
)


def _random_masks(rng: np.random.Generator, n: int, size: int = 16, empty_targets: bool = False):
    preds, targets = [], []
    for i in range(n):
        p = rng.random((size, size)) < rng.uniform(0.05, 0.6)
        t = rng.random((size, size)) < rng.uniform(0.05, 0.6)
        if empty_targets and i % 3 == 0:
            t[:] = False
            if i % 2 == 0:
                p[:] = False  # empty union: nothing predicted, nothing to find
        elif not t.any():
            t[0, 0] = True
        preds.append(p)
        targets.append(t)
    return preds, targets


def _monai(metric_cls, preds, targets, ignore_empty: bool) -> np.ndarray:
    # (B, 1, H, W) binary with include_background=True: the single channel is the foreground mask.
    y_pred = torch.from_numpy(np.stack(preds)[:, None].astype(np.float32))
    y = torch.from_numpy(np.stack(targets)[:, None].astype(np.float32))
    metric = metric_cls(include_background=True, reduction="none", ignore_empty=ignore_empty)
    return metric(y_pred, y).numpy()[:, 0].astype(np.float64)


@pytest.mark.parametrize("ignore_empty", [True, False])
def test_dice_iou_match_monai_when_targets_are_not_empty(ignore_empty: bool):
    preds, targets = _random_masks(np.random.default_rng(0), 40)
    ours = np.array([dice_iou(p, t) for p, t in zip(preds, targets)])
    np.testing.assert_allclose(ours[:, 0], _monai(monai_metrics.DiceMetric, preds, targets, ignore_empty), atol=1e-6)
    np.testing.assert_allclose(ours[:, 1], _monai(monai_metrics.MeanIoU, preds, targets, ignore_empty), atol=1e-6)
    # mDice / mIoU are the means of those per-sample values
    mdice, miou = mean_dice_iou(preds, targets)
    assert mdice == pytest.approx(ours[:, 0].mean(), abs=1e-12) and miou == pytest.approx(ours[:, 1].mean(), abs=1e-12)
    assert 0.0 < miou < mdice < 1.0  # Dice >= IoU on every sample, strictly here


def test_empty_union_scores_zero_by_default_and_one_like_monai_ignore_empty_false():
    preds, targets = _random_masks(np.random.default_rng(1), 30, empty_targets=True)
    empty_union = np.array([not (p.any() or t.any()) for p, t in zip(preds, targets)])
    assert empty_union.sum() >= 3 and (~empty_union).sum() >= 3

    default = np.array([dice_iou(p, t) for p, t in zip(preds, targets)])
    assert (default[empty_union] == 0.0).all()  # MedPLIB: an empty union scores 0

    # empty_score=1 is MONAI's ignore_empty=False, on every case (empty target with or without a prediction)
    other = np.array([dice_iou(p, t, empty_score=1.0) for p, t in zip(preds, targets)])
    np.testing.assert_allclose(other[:, 0], _monai(monai_metrics.DiceMetric, preds, targets, False), atol=1e-6)
    np.testing.assert_allclose(other[:, 1], _monai(monai_metrics.MeanIoU, preds, targets, False), atol=1e-6)
    np.testing.assert_array_equal(other[~empty_union], default[~empty_union])

    # An empty target with a non-empty prediction is a miss under both conventions.
    t = np.zeros((4, 4), bool)
    p = t.copy()
    p[1, 1] = True
    assert dice_iou(p, t) == (0.0, 0.0) and dice_iou(p, t, empty_score=1.0) == (0.0, 0.0)


def test_hand_computed_dice_iou_giou_ciou():
    t = np.zeros((4, 4), bool)
    t[0, :] = True                                # 4 pixels
    p = np.zeros((4, 4), bool)
    p[0, :2] = True
    p[1, :2] = True                               # 4 pixels, 2 shared, union 6
    assert dice_iou(p, t) == pytest.approx((0.5, 1 / 3))
    assert dice_iou(torch.from_numpy(p).int(), torch.from_numpy(t)) == pytest.approx((0.5, 1 / 3))

    empty = np.zeros((4, 4), bool)
    full = np.ones((2, 2), bool)
    preds, targets = [p, empty, full], [t, empty, full]
    # gIoU: mean of 1/3, 1.0 (empty union counts 1 as in LISA), 1.0; cIoU: (2 + 0 + 4) / (6 + 0 + 4)
    giou, ciou = giou_ciou(preds, targets)
    assert giou == pytest.approx((1 / 3 + 2) / 3) and ciou == pytest.approx(0.6)
    assert giou_ciou(preds, targets, empty_score=0.0)[0] == pytest.approx((1 / 3 + 1) / 3)
    assert mean_dice_iou(preds, targets) == pytest.approx(((0.5 + 0 + 1) / 3, (1 / 3 + 0 + 1) / 3))


def test_masks_from_logits_is_sigmoid_threshold():
    logits = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0)) * 4
    for threshold in (0.3, 0.5, 0.8):
        expected = (torch.sigmoid(logits) > threshold).numpy()
        np.testing.assert_array_equal(masks_from_logits(logits, threshold), expected)
    assert masks_from_logits(np.array([-1e4, 1e4])).tolist() == [False, True]  # no overflow


def test_mask_errors_name_the_values():
    with pytest.raises(ValueError, match=r"\(4, 4\) but target mask is \(2, 2\)"):
        dice_iou(np.zeros((4, 4), bool), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="values other than 0/1.*max 0.7"):
        dice_iou(np.full((2, 2), 0.7), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="3 predicted masks but 2 references"):
        mean_dice_iou([np.zeros(2, bool)] * 3, [np.zeros(2, bool)] * 2)
    with pytest.raises(ValueError, match="empty_score = 2"):
        dice_iou(np.zeros(2, bool), np.zeros(2, bool), empty_score=2)


def test_text_normalisation_and_closed_accuracy():
    assert tokenize("  Yes, the LEFT kidney (3.5 cm)! ") == ["yes", "the", "left", "kidney", "3.5", "cm"]
    assert normalize_text("X-ray.") == "x ray"
    assert closed_vqa_correct("Yes.", "yes") == 1.0
    assert closed_vqa_correct("yes it is", "yes") == 0.0
    assert closed_vqa_accuracy(["Yes.", "no", " NO ", "maybe"], ["yes", "yes", "no", "no"]) == 0.5


def test_open_vqa_recall_precision_f1_by_hand():
    # reference 4 tokens, prediction 6 tokens, clipped overlap 3 ("the" once, "left", "kidney")
    s = vqa_open_scores("The left kidney, the big one", "the left kidney cyst")
    assert s["recall"] == pytest.approx(3 / 4)
    assert s["precision"] == pytest.approx(3 / 6)
    assert s["f1"] == pytest.approx(2 * 0.75 * 0.5 / 1.25)
    # duplicates are clipped: "lung lung lung" against "lung" has precision 1/3, recall 1
    s = vqa_open_scores("lung lung lung", "Lung.")
    assert (s["precision"], s["recall"]) == pytest.approx((1 / 3, 1.0))
    assert vqa_open_scores("liver", "spleen")["f1"] == 0.0
    assert vqa_open_scores("", "spleen")["recall"] == 0.0
    assert vqa_open_scores("...", "!")["f1"] == 1.0  # both empty after normalisation


def test_bleu_by_hand():
    s = vqa_open_scores("the cat sat on the mat", "the cat is on the mat")
    assert s["bleu1"] == pytest.approx(5 / 6)                      # 5 of 6 unigrams, no brevity penalty
    assert s["bleu2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))   # bigrams: the cat, on the, the mat of 5
    assert vqa_open_scores("the mat", "the cat is on the mat")["bleu1"] == pytest.approx(math.exp(1 - 6 / 2))


def test_bleu_matches_nltk_on_random_cases():
    rng = np.random.default_rng(2)
    vocab = ["left", "right", "lung", "liver", "the", "lesion", "is", "in", "mass", "no"]
    preds, refs = [], []
    for _ in range(50):
        preds.append(" ".join(rng.choice(vocab, rng.integers(1, 12))))
        refs.append(" ".join(rng.choice(vocab, rng.integers(1, 12))))
    for p, r in zip(preds, refs):
        ours = vqa_open_scores(p, r)
        for name, w in BLEU_WEIGHTS.items():
            expected = sentence_bleu([r.split()], p.split(), weights=w, smoothing_function=BLEU_SMOOTHING)
            assert ours[name] == pytest.approx(expected, abs=1e-6), (name, p, r)


def test_aggregate_by_modality():
    rows = [
        {"id": "a", "modality": "ct", "task": "grounding", "dice": 0.5, "iou": 0.25},
        {"id": "b", "modality": "ct", "task": "vqa_closed", "accuracy": True},
        {"id": "c", "modality": "mr", "task": "grounding", "dice": 1.0, "iou": 1.0},
        {"id": "d", "modality": "mr", "task": "vqa_closed", "accuracy": 0.0, "dice": None},
    ]
    agg = aggregate_by_modality(rows)
    assert list(agg) == ["ct", "mr", "all"]
    assert agg["ct"] == {"accuracy": 1.0, "dice": 0.5, "iou": 0.25, "n": 2}
    assert agg["mr"] == {"accuracy": 0.0, "dice": 1.0, "iou": 1.0, "n": 2}
    assert agg["all"] == {"accuracy": 0.5, "dice": 0.75, "iou": 0.625, "n": 4}
    assert aggregate_by_modality(rows, metrics=["dice"])["all"] == {"dice": 0.75, "n": 4}
    with pytest.raises(ValueError, match="Row 0 has no 'modality' field"):
        aggregate_by_modality([{"dice": 1.0}])
