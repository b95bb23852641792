"""Set metrics, observed fuzziness and certify p-values against exact references."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch

from prunecp_cli.conformal.stats import (
    coverage,
    covered_count,
    mean_set_size,
    observed_fuzziness,
    p_value_marginal,
    p_value_pac,
    per_class_coverage,
    set_size_histogram,
)

SETS = torch.tensor(
    [
        [True, False, False],
        [True, True, False],
        [False, False, False],
        [True, True, True],
        [False, True, False],
    ]
)
LABELS = torch.tensor([0, 2, 1, 1, 1])


def test_set_metrics_hand_made():
    assert covered_count(SETS, LABELS) == 3
    assert coverage(SETS, LABELS) == 3 / 5
    assert mean_set_size(SETS) == 7 / 5
    assert set_size_histogram(SETS) == [1, 2, 1, 1]
    assert per_class_coverage(SETS, LABELS, 4) == [1.0, 2 / 3, 0.0, None]
    with pytest.raises(ValueError):
        coverage(SETS[:0], LABELS[:0])
    with pytest.raises(ValueError):
        coverage(SETS.int(), LABELS)


def ref_fuzziness(cal: list[float], test: list[list[float]], labels: list[int]) -> Fraction:
    n, total = len(cal), Fraction(0)
    for row, y_true in zip(test, labels, strict=True):
        for y, s in enumerate(row):
            if y != y_true:
                total += Fraction(sum(1 for c in cal if c >= s) + 1, n + 1)
    return total / len(test)


def test_observed_fuzziness_against_double_loop():
    gen = torch.Generator().manual_seed(3)
    # Rounded scores give many ties between calibration and test scores (the >= must count them).
    cal = (torch.rand(57, generator=gen, dtype=torch.float64) * 20).round() / 20
    test = (torch.rand(40, 6, generator=gen, dtype=torch.float64) * 20).round() / 20
    labels = torch.randint(0, 6, (40,), generator=gen)
    want = ref_fuzziness(cal.tolist(), test.tolist(), labels.tolist())
    assert observed_fuzziness(cal, test, labels) == float(want)
    # float32 calibration scores against float64 test scores, unsorted input.
    cal32 = cal.float()[torch.randperm(57, generator=gen)]
    want32 = ref_fuzziness([float(v) for v in cal32.tolist()], test.tolist(), labels.tolist())
    assert observed_fuzziness(cal32, test, labels) == float(want32)


def test_observed_fuzziness_hand_made():
    cal = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    test = torch.tensor([[0.05, 0.5, 1.0]], dtype=torch.float64)
    # True label 0: false labels 1 (two cal >= 0.5 -> 3/4) and 2 (none -> 1/4).
    assert observed_fuzziness(cal, test, torch.tensor([0])) == 1.0
    assert observed_fuzziness(cal, test, torch.tensor([2])) == (4 + 3) / 4


def ref_beta_binomial_cdf(c: int, m: int, n: int, k: int) -> Fraction:
    """P(X <= c), X ~ BetaBinomial(m, k, n+1-k), from factorials: B(x, y) = (x-1)!(y-1)!/(x+y-1)!."""
    a, b = k, n + 1 - k

    def beta(x: int, y: int) -> Fraction:
        return Fraction(math.factorial(x - 1) * math.factorial(y - 1), math.factorial(x + y - 1))

    return sum((math.comb(m, j) * beta(j + a, m - j + b) / beta(a, b) for j in range(c + 1)), Fraction(0))


@pytest.mark.parametrize(
    ("m", "n", "k"), [(1, 1, 1), (7, 9, 9), (50, 20, 18), (200, 99, 90), (300, 500, 451)]
)
def test_p_value_marginal_exact(m: int, n: int, k: int):
    for c in sorted({0, 1, m // 3, m // 2, (m * 8) // 10, m - 1, m}):
        want = ref_beta_binomial_cdf(c, m, n, k)
        got = p_value_marginal(c, m, n=n, k=k)
        assert got == pytest.approx(float(want), rel=1e-9, abs=1e-300), c


def test_beta_binomial_is_the_permutation_distribution():
    """Count of test points below the k-th smallest of n calibration points, all ranks equally likely."""
    for n, m, k in [(3, 3, 2), (4, 3, 4), (5, 4, 3)]:
        counts = [0] * (m + 1)
        for cal in itertools.combinations(range(n + m), n):  # positions of calibration points in rank order
            qhat_rank = cal[k - 1]
            covered = sum(1 for r in range(n + m) if r not in cal and r < qhat_rank)
            counts[covered] += 1
        total = sum(counts)
        for c in range(m + 1):
            want = Fraction(sum(counts[: c + 1]), total)
            assert p_value_marginal(c, m, n=n, k=k) == pytest.approx(float(want), rel=1e-12)


def ref_binomial_cdf(c: int, m: int, alpha: str) -> Fraction:
    a = 1 - Fraction(alpha)
    return sum((math.comb(m, j) * a**j * (1 - a) ** (m - j) for j in range(c + 1)), Fraction(0))


@pytest.mark.parametrize(
    ("m", "alpha"), [(1, "0.1"), (10, "0.1"), (100, "0.05"), (697, "0.1"), (1000, "0.3")]
)
def test_p_value_pac_exact(m: int, alpha: str):
    for c in sorted({0, 1, m // 2, (m * 85) // 100, m - 1, m}):
        want = ref_binomial_cdf(c, m, alpha)
        assert p_value_pac(c, m, alpha=float(alpha)) == pytest.approx(float(want), rel=1e-9, abs=1e-300), c


def test_p_value_arguments():
    with pytest.raises(ValueError):
        p_value_marginal(5, 4, n=10, k=9)
    with pytest.raises(ValueError):
        p_value_marginal(1, 4, n=10, k=11)
    with pytest.raises(ValueError):
        p_value_pac(-1, 4, alpha=0.1)
    assert p_value_marginal(4, 4, n=10, k=9) == 1.0
    assert p_value_pac(4, 4, alpha=0.1) == 1.0
