"""BatchNorm recalibration: re-estimate running statistics after pruning, without labels.

Removing channels changes what every later BatchNorm layer sees, so the running mean and variance
stored in the dense model no longer match; in one-shot pruning this mismatch, not the lost
channels, is often what destroys accuracy. :func:`recalibrate_batchnorm` re-estimates them on data
(the score split): BatchNorm layers run in training mode (normalising by batch statistics, as
during training), hooks accumulate the exact per-channel sum and sum of squares of every BatchNorm
input over all examples in float64, and the running statistics are set to their population mean
and unbiased variance. Other layers (dropout) stay in eval mode; no weight changes.

Training-mode normalisation makes the result depend on which examples share a batch, so under
``torchrun`` ranks take whole batches of the single-process order (:func:`prunecp_cli.dist.shard_batches`);
the accumulated sums are plain sums, all-reduced across ranks, so every rank ends with the
statistics one process would compute (up to the order of float64 additions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """Re-estimate every BatchNorm layer's running statistics on ``batches`` (inputs only).

    Args:
        model: the model, modified in place; returned in eval mode.
        batches: input tensors on the model's device.
        reduce: sums a tensor across processes (identity when not distributed).

    Returns:
        Number of examples seen (on this process).
    """
    layers = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]
    if not layers:
        return 0
    sums: dict[nn.Module, list[torch.Tensor]] = {}

    def hook(module, inputs):
        x = inputs[0].detach().double()
        dims = [d for d in range(x.dim()) if d != 1]
        count = x.numel() // x.shape[1]
        stats = sums.setdefault(module, [torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)] * 2 + [0])
        sums[module] = [stats[0] + x.sum(dims), stats[1] + (x * x).sum(dims), stats[2] + count]

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    seen = 0
    model.eval()
    for layer in layers:
        layer.train()
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
                seen += x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        model.eval()
    reduce = reduce or (lambda t: t)
    for layer in layers:
        if layer not in sums:
            continue
        total, total_sq, count = sums[layer]
        packed = reduce(torch.cat([total, total_sq, torch.tensor([float(count)], dtype=torch.float64,
                                                                  device=total.device)]))
        channels = total.numel()
        total, total_sq, count = packed[:channels], packed[channels : 2 * channels], packed[-1]
        mean = total / count
        var = (total_sq - count * mean * mean).clamp_min(0) / (count - 1).clamp_min(1)
        layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
        layer.running_var.copy_(var.to(layer.running_var.dtype))
        if layer.num_batches_tracked is not None:
            layer.num_batches_tracked.zero_()
    return seen
