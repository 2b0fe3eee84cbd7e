"""A recipe small enough to test the Ray Train + DeepSpeed plumbing in seconds: linear regression."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import TensorDataset


class LinearRegressionRecipe:
    def __init__(self, config: dict):
        self.n, self.dim = config.get("n", 512), config.get("dim", 8)

    def build_model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Linear(self.dim, 1)

    def train_dataset(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(self.n, self.dim, generator=g)
        w = torch.arange(1, self.dim + 1, dtype=torch.float32)[:, None] / self.dim
        return TensorDataset(x, x @ w + 0.5)

    def collate(self, items):
        xs, ys = zip(*items)
        return torch.stack(xs), torch.stack(ys)

    def loss(self, engine, batch):
        x, y = batch
        loss = torch.nn.functional.mse_loss(engine(x), y)
        return loss, {"mse": float(loss)}

    def save(self, module: torch.nn.Module, out_dir: Path) -> None:
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(out_dir / "model.safetensors"))


# The toy stage the Ray Train + DeepSpeed tests share (tests/conftest.py `toy_clean_run`): 512 samples, 6 epochs of
# 16 × 2 workers × 2 accumulation (48 steps), ZeRO-2, a checkpoint every 10 steps.
TOY_BASE = dict(recipe="tests.train.toy_recipe:LinearRegressionRecipe", recipe_config={"n": 512}, epochs=6,
                micro_batch=16, grad_accum=2, lr=0.05, zero_stage=2, checkpoint_every=10, log_every=1)
