"""The training loop, and small classifiers trained and evaluated on in-memory tensors.

:func:`train_epochs` is prunecp's one training loop: epochs of optimiser steps under a cosine
learning rate annealed to zero over all steps, skipping batches too small to use, with the mean
loss parts of each epoch logged. It serves both trainers:

* :func:`train_classifier` fits a model from scratch on tensors with AdamW and cross-entropy (the
  demo, the test fixtures, the benchmarks);
* :func:`prunecp_cli.finetune.finetune` fine-tunes a pruned model on a data set with SGD and
  cross-entropy or ConfTr, under DistributedDataParallel when launched by torchrun.

:func:`predict_logits` runs the same forward loop as :func:`prunecp_cli.pipeline.inference.collect_logits`
on tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from prunecp_cli.io.data import Batch
from prunecp_cli.pipeline.inference import forward_batches
from prunecp_cli.reporting import SILENT, Reporter

Loss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
"""A batch's training loss from its inputs and labels, with its parts as floats (for the log)."""


def train_epochs(
    epoch_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    loss: Loss,
    *,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    steps_per_epoch: int,
    smallest: int = 2,
    reporter: Reporter = SILENT,
    label: str = "train",
) -> list[dict[str, float]]:
    """Train for ``epochs`` epochs; return one record per epoch (its number and mean loss parts).

    The learning rate follows a cosine from the optimiser's down to 0 over ``epochs * steps_per_epoch``
    steps. The caller puts the model in training mode and on its device, and builds the optimiser.

    Args:
        epoch_batches: ``epoch_batches(epoch)`` gives epoch ``epoch``'s ``(x, y)`` batches (0-based; called
            as the epoch starts, so it may draw that epoch's shuffle then).
        loss: the loss of one batch (it runs the model).
        optimizer: steps the model's parameters.
        epochs: passes over the data.
        steps_per_epoch: batches per epoch (the schedule's length, and the progress bar's).
        smallest: batches with fewer examples are skipped (no step).
        reporter: progress bar per epoch and, with ``--verbose``, a line per epoch.
        label: names the epochs in both.
    """
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    log = []
    for epoch in range(epochs):
        sums: dict[str, float] = {}
        steps = 0
        for x, y in reporter.track(epoch_batches(epoch), total=steps_per_epoch,
                                   description=f"{label} epoch {epoch + 1}/{epochs}"):
            if x.shape[0] < smallest:
                continue
            value, parts = loss(x, y)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            schedule.step()
            steps += 1
            for key, part in parts.items():
                sums[key] = sums.get(key, 0.0) + part
        record = {"epoch": epoch + 1, **{k: v / max(steps, 1) for k, v in sums.items()}}
        log.append(record)
        reporter.detail(f"{label} epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items()
                                                                    if k != "epoch"))
    return log


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
    """Fit ``model`` with AdamW and cross-entropy, reproducibly; returns it in eval mode on the CPU.

    Args:
        model: the model (modified in place).
        x: inputs ``[N, C, H, W]``.
        y: integer labels ``[N]``.
        epochs: passes over the data.
        batch_size: examples per step (a last batch of one example is skipped).
        lr: AdamW learning rate (cosine-annealed to zero).
        weight_decay: AdamW weight decay.
        seed: seed for initialisation-independent randomness (shuffling).
        device: where to train.
    """
    generator = torch.Generator().manual_seed(seed)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def epoch_batches(_epoch: int):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            yield x[idx].to(device), y[idx].to(device)

    def cross_entropy(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        value = F.cross_entropy(model(xb), yb)
        return value, {"ce": float(value.detach())}

    train_epochs(epoch_batches, cross_entropy, optimizer=optimizer, epochs=epochs,
                 steps_per_epoch=-(-len(x) // batch_size), label="train")
    return model.eval().cpu()


def predict_logits(model: nn.Module, x: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """Float32 logits of ``model`` (put in eval mode, left where it is) on ``x`` (on its device), in batches.

    The forward loop is :func:`prunecp_cli.pipeline.inference.forward_batches`, without an autograd graph.
    """
    batches = (Batch(x=x[i : i + batch_size], y=None, index=torch.arange(i, min(i + batch_size, len(x))))
               for i in range(0, len(x), batch_size))
    logits, _, _ = forward_batches(model, batches, num_classes=0, device=x.device)
    return logits


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    return float((predict_logits(model, x).argmax(1) == y).float().mean())
