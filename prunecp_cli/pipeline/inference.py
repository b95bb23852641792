"""Forward passes over a data set: logits in dataset order, sharded across torchrun ranks."""

from __future__ import annotations

import torch
from torch import nn

from prunecp_cli import dist
from prunecp_cli.io.data import Dataset
from prunecp_cli.runtime import SILENT, Reporter


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
    model.to(device).eval()
    logits, labels, index = [], [], []
    batches = shard.batches(batch_size, device=device)
    for batch in reporter.track(batches, total=-(-len(shard) // batch_size), description=description):
        logits.append(model(batch.x).float())
        index.append(batch.index.to(device))
        if batch.y is not None:
            labels.append(batch.y.to(device))
    model.cpu()
    out = torch.cat(logits) if logits else torch.zeros(0, num_classes, device=device)
    idx = torch.cat(index) if index else torch.zeros(0, dtype=torch.int64, device=device)
    out = dist.gather_rows(out, idx).cpu()
    if not data.has_labels:
        return out, None
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=device)
    return out, dist.gather_rows(y, idx).cpu()
