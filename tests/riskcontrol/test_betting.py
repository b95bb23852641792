"""The WSR betting p-value: exact against a plain reference, FWER <= delta at the boundary null, power."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prunecp_cli.errors import CalibrationError, UsageError
from prunecp_cli.pipeline.risktest import risk_test
from prunecp_cli.riskcontrol.betting import ORDER_SEED, wsr_pvalue, wsr_pvalues
from prunecp_cli.riskcontrol.fixed_sequence import fixed_sequence_test
from prunecp_cli.riskcontrol.pvalues import hoeffding_bentkus_pvalue


def reference_wsr(losses: list[float], alpha: float, delta: float) -> float:
    """Bates et al. (2021) WSR wealth, one step at a time, written from the paper's formulas."""
    n = len(losses)
    wealth, best = 1.0, 0.0
    total, squares, var_before = 0.0, 0.0, 0.25
    for i, x in enumerate(losses, start=1):
        bet = min(1.0, math.sqrt(2 * math.log(1 / delta) / (n * var_before)))
        wealth *= 1 - bet * (x - alpha)
        best = max(best, wealth)
        total += x
        mu = (0.5 + total) / (1 + i)
        squares += (x - mu) ** 2
        var_before = (0.25 + squares) / (1 + i)
    return min(1.0, 1 / best)


SEQUENCES = {
    "constant half": [0.5] * 200,
    "mixed": [0.0, 0.5, 1.0, 0.5, 0.5, 0.0, 0.5, 0.5, 0.5, 1.0] * 30,
    "all zero": [0.0] * 50,
    "all one": [1.0] * 50,
    "one point": [0.2],
    "beta": np.random.default_rng(1).beta(1, 6, size=400).tolist(),
}


@pytest.mark.parametrize("name", list(SEQUENCES))
@pytest.mark.parametrize("alpha, delta", [(0.51, 0.1), (0.2, 0.05), (0.9, 0.5)])
def test_wsr_equals_the_reference_on_fixed_sequences(name, alpha, delta):
    seq = SEQUENCES[name]
    want = reference_wsr(seq, alpha, delta)
    assert float(wsr_pvalues(np.array(seq), alpha, delta=delta)) == pytest.approx(want, rel=1e-10, abs=1e-300)
    order = np.random.default_rng(ORDER_SEED).permutation(len(seq))
    assert wsr_pvalue(seq, alpha, delta=delta) == pytest.approx(reference_wsr(list(np.array(seq)[order]), alpha, delta),
                                                                rel=1e-10, abs=1e-300)


def test_vectorised_rows_are_independent_sequences():
    rows = np.random.default_rng(2).random((5, 60))
    got = wsr_pvalues(rows, 0.4, delta=0.1)
    assert got.shape == (5,)
    assert got == pytest.approx([reference_wsr(r.tolist(), 0.4, 0.1) for r in rows], rel=1e-10)


BOUNDARY = {  # loss values and probabilities whose mean is exactly the tested level
    "excess-error eps 0.02": (np.array([0.0, 0.5, 1.0]), np.array([0.015, 0.95, 0.035]), 0.51),
    "set-size K=10 B=2": (np.arange(10) / 9, np.array([0.3, 0.45, 0.15, 0.07, 0.03, 0, 0, 0, 0, 0]), None),
    "binary 0.1": (np.array([0.0, 1.0]), np.array([0.9, 0.1]), 0.1),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BOUNDARY))
def test_fwer_at_most_delta_at_the_boundary_null(name):
    """2,000 draws of n = 1,000 losses whose true risk equals the tested level at every grid level."""
    values, probs, level = BOUNDARY[name]
    level = float(values @ probs) if level is None else level
    assert values @ probs == pytest.approx(level)
    delta, draws, n = 0.1, 2000, 1000
    rng = np.random.default_rng(7)
    losses = rng.choice(values, p=probs, size=(draws, n))
    p0 = wsr_pvalues(losses, level, delta=delta)  # H_0 at the boundary: R = alpha
    p1 = wsr_pvalues(np.minimum(losses + 0.01, 1.0), level, delta=delta)  # a second level, R > alpha
    errors = sum(fixed_sequence_test([a, b], delta).n_certified > 0 for a, b in zip(p0, p1, strict=True))
    fwer = errors / draws
    print(f"{name}: FWER {fwer:.4f} at delta {delta} over {draws} draws")
    assert fwer <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)


@pytest.mark.slow
def test_wsr_certifies_where_hoeffding_bentkus_cannot():
    """The issue's case: excess error 0 with 5% disagreement, n = 5,000, eps = 0.01, delta = 0.1."""
    rng = np.random.default_rng(8)
    losses = rng.choice([0.0, 0.5, 1.0], p=[0.025, 0.95, 0.025], size=(300, 5000))
    alpha = (0.01 + 1) / 2
    wsr = (wsr_pvalues(losses, alpha, delta=0.1) <= 0.1).mean()
    hb = np.mean([hoeffding_bentkus_pvalue(r, 5000, alpha) <= 0.1 for r in losses.mean(axis=1)])
    print(f"certified: wsr {wsr:.3f}, hb {hb:.3f}")
    assert wsr >= 0.8 and hb == 0.0


def test_wsr_is_the_default_for_bounded_risks_and_uses_the_losses():
    excess = risk_test("excess-error", num_classes=10, max_risk=0.02, delta=0.1)
    assert excess.pvalue == "wsr"
    assert risk_test("error", num_classes=10, max_risk=0.02).pvalue == "binomial"
    assert risk_test("set-size", num_classes=10, max_set_size=2.0).pvalue == "wsr"
    losses = np.random.default_rng(3).choice([0.0, 0.5, 1.0], p=[0.02, 0.97, 0.01], size=3000)
    mean, p = excess.pvalue_of(losses)
    assert mean == pytest.approx(losses.mean()) and p == wsr_pvalue(losses, 0.51, delta=0.1)
    hb = risk_test("excess-error", num_classes=10, max_risk=0.02, delta=0.1, pvalue_method="hb")
    assert hb.pvalue_of(losses)[1] == hoeffding_bentkus_pvalue(losses.mean(), 3000, 0.51)


def test_wsr_errors():
    with pytest.raises(CalibrationError, match=r"\[0, 1\]"):
        wsr_pvalue([0.5, 1.5], 0.5, delta=0.1)
    with pytest.raises(CalibrationError, match="no examples"):
        wsr_pvalue([], 0.5, delta=0.1)
    with pytest.raises(UsageError, match="delta"):
        wsr_pvalue([0.5], 0.5, delta=1.0)
    with pytest.raises(UsageError, match="wsr"):
        risk_test("excess-error", num_classes=10, max_risk=0.02, pvalue_method="wsr-typo")
