"""certify's test of a PAC certificate: the Beta-Binomial law at the PAC rank is exact at level s; the
binomial test it replaced is conservative. Simulated honest audits (vectorised) give each false-fail rate.

An honest audit: n i.i.d. calibration scores (uniform: continuous scores), q̂ their k*-th smallest with
the PAC rank k*, m test points covered with probability q̂ (so the coverage given the calibration draw is
the k*-th order statistic), and certify's own p-value functions on the covered count.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from prunecp_cli.conformal.quantile import pac_rank
from prunecp_cli.conformal.stats import p_value_marginal, p_value_pac

S = 0.01
DRAWS = 20000


def _honest_counts(n: int, k: int, m: int, rng) -> np.ndarray:
    coverage = np.partition(rng.random((DRAWS, n)), k - 1, axis=1)[:, k - 1]
    return rng.binomial(m, coverage)


def _fails(counts: np.ndarray, p_value) -> float:
    """Share of counts whose p-value (certify's own function, once per distinct count) is below s."""
    values, inverse = np.unique(counts, return_inverse=True)
    return float((np.array([p_value(int(x)) for x in values])[inverse] < S).mean())


def _rates(counts: np.ndarray, n: int, m: int, k: int, alpha: float) -> tuple[float, float]:
    return (_fails(counts, lambda x: p_value_marginal(x, m, n=n, k=k)),
            _fails(counts, lambda x: p_value_pac(x, m, alpha=alpha)))


@pytest.mark.slow
@pytest.mark.parametrize("n, m, alpha, delta", [(300, 1000, 0.1, 0.1), (500, 300, 0.05, 0.05), (200, 5000, 0.1, 0.1)])
def test_false_fail_rates_of_both_pac_tests(n, m, alpha, delta):
    """Beta-Binomial: <= s (exact). Binomial: <= delta + s as claimed, and above s once m >> n."""
    k = pac_rank(n, alpha, delta)
    counts = _honest_counts(n, k, m, np.random.default_rng(n + m))
    bb, bin_ = _rates(counts, n, m, k, alpha)
    print(f"n={n} m={m} alpha={alpha} delta={delta}: false-fail beta-binomial {bb:.4f}, binomial {bin_:.4f} (s={S})")
    assert bb <= S + 3 * math.sqrt(S * (1 - S) / DRAWS)
    assert bin_ <= delta + S
    if m > 10 * n:
        assert bin_ > 2 * S  # the binomial test is not valid at level s alone


@pytest.mark.slow
def test_beta_binomial_is_more_powerful_when_test_sets_are_not_much_larger():
    """Against the same drop (test coverage 4 points below the calibration draw's), n = 1000, m = 500."""
    n, m, alpha, delta = 1000, 500, 0.1, 0.1
    k = pac_rank(n, alpha, delta)
    rng = np.random.default_rng(3)
    draws = 6000
    coverage = np.partition(rng.random((draws, n)), k - 1, axis=1)[:, k - 1]
    counts = rng.binomial(m, coverage - 0.04)
    bb, bin_ = _rates(counts, n, m, k, alpha)
    print(f"power against a 4-point drop: beta-binomial {bb:.4f}, binomial {bin_:.4f}")
    assert bb > bin_ + 4 * math.sqrt(bb * (1 - bb) / draws)


def test_beta_binomial_law_at_the_pac_rank_is_the_exact_size():
    """The exact size of the Beta-Binomial test is at most s and close to it (discreteness only)."""
    n, m, alpha, delta = 400, 800, 0.1, 0.1
    k = pac_rank(n, alpha, delta)
    table = np.array([p_value_marginal(x, m, n=n, k=k) for x in range(m + 1)])
    c = int(np.nonzero(table < S)[0][-1])
    size = table[c]
    assert size < S and table[c + 1] >= S and size > 0.8 * S
