"""Top-1 Mixture-of-Experts over LLaMA FFNs: a linear router, per-token routing with a capacity, and upcycling.

Each token runs through exactly one expert, so inference costs one FFN plus the router. The chosen expert's output
is multiplied by a straight-through gate `1 + p - p.detach()`: its value is exactly 1 (an MoE of identical experts
is the dense model, and upcycled FFNs keep their function), while the router gets the gradient of Switch's `p·FFN`.
With `straight_through=False` the output is scaled by `p` itself (Switch / DeepSpeed top-1).

An expert takes at most `capacity` tokens; the overflow passes as 0 (the residual carries it). Which tokens it keeps
is decided by a priority, never by batch order (that would always drop the end of the last sequences): in training a
random priority per token (DeepSpeed's random token selection; recomputation under gradient checkpointing restores
the RNG state, so it drops the same tokens), in evaluation the router probability, highest first (V-MoE's
batch-prioritised routing), so evaluation is deterministic and keeps the tokens the router is surest of.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class MoEFeedForward(nn.Module):
    """`experts[e](x)` for the one expert the router picks per token; tokens past an expert's capacity pass as 0.

    After a forward, `last_expert_index` holds each token's expert (-1 = dropped) and `last_drop_rate` their share.
    """

    def __init__(self, experts: Sequence[nn.Module], hidden_size: int, capacity_factor_train: float = 1.5,
                 capacity_factor_eval: float = 2.0, straight_through: bool = True):
        super().__init__()
        if len(experts) < 2:
            raise ValueError(f"An MoE layer needs at least 2 experts, got {len(experts)}")
        self.router = nn.Linear(hidden_size, len(experts), bias=False)
        self.experts = nn.ModuleList(experts)
        self.capacity_factor_train, self.capacity_factor_eval = capacity_factor_train, capacity_factor_eval
        self.straight_through = straight_through
        self.aux_loss = torch.zeros(())  # Switch load-balance loss of the last training forward
        self.last_expert_index = torch.zeros(0, dtype=torch.long)  # expert per token of the last forward, -1 = dropped
        self.last_drop_rate = torch.zeros(())  # fraction of the last forward's tokens past their expert's capacity

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        choice = expert = logits.argmax(dim=-1)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        p = probs.gather(1, choice[:, None])[:, 0]
        factor = self.capacity_factor_train if self.training else self.capacity_factor_eval
        capacity = max(1, math.ceil(factor * x.shape[0] / self.num_experts))
        if capacity < x.shape[0]:  # an expert can overflow: it keeps its `capacity` tokens of highest priority
            priority = torch.rand(x.shape[0], device=x.device) if self.training else p.detach()
            order = torch.argsort(priority, descending=True, stable=True)
            one_hot = F.one_hot(choice[order], self.num_experts)
            rank = torch.empty_like(order)
            rank[order] = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # place in its expert's queue
            expert = torch.where(rank < capacity, expert, -1)
        self.last_expert_index = expert.detach()
        self.last_drop_rate = (self.last_expert_index < 0).float().mean()

        gate = None  # the straight-through gate is exactly 1: only needed when gradients flow
        if torch.is_grad_enabled() or not self.straight_through:
            gate = (1.0 + p - p.detach()) if self.straight_through else p
            if self.training:  # Switch: E · Σ_e (fraction of tokens routed to e) · (mean router probability of e)
                routed = F.one_hot(choice, self.num_experts).float()
                self.aux_loss = self.num_experts * (routed.mean(0) * probs.mean(0)).sum()

        out = torch.zeros_like(x)
        for e, ffn in enumerate(self.experts):
            idx = torch.nonzero(expert == e).squeeze(-1)
            if idx.numel():
                y = ffn(x[idx])
                out.index_copy_(0, idx, y if gate is None else y * gate[idx, None].to(y.dtype))
        return out.reshape(shape)


def upcycle(layers: Sequence[nn.Module], expert_sources: Sequence[Sequence[nn.Module]], hidden_size: int,
            capacity_factor_train: float = 1.5, capacity_factor_eval: float = 2.0, straight_through: bool = True,
            router_std: float = 0.02) -> None:
    """Replace `layer.mlp` of every decoder layer by an MoE whose expert k copies `expert_sources[k][layer]`."""
    for k, source in enumerate(expert_sources):
        if len(source) != len(layers):
            raise ValueError(f"Expert source {k} has {len(source)} FFNs but the model has {len(layers)} layers")
    for i, layer in enumerate(layers):
        experts = [copy.deepcopy(source[i]) for source in expert_sources]
        moe = MoEFeedForward(experts, hidden_size, capacity_factor_train, capacity_factor_eval, straight_through)
        moe.to(device=next(experts[0].parameters()).device, dtype=next(experts[0].parameters()).dtype)
        nn.init.normal_(moe.router.weight, std=router_std)
        layer.mlp = moe
