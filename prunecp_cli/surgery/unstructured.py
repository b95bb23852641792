"""Unstructured global magnitude pruning: zero the smallest weights of the whole network.

This is the pruning of Alvarez (2024), "Confident magnitude-based neural network pruning"
(arXiv 2408.04759; algorithms.md §2 b1): flatten every trainable tensor, biases included, into one
vector ``w``, take ``q = quantile(|w|, fraction)`` (linear interpolation, numpy's default) and zero
every weight with ``|w| < q``. Tensors keep their shapes, so the parameter count, the FLOPs and the
latency do not change: **there is no speed-up** without a sparse kernel. It needs neither
Torch-Pruning nor an importance method.

Parameters of modules listed in ``ignore`` (and of their children) are left whole and do not enter
the quantile. BatchNorm running statistics are buffers, not trainable tensors, and are never zeroed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prunecp_cli.errors import PlanError, UsageError

NO_SPEEDUP = ("weights are zeroed in place: tensor shapes, parameter count and FLOPs are unchanged, "
              "so the model is no faster without a sparse kernel")


def prunable_parameters(model: nn.Module, ignore: Sequence[str] = ()) -> list[tuple[str, nn.Parameter]]:
    """Every trainable parameter, biases included, except those under a module in ``ignore``.

    Raises:
        UsageError: an ``ignore`` name is not a module of the model.
    """
    modules = dict(model.named_modules())
    unknown = [name for name in ignore if name not in modules]
    if unknown:
        raise UsageError(f"--ignore {unknown[0]}: the model has no layer of that name")
    prefixes = tuple(f"{name}." for name in ignore)
    return [(name, p) for name, p in model.named_parameters()
            if p.requires_grad and not (prefixes and name.startswith(prefixes))]


@dataclass(frozen=True)
class Sparsity:
    """What a magnitude pruning did.

    Attributes:
        fraction: the requested fraction of weights to zero.
        threshold: ``quantile(|w|, fraction)``; weights strictly below it were zeroed.
        zeroed: weights that are zero after pruning (among the prunable ones).
        total: prunable weights.
    """

    fraction: float
    threshold: float
    zeroed: int
    total: int

    def to_json(self) -> dict:
        """The ``extra["sparsity"]`` metadata record."""
        return {"granularity": "weight", "fraction": self.fraction, "threshold": self.threshold,
                "zeroed": self.zeroed, "total": self.total,
                "zeroed_fraction": self.zeroed / self.total if self.total else 0.0, "note": NO_SPEEDUP}


class MagnitudeRanking:
    """The sorted magnitudes of a model's prunable weights, computed once for many fractions.

    Args:
        model: the dense model (not modified).
        ignore: modules whose parameters are kept whole.

    Raises:
        PlanError: the model has no trainable weights outside ``ignore``.
    """

    def __init__(self, model: nn.Module, ignore: Sequence[str] = ()) -> None:
        self.ignore = tuple(ignore)
        params = prunable_parameters(model, self.ignore)
        if not params:
            raise PlanError("the model has no trainable weights to prune (all are ignored or frozen)")
        flat = torch.cat([p.detach().abs().flatten().double().cpu() for _, p in params])
        self.sorted = torch.sort(flat).values

    @property
    def total(self) -> int:
        """Number of prunable weights."""
        return self.sorted.numel()

    def threshold(self, fraction: float) -> float:
        """``quantile(|w|, fraction)`` with linear interpolation (``numpy.quantile``'s default).

        Raises:
            UsageError: ``fraction`` is outside (0, 1).
        """
        if not 0.0 < fraction < 1.0:
            raise UsageError(f"weight fraction {fraction} must lie in (0, 1): the share of weights to zero")
        position = fraction * (self.total - 1)
        low = math.floor(position)
        high = min(low + 1, self.total - 1)
        v_low, v_high = float(self.sorted[low]), float(self.sorted[high])
        return v_low + (position - low) * (v_high - v_low)

    def apply(self, model: nn.Module, fraction: float) -> Sparsity:
        """Zero, in place, every prunable weight of ``model`` with ``|w| < threshold(fraction)``.

        ``model`` must have the architecture the ranking was computed on (usually a copy of it).
        """
        q = self.threshold(fraction)
        zeroed = total = 0
        with torch.no_grad():
            for _, p in prunable_parameters(model, self.ignore):
                p.masked_fill_(p.abs().double() < q, 0.0)
                zeroed += int((p == 0).sum())
                total += p.numel()
        return Sparsity(fraction=fraction, threshold=q, zeroed=zeroed, total=total)


def magnitude_prune(model: nn.Module, fraction: float, *, ignore: Sequence[str] = ()) -> Sparsity:
    """Zero the ``fraction`` smallest-magnitude weights of ``model`` globally, in place (see module docstring)."""
    return MagnitudeRanking(model, ignore).apply(model, fraction)
