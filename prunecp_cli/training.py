"""Train and evaluate small classifiers on in-memory tensors (demo, tests, benchmarks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Fit ``model`` with Adam and cross-entropy, reproducibly; returns it in eval mode on the CPU.

    Args:
        model: the model (modified in place).
        x: inputs ``[N, C, H, W]``.
        y: integer labels ``[N]``.
        epochs: passes over the data.
        batch_size: examples per step.
        lr: Adam learning rate (cosine-annealed to zero).
        weight_decay: AdamW weight decay.
        seed: seed for initialisation-independent randomness (shuffling).
        device: where to train.
    """
    generator = torch.Generator().manual_seed(seed)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(x) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval().cpu()


@torch.no_grad()
@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` (eval mode) on ``x``, in batches, without an autograd graph."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    return float((predict_logits(model, x).argmax(1) == y).float().mean())
