"""Tests for prunecp_cli.riskcontrol.losses on hand-made predictions."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from prunecp_cli.errors import DataError, UsageError
from prunecp_cli.riskcontrol.betting import wsr_pvalue
from prunecp_cli.riskcontrol.losses import (
    RISKS,
    disagreement_loss,
    error_loss,
    excess_error_alpha,
    excess_error_loss,
    get_risk,
    set_size_alpha,
    set_size_loss,
)
from prunecp_cli.riskcontrol.pvalues import pvalue

PRUNED = [0, 1, 2, 3, 4, 5]
DENSE = [0, 1, 9, 3, 7, 5]
LABELS = [0, 2, 2, 3, 7, 1]


def test_disagreement_loss_numpy():
    loss = disagreement_loss(np.array(PRUNED), np.array(DENSE))
    assert isinstance(loss, np.ndarray)
    assert loss.dtype == np.float64
    assert loss.tolist() == [0, 0, 1, 0, 1, 0]


def test_error_loss_numpy_and_lists():
    assert error_loss(np.array(PRUNED), np.array(LABELS)).tolist() == [0, 1, 0, 0, 1, 1]
    assert error_loss(PRUNED, LABELS).tolist() == [0, 1, 0, 0, 1, 1]


def test_excess_error_loss_values():
    # pruned wrong:  0 1 0 0 1 1 ; dense wrong: 0 1 1 0 0 1 ; raw: 0 0 -1 0 1 0
    loss = excess_error_loss(np.array(PRUNED), np.array(DENSE), np.array(LABELS))
    assert loss.tolist() == [0.5, 0.5, 0.0, 0.5, 1.0, 0.5]
    raw = error_loss(PRUNED, LABELS) - error_loss(DENSE, LABELS)
    assert np.array_equal(loss, (raw + 1) / 2)


def test_excess_error_rescaling_equivalence():
    """mean(l') <= (alpha + 1)/2  <=>  mean(raw excess) <= alpha, checked in exact arithmetic."""
    rng = np.random.default_rng(3)
    for _ in range(500):
        n = int(rng.integers(1, 60))
        labels = rng.integers(0, 3, n)
        pruned, dense = rng.integers(0, 3, n), rng.integers(0, 3, n)
        loss = excess_error_loss(pruned, dense, labels)
        raw_sum = int((pruned != labels).sum()) - int((dense != labels).sum())
        alpha = Fraction(int(rng.integers(1, 20)), 20)
        rescaled = Fraction(int(round(loss.sum() * 2)), 2 * n)  # losses are multiples of 1/2
        assert rescaled == (Fraction(raw_sum, n) + 1) / 2
        assert (rescaled <= (alpha + 1) / 2) == (Fraction(raw_sum, n) <= alpha)
        assert excess_error_alpha(float(alpha)) == pytest.approx(float((alpha + 1) / 2))
    assert excess_error_alpha(0.05) == pytest.approx(0.525)
    with pytest.raises(UsageError):
        excess_error_alpha(0.0)


def test_set_size_loss_and_alpha():
    k = 10
    loss = set_size_loss(np.array([0, 1, 2, 10]), 3, k)
    assert loss.dtype == np.float64
    assert loss.tolist() == pytest.approx([0.0, 0.0, 1 / 9, 1.0])
    assert set_size_alpha(2, k) == pytest.approx(1 / 9)
    assert set_size_alpha(5.5, k) == pytest.approx(0.5)


def test_set_size_equivalence_for_nonempty_sets():
    rng = np.random.default_rng(4)
    k = 7
    for _ in range(300):
        sizes = rng.integers(1, k + 1, int(rng.integers(1, 40)))
        bound = Fraction(int(rng.integers(3, 2 * k - 2)), 2)  # B in (1, K), half-integers
        loss_sum = Fraction(int(round(set_size_loss(sizes, float(bound), k).sum() * (k - 1))), k - 1)
        mean_loss = loss_sum / len(sizes)
        level = (bound - 1) / (k - 1)
        assert (mean_loss <= level) == (Fraction(int(sizes.sum()), len(sizes)) <= bound)
        assert set_size_alpha(float(bound), k) == pytest.approx(float(level))


def test_set_size_validation():
    with pytest.raises(DataError, match=r"\[0, 10\]"):
        set_size_loss(np.array([1, 11]), 2, 10)
    with pytest.raises(DataError):
        set_size_loss(np.array([-1, 1]), 2, 10)
    for bad_bound in (1, 0.5, 10, 12):
        with pytest.raises(UsageError, match="strictly between"):
            set_size_alpha(bad_bound, 10)
        with pytest.raises(UsageError):
            set_size_loss(np.array([1, 2]), bad_bound, 10)
    with pytest.raises(UsageError, match="at least 2"):
        set_size_alpha(1.5, 1)
    with pytest.raises(UsageError, match="integer"):
        set_size_alpha(1.5, 10.0)
    assert set_size_loss(np.array([], dtype=np.int64), 2, 10).shape == (0,)


def test_shape_mismatch_is_a_data_error():
    with pytest.raises(DataError, match="differ in shape"):
        disagreement_loss(np.zeros(3), np.zeros(4))
    with pytest.raises(DataError, match="labels"):
        excess_error_loss(np.zeros(3), np.zeros(3), np.zeros(2))


def test_torch_inputs_stay_torch():
    torch = pytest.importorskip("torch")
    pruned, dense, labels = torch.tensor(PRUNED), torch.tensor(DENSE), torch.tensor(LABELS)
    for loss in (
        disagreement_loss(pruned, dense),
        error_loss(pruned, labels),
        excess_error_loss(pruned, dense, labels),
        set_size_loss(torch.tensor([0, 1, 2, 10]), 3, 10),
    ):
        assert isinstance(loss, torch.Tensor)
        assert loss.dtype == torch.float64
    assert disagreement_loss(pruned, dense).tolist() == [0, 0, 1, 0, 1, 0]
    assert excess_error_loss(pruned, dense, labels).tolist() == [0.5, 0.5, 0.0, 0.5, 1.0, 0.5]
    assert error_loss(pruned, np.array(LABELS)).tolist() == [0, 1, 0, 0, 1, 1]  # mixed backends


def test_registry():
    assert set(RISKS) == {"disagreement", "error", "excess-error", "set-size"}
    table = {name: (s.needs_labels, s.binary, s.pvalue_method, s.target) for name, s in RISKS.items()}
    assert table == {
        "disagreement": (False, True, "binomial", "alpha"),
        "error": (True, True, "binomial", "alpha"),
        "excess-error": (True, False, "wsr", "alpha"),
        "set-size": (False, False, "wsr", "max_size"),
    }
    assert RISKS["disagreement"].loss_alpha(0.03) == 0.03
    assert RISKS["error"].loss_alpha(0.03) == 0.03
    assert RISKS["excess-error"].loss_alpha(0.03) == pytest.approx(0.515)
    assert RISKS["set-size"].loss_alpha(2.0, num_classes=10) == pytest.approx(1 / 9)
    with pytest.raises(UsageError, match="number of classes"):
        RISKS["set-size"].loss_alpha(2.0)
    with pytest.raises(UsageError):
        RISKS["error"].loss_alpha(1.5)
    assert RISKS["error"].loss is error_loss
    with pytest.raises(TypeError):
        RISKS["new"] = RISKS["error"]  # read-only registry


def test_get_risk():
    assert get_risk("excess-error") is RISKS["excess-error"]
    with pytest.raises(UsageError) as info:
        get_risk("iou")
    assert all(name in str(info.value) for name in RISKS)


def test_registry_losses_feed_their_pvalue():
    """Binary losses give integer counts (binomial accepts them); bounded ones go through WSR (or HB)."""
    for name in ("disagreement", "error"):
        spec = RISKS[name]
        loss = spec.loss(PRUNED, LABELS) if spec.needs_labels else spec.loss(PRUNED, DENSE)
        assert 0.0 <= pvalue(spec.pvalue_method, float(loss.mean()), len(loss), spec.loss_alpha(0.5)) <= 1.0
    spec = RISKS["excess-error"]
    loss = spec.loss(PRUNED, DENSE, LABELS)
    assert spec.pvalue_method == "wsr"
    assert 0.0 < wsr_pvalue(np.asarray(loss), spec.loss_alpha(0.5), delta=0.1) <= 1.0
    p = pvalue("hb", float(loss.mean()), len(loss), spec.loss_alpha(0.5), binary=spec.binary)
    assert 0.0 <= p <= 1.0
