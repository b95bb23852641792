"""LAC/APS/RAPS scores and prediction sets against plain-Python references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from prunecp_cli.conformal.nonconformity import (
    APS,
    LAC,
    NONCONFORMITY,
    RAPS,
    choose_k_reg,
    from_parameters,
    label_ranks,
    prediction_sets,
)
from prunecp_cli.errors import CertificateError, DataError, UsageError


def softmax_row(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def ref_order(probs: list[float]) -> list[int]:
    """Labels most probable first; equal probabilities by label index."""
    return sorted(range(len(probs)), key=lambda y: (-probs[y], y))


def ref_set(row: list[float], qhat: float, *, u: float = 1.0, lam: float = 0.0, k_reg: int = 0) -> set[int]:
    """Walk the labels in rank order and include each whose APS/RAPS score is <= qhat."""
    probs = softmax_row(row)
    chosen, before = set(), 0.0
    for rank, y in enumerate(ref_order(probs), start=1):
        score = before + u * probs[y] + lam * max(0, rank - k_reg)
        if score <= qhat:
            chosen.add(y)
        before += probs[y]
    return chosen


def to_sets(mask: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row).flatten().tolist()) for row in mask]


def test_lac_values_and_dtype():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], dtype=torch.float32)
    scores = LAC().all_scores(logits)
    assert scores.dtype == torch.float64
    for i, row in enumerate(logits.double().tolist()):
        expected = [1 - p for p in softmax_row(row)]
        assert scores[i].tolist() == pytest.approx(expected, abs=1e-15)
    assert LAC().label_scores(logits, torch.tensor([0, 2])).tolist() == [
        scores[0, 0].item(),
        scores[1, 2].item(),
    ]


def test_aps_hand_values():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]], dtype=torch.float64))
    cases = [
        (APS(), [[0.5, 0.8, 1.0], [1.0, 0.8, 0.5]]),
        (RAPS(lambda_reg=0.1, k_reg=1), [[0.5, 0.9, 1.2], [1.2, 0.9, 0.5]]),
        (RAPS(lambda_reg=0.25, k_reg=0), [[0.75, 1.3, 1.75], [1.75, 1.3, 0.75]]),
    ]
    for score, want in cases:
        assert torch.allclose(
            score.all_scores(logits), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-15
        )


def test_ties_ranked_by_label_index():
    logits = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    assert label_ranks(logits).tolist() == [[1, 4, 2, 3]]
    a = math.e / (3 * math.e + 1)
    assert APS().all_scores(logits)[0].tolist() == pytest.approx([a, 1.0, 2 * a, 3 * a], abs=1e-15)
    # Equal logits: the lower index always enters the set first.
    sets = prediction_sets(APS().all_scores(logits), 2.5 * a)
    assert sets.tolist() == [[True, False, True, False]]


def test_many_ties_ranked_by_label_index():
    # Two probability levels over 200 labels: an unstable sort would scramble the order within a level.
    logits = torch.zeros(3, 200).index_fill_(1, torch.arange(0, 200, 3), 1.0)
    high = list(range(0, 200, 3))
    want_order = high + [y for y in range(200) if y not in high]
    ranks = label_ranks(logits)
    for row in ranks.tolist():
        assert sorted(range(200), key=lambda y: row[y]) == want_order
    scores = APS().all_scores(logits)
    assert torch.equal(scores.argsort(dim=1, stable=True), torch.tensor([want_order] * 3))


def test_randomized_u_is_shared_and_reproducible():
    aps = APS(randomized=True, seed=7)
    logits = torch.randn(50, 6, generator=torch.Generator().manual_seed(1))
    u = torch.rand(50, dtype=torch.float64, generator=aps.make_generator(stream=0))
    scores = aps.all_scores(logits)
    probs = torch.softmax(logits.double(), dim=1)
    top = probs.argmax(dim=1)
    # The top label's score is U * pi_top: one U per example.
    assert torch.allclose(scores.gather(1, top[:, None]).squeeze(1), u * probs.max(dim=1).values, atol=1e-15)
    assert torch.equal(scores, aps.all_scores(logits))  # generator=None is stream 0, fresh each call
    other = aps.all_scores(logits, generator=aps.make_generator(stream=1))
    assert not torch.equal(scores, other)
    labels = torch.randint(0, 6, (50,), generator=torch.Generator().manual_seed(2))
    gathered = scores.gather(1, labels[:, None]).squeeze(1)
    assert torch.equal(aps.label_scores(logits, labels), gathered)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(
        aps.label_scores(logits, labels, generator=g1),
        aps.all_scores(logits, generator=g2).gather(1, labels[:, None]).squeeze(1),
    )


@pytest.mark.parametrize("randomized", [False, True])
@pytest.mark.parametrize("kind", ["aps", "raps"])
def test_sets_match_brute_force(kind: str, randomized: bool):
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(300, 8, generator=gen) * 2
    score = (
        APS(randomized=randomized, seed=3)
        if kind == "aps"
        else RAPS(lambda_reg=0.05, k_reg=2, randomized=randomized, seed=3)
    )
    lam, k_reg = (0.0, 0) if kind == "aps" else (0.05, 2)
    u = (
        torch.rand(300, dtype=torch.float64, generator=score.make_generator())
        if randomized
        else torch.ones(300)
    )
    all_scores = score.all_scores(logits)
    for qhat in (0.3, 0.71, 0.9, 0.97, 1.05):
        got = to_sets(prediction_sets(all_scores, qhat))
        want = [
            ref_set(row, qhat, u=float(u[i]), lam=lam, k_reg=k_reg)
            for i, row in enumerate(logits.double().tolist())
        ]
        assert got == want
        # Sets are prefixes of the ranking (nested): a label is in only if all better ranks are.
        ranks = label_ranks(logits)
        for s, r in zip(got, ranks.tolist(), strict=True):
            assert sorted(r[y] for y in s) == list(range(1, len(s) + 1))


def test_lac_sets_brute_force_and_class_conditional():
    logits = torch.randn(100, 5, generator=torch.Generator().manual_seed(4))
    scores = LAC().all_scores(logits)
    qhat = torch.tensor([0.2, 0.5, 0.7, 0.9, 0.95], dtype=torch.float64)
    got = to_sets(prediction_sets(scores, qhat))
    want = [
        {y for y, p in enumerate(softmax_row(row)) if 1 - p <= float(qhat[y])}
        for row in logits.double().tolist()
    ]
    assert got == want
    # A score equal to qhat is inside the set.
    assert prediction_sets(scores, scores[0, 2].item())[0, 2]
    with pytest.raises(ValueError):
        prediction_sets(scores, torch.zeros(4))


def test_parameters_round_trip_and_registry():
    assert set(NONCONFORMITY) == {"lac", "aps", "raps", "topk", "saps", "margin"}
    logits = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    for score in (
        LAC(),
        APS(),
        APS(randomized=True, seed=9),
        RAPS(),
        RAPS(lambda_reg=0.2, k_reg=3, randomized=True),
    ):
        params = json.loads(json.dumps(score.parameters()))
        rebuilt = from_parameters(score.name, params)
        assert type(rebuilt) is type(score) and rebuilt.parameters() == score.parameters()
        assert torch.equal(rebuilt.all_scores(logits), score.all_scores(logits))
    assert RAPS().parameters() == {"randomized": False, "lambda_reg": 0.01, "k_reg": 1}
    assert APS(randomized=True).parameters() == {"randomized": True, "seed": 0}
    with pytest.raises(CertificateError, match="unknown nonconformity 'thr'"):
        from_parameters("thr", {})
    with pytest.raises(CertificateError, match="invalid"):
        from_parameters("raps", {"lambda_reg": -1})
    with pytest.raises(CertificateError):
        from_parameters("lac", {"bogus": 1})


def test_bad_parameters_and_labels():
    with pytest.raises(UsageError, match="lambda_reg"):
        RAPS(lambda_reg=float("nan"))
    with pytest.raises(UsageError, match="k_reg"):
        RAPS(k_reg=-1)
    with pytest.raises(UsageError, match="seed"):
        APS(randomized=True, seed=1.5)
    with pytest.raises(DataError, match="label 3 is outside 0..2"):
        LAC().label_scores(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_choose_k_reg_matches_numpy_higher_quantile():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(400, 10, generator=gen)
    labels = torch.randint(0, 10, (400,), generator=gen)
    rows = logits.double().tolist()
    true_ranks = [ref_order(softmax_row(row)).index(int(y)) + 1 for row, y in zip(rows, labels, strict=True)]
    for alpha in (0.05, 0.1, 0.3):
        ordered = sorted(true_ranks)
        want = ordered[math.ceil((1 - alpha) * (len(ordered) - 1))]
        assert (
            choose_k_reg(logits, labels, alpha)
            == want
            == int(np.quantile(true_ranks, 1 - alpha, method="higher"))
        )
    # A perfect classifier: every true label is ranked first.
    assert choose_k_reg(torch.eye(5) * 10, torch.arange(5), 0.1) == 1
    with pytest.raises(UsageError):
        choose_k_reg(logits, labels, 1.0)
