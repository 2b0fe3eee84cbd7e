"""The example prompt: in-context examples (image, mask) given to SAM's mask decoder, not only shown to the LLM.

SegICL's claim is that a model segments a kind of image it never trained on better with more examples. Shown to the
tiny LLM as images (MedPLIB's in-context variant), the examples changed little: trained on in-context records, the
model segmented at K >= 1 about as well as at K = 0 (README, "In-context training, measured"). Here the mask decoder
reads them too, as few-shot segmentation models do (a prototype per class, PANet; a similarity prior, PFENet): each
example's SAM image embedding is pooled under its mask (the structure's prototype) and outside it (the field's), the
prototypes of a prompt's examples are averaged, and the query's embedding is compared with both at every position.
The two cosine-similarity maps become a dense prompt (a 1x1 convolution to the decoder's width, added to SAM's
no-mask embedding) and the structure's prototype a sparse one (a linear map, added to the `<SEG>` state's prompt).
Both maps start at zero, so a model without examples (K = 0) or before training is the model it was; more examples
give a better prototype, which is where a gain with K on unseen modalities would come from.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ExamplePrompt(nn.Module):
    """Prompts for SAM's mask decoder from example (embedding, mask) pairs; `width` is the decoder's (and the image
    embedding's) channel count."""

    def __init__(self, width: int):
        super().__init__()
        self.dense = nn.Conv2d(2, width, kernel_size=1)
        self.sparse = nn.Linear(width, width)
        for layer in (self.dense, self.sparse):  # zero: no effect until trained
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @staticmethod
    def prototypes(embeddings: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(E, C, h, w) example embeddings and their (E, H, W) masks → (E, 2, C): the mean embedding under each mask
        (each position weighted by the share of it the mask covers) and outside it."""
        share = F.adaptive_avg_pool2d(masks[:, None].to(embeddings.dtype), embeddings.shape[-2:])  # (E, 1, h, w)
        inside = (embeddings * share).sum((2, 3)) / share.sum((2, 3)).clamp(min=1e-6)
        outside = (embeddings * (1 - share)).sum((2, 3)) / (1 - share).sum((2, 3)).clamp(min=1e-6)
        return torch.stack([inside, outside], dim=1)

    @staticmethod
    def per_sample(prototypes: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, 2, C) prototypes of the batch's examples in batch order and (B,) examples per sample → (B, 2, C) the mean
        of each sample's, and (B,) bool which samples have any."""
        counts = counts.to(prototypes.device).long()
        if int(counts.sum()) != prototypes.shape[0]:
            raise ValueError(f"Examples per sample {counts.tolist()} do not add up to the {prototypes.shape[0]} "
                             "example masks given")
        index = torch.repeat_interleave(torch.arange(len(counts), device=prototypes.device), counts)
        total = prototypes.new_zeros(len(counts), *prototypes.shape[1:]).index_add_(0, index, prototypes)
        return total / counts.clamp(min=1)[:, None, None].to(prototypes.dtype), counts > 0

    def forward(self, query: torch.Tensor, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, C, h, w) query embeddings and (S, 2, C) their prompts' prototypes → the sparse (S, C) and dense
        (S, C, h, w) prompts to add to the decoder's."""
        similarity = torch.stack([F.cosine_similarity(query, p[:, :, None, None], dim=1)
                                  for p in prototypes.unbind(1)], dim=1)  # (S, 2, h, w)
        return self.sparse(prototypes[:, 0]), self.dense(similarity)
