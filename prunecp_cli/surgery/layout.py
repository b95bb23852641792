"""Channels-last memory format for the CPU forward passes that scoring and allocation repeat.

Only the layout in memory changes, not the indexing: every layer, hook and gate still sees logical
``[B, C, H, W]`` tensors, and the values agree to float rounding. CPU convolutions run faster on it
(one thread, 128 MNIST images, BatchNorm on batch statistics, the benchmark's CNNs: VGG 0.050 → 0.038 s,
ResNet 0.122 → 0.085 s, MobileNet 0.331 → 0.198 s per forward pass; torchvision's resnet18 on 96×96
images 0.32 → 0.22 s, on 32×32 no change). In the benchmark run (examples/benchmarks/quality.py, same
figures to the third decimal) MobileNet's cp-bruteforce scoring took 129 and 109 s in two runs against
248 s before, and its shapley 39-64 s against 111-125 s per seed; the ResNet's cp-bruteforce was no
faster (67-72 s against 70 s). GPUs and models without 2-d convolutions are left alone.
"""

from __future__ import annotations

import torch
from torch import nn


def wants_channels_last(model: nn.Module, x: torch.Tensor) -> bool:
    """True for a 4-d CPU input and a CPU model with a 2-d convolution whose weights are in the standard layout."""
    if x.dim() != 4 or x.device.type != "cpu":
        return False
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return bool(convs) and all(m.weight.device.type == "cpu" and m.weight.is_contiguous() for m in convs)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` (4-d) in channels-last memory; other tensors unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def adopt_channels_last(model: nn.Module, x: torch.Tensor, expected: torch.Tensor | None = None) -> bool:
    """Hold ``model`` channels-last if it is a CPU convolutional model that gives the same output that way.

    The check runs ``model`` on ``x`` in both layouts (``expected``: its output in the standard one, if
    already known) and keeps channels-last only when the outputs agree (rtol 1e-3, atol 1e-4) and
    nothing raised: a forward that calls ``.view`` on a feature map, for instance, fails on
    channels-last memory, and such a model stays as it is. Returns whether the layout was changed; the
    caller then passes its inputs through :func:`to_channels_last` and calls :func:`restore` at the end.
    """
    if not wants_channels_last(model, x):
        return False
    with torch.no_grad():
        if expected is None:
            expected = model(x)
        model.to(memory_format=torch.channels_last)
        try:
            got = model(to_channels_last(x))
            same = (isinstance(got, torch.Tensor) and isinstance(expected, torch.Tensor) and got.shape == expected.shape
                    and torch.allclose(got.float(), expected.float(), rtol=1e-3, atol=1e-4))
        except Exception:  # any failure of the other layout: keep the standard one
            same = False
    if not same:
        restore(model)
    return same


def restore(model: nn.Module) -> None:
    """``model``'s parameters and buffers back in the standard (contiguous) layout that surgery and files expect."""
    model.to(memory_format=torch.contiguous_format)
