"""Tests for prunecp_cli.importance.clustering on hand-made features and functions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prunecp_cli.importance.clustering import (
    activation_cosine_feature,
    channel_features,
    crowding_distance,
    crowding_scores,
    jde_integer_search,
    kmeans_pp,
    select_in_clusters,
    standardize,
)

INF = math.inf

# Five points in 2-D. x sorted: P0(0) P1(1) P2(3) P4(5) P3(6), span 6; y sorted: P3(0) P4(1) P1(2) P2(4) P0(5), span 5.
POINTS = torch.tensor([[0.0, 5.0], [1.0, 2.0], [3.0, 4.0], [6.0, 0.0], [5.0, 1.0]])
# P0, P3 are boundaries in both dimensions. Interior sums of normalised neighbour gaps:
# P1: (3-0)/6 + (4-1)/5 = 0.5 + 0.6; P2: (5-1)/6 + (5-2)/5 = 4/6 + 0.6; P4: (6-3)/6 + (2-0)/5 = 0.5 + 0.4.
EXPECTED_CROWDING = [INF, 1.1, 4 / 6 + 0.6, INF, 0.9]


def test_crowding_distance_hand_example() -> None:
    torch.testing.assert_close(
        crowding_distance(POINTS), torch.tensor(EXPECTED_CROWDING, dtype=torch.float64)
    )
    # A constant dimension is skipped (it would otherwise divide by zero and add boundaries).
    with_constant = torch.cat([POINTS, torch.full((5, 1), 2.0)], 1)
    torch.testing.assert_close(
        crowding_distance(with_constant), torch.tensor(EXPECTED_CROWDING, dtype=torch.float64)
    )
    assert torch.all(crowding_distance(POINTS[:2]) == INF) and torch.all(crowding_distance(POINTS[:1]) == INF)
    assert torch.all(crowding_distance(torch.ones(4, 3)) == 0)


def test_select_in_clusters_and_scores_on_hand_example() -> None:
    # Keep order in the single cluster: P0, P3 (both +inf, lower index first), P2, P1, P4.
    labels = torch.zeros(5, dtype=torch.long)
    assert select_in_clusters(POINTS, labels, keep_fraction=0.6).tolist() == [True, False, True, True, False]
    assert select_in_clusters(POINTS, labels, keep_fraction=0.8).tolist() == [True, True, True, True, False]
    assert select_in_clusters(POINTS, labels, keep_fraction=0.0).tolist() == [
        True,
        False,
        False,
        False,
        False,
    ]
    scores = crowding_scores(POINTS, labels)
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.4, 0.6, 0.8, 0.2], dtype=torch.float64))


def test_select_in_clusters_per_cluster_and_matches_scores() -> None:
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0] * 10 + [1] * 17 + [2] * 1 + [3] * 2 + [4] * 10)
    for keep_fraction in (0.1, 0.3, 0.5, 0.75, 1.0):
        keep = select_in_clusters(features, labels, keep_fraction=keep_fraction)
        for g, size in zip(range(5), (10, 17, 1, 2, 10), strict=True):
            expected = max(1, math.ceil(round(keep_fraction * size, 9)))
            assert int(keep[labels == g].sum()) == expected
        assert torch.equal(keep, crowding_scores(features, labels) > 1 - keep_fraction)
    scores = crowding_scores(features, labels)
    assert scores[labels == 2].item() == 1.0 and torch.all(
        scores[labels == 3] == torch.tensor([1.0, 0.5]).double()
    )


def test_channel_features_hand_kernels() -> None:
    weight = torch.tensor(
        [
            [[[1.0, 2.0], [3.0, 4.0]]],
            [[[1.0, -1.0], [1.0, -1.0]]],
            [[[0.0, 0.0], [0.0, 0.0]]],
            [[[-2.0, -2.0], [-2.0, -2.0]]],
        ]
    )
    f = channel_features(weight)
    assert f.shape == (4, 3) and f.dtype == torch.float64
    # Channel 0: mu 2.5, population variance 1.25, cos = 10 / (2 * sqrt(30)).
    torch.testing.assert_close(
        f[0], torch.tensor([2.5, 1.25, 1 - 10 / (2 * math.sqrt(30))], dtype=torch.float64)
    )
    torch.testing.assert_close(f[1], torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(f[2], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))  # zero kernel: d = 1
    torch.testing.assert_close(
        f[3], torch.tensor([-2.0, 0.0, 2.0], dtype=torch.float64)
    )  # anti-parallel to u


def test_weight_cosine_feature_is_redundant() -> None:
    # algorithms.md §4(d): on the weights, d = 1 - mu / sqrt(mu^2 + sigma^2) (population variance).
    weight = torch.randn(32, 8, 3, 3, generator=torch.Generator().manual_seed(1)) + 0.3
    mu, var, d = channel_features(weight).unbind(1)
    torch.testing.assert_close(d, 1 - mu / torch.sqrt(mu**2 + var), rtol=0, atol=1e-12)


def test_activation_cosine_feature() -> None:
    maps = torch.tensor([[2.0, 2.0, 2.0, 2.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(
        activation_cosine_feature(maps), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        activation_cosine_feature(maps.reshape(3, 2, 2)), activation_cosine_feature(maps)
    )


def test_standardize() -> None:
    f = torch.tensor([[1.0, 5.0, 0.0], [3.0, 5.0, 1.0], [5.0, 5.0, 2.0]])
    z = standardize(f)
    torch.testing.assert_close(z[:, 0], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) * math.sqrt(1.5))
    assert torch.all(z[:, 1] == 0)  # constant column: no division by zero
    torch.testing.assert_close(z.mean(0), torch.zeros(3, dtype=torch.float64))


def _blobs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 5.0]])
    truth = np.repeat([0, 1, 2], [15, 20, 10])
    return centres[truth] + 0.5 * rng.standard_normal((45, 3)), truth


def test_kmeans_pp_recovers_blobs_and_is_deterministic() -> None:
    x, truth = _blobs()
    labels, centers, inertia = kmeans_pp(torch.from_numpy(x), 3, seed=3)
    # Labels are numbered by first appearance, so they equal the truth exactly.
    assert labels.tolist() == truth.tolist()
    torch.testing.assert_close(centers, torch.from_numpy(np.stack([x[truth == g].mean(0) for g in range(3)])))
    assert inertia == pytest.approx(
        sum(((x[truth == g] - x[truth == g].mean(0)) ** 2).sum() for g in range(3))
    )
    again = kmeans_pp(x, 3, seed=3)
    assert torch.equal(labels, again[0]) and torch.equal(centers, again[1]) and inertia == again[2]
    five = [kmeans_pp(x, 5, seed=s) for s in (4, 4)]
    assert torch.equal(five[0][0], five[1][0]) and five[0][2] == five[1][2] and five[0][2] < inertia


def test_kmeans_pp_with_k_at_least_distinct_points() -> None:
    x = np.array([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    for k in (3, 4, 10):
        labels, centers, inertia = kmeans_pp(x, k, seed=0)
        assert labels.tolist() == [0, 1, 0, 2] and inertia == 0.0
        torch.testing.assert_close(
            centers, torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
        )
    assert kmeans_pp(x, 1, seed=0)[0].tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        kmeans_pp(x, 0, seed=0)


TARGET = np.array([3, -2, 7, 0, 12])


def quadratic(genes: np.ndarray) -> float:
    return -float(((genes - TARGET) ** 2).sum())


def test_jde_finds_integer_optimum_and_is_deterministic() -> None:
    lower, upper = np.full(5, -10), np.full(5, 15)
    seen: list[tuple[int, ...]] = []

    def fitness(genes: np.ndarray) -> float:
        assert genes.dtype == np.int64 and np.all(genes >= lower) and np.all(genes <= upper)
        seen.append(tuple(genes.tolist()))
        return quadratic(genes)

    printed = []
    result = jde_integer_search(
        fitness, lower, upper, population=20, generations=60, seed=0, verbose_callback=printed.append
    )
    assert result.best_genes.tolist() == TARGET.tolist() and result.best_fitness == 0.0
    assert len(result.history) == 61 and [h.generation for h in result.history] == list(range(61))
    assert printed == list(result.history)
    best = [h.best_fitness for h in result.history]
    assert best == sorted(best)  # greedy selection: the best never gets worse
    # The cache: every fitness call is a new gene vector, and duplicates were served from it.
    assert len(seen) == len(set(seen)) == result.evaluations
    assert result.evaluations + result.cache_hits == 20 * 61 and result.cache_hits > 0

    again = jde_integer_search(quadratic, lower, upper, population=20, generations=60, seed=0)
    assert [(h.best_genes.tolist(), h.best_fitness, h.evaluations) for h in again.history] == [
        (h.best_genes.tolist(), h.best_fitness, h.evaluations) for h in result.history
    ]


def test_jde_respects_bounds_with_optimum_outside() -> None:
    # The unconstrained optimum (3, -2, 7, 0, 12) lies outside [0, 5]^5: the best is the clipped point.
    result = jde_integer_search(quadratic, np.zeros(5), np.full(5, 5), population=12, generations=40, seed=1)
    assert result.best_genes.tolist() == [3, 0, 5, 0, 5]
    with pytest.raises(ValueError, match="at least 4"):
        jde_integer_search(quadratic, np.zeros(5), np.full(5, 5), population=3, seed=1)
