"""Per-example losses bounded in ``[0, 1]`` for certifying a pruned model, and their registry.

Each loss maps predictions of the pruned model (and, depending on the risk, of the dense model and
the labels) to one loss per example, as a float64 array of the same backend as the input (a torch
tensor on the input's device, else a numpy array), so that ``losses.mean()`` is an accurate
empirical risk. A risk is the expected loss; Learn-then-Test certifies ``risk <= alpha``.

========================  ======  =======  ==========  ============================================
risk                      labels  binary   p-value     alpha given to the p-value
========================  ======  =======  ==========  ============================================
``disagreement``          no      yes      binomial    ``alpha``
``error``                 yes     yes      binomial    ``alpha``
``excess-error``          yes     no       wsr         ``(alpha + 1) / 2``
``set-size``              no      no       wsr         ``(B - 1) / (K - 1)`` for a size bound ``B``
========================  ======  =======  ==========  ============================================
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from prunecp_cli.errors import DataError, UsageError
from prunecp_cli.riskcontrol.pvalues import _check_alpha

__all__ = [
    "RISKS",
    "RiskSpec",
    "disagreement_loss",
    "error_loss",
    "excess_error_alpha",
    "excess_error_loss",
    "get_risk",
    "set_size_alpha",
    "set_size_loss",
]


def _arrays(**named: Any) -> list[Any]:
    """Bring the inputs to one backend (torch if any input is a tensor, else numpy), same shape."""
    torch = sys.modules.get("torch")
    tensors = [v for v in named.values() if torch is not None and isinstance(v, torch.Tensor)]
    if tensors:
        device = tensors[0].device
        out = [torch.as_tensor(v, device=device) for v in named.values()]
    else:
        out = [np.asarray(v) for v in named.values()]
    shapes = {name: tuple(v.shape) for name, v in zip(named, out, strict=True)}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise DataError(f"per-example inputs differ in shape ({listed}); pass one entry per example to each")
    return out


def _as_float(x: Any) -> Any:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        # MPS has no float64; float32 is exact for the values {0, 1/2, 1} and (s-1)/(K-1) to ~1e-7.
        return x.to(torch.float32 if x.device.type == "mps" else torch.float64)
    return np.asarray(x, dtype=np.float64)


def disagreement_loss(pruned_top1: Any, dense_top1: Any) -> Any:
    """Binary loss ``1[pruned top-1 != dense top-1]``; needs no labels (Alvarez 2024, §2 b3).

    Args:
        pruned_top1: Top-1 class of the pruned model per example.
        dense_top1: Top-1 class of the dense model per example, same shape.

    Returns:
        Float64 losses in ``{0, 1}``, same backend and shape as the inputs.

    Raises:
        DataError: The inputs differ in shape.
    """
    pruned, dense = _arrays(pruned_top1=pruned_top1, dense_top1=dense_top1)
    return _as_float(pruned != dense)


def error_loss(pruned_top1: Any, labels: Any) -> Any:
    """Binary loss ``1[pruned top-1 != label]``; its risk is the pruned model's error rate.

    Args:
        pruned_top1: Top-1 class of the pruned model per example.
        labels: True class per example, same shape.

    Returns:
        Float64 losses in ``{0, 1}``, same backend and shape as the inputs.

    Raises:
        DataError: The inputs differ in shape.
    """
    pruned, y = _arrays(pruned_top1=pruned_top1, labels=labels)
    return _as_float(pruned != y)


def excess_error_loss(pruned_top1: Any, dense_top1: Any, labels: Any) -> Any:
    """Rescaled excess error ``(1[pruned wrong] - 1[dense wrong] + 1) / 2`` in ``{0, 1/2, 1}``.

    The raw loss ``l = 1[pruned wrong] - 1[dense wrong]`` lies in ``{-1, 0, 1}``; its risk is the
    pruned error rate minus the dense one. The rescaled loss ``l' = (l + 1) / 2`` lies in ``[0, 1]``
    and its risk is ``R' = (R + 1) / 2``, an increasing affine map, so
    ``R' <= (alpha + 1) / 2  <=>  R <= alpha``: certify ``R'`` at :func:`excess_error_alpha`.
    The loss is not binary: use the Hoeffding-Bentkus p-value with ``binary=False``.

    Args:
        pruned_top1: Top-1 class of the pruned model per example.
        dense_top1: Top-1 class of the dense model per example.
        labels: True class per example. All three share one shape.

    Returns:
        Float64 losses in ``{0, 0.5, 1}``, same backend and shape as the inputs.

    Raises:
        DataError: The inputs differ in shape.
    """
    pruned, dense, y = _arrays(pruned_top1=pruned_top1, dense_top1=dense_top1, labels=labels)
    return (_as_float(pruned != y) - _as_float(dense != y) + 1.0) / 2.0


def excess_error_alpha(alpha: float) -> float:
    """Level ``(alpha + 1) / 2`` for the rescaled excess-error loss matching excess risk ``alpha``.

    Args:
        alpha: Largest tolerated excess error rate (pruned minus dense), strictly between 0 and 1.

    Returns:
        The level for :func:`excess_error_loss`, in ``(0.5, 1)``.

    Raises:
        UsageError: ``alpha`` is outside ``(0, 1)``.
    """
    return (_check_alpha(alpha) + 1.0) / 2.0


def _check_num_classes(num_classes: Any) -> int:
    try:
        k = operator.index(num_classes)
    except TypeError:
        k = None
    if k is None or k < 2:
        raise UsageError(f"num_classes={num_classes!r} must be an integer of at least 2 (a set size needs a choice "
                         "of classes); pass the model's class count")
    return k


def set_size_alpha(max_size: float, num_classes: int) -> float:
    """Level ``(B - 1) / (K - 1)`` for :func:`set_size_loss` matching the mean set size bound ``B``.

    Args:
        max_size: Bound ``B`` on the mean conformal set size, strictly between 1 and ``K``.
        num_classes: Number of classes ``K``, at least 2.

    Returns:
        The level, strictly between 0 and 1.

    Raises:
        UsageError: ``B`` is not in ``(1, K)`` (``B <= 1`` cannot be certified, ``B >= K`` always
            holds) or ``K`` is not an integer of at least 2.
    """
    k = _check_num_classes(num_classes)
    b = float(max_size)
    if not 1.0 < b < k:
        raise UsageError(
            f"max set size {max_size!r} cannot be certified with {k} classes: it must lie strictly between "
            f"1 (unattainable with a positive risk level) and {k} (always true); pick e.g. 2"
        )
    return (b - 1.0) / (k - 1.0)


def set_size_loss(set_sizes: Any, max_size: float, num_classes: int) -> Any:
    """Bounded set-size loss ``max(size - 1, 0) / (K - 1)`` in ``[0, 1]``.

    For sets of size at least 1, ``mean l <= (B - 1) / (K - 1)  <=>  mean size <= B``: certify at
    :func:`set_size_alpha`. An empty set counts as size 1 (the loss cannot go negative), so the
    certified statement is ``E[max(size, 1)] <= B``, which implies ``E[size] <= B``. The loss is not
    binary: use the Hoeffding-Bentkus p-value with ``binary=False``.

    Args:
        set_sizes: Conformal set size per example, integers in ``[0, K]``.
        max_size: The bound ``B`` to be certified; checked here with :func:`set_size_alpha` so that a
            bad bound fails before any model is evaluated. The loss itself does not depend on it.
        num_classes: Number of classes ``K``, at least 2.

    Returns:
        Float64 losses in ``[0, 1]``, same backend and shape as ``set_sizes``.

    Raises:
        UsageError: ``max_size`` or ``num_classes`` is invalid.
        DataError: A set size is negative or larger than ``num_classes``.
    """
    set_size_alpha(max_size, num_classes)
    k = int(num_classes)
    (sizes,) = _arrays(set_sizes=set_sizes)
    sizes = _as_float(sizes)
    if sizes.reshape(-1).shape[0]:
        lo, hi = float(sizes.min()), float(sizes.max())
        if lo < 0 or hi > k:
            raise DataError(
                f"set sizes range over [{lo:g}, {hi:g}] but must lie in [0, {k}] for {k} classes; "
                "check num_classes and the prediction sets"
            )
    return (sizes - 1.0).clip(min=0.0) / (k - 1.0)


def _size_alpha(max_size: float, num_classes: int | None = None) -> float:
    if num_classes is None:
        raise UsageError("the set-size risk needs the number of classes to turn a size bound into a level")
    return set_size_alpha(max_size, num_classes)


@dataclass(frozen=True)
class RiskSpec:
    """How to certify one kind of risk.

    Attributes:
        name: Registry key, as given on the command line.
        needs_labels: The loss uses the true labels (else it needs only model outputs).
        binary: The loss takes values in ``{0, 1}`` only, so the exact binomial p-value applies.
        target: What the user's number means: ``"alpha"`` (a risk level) or ``"max_size"`` (``B``).
        description: One line for help texts.
        loss: The loss function of this module.
        alpha_transform: ``(target, num_classes) -> level`` handed to the p-value.
    """

    name: str
    needs_labels: bool
    binary: bool
    target: str
    description: str
    loss: Callable[..., Any] = field(repr=False)
    alpha_transform: Callable[[float, int | None], float] = field(repr=False)

    @property
    def pvalue_method(self) -> str:
        """``"binomial"`` for binary losses (exact), else ``"wsr"`` (betting, variance-adaptive).

        WSR replaced Hoeffding-Bentkus as the bounded-loss default: it is valid (FWER <= delta, simulated
        in tests/riskcontrol/test_betting.py) and far more powerful on low-variance losses.
        """
        return "binomial" if self.binary else "wsr"

    def loss_alpha(self, target: float, *, num_classes: int | None = None) -> float:
        """The level at which the loss's empirical risk is tested.

        Args:
            target: The user's target: a risk level ``alpha``, or ``B`` for ``set-size``.
            num_classes: Number of classes; required for ``set-size``.

        Returns:
            The level in ``(0, 1)`` to pass to the p-value.

        Raises:
            UsageError: The target is out of range or ``num_classes`` is missing where needed.
        """
        return self.alpha_transform(target, num_classes)


RISKS: Mapping[str, RiskSpec] = MappingProxyType({
    "disagreement": RiskSpec(
        "disagreement", needs_labels=False, binary=True, target="alpha", loss=disagreement_loss,
        description="share of examples where the pruned top-1 differs from the dense top-1",
        alpha_transform=lambda alpha, _k: _check_alpha(alpha)),
    "error": RiskSpec(
        "error", needs_labels=True, binary=True, target="alpha", loss=error_loss,
        description="top-1 error rate of the pruned model", alpha_transform=lambda alpha, _k: _check_alpha(alpha)),
    "excess-error": RiskSpec(
        "excess-error", needs_labels=True, binary=False, target="alpha", loss=excess_error_loss,
        description="pruned top-1 error rate minus the dense one (loss rescaled to [0, 1])",
        alpha_transform=lambda alpha, _k: excess_error_alpha(alpha)),
    "set-size": RiskSpec(
        "set-size", needs_labels=False, binary=False, target="max_size", loss=set_size_loss,
        description="mean conformal set size (loss (size - 1) / (K - 1), empty sets count as 1)",
        alpha_transform=_size_alpha),
})


def get_risk(name: str) -> RiskSpec:
    """Look a risk up by name.

    Args:
        name: A key of :data:`RISKS`.

    Returns:
        Its :class:`RiskSpec`.

    Raises:
        UsageError: The name is unknown; the message lists the valid ones.
    """
    try:
        return RISKS[name]
    except KeyError:
        raise UsageError(
            f"unknown risk {name!r}; no loss is defined for it; use one of {', '.join(RISKS)}"
        ) from None
