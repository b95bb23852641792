"""Model-independent maths of MCICP clustering pruning (Sun et al. 2024; algorithms.md §4).

Per layer: describe each output channel by three features (:func:`channel_features`), z-score them
(:func:`standardize`), cluster them with k-means++ (:func:`kmeans_pp`), and inside each cluster keep
the channels with the largest NSGA-II crowding distance (:func:`select_in_clusters`), i.e. prune
the crowded, redundant ones. :func:`crowding_scores` turns the same ranking into a per-channel
importance, and :func:`~prunecp_cli.importance.jde.jde_integer_search` (in its own module,
re-exported here) is the self-adaptive differential evolution that picks the number of clusters per
layer.

Feature redundancy (algorithms.md §4(d)): on one weight vector ``w`` of length ``m``,
``cos(w, u) = mu / sqrt(mu**2 + sigma2)`` with ``u = 1/sqrt(m)`` and the *population* variance, so
the weight-based cosine feature is a function of the other two. :func:`activation_cosine_feature`
computes the alternative cosine feature from each channel's mean activation map instead.

References:
    Sun, Chen, Wu, Li & Ma (2024), "A Clustering Pruning Method Based on Multidimensional Channel
    Information", Neural Processing Letters, doi:10.1007/s11063-024-11684-z.
    Arthur & Vassilvitskii (2007), "k-means++: the advantages of careful seeding", SODA.
    Deb, Pratap, Agarwal & Meyarivan (2002), "A fast and elitist multiobjective genetic algorithm:
    NSGA-II", IEEE Trans. Evolutionary Computation 6(2).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from prunecp_cli.importance.jde import DEGeneration, DEResult, jde_integer_search  # noqa: F401  (re-exported)


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _one_minus_cos_to_ones(rows: torch.Tensor) -> torch.Tensor:
    """``1 - cos(row, 1/sqrt(m))`` per row; a zero row has cosine 0, so distance 1."""
    rows = rows.to(torch.float64)
    norm = rows.norm(dim=1)
    dot = rows.sum(1) / math.sqrt(rows.shape[1])
    cos = torch.where(norm > 0, dot / norm.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return 1.0 - cos


def channel_features(weight: torch.Tensor) -> torch.Tensor:
    """MCICP features of each output channel, computed on its flattened kernel (algorithms.md §4(b)1).

    For channel ``c`` with flattened kernel ``w_c`` of length ``m = C_in * k * k``: ``mu = mean(w_c)``,
    ``sigma2 = var(w_c)`` (population variance, ddof 0) and ``d = 1 - cos(w_c, u)`` with
    ``u = 1/sqrt(m)``. A zero kernel gets ``d = 1``. Note ``d = 1 - mu / sqrt(mu**2 + sigma2)``.

    Args:
        weight: ``[C_out, ...]`` weight tensor (conv ``[C_out, C_in, k, k]`` or linear).

    Returns:
        ``float64[C_out, 3]`` with columns ``(mu, sigma2, d)``.
    """
    if weight.ndim < 1 or weight.shape[0] == 0:
        raise ValueError(f"weight must have at least one output channel, got shape {tuple(weight.shape)}")
    flat = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    mu = flat.mean(1)
    var = flat.var(1, correction=0)
    return torch.stack([mu, var, _one_minus_cos_to_ones(flat)], 1)


def activation_cosine_feature(mean_activation_maps: torch.Tensor) -> torch.Tensor:
    """The alternative cosine feature, from each channel's mean activation map (algorithms.md §4(d)).

    Args:
        mean_activation_maps: ``[C, H*W]`` (or ``[C, H, W]``, flattened here) activation maps averaged
            over examples.

    Returns:
        ``float64[C]``, ``1 - cos(map_c, u)`` with ``u = 1/sqrt(H*W)``; a zero map gets 1.
    """
    maps = mean_activation_maps.detach()
    return _one_minus_cos_to_ones(maps.reshape(maps.shape[0], -1))


def standardize(features: torch.Tensor) -> torch.Tensor:
    """Z-score each column within a layer (population std); a constant column becomes all zeros.

    Args:
        features: ``[C, k]`` features of one layer.

    Returns:
        ``float64[C, k]``.
    """
    f = features.detach().to(torch.float64)
    centred = f - f.mean(0, keepdim=True)
    std = f.std(0, correction=0, keepdim=True)
    varies = std > 1e-12 * (1.0 + f.abs().amax(0, keepdim=True))  # relative guard against round-off
    return torch.where(varies, centred / torch.where(varies, std, 1.0), 0.0)


def _lloyd(x: np.ndarray, centers: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray, float]:
    labels = np.full(len(x), -1)
    sq = (x * x).sum(1)
    for _ in range(iters):
        dist = np.maximum(sq[:, None] - 2.0 * x @ centers.T + (centers * centers).sum(1)[None, :], 0.0)
        new = dist.argmin(1)
        counts = np.bincount(new, minlength=len(centers))
        for empty in np.flatnonzero(counts == 0):  # re-seed with the worst-served point
            far = int(dist[np.arange(len(x)), new].argmax())
            new[far] = empty
            dist[far] = 0.0
        if np.array_equal(new, labels):
            break
        labels = new
        centers = np.stack(
            [x[labels == j].mean(0) if np.any(labels == j) else centers[j] for j in range(len(centers))]
        )
    inertia = float(((x - centers[labels]) ** 2).sum())
    return labels, centers, inertia


def _canonical(labels: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber clusters by first appearance, so equal partitions get equal labels."""
    _, first = np.unique(labels, return_index=True)
    order = labels[np.sort(first)]
    remap = np.empty(len(centers), dtype=np.int64)
    remap[order] = np.arange(len(order))
    return remap[labels], centers[order]


