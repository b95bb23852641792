"""Differentiable conformal training losses (ConfTr) in plain torch.

Smooth split-conformal calibration and prediction for the ``cp-taylor`` importance and ConfTr
fine-tuning (D. Stutz, K. Dvijotham, A. T. Cemgil, A. Doucet, "Learning Optimal Conformal
Classifiers", ICLR 2022). Results keep the logits' dtype (half is upcast to float32) and device.

The smooth quantile, the smooth threshold and the soft sets these losses are built on live in
:mod:`prunecp_cli.conformal.smooth_calibration` and are re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from prunecp_cli.conformal.quantile import min_calibration_size
from prunecp_cli.conformal.smooth_calibration import (  # noqa: F401  (re-exported)
    NONCONFORMITIES,
    check_labels,
    conformal_level,
    nonconformity_matrix,
    smooth_quantile,
    smooth_threshold,
    soft_set_membership,
)
from prunecp_cli.errors import CalibrationError

__all__ = [
    "NONCONFORMITIES",
    "ConfTrLossOutput",
    "classification_loss",
    "conformal_level",
    "conftr_loss",
    "coverage_loss",
    "nonconformity_matrix",
    "size_loss",
    "smooth_quantile",
    "smooth_set_size_loss",
    "smooth_threshold",
    "soft_set_membership",
]


def size_loss(membership: Tensor, *, target_size: float = 0.0) -> Tensor:
    """ConfTr size loss Omega = mean_i max(0, sum_k C_k(x_i) - kappa) (Stutz et al., 2022).

    Args:
        membership: Tensor [N, K] of soft memberships.
        target_size: kappa. Use 0 ("normal", the mean soft set size) or 1 ("valid").

    Returns:
        0-d tensor.
    """
    return torch.relu(membership.sum(dim=1) - target_size).mean()


def classification_loss(membership: Tensor, labels: Tensor, *, loss_matrix: Tensor | None = None) -> Tensor:
    """ConfTr classification loss L_cls (Stutz et al., 2022).

    mean_i sum_k [(1 - C_k) 1[y=k] + C_k 1[y!=k]] L[y, k]. prunecp's default L is all ones: it
    charges for a missing true class and for every wrong class included. The reference code of
    ConfTr defaults to the identity L instead, under which the wrong-class term vanishes and the
    loss is mean_i (1 - C_y(x_i)); pass ``loss_matrix=torch.eye(K)`` for that.

    Args:
        membership: Tensor [N, K] of soft memberships.
        labels: Integer tensor [N].
        loss_matrix: Optional tensor [K, K] of non-negative weights L[y, k].

    Returns:
        0-d tensor.
    """
    check_labels(labels, membership.shape[0], membership.shape[1])
    onehot = torch.nn.functional.one_hot(labels.long(), membership.shape[1]).to(membership.dtype)
    per_class = (1.0 - membership) * onehot + membership * (1.0 - onehot)
    if loss_matrix is not None:
        per_class = per_class * loss_matrix.to(membership)[labels.long()]
    return per_class.sum(dim=1).mean()


def coverage_loss(membership: Tensor, labels: Tensor, *, alpha: float, transform: str = "square") -> Tensor:
    """Optional ConfTr coverage loss mean_i (C_y(x_i) - (1 - alpha))^2, or its absolute value.

    Args:
        membership: Tensor [N, K] of soft memberships.
        labels: Integer tensor [N].
        alpha: Target miscoverage.
        transform: ``"square"`` or ``"abs"``.

    Returns:
        0-d tensor.

    Raises:
        ValueError: If ``transform`` is unknown.
    """
    check_labels(labels, membership.shape[0], membership.shape[1])
    gap = membership.gather(1, labels.long().unsqueeze(1)).squeeze(1) - (1.0 - alpha)
    if transform == "square":
        return gap.square().mean()
    if transform == "abs":
        return gap.abs().mean()
    raise ValueError(f"transform={transform!r} is unknown; choose 'square' or 'abs'")


@dataclass(frozen=True)
class ConfTrLossOutput:
    """Result of :func:`conftr_loss`; every field is a 0-d tensor and all but ``total`` are for logging.

    Attributes:
        total: log(L_cls + lambda * Omega + 1e-8), the term to add to the caller's cross-entropy.
        size: Omega on the prediction part, before the weight lambda.
        classification: L_cls on the prediction part (zero when disabled).
        threshold: Smooth threshold q on the calibration part.
    """

    total: Tensor
    size: Tensor
    classification: Tensor
    threshold: Tensor


def conftr_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    alpha: float = 0.01,
    fraction: float = 0.5,
    temperature: float = 1.0,
    dispersion: float = 0.1,
    size_weight: float = 0.01,
    target_size: float = 1.0,
    use_classification: bool = True,
    nonconformity: str = "logp",
    generator: torch.Generator | None = None,
) -> ConfTrLossOutput:
    """Conformal training loss of Stutz et al. (ICLR 2022) on one mini-batch.

    The batch is split at random: ``fraction`` of it calibrates the smooth threshold, and the rest
    receives soft sets. The result is log(L_cls + lambda * Omega + 1e-8), or log(lambda * Omega + 1e-8)
    without L_cls. Cross-entropy and weight decay are **not** included: the caller adds
    ``w_CE * CE`` (algorithms.md section 1.1).

    Args:
        logits: Tensor [N, K] of batch logits, float32 or float64, on CPU or CUDA.
        labels: Integer tensor [N].
        alpha: Training miscoverage. ConfTr uses 0.01, which needs at least 99 calibration points.
        fraction: Share of the batch used for calibration.
        temperature: T of :func:`soft_set_membership`.
        dispersion: See :func:`smooth_quantile`.
        size_weight: lambda.
        target_size: kappa of :func:`size_loss`: 1 ("valid") with L_cls, 0 without.
        use_classification: Include L_cls.
        nonconformity: ``"logp"`` (ConfTr's THR on log-probabilities) or ``"lac"``.
        generator: Optional torch.Generator for the split.

    Returns:
        A :class:`ConfTrLossOutput`.

    Raises:
        ValueError: If either part of the split would be empty.
        CalibrationError: If the calibration part is too small for a finite threshold at ``alpha``.
        DataError: If a label is out of range (checked for CPU tensors only, to avoid a CUDA sync).
    """
    n = logits.shape[0]
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction} must lie in (0, 1)")
    n_cal = int(fraction * n)
    if n_cal < 1 or n - n_cal < 1:
        raise ValueError(
            f"a batch of {n} split at fraction={fraction} gives {n_cal} calibration and {n - n_cal} "
            "prediction points; both parts must be non-empty, so use a larger batch or another fraction"
        )
    need = min_calibration_size(alpha)
    if n_cal < need:
        raise CalibrationError(
            f"a batch of {n} split at fraction={fraction} leaves {n_cal} calibration points, too few for a "
            f"finite threshold at alpha={alpha} (need {need}); use a batch of at least "
            f"{math.ceil(need / fraction)} or a larger alpha"
        )
    check_labels(labels, n, logits.shape[1])
    device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(n, generator=generator, device=device).to(logits.device)
    cal, pred = perm[:n_cal], perm[n_cal:]
    threshold = smooth_threshold(
        logits[cal], labels[cal], alpha=alpha, dispersion=dispersion, nonconformity=nonconformity
    )
    membership = soft_set_membership(
        logits[pred], threshold, temperature=temperature, nonconformity=nonconformity
    )
    size = size_loss(membership, target_size=target_size)
    if use_classification:
        classification = classification_loss(membership, labels[pred])
    else:
        classification = torch.zeros((), dtype=membership.dtype, device=membership.device)
    total = torch.log(classification + size_weight * size + 1e-8)
    return ConfTrLossOutput(total=total, size=size, classification=classification, threshold=threshold)


def smooth_set_size_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    dispersion: float = 0.1,
    fraction: float = 0.5,
    nonconformity: str = "logp",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Smooth set size Omega_s used by the ``cp-taylor`` importance (algorithms.md section 1, step 4).

    The threshold is calibrated on a random ``fraction`` of the batch. The result is the mean soft set
    size (kappa = 0) on the rest, i.e. ``conftr_loss(..., target_size=0, use_classification=False).size``.
    Gradients flow into the logits of both parts.

    Args:
        logits: Tensor [N, K] of batch logits.
        labels: Integer tensor [N].
        alpha: Miscoverage of the smooth threshold.
        temperature: T of :func:`soft_set_membership` (1 on log-probabilities, as in algorithms.md).
        dispersion: See :func:`smooth_quantile`.
        fraction: Share of the batch used for calibration.
        nonconformity: ``"logp"`` (default, as in algorithms.md) or ``"lac"``.
        generator: Optional torch.Generator for the split.

    Returns:
        0-d tensor.

    Raises:
        ValueError: If either part of the split would be empty.
        CalibrationError: If the calibration part is too small for a finite threshold at ``alpha``.
    """
    return conftr_loss(
        logits,
        labels,
        alpha=alpha,
        fraction=fraction,
        temperature=temperature,
        dispersion=dispersion,
        target_size=0.0,
        use_classification=False,
        nonconformity=nonconformity,
        generator=generator,
    ).size
