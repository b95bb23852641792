"""Tests for fixed-sequence testing, including a Monte Carlo check of Learn-then-Test's FWER."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy.special import bdtr

from prunecp_cli.errors import CalibrationError, UsageError
from prunecp_cli.riskcontrol.fixed_sequence import (
    FixedSequenceResult,
    fixed_sequence_search,
    fixed_sequence_test,
)
from prunecp_cli.riskcontrol.losses import excess_error_alpha, excess_error_loss
from prunecp_cli.riskcontrol.pvalues import binomial_pvalue, hoeffding_bentkus_pvalue

# ---------------------------------------------------------------------------------------------
# The procedure on hand-made p-values.


def test_stops_at_first_failure():
    res = fixed_sequence_test([0.01, 0.02, 0.2, 0.01, 0.0], delta=0.05)
    assert res.last_certified == 1
    assert res.tested == 3
    assert res.rejected == [True, True, False, False, False]  # p_3 < delta but never tested
    assert res.pvalues == [0.01, 0.02, 0.2, 0.01, 0.0]
    assert res.n_certified == 2


def test_nothing_certified_is_none_not_minus_one():
    res = fixed_sequence_test([0.06, 0.0, 0.0], delta=0.05)
    assert res.last_certified is None
    assert res.tested == 1
    assert res.rejected == [False, False, False]
    assert res.n_certified == 0
    assert fixed_sequence_test([1.0], delta=0.5).last_certified is None


def test_rejection_is_non_strict():
    assert fixed_sequence_test([0.05, 0.05000001], delta=0.05).last_certified == 0
    assert fixed_sequence_test([0.1, 0.2], delta=0.1).last_certified == 0


def test_all_rejected():
    res = fixed_sequence_test([0.0, 0.001, 0.04], delta=0.05)
    assert res.last_certified == 2
    assert res.tested == 3
    assert res.rejected == [True, True, True]


def test_result_is_frozen():
    res = fixed_sequence_test([0.0], delta=0.05)
    assert isinstance(res, FixedSequenceResult)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.last_certified = 3


def test_lazy_search_evaluates_nothing_after_the_first_failure():
    pvals = {10: 0.0, 20: 0.03, 30: 0.5, 40: 0.0, 50: 0.0}
    calls: list[int] = []

    def evaluate(level):
        calls.append(level)
        if level > 30:
            raise AssertionError(f"evaluated level {level} after the first failure")
        return pvals[level]

    res = fixed_sequence_search([10, 20, 30, 40, 50], evaluate, delta=0.05)
    assert calls == [10, 20, 30]
    assert res.last_certified == 1
    assert res.tested == 3
    assert res.rejected == [True, True, False]
    assert res.pvalues == [0.0, 0.03, 0.5]


def test_lazy_search_first_failure_and_all_pass():
    calls = []
    res = fixed_sequence_search(["a", "b"], lambda lv: calls.append(lv) or 0.9, delta=0.1)
    assert (res.last_certified, res.tested, calls) == (None, 1, ["a"])
    res = fixed_sequence_search(range(4), lambda lv: 0.01, delta=0.1)
    assert (res.last_certified, res.tested, res.rejected) == (3, 4, [True] * 4)


def test_lazy_and_eager_agree_on_random_pvalues():
    rng = np.random.default_rng(0)
    for _ in range(300):
        ps = list(rng.choice([0.0, 0.01, 0.05, 0.049, 0.051, 0.3], size=int(rng.integers(1, 8))))
        eager = fixed_sequence_test(ps, 0.05)
        lazy = fixed_sequence_search(range(len(ps)), lambda j, ps=ps: ps[j], 0.05)
        assert lazy.last_certified == eager.last_certified
        assert lazy.tested == eager.tested
        assert lazy.pvalues == eager.pvalues[: eager.tested]
        assert lazy.rejected == eager.rejected[: eager.tested]


def test_validation():
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(UsageError, match="delta"):
            fixed_sequence_test([0.01], bad)
        with pytest.raises(UsageError, match="delta"):
            fixed_sequence_search([1], lambda lv: pytest.fail("evaluated before validating delta"), bad)
    with pytest.raises(UsageError, match="empty"):
        fixed_sequence_test([], 0.05)
    with pytest.raises(UsageError, match="empty"):
        fixed_sequence_search([], lambda lv: 0.0, 0.05)
    for bad_p in (float("nan"), -0.1, 1.5):
        with pytest.raises(CalibrationError, match="p-value #1"):
            fixed_sequence_test([0.0, bad_p], 0.05)
        with pytest.raises(CalibrationError, match="p-value #0"):
            fixed_sequence_search([0], lambda lv, p=bad_p: p, 0.05)


# ---------------------------------------------------------------------------------------------
# Family-wise error rate of Learn-then-Test by simulation (n = 500, delta = 0.1).

N_DRAWS, N_CAL, ALPHA, DELTA = 2000, 500, 0.1, 0.1
FWER_BOUND = DELTA + 3 * math.sqrt(DELTA * (1 - DELTA) / N_DRAWS)
# Monotone true risk curve over the grid: below alpha, exactly alpha (index 5), then above.
RISKS = np.array([0.02, 0.04, 0.06, 0.08, 0.09, 0.10, 0.105, 0.12, 0.15, 0.25])
FIRST_BAD = int(np.argmax(RISKS > ALPHA))


def run_ltt(risk_hat: np.ndarray, pvalue_fn) -> np.ndarray:
    """Certified index per draw (-1 when none) from an (N_DRAWS, levels) empirical-risk table."""
    out = np.empty(len(risk_hat), dtype=int)
    for d, row in enumerate(risk_hat):
        res = fixed_sequence_search(range(len(row)), lambda j, row=row: pvalue_fn(float(row[j])), DELTA)
        out[d] = -1 if res.last_certified is None else res.last_certified
    return out


@pytest.fixture(scope="module")
def bernoulli_risk_hat() -> np.ndarray:
    """0/1 losses coupled across levels, as for nested pruning: loss_ij = 1[U_i < R_j]."""
    rng = np.random.default_rng(12345)
    u = rng.random((N_DRAWS, N_CAL, 1))
    return (u < RISKS).sum(axis=1) / N_CAL


BINARY_METHODS = {
    "binomial": lambda r: binomial_pvalue(round(r * N_CAL), N_CAL, ALPHA),
    "hb-binary": lambda r: hoeffding_bentkus_pvalue(r, N_CAL, ALPHA, binary=True),
    "hb-with-e": lambda r: hoeffding_bentkus_pvalue(r, N_CAL, ALPHA),
}


@pytest.mark.parametrize("method", BINARY_METHODS)
def test_fwer_and_power_with_binary_losses(bernoulli_risk_hat, method):
    certified = run_ltt(bernoulli_risk_hat, BINARY_METHODS[method])
    violation = certified >= FIRST_BAD  # certified a level whose true risk exceeds alpha
    fwer = violation.mean()
    assert fwer <= FWER_BOUND, f"{method}: FWER {fwer:.4f} > {FWER_BOUND:.4f}"
    # Power: the level with risk 0.06 (alpha - 0.04) is certified in most draws.
    assert (certified >= 2).mean() >= 0.9
    if method != "hb-with-e":
        # The binomial test is exact: with the coupled losses, a violation happens iff the count at
        # risk 0.105 is at most the largest certifiable count k*, so FWER = F_Bin(k*; n, 0.105).
        k_star = max(k for k in range(N_CAL + 1) if binomial_pvalue(k, N_CAL, ALPHA) <= DELTA)
        expected = bdtr(k_star, N_CAL, RISKS[FIRST_BAD])
        se = math.sqrt(expected * (1 - expected) / N_DRAWS)
        assert abs(fwer - expected) <= 4 * se, (fwer, expected)
        assert fwer > 0.02  # the simulation reaches the boundary, so the bound above has teeth


def test_simulation_detects_an_invalid_procedure(bernoulli_risk_hat):
    """Plug-in rule "certify if risk_hat <= alpha" must blow the FWER bound in this simulation."""
    certified = run_ltt(bernoulli_risk_hat, lambda r: 0.0 if r <= ALPHA else 1.0)
    assert (certified >= FIRST_BAD).mean() > FWER_BOUND + 0.1


def test_fwer_and_power_with_bounded_excess_error_losses():
    """Losses in {0, 1/2, 1} from excess_error_loss, certified with HB at alpha' = (alpha + 1)/2."""
    rng = np.random.default_rng(777)
    dense_error = 0.2
    excess = np.array([-0.1, -0.05, 0.0, 0.05, 0.08, 0.1, 0.12, 0.15, 0.3])  # index 5 == alpha
    labels = np.zeros((N_DRAWS, N_CAL), dtype=np.int64)
    dense_top1 = (rng.random((N_DRAWS, N_CAL)) < dense_error).astype(np.int64)  # 1 = wrong class
    u = rng.random((N_DRAWS, N_CAL))
    risk_hat = np.empty((N_DRAWS, len(excess)))
    for j, e in enumerate(excess):
        pruned_top1 = (u < dense_error + e).astype(np.int64)
        losses = excess_error_loss(pruned_top1, dense_top1, labels)
        assert set(np.unique(losses)) <= {0.0, 0.5, 1.0}
        risk_hat[:, j] = losses.mean(axis=1)
    alpha_prime = excess_error_alpha(ALPHA)
    certified = run_ltt(risk_hat, lambda r: hoeffding_bentkus_pvalue(r, N_CAL, alpha_prime))
    first_bad = int(np.argmax(excess > ALPHA))
    assert (certified >= first_bad).mean() <= FWER_BOUND
    assert (certified >= 1).mean() >= 0.9  # excess risk -0.05 is certified most of the time