def kmeans_pp(
    features: torch.Tensor | np.ndarray,
    k: int,
    *,
    seed: int | np.random.Generator,
    restarts: int = 10,
    iters: int = 100,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """K-means with k-means++ seeding (Arthur & Vassilvitskii 2007), best of ``restarts`` by inertia.

    Each restart draws the first centre uniformly and the others with probability proportional to
    the squared distance to the nearest chosen centre, then runs Lloyd iterations until the labels
    stop changing (at most ``iters``); an empty cluster is re-seeded with the point farthest from its
    centre. Ties in inertia keep the earlier restart. Clusters are numbered by first appearance.
    If ``k`` is at least the number of distinct points, every distinct point is its own cluster (so
    fewer than ``k`` clusters may be returned) and the inertia is 0.

    Args:
        features: ``[n, d]`` points.
        k: Number of clusters, at least 1.
        seed: Integer seed or NumPy generator; a fixed seed gives identical results.
        restarts: Number of independent seedings.
        iters: Maximum Lloyd iterations per restart.

    Returns:
        ``(labels, centers, inertia)``: ``int64[n]`` labels in ``0..K-1``, ``float64[K, d]`` centres
        (``K = min(k, distinct points)``) and the sum of squared distances to the assigned centres.

    Raises:
        ValueError: If ``k``, ``restarts`` or ``iters`` is below 1 or ``features`` is not ``[n, d]``.
    """
    x = _as_numpy(features)
    if x.ndim != 2 or len(x) == 0 or not np.isfinite(x).all():
        raise ValueError(f"features must be a non-empty, finite [n, d] matrix, got shape {x.shape}")
    if k < 1 or restarts < 1 or iters < 1:
        raise ValueError(f"k={k}, restarts={restarts} and iters={iters} must all be at least 1")
    distinct, inverse = np.unique(x, axis=0, return_inverse=True)
    if k >= len(distinct):
        labels, centers = _canonical(inverse.reshape(-1).astype(np.int64), distinct)
        return torch.from_numpy(labels), torch.from_numpy(centers.copy()), 0.0
    rng = np.random.default_rng(seed)
    best: tuple[np.ndarray, np.ndarray, float] | None = None
    for _ in range(restarts):
        centers = [x[rng.integers(len(x))]]
        closest = ((x - centers[0]) ** 2).sum(1)
        for _ in range(1, k):
            # Fewer than k distinct points is excluded above, so some point has closest > 0.
            idx = int(rng.choice(len(x), p=closest / closest.sum()))
            centers.append(x[idx])
            closest = np.minimum(closest, ((x - x[idx]) ** 2).sum(1))
        result = _lloyd(x, np.stack(centers), iters)
        if best is None or result[2] < best[2]:
            best = result
    labels, centers = _canonical(best[0].astype(np.int64), best[1])
    return torch.from_numpy(labels), torch.from_numpy(centers), best[2]


def crowding_distance(points: torch.Tensor | np.ndarray) -> torch.Tensor:
    """NSGA-II crowding distance of each point (Deb et al. 2002).

    For every dimension with ``max > min``: sort the points (stable, so equal values keep index
    order), give the first and last ``+inf`` and add ``(next - prev) / (max - min)`` to each interior
    point. Dimensions with ``max == min`` are skipped entirely. With 1 or 2 points all distances are
    ``+inf``.

    Args:
        points: ``[n, d]``.

    Returns:
        ``float64[n]``.
    """
    x = _as_numpy(points)
    if x.ndim != 2:
        raise ValueError(f"points must be [n, d], got shape {x.shape}")
    n = len(x)
    out = np.zeros(n)
    if n <= 2:
        return torch.full((n,), math.inf, dtype=torch.float64)
    for col in x.T:
        span = col.max() - col.min()
        if not span > 0:
            continue
        order = np.argsort(col, kind="stable")
        out[order[0]] = out[order[-1]] = math.inf
        out[order[1:-1]] += (col[order[2:]] - col[order[:-2]]) / span
    return torch.from_numpy(out)


def _keep_orders(features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> list[np.ndarray]:
    """Per cluster, member indices from most to least worth keeping: crowding distance descending,
    ties by channel index ascending."""
    x = _as_numpy(features)
    lab = np.asarray(labels.cpu().numpy() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if x.ndim != 2 or len(lab) != len(x):
        raise ValueError(f"features {x.shape} and labels ({len(lab)},) must be [C, d] and [C]")
    orders = []
    for g in np.unique(lab):
        members = np.flatnonzero(lab == g)
        cd = crowding_distance(x[members]).numpy()
        orders.append(members[np.lexsort((members, -cd))])
    return orders


def select_in_clusters(
    features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, *, keep_fraction: float
) -> torch.Tensor:
    """Keep the least crowded members of each cluster (algorithms.md §4(b)4).

    In each cluster ``g`` keep ``max(1, ceil(keep_fraction * |g|))`` members with the largest
    crowding distance over ``features``; ties (e.g. several ``+inf`` boundary points) go to the lower
    channel index. ``keep_fraction * |g|`` is rounded to 9 decimals before the ceiling, so
    ``0.3 * 10`` keeps 3. For ``keep_fraction > 0`` this equals ``crowding_scores(...) > 1 - keep_fraction``
    (up to floating-point rounding at exact boundaries).

    Args:
        features: ``[C, d]`` channel features (usually standardised).
        labels: ``[C]`` cluster labels.
        keep_fraction: Fraction of each cluster to keep, in ``[0, 1]`` (``1 - p_l``).

    Returns:
        ``BoolTensor[C]``, ``True`` for kept channels.
    """
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction={keep_fraction} must lie in [0, 1]")
    orders = _keep_orders(features, labels)
    keep = np.zeros(sum(map(len, orders)), dtype=bool)
    for order in orders:
        count = max(1, math.ceil(round(keep_fraction * len(order), 9)))
        keep[order[:count]] = True
    return torch.from_numpy(keep)


def crowding_scores(features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Per-channel importance from the clustering: higher means more worth keeping.

    Within a cluster of size ``n``, order the members as :func:`select_in_clusters` does (crowding
    distance descending, ties by lower index) and give the member at rank ``r`` (0-based) the score
    ``(n - r) / n``. The least crowded member of every cluster, and every singleton, scores 1; the
    most crowded scores ``1/n``. Pruning the lowest scores globally removes the most crowded
    channels of each cluster first, in proportion to cluster size, and keeping ``score > 1 - f``
    keeps exactly ``ceil(f * n)`` per cluster.

    Args:
        features: ``[C, d]`` channel features.
        labels: ``[C]`` cluster labels.

    Returns:
        ``float64[C]`` in ``(0, 1]``.
    """
    orders = _keep_orders(features, labels)
    scores = np.zeros(sum(map(len, orders)))
    for order in orders:
        n = len(order)
        scores[order] = (n - np.arange(n)) / n
    return torch.from_numpy(scores)
