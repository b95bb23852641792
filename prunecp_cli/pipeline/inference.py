"""Forward passes over a data set: logits in dataset order, sharded across torchrun ranks."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from prunecp_cli import dist
from prunecp_cli.io.data import Batch, Dataset
from prunecp_cli.reporting import SILENT, Reporter


@torch.no_grad()
def forward_batches(model: nn.Module, batches: Iterable[Batch], *, num_classes: int, device: torch.device,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Float32 logits, dataset rows and labels (None when no batch has any) of ``batches``, in their order.

    The forward loop of this process alone (no sharding), the model in eval mode where it is.

    Args:
        model: The model, already on ``device``.
        batches: The batches, on ``device``.
        num_classes: The width of the logits when there are no batches.
        device: Where the outputs are.
    """
    model.eval()
    logits, labels, index = [], [], []
    for batch in batches:
        logits.append(model(batch.x).float())
        index.append(batch.index.to(device))
        if batch.y is not None:
            labels.append(batch.y.to(device))
    out = torch.cat(logits) if logits else torch.zeros(0, num_classes, device=device)
    idx = torch.cat(index) if index else torch.zeros(0, dtype=torch.int64, device=device)
    return out, idx, torch.cat(labels) if labels else None


@torch.no_grad()
def collect_logits(model: nn.Module, data: Dataset, *, device: torch.device, batch_size: int, num_classes: int,
                   reporter: Reporter = SILENT, description: str = "forward passes",
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (float32, CPU) and labels (int64 or None) of every example, in dataset-row order.

    Under torchrun each rank runs its shard and the rows are gathered on every rank.

    Args:
        model: The model (moved to ``device`` and back to the CPU).
        data: The data set.
        device: Where to compute.
        batch_size: Examples per forward pass.
        num_classes: The model's output size (for an empty shard).
        reporter: Progress bar.
        description: Its label.
    """
    shard = dist.shard_dataset(data)
    model.to(device)
    batches = reporter.track(shard.batches(batch_size, device=device), total=-(-len(shard) // batch_size),
                             description=description)
    out, idx, y = forward_batches(model, batches, num_classes=num_classes, device=device)
    model.cpu()
    out = dist.gather_rows(out, idx).cpu()
    if not data.has_labels:
        return out, None
    if y is None:
        y = torch.zeros(0, dtype=torch.int64, device=device)
    return out, dist.gather_rows(y, idx).cpu()
