"""The power of certify's coverage test: quadrature against adaptive quad, and against simulated audits."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate
from scipy.stats import beta, binom

from prunecp_cli.conformal.power import CoverageLaw, detection_power, min_detectable_drop, rejection_count
from prunecp_cli.conformal.stats import p_value_marginal, p_value_pac

S = 0.01


def _rank(n: int, alpha: float = 0.1) -> int:
    return math.ceil((n + 1) * (1 - alpha) - 1e-9)


@pytest.mark.parametrize("n, m", [(500, 1000), (135, 135), (100, 20000), (5000, 100)])
def test_rejection_count_is_the_largest_count_the_test_fails(n, m):
    k = _rank(n)
    c = rejection_count(CoverageLaw(m, n=n, k=k), S)
    assert c >= 0
    assert p_value_marginal(c, m, n=n, k=k) < S <= p_value_marginal(c + 1, m, n=n, k=k)
    cb = rejection_count(CoverageLaw(m, coverage=0.9), S)
    assert p_value_pac(cb, m, alpha=0.1) < S <= p_value_pac(cb + 1, m, alpha=0.1)


@pytest.mark.parametrize("n, m, alpha", [(500, 1000, 0.1), (1000, 5000, 0.05), (60, 60, 0.2), (100, 50000, 0.1)])
@pytest.mark.parametrize("drop", [0.005, 0.03, 0.1])
def test_power_matches_adaptive_quadrature(n, m, alpha, drop):
    k = _rank(n, alpha)
    law = CoverageLaw(m, n=n, k=k)
    c = rejection_count(law, S)
    lo, hi = beta.ppf(1e-15, k, n + 1 - k), beta.ppf(1 - 1e-15, k, n + 1 - k)
    ref = integrate.quad(lambda cov: binom.cdf(c, m, max(cov - drop, 0.0)) * beta.pdf(cov, k, n + 1 - k), lo, hi,
                         points=[k / (n + 1)], limit=1000, epsabs=1e-13, epsrel=1e-12)[0]
    assert detection_power(drop, [law], S) == pytest.approx(ref, abs=1e-7)


def test_binomial_power_is_the_closed_form():
    law = CoverageLaw(1000, coverage=0.9)
    c = rejection_count(law, S)
    want = sum(math.comb(1000, x) * 0.87**x * 0.13 ** (1000 - x) for x in range(c + 1))
    assert detection_power(0.03, [law], S) == pytest.approx(want, rel=1e-9)


def _simulated_rejections(n: int, k: int, m: int, drop: float, draws: int, rng) -> np.ndarray:
    """Audits under a drop: calibration coverage from real order statistics, test hits, certify's own p-value."""
    scores = rng.random((draws, n))
    coverage = np.partition(scores, k - 1, axis=1)[:, k - 1]  # P(U <= k-th smallest) for uniform test scores
    hits = rng.binomial(m, np.clip(coverage - drop, 0.0, 1.0))
    values, inverse = np.unique(hits, return_inverse=True)
    return np.array([p_value_marginal(int(x), m, n=n, k=k) for x in values])[inverse] < S


@pytest.mark.parametrize("n, m", [(500, 1000), (200, 2000)])
def test_min_detectable_drop_has_power_08_in_simulated_audits(n, m):
    """At the reported drop simulated audits fail ~80% of the time; 0.01 less fails clearly less often."""
    k = _rank(n)
    drop = min_detectable_drop([CoverageLaw(m, n=n, k=k)], S)
    rng = np.random.default_rng(5)
    draws = 4000
    at = _simulated_rejections(n, k, m, drop, draws, rng).mean()
    below = _simulated_rejections(n, k, m, drop - 0.01, draws, rng).mean()
    se = math.sqrt(0.16 / draws)
    assert abs(at - 0.8) <= 3.5 * se, at
    assert below < 0.8 - 3.5 * se, below
    assert detection_power(drop, [CoverageLaw(m, n=n, k=k)], S) >= 0.8 > detection_power(drop - 1e-4, [CoverageLaw(
        m, n=n, k=k)], S)


def test_the_audit_misses_a_two_point_drop_at_small_n():
    """The issue's finding: at n = 500, m = 1000 a 2-point drop is caught rarely; simulation agrees."""
    n, m, k = 500, 1000, _rank(500)
    power = detection_power(0.02, [CoverageLaw(m, n=n, k=k)], S)
    simulated = _simulated_rejections(n, k, m, 0.02, 4000, np.random.default_rng(6)).mean()
    assert abs(power - simulated) <= 3.5 * math.sqrt(power * (1 - power) / 4000)
    assert power < 0.2


def test_class_conditional_power_combines_independent_classes():
    laws = [CoverageLaw(60 + 10 * c, n=80 + 5 * c, k=_rank(80 + 5 * c)) for c in range(4)]
    single = [detection_power(0.1, [law], S / 4) for law in laws]
    assert detection_power(0.1, laws, S) == pytest.approx(1 - np.prod([1 - p for p in single]), rel=1e-12)
    assert min_detectable_drop(laws, S) > min_detectable_drop([CoverageLaw(sum(law.m for law in laws), n=400,
                                                                            k=_rank(400))], S)


def test_none_when_no_count_can_fail():
    assert min_detectable_drop([CoverageLaw(1, n=100, k=_rank(100))], S) is None
    assert detection_power(0.5, [CoverageLaw(1, n=100, k=_rank(100))], S) == 0.0
