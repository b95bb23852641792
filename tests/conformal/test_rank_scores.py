"""Top-K, SAPS and Margin, value by value against hand references written from the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from prunecp_cli.conformal.nonconformity import (
    NONCONFORMITY,
    SAPS,
    Margin,
    TopK,
    from_parameters,
    prediction_sets,
)
from prunecp_cli.errors import CertificateError, UsageError
from prunecp_cli.pipeline.calibration import make_nonconformity

LOGITS = torch.tensor([
    [2.0, 1.0, 0.0, 0.5],
    [0.0, 0.0, 3.0, 1.0],   # a tie between labels 0 and 1: label 0 ranks first
    [-1.0, 4.0, 4.0, 0.0],  # a tie at the top
    [0.3, 0.2, 0.1, 0.0],
])


def softmax_rows(logits: torch.Tensor) -> list[list[float]]:
    rows = []
    for row in logits.tolist():
        top = max(row)
        e = [math.exp(v - top) for v in row]
        rows.append([v / sum(e) for v in e])
    return rows


def rank(p: list[float], y: int) -> int:
    """1-based rank of y, probabilities descending, ties by lower label index."""
    return sorted(range(len(p)), key=lambda j: (-p[j], j)).index(y) + 1


def ref_topk(p, y, u):
    return rank(p, y) - 1 + u


def ref_saps(p, y, u, weight):
    """Huang et al. (2023), Eq. (5)."""
    o = rank(p, y)
    return u * max(p) if o == 1 else max(p) + (o - 2 + u) * weight


def ref_margin(p, y):
    return max(v for j, v in enumerate(p) if j != y) - p[y]


def _uniforms(score, n):
    return torch.rand(n, dtype=torch.float64, generator=score.make_generator(stream=0)).tolist()


@pytest.mark.parametrize("randomized", [False, True])
def test_topk_values(randomized):
    score = TopK(randomized=randomized, seed=4)
    got = score.all_scores(LOGITS).tolist()
    us = _uniforms(score, 4) if randomized else [1.0] * 4
    for i, p in enumerate(softmax_rows(LOGITS)):
        for y in range(4):
            assert got[i][y] == pytest.approx(ref_topk(p, y, us[i]), abs=1e-15)
    if not randomized:
        assert got[1] == [3.0, 4.0, 1.0, 2.0] and got[2] == [4.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("randomized, weight", [(False, 0.2), (True, 0.05), (True, 0.6)])
def test_saps_values(randomized, weight):
    score = SAPS(weight=weight, randomized=randomized, seed=5)
    got = score.all_scores(LOGITS).tolist()
    us = _uniforms(score, 4) if randomized else [1.0] * 4
    for i, p in enumerate(softmax_rows(LOGITS)):
        for y in range(4):
            assert got[i][y] == pytest.approx(ref_saps(p, y, us[i], weight), abs=1e-14)


def test_margin_values():
    got = Margin().all_scores(LOGITS).tolist()
    for i, p in enumerate(softmax_rows(LOGITS)):
        for y in range(4):
            assert got[i][y] == pytest.approx(ref_margin(p, y), abs=1e-15)
    assert got[2][1] == got[2][2] == 0.0  # a tie at the top: both labels have margin 0


@pytest.mark.parametrize("score", [TopK(), TopK(randomized=True, seed=1), SAPS(), SAPS(randomized=True, seed=1),
                                   Margin()])
def test_sets_are_nested_in_the_ranking_and_labels_agree(score):
    """Scores grow along each example's ranking (sets are top-k prefixes), and label_scores gathers all_scores."""
    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    scores = score.all_scores(logits, generator=score.make_generator(stream=3))
    order = torch.sort(torch.softmax(logits.double(), 1), dim=1, descending=True, stable=True).indices
    assert bool((scores.gather(1, order).diff(dim=1) >= 0).all())
    labels = torch.arange(50) % 7
    assert torch.equal(score.label_scores(logits, labels, generator=score.make_generator(stream=3)),
                       scores.gather(1, labels[:, None]).squeeze(1))
    sets = prediction_sets(scores, float(scores.median()))
    assert sets.dtype == torch.bool and sets.shape == (50, 7)


def test_registry_parameters_and_errors():
    assert {"topk", "saps", "margin"} <= set(NONCONFORMITY)
    saps = SAPS(weight=0.3, randomized=True, seed=2)
    assert saps.parameters() == {"randomized": True, "seed": 2, "weight": 0.3}
    rebuilt = from_parameters("saps", saps.parameters())
    assert torch.equal(rebuilt.all_scores(LOGITS), saps.all_scores(LOGITS))
    assert from_parameters("margin", {}).parameters() == {} and from_parameters("topk", {"randomized": False})
    with pytest.raises(CertificateError, match="saps"):
        from_parameters("saps", {"weight": -1.0})
    for bad in (0.0, -0.1, float("inf"), True):
        with pytest.raises(UsageError, match="weight"):
            SAPS(weight=bad)
    assert make_nonconformity("saps", lambda_reg=0.05).weight == 0.05
    assert make_nonconformity("saps").weight == 0.2
    with pytest.raises(UsageError, match="randomized"):
        make_nonconformity("margin", randomized=True)
    with pytest.raises(UsageError, match="k_reg"):
        make_nonconformity("saps", k_reg=2)
    with pytest.raises(UsageError, match="lambda_reg"):
        make_nonconformity("topk", lambda_reg=0.1)
