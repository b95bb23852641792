"""Ranks, quantiles and guarantees against exact integer/rational references."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch

from prunecp_cli.conformal.quantile import (
    QuantileResult,
    class_conditional_quantiles,
    conformal_quantile,
    conformal_rank,
    guarantee,
    min_calibration_size,
    pac_rank,
)
from prunecp_cli.errors import CalibrationError, DataError, UsageError

ALPHAS = [
    "0.1",
    "0.05",
    "0.01",
    "0.2",
    "0.3",
    "0.15",
    "0.001",
    "0.07",
    "0.33",
    "0.5",
    "0.9",
    "0.025",
    "0.12",
    "0.18",
    "0.176",
    "0.059",
]


def decimal_ratio(text: str) -> tuple[int, int]:
    """'0.07' -> (7, 100), by string handling alone."""
    whole, frac = text.split(".")
    return int(whole + frac), 10 ** len(frac)


def ref_rank(n: int, text: str) -> int:
    """ceil((n+1)(1 - p/q)) in integer arithmetic."""
    p, q = decimal_ratio(text)
    num = (n + 1) * (q - p)
    return -(-num // q)


def ref_pac_rank(n: int, alpha: str, delta: str) -> int:
    """min k with P(Bin(n, 1-alpha) >= k) <= delta, by exact sums of integers."""
    p, q = decimal_ratio(alpha)
    dp, dq = decimal_ratio(delta)
    # P(X = j) = C(n, j) (q-p)^j p^(n-j) / q^n; compare tails times q^n * dq exactly.
    tail, k = 0, n + 1
    while k >= 1:
        term = math.comb(n, k - 1) * (q - p) ** (k - 1) * p ** (n - k + 1)
        if (tail + term) * dq > dp * q**n:
            return k
        tail += term
        k -= 1
    return 1


def test_conformal_rank_matches_exact_reference():
    for text in ALPHAS:
        alpha = float(text)
        for n in range(0, 2001):
            assert conformal_rank(n, alpha) == ref_rank(n, text), (n, text)


def test_conformal_rank_float_trap():
    # The naive float formula overshoots here (150 * 0.82 = 123 exactly); the exact one must not.
    assert math.ceil((149 + 1) * (1 - 0.18)) == 124
    assert conformal_rank(149, 0.18) == 123
    assert math.ceil((999 + 1) * (1 - 0.059)) == 942
    assert conformal_rank(999, 0.059) == 941
    assert conformal_rank(9, 0.1) == 9
    assert conformal_rank(19, 0.05) == 19
    assert conformal_rank(99, 0.01) == 99
    assert conformal_rank(9, Fraction(1, 10)) == 9


@pytest.mark.parametrize(
    ("n", "delta", "level"), [(1000, 0.1, 0.913), (1000, 0.05, 0.916), (5000, 0.05, 0.9072)]
)
def test_pac_rank_worked_examples(n: int, delta: float, level: float):
    k = pac_rank(n, 0.1, delta)
    assert k == round(level * n)
    assert k == ref_pac_rank(n, "0.1", str(delta))


def test_pac_rank_matches_exact_reference():
    for n in (1, 2, 5, 10, 22, 29, 30, 50, 100, 257, 1000):
        for alpha in ("0.1", "0.05", "0.2", "0.5"):
            for delta in ("0.1", "0.05", "0.01", "0.5"):
                assert pac_rank(n, float(alpha), float(delta)) == ref_pac_rank(n, alpha, delta), (
                    n,
                    alpha,
                    delta,
                )


def test_min_calibration_size():
    assert min_calibration_size(0.01) == 99
    assert min_calibration_size(0.1) == 9
    assert min_calibration_size(0.5) == 1
    for text in ALPHAS:
        want = next(n for n in range(1, 10**4) if ref_rank(n, text) <= n)
        assert min_calibration_size(float(text)) == want
    for alpha, delta in [
        ("0.1", "0.05"),
        ("0.1", "0.1"),
        ("0.05", "0.01"),
        ("0.2", "0.5"),
        ("0.01", "0.1"),
        ("0.5", "0.25"),
    ]:
        a, d = Fraction(alpha), Fraction(delta)
        want = next(n for n in range(1, 10**4) if (1 - a) ** n <= d)
        got = min_calibration_size(float(alpha), float(delta))
        assert got == want
        assert pac_rank(got, float(alpha), float(delta)) <= got
        assert pac_rank(got - 1, float(alpha), float(delta)) > got - 1
    assert min_calibration_size(0.1, 0.05) == 29  # 0.9^29 = 0.047 <= 0.05 < 0.9^28


def test_quantile_with_ties_hand_made():
    scores = torch.tensor([0.1, 0.5, 0.5, 0.2, 0.9, 0.3, 0.5, 0.7, 0.4], dtype=torch.float64)  # n = 9
    for alpha, k, qhat in [
        (0.1, 9, 0.9),
        (0.2, 8, 0.7),
        (0.4, 6, 0.5),
        (0.45, 6, 0.5),
        (0.5, 5, 0.5),
        (0.7, 3, 0.3),
    ]:
        result = conformal_quantile(scores, alpha)
        assert (result.k, result.qhat, result.n, result.kind) == (k, qhat, 9, "marginal")
        assert result.level == k / 9
        # Independent definition: the smallest score q with #{s_i <= q} >= (1-alpha)(n+1).
        want = min(
            s
            for s in scores.tolist()
            if sum(v <= s for v in scores.tolist()) >= (1 - Fraction(str(alpha))) * 10
        )
        assert result.qhat == want


def test_quantile_random_against_definition():
    gen = torch.Generator().manual_seed(0)
    for n in (9, 10, 37, 200):
        scores = torch.rand(n, generator=gen, dtype=torch.float64).round(decimals=2)  # plenty of ties
        values = scores.tolist()
        for alpha in (0.1, 0.05, 0.25):
            if ref_rank(n, str(alpha)) > n:
                continue
            want = min(
                s for s in values if sum(v <= s for v in values) >= (1 - Fraction(str(alpha))) * (n + 1)
            )
            assert conformal_quantile(scores, alpha).qhat == want


def test_too_few_points_names_the_minimum():
    with pytest.raises(
        CalibrationError, match=r"n=8 .*alpha=0\.1.*k=9 exceeds n.*at least 9 calibration points"
    ):
        conformal_quantile(torch.rand(8), 0.1)
    with pytest.raises(CalibrationError, match=r"n=40 .*at least 99 "):
        conformal_quantile(torch.rand(40), 0.01)
    with pytest.raises(CalibrationError, match=r"n=28 .*delta=0\.05.*at least 29 .*delta"):
        conformal_quantile(torch.rand(28), 0.1, delta=0.05)
    with pytest.raises(CalibrationError, match="n=0"):
        conformal_quantile(torch.zeros(0), 0.1)
    assert conformal_quantile(torch.arange(9.0), 0.1).qhat == 8.0  # n just large enough
    assert conformal_quantile(torch.arange(29.0), 0.1, delta=0.05).k == 29


def test_bad_inputs():
    with pytest.raises(UsageError, match="alpha=0"):
        conformal_quantile(torch.rand(10), 0.0)
    with pytest.raises(UsageError, match="delta=1.5"):
        conformal_quantile(torch.rand(10), 0.1, delta=1.5)
    with pytest.raises(CalibrationError, match="NaN or infinite"):
        conformal_quantile(torch.tensor([0.1, float("nan")] * 20), 0.1)


def test_pac_quantile():
    scores = torch.arange(1000, dtype=torch.float64).flip(0)
    result = conformal_quantile(scores, 0.1, delta=0.05)
    assert result == QuantileResult(
        qhat=915.0, k=916, n=1000, level=0.916, kind="training-conditional", alpha=0.1, delta=0.05
    )


def test_class_conditional():
    scores = torch.tensor([0.9, 0.1, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6, 0.5, 0.05] * 2, dtype=torch.float64)
    labels = torch.tensor([0] * 10 + [1] * 10)
    results = class_conditional_quantiles(scores, labels, 2, 0.2)  # n=10 each: k = ceil(11*0.8) = 9
    assert [(r.n, r.k, r.qhat) for r in results] == [(10, 9, 0.8), (10, 9, 0.8)]
    labels = torch.tensor([0] * 9 + [1] * 6 + [3] * 5)
    with pytest.raises(CalibrationError) as info:
        class_conditional_quantiles(scores, labels, 5, 0.1)
    message = str(info.value)
    for part in (
        "class 1 has 6 of 9",
        "class 2 has 0 of 9",
        "class 3 has 5 of 9",
        "class 4 has 0 of 9",
        "4 of 5 classes",
    ):
        assert part in message
    assert "class 0" not in message and "\n" not in message
    with pytest.raises(DataError):
        class_conditional_quantiles(scores, labels, 3, 0.1)


def test_guarantee_marginal_and_pac():
    scores = torch.linspace(0, 1, 100, dtype=torch.float64)
    result = conformal_quantile(scores, 0.1)
    g = guarantee(result, label_scores=scores)
    assert json.loads(json.dumps(g)) == g
    assert g["type"] == "marginal" and g["confidence"] is None
    assert g["coverage_at_least"] == 0.9
    assert g["coverage_at_most"] == float(Fraction(9, 10) + Fraction(1, 101))
    assert "at least 0.9 " in g["statement"] and "at most 0.909901" in g["statement"]  # 0.90990099 rounded up
    tied = scores.clone()
    tied[3] = tied[4]
    g = guarantee(conformal_quantile(tied, 0.1), label_scores=tied)
    assert g["coverage_at_most"] is None and "ties" in g["statement"]
    g = guarantee(conformal_quantile(scores, 0.1, delta=0.1), label_scores=scores)
    assert g["type"] == "training-conditional"
    assert (g["coverage_at_least"], g["coverage_at_most"], g["confidence"]) == (0.9, None, 0.9)
    assert "at least 0.9 over the draw of the 100" in g["statement"]
    with pytest.raises(ValueError):
        guarantee(result, label_scores=scores[:50])


def test_guarantee_never_rounds_a_claim_up():
    scores = torch.rand(10**4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = guarantee(conformal_quantile(scores, 1.234567e-4), label_scores=scores)
    assert "at least 0.999876 " in g["statement"]  # 0.9998765433 rounded down, never to 1
