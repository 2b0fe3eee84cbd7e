"""MedPLIB's training losses: token cross-entropy on answers, mask BCE, soft Dice and sigmoid focal (REFERENCE §3)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms; a stage config sets them (stage III: ce 1, dice 5, bce 1, focal 1; stage IV: ce 1,
    dice 0.5, bce 2)."""

    ce: float = 1.0
    bce: float = 1.0
    dice: float = 1.0
    focal: float = 0.0


def answer_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the given answer positions (already shifted); 0 if there are none."""
    if targets.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)


def mask_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-pixel binary cross-entropy, averaged over pixels and masks."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 − soft Dice of sigmoid(logits) against binary targets, per mask (..., H, W), averaged over masks."""
    p = torch.sigmoid(logits.float()).flatten(-2)
    t = targets.float().flatten(-2)
    dice = (2 * (p * t).sum(-1) + smooth) / (p.sum(-1) + t.sum(-1) + smooth)
    return (1 - dice).mean()


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al.) of sigmoid(logits) against binary targets, the mean over pixels and masks, as
    `torchvision.ops.sigmoid_focal_loss(reduction="mean")`: BCE scaled by α_t (1 − p_t)^γ, so easy pixels count less."""
    logits, targets = logits.float(), targets.float()
    p = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * bce * (1 - p_t) ** gamma).mean()


def dice_score(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard Dice per mask of boolean masks (..., H, W); an empty union scores 0 as in MedPLIB's evaluation."""
    pred, target = pred.bool().flatten(-2), target.bool().flatten(-2)
    inter = (pred & target).sum(-1).float()
    total = (pred.sum(-1) + target.sum(-1)).float()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.zeros_like(total))
