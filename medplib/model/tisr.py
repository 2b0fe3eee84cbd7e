"""TISR's plug-in for report generators (REFERENCE §6): textual inversion and self-supervised refinement.

- **Textual inversion**: the image's patch features → `n` pseudo-word embeddings in the language model's input
  space (learned queries attend over the patches, then a two-layer MLP), put before the prompt's embeddings.
- **Self-supervised refinement**: an image–text contrastive loss (symmetric InfoNCE over the batch) pulls the mean
  pseudo-word toward the mean input embedding of the sample's own answer text (the report) and away from the other
  reports of the batch. The text side is the target: it is not moved by this loss.

Plug-and-play for any model family that exposes input embeddings (`ExposesInputEmbeddings`): the family calls
`TextualInversion` on its image features, `prepend` on its input embeddings and attention mask, and adds
`refinement_loss` with its weight. MedPLIB does (`MedPLIB.tisr`, config `model.tisr`).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medplib.config.model import TISRConfig
from medplib.model.losses import IGNORE_INDEX


class ExposesInputEmbeddings(Protocol):
    """What the plug-in needs of a model: its token embedding table (the space the pseudo-words live in)."""

    def get_input_embeddings(self) -> nn.Embedding: ...


class TextualInversion(nn.Module):
    """Patch features (B, N, C) → pseudo-word embeddings (B, n, H)."""

    def __init__(self, feature_size: int, embed_size: int, num_pseudo_words: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_pseudo_words, feature_size) * feature_size ** -0.5)
        self.key = nn.Linear(feature_size, feature_size, bias=False)
        self.mlp = nn.Sequential(nn.Linear(feature_size, embed_size), nn.GELU(), nn.Linear(embed_size, embed_size))

    @property
    def num_pseudo_words(self) -> int:
        return self.queries.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 3 or features.shape[-1] != self.queries.shape[-1]:
            raise ValueError(f"Textual inversion takes patch features (B, N, {self.queries.shape[-1]}), got "
                             f"{tuple(features.shape)}")
        keys = self.key(features)  # (B, N, C)
        attention = torch.einsum("qc,bnc->bqn", self.queries.to(keys.dtype), keys) * keys.shape[-1] ** -0.5
        pooled = torch.einsum("bqn,bnc->bqc", attention.softmax(dim=-1), features)
        return self.mlp(pooled)


def prepend(pseudo_words: torch.Tensor, embeds: torch.Tensor,
            attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pseudo-words (B, n, H) before the prompt: embeddings (B, n + L, H) and attention mask (B, n + L). With
    left padding the pads sit between them and the prompt, masked."""
    if pseudo_words.shape[0] != embeds.shape[0] or pseudo_words.shape[-1] != embeds.shape[-1]:
        raise ValueError(f"Pseudo-words {tuple(pseudo_words.shape)} do not fit input embeddings {tuple(embeds.shape)}")
    ones = attention_mask.new_ones(attention_mask.shape[0], pseudo_words.shape[1])
    return torch.cat([pseudo_words.to(embeds.dtype), embeds], dim=1), torch.cat([ones, attention_mask], dim=1)


def text_embedding(model: ExposesInputEmbeddings, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's answer text as the mean input embedding of its answer tokens (B, H); zeros without any."""
    answer = labels != IGNORE_INDEX
    ids = torch.where(answer, labels, torch.zeros_like(labels))
    embeds = model.get_input_embeddings()(ids) * answer[..., None]
    return embeds.sum(dim=1) / answer.sum(dim=1, keepdim=True).clamp(min=1)


def refinement_loss(pseudo_words: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor | None:
    """Symmetric InfoNCE between each sample's mean pseudo-word (B, n, H) and its text embedding (B, H), the other
    samples of the batch as negatives; None with fewer than two samples (nothing to contrast)."""
    if pseudo_words.shape[0] < 2:
        return None
    image = F.normalize(pseudo_words.float().mean(dim=1), dim=-1)
    text = F.normalize(text.detach().float(), dim=-1)
    logits = image @ text.T / temperature
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def refine_rows(records: Sequence | None, config: TISRConfig, batch: int) -> torch.Tensor:
    """Which samples of a batch the refinement reads: those of `config.refine_tasks` (task names or groups, by each
    record's task)."""
    if records is None:
        return torch.zeros(batch, dtype=torch.bool)
    from medplib import tasks

    chosen = set(tasks.resolve(config.refine_tasks))
    return torch.tensor([getattr(r, "task", None) in chosen for r in records], dtype=torch.bool)
