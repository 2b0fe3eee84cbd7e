"""SAM-Med2D's adapters in transformers' SAM image encoder, so its released weights keep what they learned.

SAM-Med2D (the SAM MedPLIB starts from) adds an `Adapter_Layer` to every image-encoder block, in parallel with the
block's MLP: `x = x + mlp(norm2(x)) + adapter(norm2(x))`. The adapter is channel attention (average pool, two bias-free
linears at a quarter of the width, a sigmoid) scaling the features, then a spatial path (a 3x3 stride-2 convolution
and a 4x4 stride-2 transposed one, each with a ReLU, bias-free) added back, then a LayerNorm. Here each block's
`SamMLPBlock` becomes a `SamMed2DMLP` holding the same `lin1`/`lin2` and an `adapter`, so a converted checkpoint's
keys are SAM's plus `vision_encoder.layers.{i}.mlp.adapter.*` (`adapters_from_sam_med2d` renames SAM-Med2D's
`image_encoder.blocks.{i}.Adapter.*` to them) and a model without adapters loads as before.
"""
from __future__ import annotations

import re

import torch
from torch import nn
from transformers.models.sam.modeling_sam import SamMLPBlock

ADAPTER_KEY = re.compile(r"(?:^|\.)vision_encoder\.layers\.(\d+)\.mlp\.adapter\.")
_SAM_MED2D_KEY = re.compile(r"^(?:module\.)?image_encoder\.blocks\.(\d+)\.Adapter\.(.+)$")


class SamMed2DAdapter(nn.Module):
    """SAM-Med2D's `Adapter_Layer` (skip connection on), on (B, H, W, C) features; its parameter names are SAM-Med2D's
    (`norm`, `channel.0`, `channel.2`, `spatial.0`, `spatial.2`)."""

    def __init__(self, dim: int, mlp_ratio: float = 0.25, eps: float = 1e-5):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.channel = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(),
                                     nn.Linear(hidden, dim, bias=False), nn.Sigmoid())
        self.spatial = nn.Sequential(nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1, bias=False), nn.ReLU(),
                                     nn.ConvTranspose2d(dim, dim, kernel_size=4, stride=2, padding=1, bias=False),
                                     nn.ReLU())
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)  # (B, C, H, W)
        weights = self.channel(x.mean(dim=(2, 3)))[:, :, None, None]
        x = x + self.spatial(weights * x)
        return self.norm(x.permute(0, 2, 3, 1))


class SamMed2DMLP(SamMLPBlock):
    """A SAM image-encoder block's MLP with SAM-Med2D's adapter beside it: `mlp(y) + adapter(y)`."""

    def __init__(self, config):
        super().__init__(config)
        self.adapter = SamMed2DAdapter(config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states) + self.adapter(hidden_states)


def has_adapters(sam: nn.Module) -> bool:
    return any(isinstance(layer.mlp, SamMed2DMLP) for layer in sam.vision_encoder.layers)


def attach_adapters(sam: nn.Module) -> nn.Module:
    """Give every image-encoder block of a `SamModel` SAM-Med2D's adapter (freshly initialised), keeping its MLP's
    weights, dtype and device; a block that has one keeps it. Returns `sam`."""
    config = sam.config.vision_config
    for layer in sam.vision_encoder.layers:
        if isinstance(layer.mlp, SamMed2DMLP):
            continue
        old = layer.mlp
        new = SamMed2DMLP(config)
        new.load_state_dict(old.state_dict(), strict=False)  # lin1, lin2; the adapter is new
        ref = old.lin1.weight
        layer.mlp = new.to(device=ref.device, dtype=ref.dtype)
    return sam


def adapters_from_sam_med2d(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAM-Med2D checkpoint keys (`image_encoder.blocks.{i}.Adapter.*`, as in its `sam-med2d_b.pth` "model" dict) →
    this module's (`vision_encoder.layers.{i}.mlp.adapter.*`); every other key is left out."""
    out = {}
    for key, value in state.items():
        m = _SAM_MED2D_KEY.match(key)
        if m:
            out[f"vision_encoder.layers.{m.group(1)}.mlp.adapter.{m.group(2)}"] = value
    return out
