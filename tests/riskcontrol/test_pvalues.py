"""Tests for prunecp_cli.riskcontrol.pvalues against exact, independently written references."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from prunecp_cli.errors import CalibrationError, UsageError
from prunecp_cli.riskcontrol.pvalues import (
    PVALUE_METHODS,
    bentkus_pvalue,
    binomial_pvalue,
    hoeffding_bentkus_pvalue,
    hoeffding_pvalue,
    pvalue,
)

# ---------------------------------------------------------------------------------------------
# Exact references: rational arithmetic, no scipy.


def exact_binom_cdf(k: int, n: int, p: Fraction) -> Fraction:
    """P(Bin(n, p) <= k) as an exact fraction."""
    if k < 0:
        return Fraction(0)
    num, den = p.numerator, p.denominator
    term = (den - num) ** n  # C(n, i) num^i (den - num)^(n - i) for i = 0, updated exactly below
    total = term
    for i in range(min(k, n)):
        term = term * (n - i) * num // ((i + 1) * (den - num))
        total += term
    return Fraction(total, den**n)


def ref_binomial(count: int, n: int, alpha: Fraction) -> float:
    return float(exact_binom_cdf(count, n, alpha))


def ref_hoeffding(r: Fraction, n: int, alpha: Fraction) -> float:
    gap = max(alpha - r, Fraction(0))
    return min(1.0, math.exp(-float(2 * n * gap * gap)))


def ref_bentkus(r: Fraction, n: int, alpha: Fraction) -> float:
    return min(1.0, math.e * float(exact_binom_cdf(math.ceil(n * r), n, alpha)))


def ref_chernoff(r: Fraction, n: int, alpha: Fraction) -> float:
    """(b/a)^(na) ((1-b)/(1-a))^(n(1-a)) with a = min(r, alpha), b = alpha; 1 when a = b."""
    a, b = min(r, alpha), alpha
    if a == b:
        return 1.0
    if a == 0:
        return float((1 - b) ** n)
    log_p = float(n * a) * (math.log(b) - math.log(a)) + float(n * (1 - a)) * (
        math.log(1 - b) - math.log(1 - a)
    )
    return math.exp(log_p)


def ref_hb(r: Fraction, n: int, alpha: Fraction, binary: bool) -> float:
    factor = 1.0 if binary else math.e
    bin_term = factor * float(exact_binom_cdf(math.ceil(n * r), n, alpha))
    return min(1.0, ref_chernoff(r, n, alpha), bin_term)


# (n, risk_hat, alpha) with risk_hat and alpha exact rationals. Integer counts n * risk_hat first.
INTEGER_CASES = [
    (1, Fraction(0), Fraction(1, 2)),
    (1, Fraction(1), Fraction(1, 2)),
    (1, Fraction(0), Fraction(1, 10)),
    (10, Fraction(0), Fraction(1, 10)),
    (10, Fraction(1, 10), Fraction(1, 10)),  # risk_hat == alpha
    (10, Fraction(3, 10), Fraction(1, 10)),  # risk_hat > alpha
    (100, Fraction(5, 100), Fraction(1, 10)),
    (500, Fraction(40, 500), Fraction(1, 10)),
    (500, Fraction(50, 500), Fraction(1, 10)),
    (500, Fraction(500, 500), Fraction(1, 10)),
    (9000, Fraction(0), Fraction(3, 100)),
    (9000, Fraction(243, 9000), Fraction(3, 100)),
    (9000, Fraction(236, 9000), Fraction(3, 100)),
    (9000, Fraction(450, 9000), Fraction(3, 100)),
]
# Bounded losses: n * risk_hat is not an integer (e.g. losses in {0, 1/2, 1}).
FRACTIONAL_CASES = [
    (1, Fraction(1, 2), Fraction(1, 2)),
    (200, Fraction(15, 400), Fraction(1, 10)),  # n * r = 7.5
    (500, Fraction(91, 1000), Fraction(11, 20)),  # n * r = 45.5
    (500, Fraction(517, 1000), Fraction(11, 20)),  # n * r = 258.5, excess-error scale
    (9000, Fraction(4801, 18000), Fraction(3, 100)),  # r > alpha
]
ALL_CASES = INTEGER_CASES + FRACTIONAL_CASES


def close(x: float, y: float) -> bool:
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-300)


@pytest.mark.parametrize(("n", "r", "alpha"), INTEGER_CASES)
def test_binomial_matches_exact_cdf(n, r, alpha):
    count = int(n * r)
    got = binomial_pvalue(count, n, float(alpha))
    assert close(got, ref_binomial(count, n, alpha)), (got, ref_binomial(count, n, alpha))
    assert close(pvalue("binomial", float(r), n, float(alpha)), got)


@pytest.mark.parametrize(("n", "r", "alpha"), ALL_CASES)
def test_hoeffding_matches_closed_form(n, r, alpha):
    got = hoeffding_pvalue(float(r), n, float(alpha))
    assert close(got, ref_hoeffding(r, n, alpha))
    if r >= alpha:
        assert got == 1.0
    assert pvalue("hoeffding", float(r), n, float(alpha)) == got


@pytest.mark.parametrize(("n", "r", "alpha"), ALL_CASES)
def test_bentkus_matches_exact_reference(n, r, alpha):
    got = bentkus_pvalue(float(r), n, float(alpha))
    assert close(got, ref_bentkus(r, n, alpha)), (got, ref_bentkus(r, n, alpha))
    assert got <= 1.0
    assert pvalue("bentkus", float(r), n, float(alpha)) == got


@pytest.mark.parametrize(("n", "r", "alpha"), ALL_CASES)
def test_hb_matches_exact_reference(n, r, alpha):
    got = hoeffding_bentkus_pvalue(float(r), n, float(alpha))
    assert close(got, ref_hb(r, n, alpha, binary=False)), (got, ref_hb(r, n, alpha, binary=False))
    assert pvalue("hb", float(r), n, float(alpha)) == got
    if r >= alpha:
        assert got == 1.0


@pytest.mark.parametrize(("n", "r", "alpha"), INTEGER_CASES)
def test_hb_binary_matches_reference_and_equals_binomial(n, r, alpha):
    got = hoeffding_bentkus_pvalue(float(r), n, float(alpha), binary=True)
    assert close(got, ref_hb(r, n, alpha, binary=True))
    # The Chernoff term never undercuts the exact binomial CDF, so HB(binary) is the binomial p-value.
    assert close(got, binomial_pvalue(int(n * r), n, float(alpha)))
    assert pvalue("hb", float(r), n, float(alpha), binary=True) == got


def test_zero_risk_uses_zero_log_zero():
    # a = 0: h1(0, b) = -ln(1 - b), so the Chernoff term is (1 - b)^n, finite and not NaN.
    n, alpha = 50, 0.2
    assert close(hoeffding_bentkus_pvalue(0.0, n, alpha, binary=True), 0.8**n)
    assert close(hoeffding_bentkus_pvalue(0.0, n, alpha), 0.8**n)  # Chernoff < e * 0.8^n


def test_one_point_edge_cases():
    assert binomial_pvalue(0, 1, 0.3) == pytest.approx(0.7)
    assert binomial_pvalue(1, 1, 0.3) == 1.0
    assert bentkus_pvalue(0.0, 1, 0.9) == pytest.approx(math.e * 0.1)
    assert bentkus_pvalue(0.0, 1, 0.3) == 1.0  # e * 0.7 capped


def test_sanity_thresholds_from_algorithms_md():
    """n=9000, alpha=0.03, delta=0.05: binomial certifies <= 243 errors, HB (with e) <= 236."""
    n, alpha, delta = 9000, 0.03, 0.05

    def max_certified(p_of_count):
        certified = [k for k in range(0, 400) if p_of_count(k) <= delta]
        assert certified == list(range(len(certified)))  # monotone: a prefix of counts
        return certified[-1]

    assert max_certified(lambda k: binomial_pvalue(k, n, alpha)) == 243
    assert max_certified(lambda k: pvalue("binomial", k / n, n, alpha)) == 243
    # HB as in MAPIE / algorithms.md 2(b)4, i.e. with the Bentkus factor e, applied to 0/1 losses:
    assert max_certified(lambda k: hoeffding_bentkus_pvalue(k / n, n, alpha)) == 236
    # Dropping e for binary losses makes HB exactly the binomial p-value, hence the same threshold.
    assert max_certified(lambda k: hoeffding_bentkus_pvalue(k / n, n, alpha, binary=True)) == 243


def test_binomial_pvalue_is_super_uniform_at_the_boundary():
    """Exactly: under R = alpha, P(p <= u) <= u, and the size is not far below u (exact test)."""
    for n, alpha in [(20, Fraction(1, 10)), (500, Fraction(1, 10)), (9000, Fraction(3, 100))]:
        for u in (0.01, 0.05, 0.1, 0.3):
            # p is increasing in the count, so {p <= u} = {count <= k_u}.
            k_u = max((k for k in range(n + 1) if binomial_pvalue(k, n, float(alpha)) <= u), default=-1)
            size = ref_binomial(k_u, n, alpha)
            assert size <= u * (1 + 1e-12)
            assert ref_binomial(k_u + 1, n, alpha) > u  # the next count would break validity
            if n >= 500:
                assert size >= 0.6 * u  # not trivially conservative


def test_float_noise_in_risk_does_not_add_a_loss():
    n = 9000
    risk = float(np.mean(np.r_[np.ones(243), np.zeros(n - 243)]))
    assert bentkus_pvalue(risk, n, 0.03) == bentkus_pvalue(243 / n, n, 0.03)
    assert bentkus_pvalue(0.1 * 3, 10, 0.5) == pytest.approx(math.e * ref_binomial(3, 10, Fraction(1, 2)))
    assert pvalue("binomial", 0.1 * 3, 10, 0.5) == binomial_pvalue(3, 10, 0.5)


@pytest.mark.parametrize("method", PVALUE_METHODS)
def test_monotone_in_risk_and_alpha(method):
    n = 400
    risks = [k / n for k in range(0, 120)]
    ps = [pvalue(method, r, n, 0.15) for r in risks]
    assert all(a <= b + 1e-15 for a, b in zip(ps, ps[1:], strict=False))
    ps_alpha = [pvalue(method, 0.1, n, a) for a in (0.05, 0.1, 0.12, 0.15, 0.2)]
    assert all(a >= b - 1e-15 for a, b in zip(ps_alpha, ps_alpha[1:], strict=False))
    assert all(0.0 <= p <= 1.0 for p in ps + ps_alpha)


def test_hb_is_at_most_each_component():
    for n, r, alpha in FRACTIONAL_CASES + INTEGER_CASES:
        hb = hoeffding_bentkus_pvalue(float(r), n, float(alpha))
        assert hb <= bentkus_pvalue(float(r), n, float(alpha)) + 1e-15
        # The KL-form Chernoff term is never worse than plain Hoeffding.
        assert hb <= hoeffding_pvalue(float(r), n, float(alpha)) + 1e-15


@pytest.mark.parametrize("func", [hoeffding_pvalue, bentkus_pvalue, hoeffding_bentkus_pvalue])
def test_validation_errors(func):
    with pytest.raises(CalibrationError, match="n=0"):
        func(0.1, 0, 0.1)
    with pytest.raises(CalibrationError, match="not an integer"):
        func(0.1, 10.5, 0.1)
    for bad_alpha in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(UsageError, match="strictly between 0 and 1"):
            func(0.1, 10, bad_alpha)
    for bad_risk in (-0.01, 1.01, float("nan")):
        with pytest.raises(CalibrationError, match=r"outside \[0, 1\]"):
            func(bad_risk, 10, 0.1)


def test_binomial_validation_errors():
    with pytest.raises(CalibrationError, match="not a count"):
        binomial_pvalue(2.5, 10, 0.1)
    with pytest.raises(CalibrationError, match="not a count"):
        binomial_pvalue(11, 10, 0.1)
    with pytest.raises(CalibrationError, match="not a count"):
        binomial_pvalue(-1, 10, 0.1)
    with pytest.raises(UsageError):
        binomial_pvalue(1, 10, 1.0)
    with pytest.raises(CalibrationError, match="'hb'"):
        pvalue("binomial", 0.0375, 200, 0.1)  # 7.5 losses: not a 0/1 loss
    with pytest.raises(CalibrationError, match="binary=False"):
        hoeffding_bentkus_pvalue(0.0375, 200, 0.1, binary=True)
    assert binomial_pvalue(np.int64(3), np.int64(10), 0.5) == binomial_pvalue(3, 10, 0.5)
    assert binomial_pvalue(3.0, 10, 0.5) == binomial_pvalue(3, 10, 0.5)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(UsageError) as info:
        pvalue("wsr", 0.1, 100, 0.2)
    message = str(info.value)
    assert all(name in message for name in PVALUE_METHODS)
    assert "\n" not in message
    assert info.value.exit_code == 2
