"""Calibration ranks, the conformal quantile ``qhat`` and the guarantee it supports.

Pure maths on a 1-D tensor of calibration scores (algorithms.md §0.2, §0.4, §0.5):

* marginal split conformal: ``qhat`` is the ``k``-th smallest score with ``k = ceil((n+1)(1-alpha))``;
* training-conditional (PAC, Vovk 2012): ``k* = min{k : F_Bin(k-1; n, 1-alpha) >= 1-delta}``.

Ranks are computed from the *decimal* value of ``alpha`` and ``delta`` (see :func:`decimal_fraction`),
so ``alpha=0.1`` means exactly 1/10. When ``k > n`` no finite threshold gives the guarantee, and a
:class:`~prunecp_cli.errors.CalibrationError` says how many points would; ``qhat`` is never ``inf``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any, Literal

import torch
from scipy.stats import binom

from prunecp_cli.errors import CalibrationError, DataError, UsageError

__all__ = [
    "QuantileResult",
    "class_conditional_quantiles",
    "conformal_quantile",
    "conformal_rank",
    "decimal_fraction",
    "guarantee",
    "min_calibration_size",
    "pac_rank",
]

Kind = Literal["marginal", "training-conditional"]


def decimal_fraction(x: float | Fraction | Decimal, *, name: str = "alpha") -> Fraction:
    """The exact rational a user meant by a probability such as ``0.1``.

    A float is read through its shortest round-trip decimal (``repr``), so ``0.1`` becomes exactly
    ``1/10`` rather than the binary value ``0.1000000000000000055...``. Computing
    ``(n+1)(1-alpha)`` in floats instead gives ``123.00000000000001`` for ``n=149, alpha=0.18`` and a
    rank of 124 where the formula says 123 (likewise ``n=999, alpha=0.059``). ``Fraction`` and
    ``Decimal`` inputs are taken as they are.

    Args:
        x: The probability.
        name: Its name in the error message.

    Returns:
        The exact fraction, strictly between 0 and 1.

    Raises:
        UsageError: ``x`` is not a number strictly between 0 and 1.
    """
    if isinstance(x, Fraction):
        value = x
    elif isinstance(x, Decimal) and x.is_finite():
        value = Fraction(x)
    elif isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x):
        value = Fraction(repr(float(x)))
    else:
        raise UsageError(f"{name}={x!r} is not a number; pass a probability such as 0.1")
    if not 0 < value < 1:
        raise UsageError(f"{name}={x} is outside (0, 1); pass a probability such as 0.1")
    return value


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    return n


def conformal_rank(n: int, alpha: float) -> int:
    """Rank of the marginal split-conformal quantile, ``k = ceil((n+1)(1-alpha))``.

    Computed exactly on :func:`decimal_fraction` ``(alpha)``, so ``conformal_rank(9, 0.1) == 9``.

    Args:
        n: Number of calibration scores.
        alpha: Target miscoverage in (0, 1).

    Returns:
        ``k``; it may exceed ``n`` (then no finite quantile exists).
    """
    return math.ceil((_check_n(n) + 1) * (1 - decimal_fraction(alpha)))


def pac_rank(n: int, alpha: float, delta: float) -> int:
    """Rank of the training-conditional (PAC) quantile (Vovk 2012, "Conditional validity of
    inductive conformal predictors", ACML).

    ``k* = min{k : F_Bin(k-1; n, 1-alpha) >= 1-delta}`` = ``binom.ppf(1-delta, n, 1-alpha) + 1``.
    Evaluated as the smallest ``k`` with ``P(Bin(n, 1-alpha) >= k) <= delta`` using scipy's
    survival function (accurate in the upper tail), starting from ``ppf`` and stepping to the
    boundary. Where the tail is within a relative 1e-9 of ``delta`` (exact ties such as
    ``n=257, alpha=delta=0.5``) it is decided in exact integer arithmetic, for ``n <= 20000``.

    Args:
        n: Number of calibration scores.
        alpha: Target miscoverage in (0, 1).
        delta: Allowed probability that coverage falls below ``1-alpha``, in (0, 1).

    Returns:
        ``k*`` in ``1..n+1``; ``n+1`` means no finite quantile gives the guarantee.
    """
    n = _check_n(n)
    p = float(1 - decimal_fraction(alpha))
    d = float(decimal_fraction(delta, name="delta"))

    def small_tail(k: int) -> bool:  # P(Bin(n, p) >= k) <= delta
        tail = float(binom.sf(k - 1, n, p))
        if abs(tail - d) > 1e-9 * d or n > _EXACT_MAX_N:
            return tail <= d
        return _exact_small_tail(n, decimal_fraction(alpha), k, decimal_fraction(delta, name="delta"))

    k = min(max(int(binom.ppf(1 - d, n, p)) + 1, 1), n + 1)
    while k > 1 and small_tail(k - 1):
        k -= 1
    while k <= n and not small_tail(k):
        k += 1
    return k


_EXACT_MAX_N = 20000


def _exact_small_tail(n: int, alpha: Fraction, k: int, delta: Fraction) -> bool:
    """``P(Bin(n, 1-alpha) >= k) <= delta`` in integers: the terms are ``C(n,j) a^j b^(n-j) / q^n``."""
    a, b, q = alpha.denominator - alpha.numerator, alpha.numerator, alpha.denominator
    term, total = a**n, 0  # j = n
    for j in range(n, k - 1, -1):
        total += term
        term = term * j * b // ((n - j + 1) * a)  # C(n,j-1) a^(j-1) b^(n-j+1), exact
    return total * delta.denominator <= delta.numerator * q**n


def min_calibration_size(alpha: float, delta: float | None = None) -> int:
    """Smallest number of calibration points for which the rank is at most ``n``.

    Marginal: ``ceil((n+1)(1-alpha)) <= n`` iff ``(n+1) alpha >= 1``, so ``n = ceil(1/alpha) - 1``
    (99 for ``alpha=0.01``). PAC: ``k* <= n`` iff ``(1-alpha)^n <= delta``; the closed form is
    checked (and corrected) with :func:`pac_rank` itself.

    Args:
        alpha: Target miscoverage in (0, 1).
        delta: PAC failure probability, or ``None`` for the marginal guarantee.

    Returns:
        The minimum ``n`` (at least 1).
    """
    a = decimal_fraction(alpha)
    if delta is None:
        n = max(math.ceil(1 / a) - 1, 1)
        assert conformal_rank(n, alpha) <= n and (n == 1 or conformal_rank(n - 1, alpha) > n - 1)
        return n
    d = decimal_fraction(delta, name="delta")
    n = max(math.ceil(math.log(float(d)) / math.log1p(-float(a))), 1)
    while n > 1 and pac_rank(n - 1, alpha, delta) <= n - 1:
        n -= 1
    while pac_rank(n, alpha, delta) > n:
        n += 1
    return n


@dataclass(frozen=True)
class QuantileResult:
    """A calibrated threshold.

    Attributes:
        qhat: The ``k``-th smallest calibration score (a finite float).
        k: Its 1-based rank.
        n: Number of calibration scores.
        level: ``k / n``, the empirical quantile level (``"higher"`` interpolation).
        kind: ``"marginal"`` or ``"training-conditional"``.
        alpha: Target miscoverage.
        delta: PAC failure probability, or ``None`` for the marginal kind.
    """

    qhat: float
    k: int
    n: int
    level: float
    kind: Kind
    alpha: float
    delta: float | None = None


def _scores_1d(label_scores: torch.Tensor) -> torch.Tensor:
    scores = torch.as_tensor(label_scores)
    if scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError(f"label_scores must be a 1-D float tensor, got {scores.dtype} {tuple(scores.shape)}")
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        raise CalibrationError(
            f"{bad} of {scores.shape[0]} calibration scores are NaN or infinite, so no quantile can be "
            "taken; check the model's logits on the calibration data for NaN/inf"
        )
    return scores


def _rank(n: int, alpha: float, delta: float | None) -> int:
    return conformal_rank(n, alpha) if delta is None else pac_rank(n, alpha, delta)


def _target(alpha: float, delta: float | None) -> str:
    if delta is None:
        return f"a marginal guarantee at alpha={alpha}"
    return f"a training-conditional guarantee at alpha={alpha}, delta={delta}"


def conformal_quantile(
    label_scores: torch.Tensor, alpha: float, *, delta: float | None = None
) -> QuantileResult:
    """The split-conformal threshold: the ``k``-th smallest calibration score.

    ``k = ceil((n+1)(1-alpha))`` (marginal, Vovk et al. 2005; Lei et al. 2018), or the PAC rank of
    :func:`pac_rank` when ``delta`` is given. Ties among scores need no special handling: the
    ``k``-th order statistic is well defined and coverage can only grow.

    Args:
        label_scores: Float tensor [n] of calibration scores at the true labels.
        alpha: Target miscoverage in (0, 1).
        delta: PAC failure probability in (0, 1), or ``None`` for the marginal guarantee.

    Returns:
        The :class:`QuantileResult`.

    Raises:
        UsageError: ``alpha`` or ``delta`` is outside (0, 1).
        CalibrationError: Too few calibration points (``k > n``), or non-finite scores.
    """
    scores = _scores_1d(label_scores)
    n = scores.shape[0]
    k = _rank(n, alpha, delta)
    if k > n:
        need = min_calibration_size(alpha, delta)
        raise CalibrationError(
            f"n={n} calibration points cannot give {_target(alpha, delta)}: the rank k={k} exceeds n; "
            f"use at least {need} calibration points, or a larger alpha"
            + ("" if delta is None else " or delta")
        )
    qhat = float(torch.kthvalue(scores, k).values)
    kind: Kind = "marginal" if delta is None else "training-conditional"
    return QuantileResult(qhat=qhat, k=k, n=n, level=k / n, kind=kind, alpha=alpha, delta=delta)


def class_conditional_quantiles(
    label_scores: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    alpha: float,
    *,
    delta: float | None = None,
) -> list[QuantileResult]:
    """Mondrian (class-conditional) thresholds: one :func:`conformal_quantile` per true class.

    Vovk et al., "Algorithmic Learning in a Random World", 2005, §4.5. The guarantee of class ``c``
    holds for test points whose true label is ``c``, with ``n`` = the calibration points of class ``c``.

    Args:
        label_scores: Float tensor [n] of calibration scores at the true labels.
        labels: Integer tensor [n] of the true labels.
        num_classes: Number of classes ``K``.
        alpha: Target miscoverage in (0, 1), the same for every class.
        delta: PAC failure probability per class, or ``None``.

    Returns:
        ``K`` results; item ``c`` is class ``c``'s threshold.

    Raises:
        CalibrationError: One or more classes have too few points; the message names all of them.
        DataError: A label lies outside ``0..num_classes-1``.
    """
    scores = _scores_1d(label_scores).cpu()
    labels = torch.as_tensor(labels).cpu()
    if labels.shape != scores.shape or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of shape {tuple(scores.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"labels span {int(labels.min())}..{int(labels.max())} but there are {num_classes} classes; "
            "check that the data's labels match the model's classes"
        )
    counts = torch.bincount(labels.to(torch.int64), minlength=num_classes).tolist()
    ranks = {n: _rank(n, alpha, delta) for n in set(counts)}
    short = [c for c in range(num_classes) if ranks[counts[c]] > counts[c]]
    if short:
        need = min_calibration_size(alpha, delta)
        listing = ", ".join(f"class {c} has {counts[c]} of {need}" for c in short)
        raise CalibrationError(
            f"class-conditional calibration for {_target(alpha, delta)} needs at least {need} calibration "
            f"points in every class, but {len(short)} of {num_classes} classes have fewer ({listing}); add "
            "calibration data for these classes, raise alpha, or calibrate marginally"
        )
    return [conformal_quantile(scores[labels == c], alpha, delta=delta) for c in range(num_classes)]


def _fmt(x: Fraction, *, up: bool) -> str:
    """``x`` to 6 significant digits, rounded up or down so the printed claim stays true."""
    if x == 0:
        return "0"
    e = 0
    while x * Fraction(10) ** e < 10**5:
        e += 1
    while x * Fraction(10) ** e >= 10**6:
        e -= 1
    scaled = x * Fraction(10) ** e
    m = math.ceil(scaled) if up else math.floor(scaled)
    return format(Decimal(m).scaleb(-e).normalize(), "f")


def guarantee(result: QuantileResult, *, label_scores: torch.Tensor) -> dict[str, Any]:
    """The certificate's ``guarantee`` object for a calibrated threshold.

    What is claimed, and nothing more:

    * ``marginal``: for a test point exchangeable with the ``n`` calibration points,
      ``P(Y in C(X)) >= k/(n+1) >= 1-alpha``, the probability taken over the calibration set, the
      test point and any randomisation ``U``. ``coverage_at_most = 1-alpha+1/(n+1)`` is the upper bound
      that needs continuous scores (no ties among the ``n+1`` scores); it is given only when the
      calibration scores show no ties, a necessary check that cannot prove continuity, and is
      ``None`` otherwise. ``confidence`` is ``None``: nothing is claimed for one fixed calibration set.
    * ``training-conditional`` (Vovk 2012): with probability at least ``1-delta`` over an i.i.d.
      calibration draw, the coverage conditional on that calibration set is at least ``1-alpha``.
      Ties only raise coverage, so this holds for any score distribution; no upper bound is given.

    Neither claim is per class or per input; a class-conditional threshold makes the same claims for
    test points of its own class.

    Args:
        result: The output of :func:`conformal_quantile`.
        label_scores: The calibration scores ``result`` was computed from (for the tie check).

    Returns:
        ``{"type", "coverage_at_least", "coverage_at_most", "confidence", "statement"}``, JSON-ready.
    """
    scores = _scores_1d(label_scores)
    if scores.shape[0] != result.n:
        raise ValueError(
            f"label_scores has {scores.shape[0]} values but the result was calibrated on {result.n}"
        )
    one_minus_alpha = 1 - decimal_fraction(result.alpha)
    n = result.n
    if result.kind == "marginal":
        ordered = torch.sort(scores).values
        ties = bool((ordered[1:] == ordered[:-1]).any())
        upper = None if ties else one_minus_alpha + Fraction(1, n + 1)
        bound = (
            f"and, if the scores are continuous (the calibration scores show no ties), at most "
            f"{_fmt(upper, up=True)}"
            if upper is not None
            else "(no upper bound is stated because the calibration scores contain ties)"
        )
        statement = (
            f"Marginal guarantee: for a new test point exchangeable with the {n} calibration points, the "
            f"prediction set contains the true label with probability at least {_fmt(one_minus_alpha, up=False)} "
            f"{bound}; the probability is averaged over the calibration draw and the test point, so it is "
            "not a promise for one fixed calibration set, one class or one input."
        )
        return {
            "type": "marginal",
            "coverage_at_least": float(one_minus_alpha),
            "coverage_at_most": None if upper is None else float(upper),
            "confidence": None,
            "statement": statement,
        }
    confidence = 1 - decimal_fraction(result.delta, name="delta")
    statement = (
        f"Training-conditional (PAC) guarantee: with probability at least {_fmt(confidence, up=False)} over "
        f"the draw of the {n} i.i.d. calibration points, the prediction sets contain the true label of a new "
        f"point from the same distribution with probability at least {_fmt(one_minus_alpha, up=False)}; "
        "this is not a promise for one class or one input."
    )
    return {
        "type": "training-conditional",
        "coverage_at_least": float(one_minus_alpha),
        "coverage_at_most": None,
        "confidence": float(confidence),
        "statement": statement,
    }
