"""Nonconformity functions for split-conformal classification: LAC, APS, RAPS, Top-K, SAPS and Margin.

LAC, APS and RAPS live here; the rank-based Top-K and SAPS and the Margin score in
:mod:`prunecp_cli.conformal.rank_scores`; the base class in :mod:`prunecp_cli.conformal.nonconformity_base`.

Every function here is pure tensor maths: logits in, scores out, on the device of the logits.
Larger scores mean "less conforming"; a prediction set is ``{y : s(x, y) <= qhat}``.

Conventions every caller relies on:

* **Precision.** Softmax, cumulative sums and scores are computed in float64 whatever the dtype of
  the logits, and scores are returned as float64. The calibration quantile ``qhat`` is one of these
  float64 scores, so a test point with the same score is included exactly, and a ``qhat`` stored in
  JSON (Python's ``repr`` of a float round-trips) rebuilds identical sets.
* **Ranks and ties.** Labels are ranked by softmax probability, highest first (rank 1). Equal
  probabilities are ordered by label index, lower index first (a stable descending sort), so the
  ordering, and therefore every APS/RAPS score, is deterministic.
* **Randomisation.** Randomised APS/RAPS draw one ``U ~ Unif(0, 1)`` per example, shared by all the
  labels of that example so that sets stay nested in ``qhat``. ``U`` is
  ``torch.rand(N, dtype=float64, generator=generator, device=generator.device)``, moved to the
  logits' device; with ``generator=None`` the score's own ``make_generator(stream=0)`` is used. Use a
  different stream (or one continuing generator) for each data set: calibration and test points
  must not reuse the same ``U`` values, or they stop being exchangeable.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from prunecp_cli.conformal.nonconformity_base import (
    Nonconformity,
    RandomizedScore,
    _check_labels,
    _probs,
    _sorted_order,
    label_ranks,
)
from prunecp_cli.conformal.rank_scores import SAPS, Margin, TopK
from prunecp_cli.errors import CertificateError, DataError, UsageError, brief

__all__ = [
    "APS",
    "LAC",
    "NONCONFORMITY",
    "RAPS",
    "SAPS",
    "Margin",
    "TopK",
    "Nonconformity",
    "choose_k_reg",
    "from_parameters",
    "label_ranks",
    "prediction_sets",
]


class LAC(Nonconformity):
    """Least-ambiguous set-valued classifier score ``s(x, y) = 1 - softmax_y(x)``.

    Sadinle, Lei & Wasserman, "Least Ambiguous Set-Valued Classifiers with Bounded Error Levels",
    JASA 2019.
    """

    name = "lac"

    def all_scores(self, logits: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return 1.0 - _probs(logits)


class APS(RandomizedScore):
    """Adaptive prediction sets: ``s(x, y) = sum_{j < o(x,y)} pi_(j)(x) + U * pi_y(x)``.

    Romano, Sesia & Candès, "Classification with Valid and Adaptive Coverage", NeurIPS 2020
    (https://arxiv.org/abs/2006.02544). ``o(x, y)`` is the 1-based rank of ``y`` with probabilities
    sorted descending (ties: lower label index first). Non-randomised by default (``U = 1``, so the
    score is the cumulative probability up to and including ``y``).

    Args:
        randomized: Draw ``U ~ Unif(0, 1)``, one per example, instead of ``U = 1``.
        seed: Seed of :meth:`make_generator`; used only when ``randomized`` (default 0 then).

    Raises:
        UsageError: ``seed`` is not an integer.
    """

    name = "aps"

    def _penalty(self, ranks: torch.Tensor) -> torch.Tensor | float:
        return 0.0

    def all_scores(self, logits: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        probs = _probs(logits)
        order = _sorted_order(probs)
        sorted_probs = probs.gather(1, order)
        # Exclusive cumulative sum by shifting the inclusive one: with U = 1 the score is exactly the
        # inclusive cumsum, and scores stay non-decreasing along the ranking (nested sets) in floats.
        before = torch.cumsum(sorted_probs, dim=1)
        before = torch.cat([torch.zeros_like(before[:, :1]), before[:, :-1]], dim=1)
        u = self._uniforms(probs.shape[0], probs.device, generator)
        ranks = torch.arange(1, probs.shape[1] + 1, device=probs.device, dtype=torch.float64)
        sorted_scores = before + u * sorted_probs + self._penalty(ranks)
        return torch.empty_like(sorted_scores).scatter_(1, order, sorted_scores)


class RAPS(APS):
    """Regularised APS: the APS score plus ``lambda_reg * max(0, o(x, y) - k_reg)``.

    Angelopoulos, Bates, Malik & Jordan, "Uncertainty Sets for Image Classifiers using Conformal
    Prediction", ICLR 2021 (https://arxiv.org/abs/2009.14193). ``o(x, y)`` is the 1-based rank of
    ``y``. Defaults: ``lambda_reg = 0.01`` and ``k_reg = 1`` unless the caller sets them; the paper
    picks ``k_reg`` on held-out data, which :func:`choose_k_reg` does. No temperature scaling is
    applied here.

    Args:
        lambda_reg: Penalty per rank beyond ``k_reg``; finite and >= 0.
        k_reg: Number of top ranks left unpenalised; integer >= 0.
        randomized: Draw ``U ~ Unif(0, 1)`` per example instead of ``U = 1``.
        seed: Seed of :meth:`make_generator`; used only when ``randomized``.

    Raises:
        UsageError: A parameter is out of range.
    """

    name = "raps"

    def __init__(
        self, *, lambda_reg: float = 0.01, k_reg: int = 1, randomized: bool = False, seed: int | None = None
    ) -> None:
        super().__init__(randomized=randomized, seed=seed)
        if isinstance(lambda_reg, bool) or not isinstance(lambda_reg, (int, float)):
            raise UsageError(f"lambda_reg={lambda_reg!r} is not a number; pass a value such as 0.01")
        if not (math.isfinite(lambda_reg) and lambda_reg >= 0):
            raise UsageError(
                f"lambda_reg={lambda_reg} must be finite and >= 0; typical values are 0.001 to 0.5"
            )
        if isinstance(k_reg, bool) or not isinstance(k_reg, int) or k_reg < 0:
            raise UsageError(f"k_reg={k_reg!r} must be an integer >= 0; use choose_k_reg or the default 1")
        self.lambda_reg = float(lambda_reg)
        self.k_reg = int(k_reg)

    def parameters(self) -> dict[str, Any]:
        return {**super().parameters(), "lambda_reg": self.lambda_reg, "k_reg": self.k_reg}

    def _penalty(self, ranks: torch.Tensor) -> torch.Tensor:
        return self.lambda_reg * torch.clamp(ranks - self.k_reg, min=0.0)


NONCONFORMITY: dict[str, type[Nonconformity]] = {"lac": LAC, "aps": APS, "raps": RAPS, "topk": TopK, "saps": SAPS,
                                                 "margin": Margin}


def from_parameters(name: str, params: dict[str, Any]) -> Nonconformity:
    """Rebuild a nonconformity function from its ``name`` and ``parameters()`` (e.g. a certificate).

    Args:
        name: A key of :data:`NONCONFORMITY`.
        params: The dictionary returned by ``parameters()``.

    Returns:
        The nonconformity object.

    Raises:
        CertificateError: The name is unknown or the parameters do not fit it.
    """
    if name not in NONCONFORMITY:
        raise CertificateError(
            f"unknown nonconformity {name!r}; this prunecp knows {', '.join(sorted(NONCONFORMITY))}, "
            "so the certificate was written by another version or edited"
        )
    try:
        return NONCONFORMITY[name](**dict(params))
    except (TypeError, ValueError, OverflowError, UsageError) as exc:
        shown = repr(params) if len(repr(params)) <= 120 else repr(params)[:119] + "…"
        reason = brief(exc)
        raise CertificateError(
            f"nonconformity {name!r} parameters {shown} are invalid ({reason}); "
            "recalibrate to write a fresh certificate"
        ) from exc


def prediction_sets(all_scores: torch.Tensor, qhat: float | torch.Tensor) -> torch.Tensor:
    """Prediction sets ``C(x) = {y : s(x, y) <= qhat}``.

    Args:
        all_scores: Tensor [N, K] from :meth:`Nonconformity.all_scores`.
        qhat: A scalar threshold, a tensor [K] of per-class thresholds (class-conditional
            calibration: label ``y`` is compared with ``qhat[y]``), or a tensor [N, 1] of per-point
            thresholds (Mondrian by user group: each point's group's q̂).

    Returns:
        Bool tensor [N, K] on the scores' device.
    """
    q = torch.as_tensor(qhat, dtype=all_scores.dtype, device=all_scores.device)
    if not (q.dim() == 0 or (q.dim() == 1 and q.shape[0] == all_scores.shape[1])
            or (q.dim() == 2 and q.shape == (all_scores.shape[0], 1))):
        raise ValueError(f"qhat must be a scalar, a tensor [{all_scores.shape[1]}] or [{all_scores.shape[0]}, 1], "
                         f"got {tuple(q.shape)}")
    return all_scores <= q


def choose_k_reg(logits: torch.Tensor, labels: torch.Tensor, alpha: float) -> int:
    """RAPS ``k_reg``: the (1 - alpha)-quantile of the true label's 1-based rank.

    Follows ``aangelopoulos/conformal_classification`` (``np.quantile(..., interpolation="higher")``)
    and algorithms.md §0.1. Run it on a held-out part of the data, not on the calibration points.

    Args:
        logits: Float tensor [N, K] of held-out examples.
        labels: Integer tensor [N] of their labels.
        alpha: Target miscoverage in (0, 1).

    Returns:
        ``k_reg`` >= 1.

    Raises:
        UsageError: ``alpha`` is outside (0, 1).
        DataError: No examples, or a label lies outside ``0..K-1``.
    """
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise UsageError(f"alpha={alpha!r} is outside (0, 1); pass the target miscoverage such as 0.1")
    ranks = label_ranks(logits)
    if ranks.shape[0] == 0:
        raise DataError("choose_k_reg got no examples; give it a non-empty held-out split")
    labels = _check_labels(labels, ranks.shape[0], ranks.shape[1]).to(ranks.device)
    true_ranks = ranks.gather(1, labels.unsqueeze(1)).squeeze(1).cpu().numpy()
    return int(np.quantile(true_ranks, 1.0 - float(alpha), method="higher"))
