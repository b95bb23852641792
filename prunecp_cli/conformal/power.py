"""The power of ``certify``'s coverage test: the smallest coverage drop it detects with probability 0.8.

``certify`` fails a certificate when the number ``X`` of covered test points among ``m`` is so low that
``P_0(X <= x) < s`` under the certificate's law ``P_0`` (:mod:`prunecp_cli.conformal.stats`). Its
rejection region is therefore ``X <= c`` with ``c = max{x : P_0(X <= x) < s}`` (``c = -1``: no count
fails it, so nothing can be detected).

**Alternative: coverage drops by ``d``.** The test data's coverage is ``d`` lower than the certificate's
law says, everything else unchanged:

* Beta-Binomial law (marginal certificates, and PAC certificates under the default ``--pac-test
  beta-binomial``): given the calibration draw the coverage is ``C ~ Beta(k, n+1-k)``; under the drop
  ``X | C ~ Bin(m, max(C - d, 0))``, so the power is ``E_C[F_Bin(c; m, max(C - d, 0))]``, an integral
  over the Beta density, evaluated by composite Gauss-Legendre quadrature (8 panels of 32 nodes, times
  ``ceil(sqrt(m / n))`` when ``m > n``, over the central ``1 - 2e-14`` of the Beta law; tests compare it with adaptive ``scipy.integrate.quad`` to
  1e-7);
* Binomial law (``--pac-test binomial``): ``X ~ Bin(m, 1 - alpha - d)``, power ``F_Bin(c; m, 1 - alpha - d)``
  in closed form.

The power grows with ``d``; :func:`min_detectable_drop` finds the smallest ``d`` (to 1e-4, rounded up,
so the power at the reported drop is at least the target) by bisection. A class-conditional audit
(Bonferroni over ``J`` classes, each tested at ``s / J``) is taken to face the drop in every class at
once; its classes' counts are independent, so its power is ``1 - prod_c (1 - power_c(d))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import bdtr, betaln, gammaln
from scipy.stats import beta, binom

__all__ = ["DETECTION_POWER", "CoverageLaw", "detection_power", "min_detectable_drop", "rejection_count"]

DETECTION_POWER = 0.8
"""The detection probability ``min_detectable_drop`` is stated at."""
_TOLERANCE = 1e-4
_PANELS, _NODES = 8, 32
_GAUSS = np.polynomial.legendre.leggauss(_NODES)


@dataclass(frozen=True)
class CoverageLaw:
    """The null law of the covered count among ``m`` test points.

    Attributes:
        m: Test points.
        n: Calibration points (Beta-Binomial law), or None for the binomial law.
        k: Rank of the quantile (Beta-Binomial law), or None.
        coverage: The claimed coverage ``1 - alpha`` (binomial law), or None.
    """

    m: int
    n: int | None = None
    k: int | None = None
    coverage: float | None = None

    def __post_init__(self) -> None:
        if self.m < 1:
            raise ValueError(f"m must be >= 1, got {self.m}")
        if (self.coverage is None) == (self.n is None or self.k is None):
            raise ValueError("give either n and k (Beta-Binomial) or coverage (binomial)")
        if self.n is not None and not 1 <= self.k <= self.n:
            raise ValueError(f"need 1 <= k <= n, got n={self.n}, k={self.k}")

    def log_cdf(self) -> np.ndarray:
        """``log P_0(X <= x)`` for ``x = 0..m``."""
        x = np.arange(self.m + 1, dtype=np.float64)
        if self.coverage is not None:
            return binom.logcdf(x, self.m, self.coverage)
        a, b, m = float(self.k), float(self.n + 1 - self.k), float(self.m)
        log_pmf = gammaln(m + 1.0) - gammaln(x + 1.0) - gammaln(m - x + 1.0) + betaln(x + a, m - x + b) - betaln(a, b)
        return np.logaddexp.accumulate(log_pmf)


def rejection_count(law: CoverageLaw, significance: float) -> int:
    """``c = max{x : P_0(X <= x) < significance}``; ``-1`` when even ``X = 0`` passes."""
    below = np.nonzero(law.log_cdf() < math.log(significance))[0]
    return int(below[-1]) if below.size else -1


def _nodes(law: CoverageLaw) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes over the coverage's Beta law and their weights times the density."""
    a, b = law.k, law.n + 1 - law.k
    lo, hi = float(beta.ppf(1e-14, a, b)), float(beta.ppf(1.0 - 1e-14, a, b))
    x, w = _GAUSS
    # the binomial CDF is a step of width ~1/sqrt(m) while the Beta spans ~1/sqrt(n): more panels when m >> n
    edges = np.linspace(lo, hi, _PANELS * max(1, math.ceil(math.sqrt(law.m / law.n))) + 1)
    half = (edges[1:] - edges[:-1])[:, None] / 2
    nodes = ((edges[1:] + edges[:-1])[:, None] / 2 + half * x).ravel()
    return nodes, (half * w).ravel() * beta.pdf(nodes, a, b)


def _power_given(law: CoverageLaw, c: int, drop: float, quadrature: tuple[np.ndarray, np.ndarray] | None) -> float:
    if c < 0:
        return 0.0
    if c >= law.m:
        return 1.0
    if law.coverage is not None:
        return float(binom.cdf(c, law.m, max(law.coverage - drop, 0.0)))
    nodes, weights = quadrature if quadrature is not None else _nodes(law)
    value = float(np.dot(weights, bdtr(c, law.m, np.clip(nodes - drop, 0.0, 1.0))))
    return min(max(value, 0.0), 1.0)


class _Audit:
    """The laws of one audit with their rejection counts and quadrature nodes, computed once."""

    def __init__(self, laws: Sequence[CoverageLaw], significance: float) -> None:
        level = significance / len(laws)
        self.laws = list(laws)
        self.counts = [rejection_count(law, level) for law in laws]
        self.quadrature = [None if law.coverage is not None else _nodes(law) for law in laws]

    def power(self, drop: float) -> float:
        miss = 1.0
        for law, c, q in zip(self.laws, self.counts, self.quadrature, strict=True):
            miss *= 1.0 - _power_given(law, c, drop, q)
        return 1.0 - miss


def detection_power(drop: float, laws: Sequence[CoverageLaw], significance: float) -> float:
    """Probability that the audit fails when the coverage is ``drop`` lower than every law claims.

    Args:
        drop: The coverage drop ``d`` in ``[0, 1]``.
        laws: One law (a single test), or one per tested class (Bonferroni at ``significance / J``).
        significance: The audit's significance ``s``.

    Returns:
        The power, in ``[0, 1]``.
    """
    return _Audit(laws, significance).power(drop)


def min_detectable_drop(laws: Sequence[CoverageLaw], significance: float, *,
                        target: float = DETECTION_POWER) -> float | None:
    """The smallest coverage drop detected with probability ``target`` (see the module docstring).

    Args:
        laws: One law, or one per tested class.
        significance: The audit's significance.
        target: The detection probability.

    Returns:
        The drop, rounded up to 1e-4, or None when no drop can be detected (too few test points: even
        zero covered points would pass).
    """
    audit = _Audit(laws, significance)
    if all(c < 0 for c in audit.counts):
        return None
    lo, hi = 0.0, 1.0
    if audit.power(lo) >= target:
        return 0.0
    while hi - lo > _TOLERANCE / 4:
        mid = (lo + hi) / 2
        if audit.power(mid) >= target:
            hi = mid
        else:
            lo = mid
    return min(1.0, round(math.ceil(hi / _TOLERANCE - 1e-9) * _TOLERANCE, 4))
