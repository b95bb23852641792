"""Tests for prunecp_cli.importance.shapley_estimator on hand-made games (no model involved)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from prunecp_cli.importance.shapley_estimator import (
    aggregate,
    exact_shapley,
    permutation_shapley,
)


def additive_game(weights: torch.Tensor):
    """v_n(S) = sum_{i in S} weights[n, i]; its Shapley values are the weights."""

    def value_fn(masks: torch.Tensor) -> torch.Tensor:
        return masks.to(torch.float64) @ weights.T

    return value_fn


# A 6-player game with pairwise interactions, a triple interaction and a max term, per example.
_W = torch.tensor([[1.0, -0.5, 2.0, 0.3, 0.0, 1.5], [0.2, 0.4, -1.0, 1.0, 0.7, 0.1]], dtype=torch.float64)
_PAIRS = {(0, 1): 0.8, (2, 3): -1.2, (1, 4): 0.5, (0, 5): 2.0}
_B = torch.tensor([[3.0, 0.5, 1.0, 2.5, 4.0, 0.2], [1.0, 2.0, 3.0, 0.5, 0.1, 5.0]], dtype=torch.float64)


def interaction_game(masks: torch.Tensor) -> torch.Tensor:
    s = masks.to(torch.float64)
    value = s @ _W.T
    for (i, j), a in _PAIRS.items():
        value = value + a * (s[:, i] * s[:, j]).unsqueeze(1)
    value = value + 1.7 * (s[:, 0] * s[:, 2] * s[:, 4]).unsqueeze(1)
    active_b = torch.where(masks.unsqueeze(1), _B.unsqueeze(0), 0.0)  # [M, N, C]
    return value + active_b.amax(-1)


def reference_shapley(value_fn, num_players: int) -> torch.Tensor:
    """The Shapley formula written out with factorial weights, one coalition at a time."""

    def v(coalition) -> torch.Tensor:
        mask = torch.zeros(1, num_players, dtype=torch.bool)
        mask[0, list(coalition)] = True
        return value_fn(mask)[0]

    c = num_players
    columns = []
    for i in range(c):
        others = [j for j in range(c) if j != i]
        total = 0.0
        for size in range(c):
            weight = math.factorial(size) * math.factorial(c - size - 1) / math.factorial(c)
            for subset in itertools.combinations(others, size):
                total = total + weight * (v(subset + (i,)) - v(subset))
        columns.append(total)
    return torch.stack(columns, 1)


def counting(value_fn):
    calls: list[int] = []

    def wrapped(masks: torch.Tensor) -> torch.Tensor:
        assert masks.dtype == torch.bool
        calls.append(masks.shape[0])
        return value_fn(masks)

    return wrapped, calls


@pytest.mark.parametrize("antithetic", [False, True])
@pytest.mark.parametrize("samples", [1, 3, 8])
def test_additive_game_is_recovered_exactly(antithetic: bool, samples: int) -> None:
    weights = torch.randn(4, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    est = permutation_shapley(
        additive_game(weights),
        9,
        samples=samples,
        antithetic=antithetic,
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(est.per_example, weights, rtol=0, atol=1e-12)
    torch.testing.assert_close(est.mean, weights.mean(0), rtol=0, atol=1e-12)
    assert est.per_example.dtype == torch.float64
    expected_perms = samples + (samples % 2) if antithetic else samples
    assert est.permutations == expected_perms
    if expected_perms // (2 if antithetic else 1) > 1:
        assert torch.all(est.std_error.abs() < 1e-12)
    else:
        assert torch.all(torch.isnan(est.std_error))


def test_exact_matches_written_out_formula_and_efficiency() -> None:
    reference = reference_shapley(interaction_game, 6)
    exact = exact_shapley(interaction_game, 6)
    torch.testing.assert_close(exact.per_example, reference, rtol=0, atol=1e-12)
    assert exact.evaluations == 64
    ends = interaction_game(torch.tensor([[True] * 6, [False] * 6]))
    torch.testing.assert_close(exact.per_example.sum(1), ends[0] - ends[1], rtol=0, atol=1e-12)
    # The game is not additive, so the check above is not trivially satisfied.
    assert not torch.allclose(exact.per_example, _W + _B / 6)


@pytest.mark.parametrize("antithetic", [False, True])
def test_permutation_estimate_converges_to_exact(antithetic: bool) -> None:
    exact = exact_shapley(interaction_game, 6)
    est = permutation_shapley(
        interaction_game, 6, samples=2000, antithetic=antithetic, generator=torch.Generator().manual_seed(7)
    )
    assert est.evaluations == 2 + 2000 * 5
    error = (est.mean - exact.mean).abs()
    assert torch.all(error < 3 * est.std_error + 1e-3), (error, est.std_error)
    assert torch.all(est.std_error > 0) and torch.all(est.std_error < 0.05)
    # Efficiency holds for every sampled estimate, per example.
    ends = interaction_game(torch.tensor([[True] * 6, [False] * 6]))
    torch.testing.assert_close(est.per_example.sum(1), ends[0] - ends[1], rtol=0, atol=1e-10)


def test_sign_convention_removal_that_lowers_value_is_positive() -> None:
    # v = -loss; channel 0 matters (removing it raises the loss), channel 1 hurts.
    def value_fn(masks: torch.Tensor) -> torch.Tensor:
        loss = 2.0 - 1.5 * masks[:, 0].double() + 0.5 * masks[:, 1].double()
        return -loss.unsqueeze(1)

    est = permutation_shapley(value_fn, 3, samples=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(est.mean, torch.tensor([1.5, -0.5, 0.0], dtype=torch.float64))


@pytest.mark.parametrize(
    ("max_masks", "samples", "antithetic"), [(7, 6, True), (1, 3, False), (256, 5, True)]
)
def test_batching_respects_limit_and_counts(max_masks: int, samples: int, antithetic: bool) -> None:
    weights = torch.randn(3, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    value_fn, calls = counting(additive_game(weights))
    est = permutation_shapley(
        value_fn,
        10,
        samples=samples,
        antithetic=antithetic,
        generator=torch.Generator().manual_seed(0),
        max_masks_per_call=max_masks,
    )
    assert max(calls) <= max_masks
    assert sum(calls) == est.evaluations == 2 + est.permutations * 9
    if max_masks == 256:
        assert calls == [2, 54]  # all intermediate coalitions of the 6 permutations in one call


def test_estimate_does_not_depend_on_batch_size() -> None:
    runs = [
        permutation_shapley(
            interaction_game, 6, samples=10, generator=torch.Generator().manual_seed(5), max_masks_per_call=m
        )
        for m in (1, 4, 256)
    ]
    for run in runs[1:]:
        torch.testing.assert_close(run.per_example, runs[0].per_example, rtol=0, atol=1e-12)


def test_exact_batching_and_limit() -> None:
    value_fn, calls = counting(interaction_game)
    exact_shapley(value_fn, 6, max_masks_per_call=10)
    assert max(calls) <= 10 and sum(calls) == 64
    with pytest.raises(ValueError, match="limit is 16"):
        exact_shapley(interaction_game, 17)


def saturating_game(masks: torch.Tensor) -> torch.Tensor:
    """v = -min(L_max, L0 + sum of costs of removed channels): the loss saturates at chance level."""
    costs = torch.tensor([0.5, 1.0, 0.2, 0.8, 0.3, 0.6, 0.4, 0.9, 0.7, 0.1, 0.5, 1.2], dtype=torch.float64)
    removed = (~masks).to(torch.float64) @ costs
    per_example = torch.stack([removed, 0.5 * removed], 1)
    return -torch.minimum(torch.tensor([2.0, 1.0], dtype=torch.float64), 0.1 + per_example)


def test_truncation_exact_on_saturating_game_with_fewer_evaluations() -> None:
    def run(value_fn, tol):
        generator = torch.Generator().manual_seed(2)
        return permutation_shapley(
            value_fn, 12, samples=8, generator=generator, max_masks_per_call=8, truncation_tol=tol
        )

    plain = run(saturating_game, None)
    trunc_fn, trunc_calls = counting(saturating_game)
    trunc = run(trunc_fn, 1e-9)
    # Once both examples are at chance loss, all later marginals are exactly 0: truncation is exact.
    torch.testing.assert_close(trunc.per_example, plain.per_example, rtol=0, atol=1e-12)
    assert plain.evaluations == 2 + 8 * 11
    assert trunc.evaluations < plain.evaluations
    assert sum(trunc_calls) == trunc.evaluations and max(trunc_calls) <= 8


def test_truncation_bias_is_as_documented() -> None:
    # Additive game: four big players and two small ones. With tol 0.25, a permutation stops once
    # only small players (total value < 0.25) remain; they get 0 there.
    weights = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.1, 0.1]], dtype=torch.float64)
    est = permutation_shapley(
        additive_game(weights), 6, samples=20, generator=torch.Generator().manual_seed(4), truncation_tol=0.25
    )
    torch.testing.assert_close(est.mean[:4], torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.all(est.mean[4:] >= 0) and torch.all(est.mean[4:] < 0.1)
    missing = weights.sum() - est.mean.sum()
    assert 0 < missing <= 0.25
    # Saturated from the start: everything is 0 and only v(all), v(none) are evaluated.
    flat = permutation_shapley(
        additive_game(weights), 6, samples=4, generator=torch.Generator().manual_seed(4), truncation_tol=10.0
    )
    assert flat.evaluations == 2 and torch.all(flat.per_example == 0)


def test_deterministic_for_fixed_seed() -> None:
    def run(seed: int):
        return permutation_shapley(
            interaction_game, 6, samples=6, generator=torch.Generator().manual_seed(seed)
        )

    a, b, c = run(11), run(11), run(12)
    assert torch.equal(a.per_example, b.per_example) and torch.equal(a.std_error, b.std_error)
    assert not torch.equal(a.per_example, c.per_example)


def test_aggregate() -> None:
    per_example = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 6.0]], dtype=torch.float64)
    torch.testing.assert_close(aggregate(per_example), torch.tensor([2.0, 2.0], dtype=torch.float64))
    std = torch.tensor([math.sqrt(2 / 3), math.sqrt(8)], dtype=torch.float64)  # population std
    torch.testing.assert_close(
        aggregate(per_example, "mean+2std"), torch.tensor([2.0, 2.0]).double() + 2 * std
    )
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(per_example, "median")


def test_bad_value_fn_shape_is_reported() -> None:
    with pytest.raises(ValueError, match=r"\[num_masks, num_examples\]"):
        permutation_shapley(lambda m: torch.zeros(m.shape[0] + 1, 2), 3, generator=torch.Generator())


def reference_semivalue(value_fn, num_players: int, played: int) -> torch.Tensor:
    """Mean marginal of each player over all permutations, counting only the first ``played`` removals."""
    c = num_players
    totals = torch.zeros(value_fn(torch.ones(1, c, dtype=torch.bool)).shape[1], c, dtype=torch.float64)
    counts = torch.zeros(c)
    for perm in itertools.permutations(range(c)):
        active = torch.ones(1, c, dtype=torch.bool)
        for step in range(played):
            after = active.clone()
            after[0, perm[step]] = False
            totals[:, perm[step]] += value_fn(active)[0] - value_fn(after)[0]
            counts[perm[step]] += 1
            active = after
    return totals / counts


def test_depth_recovers_an_additive_game_exactly() -> None:
    weights = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    est = permutation_shapley(additive_game(weights), 8, samples=6, antithetic=True, depth=0.5,
                              generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(est.per_example, weights, rtol=0, atol=1e-12)
    assert est.evaluations == 2 + 6 * 4  # half of every permutation is played
    assert torch.all(est.std_error.abs() < 1e-12)


def test_depth_converges_to_the_written_out_semivalue() -> None:
    reference = reference_semivalue(interaction_game, 6, played=3)
    est = permutation_shapley(interaction_game, 6, samples=3000, antithetic=True, depth=0.5,
                              generator=torch.Generator().manual_seed(3))
    error = (est.mean - reference.mean(0)).abs()
    assert torch.all(error < 4 * est.std_error + 1e-3), (error, est.std_error)
    exact = exact_shapley(interaction_game, 6).mean
    assert (reference.mean(0) - exact).abs().max() > 0.1  # a different quantity from the Shapley value
    with pytest.raises(ValueError, match="depth"):
        permutation_shapley(interaction_game, 6, depth=0.0, generator=torch.Generator())
