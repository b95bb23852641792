"""Metrics of prediction sets and the p-values of ``certify``'s coverage test.

Metrics take the bool sets of :func:`~prunecp_cli.conformal.nonconformity.prediction_sets`
([N, K], any device) and return plain Python numbers.

The p-values are lower-tail: how improbable it is to see this few covered test points if the
certificate holds. Under the null hypothesis each is super-uniform (``P(p <= s) <= s``), so rejecting
when ``p < s`` wrongly fails a correct certificate with probability at most ``s`` (marginal) or
``delta + s`` (training-conditional).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import betaln, gammaln, logsumexp
from scipy.stats import binom

from prunecp_cli.conformal.quantile import decimal_fraction

__all__ = [
    "coverage",
    "covered_count",
    "mean_set_size",
    "observed_fuzziness",
    "p_value_marginal",
    "p_value_pac",
    "per_class_coverage",
    "set_size_histogram",
]


def _check_sets(sets: torch.Tensor) -> torch.Tensor:
    if not isinstance(sets, torch.Tensor) or sets.dim() != 2 or sets.dtype != torch.bool:
        raise ValueError("sets must be a bool tensor [N, K] from prediction_sets")
    if sets.shape[0] == 0:
        raise ValueError("sets is empty: metrics need at least one test point")
    return sets


def _hits(sets: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    sets = _check_sets(sets)
    labels = torch.as_tensor(labels, device=sets.device)
    if labels.shape != (sets.shape[0],) or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of shape ({sets.shape[0]},)")
    return sets.gather(1, labels.to(torch.int64).unsqueeze(1)).squeeze(1)


def covered_count(sets: torch.Tensor, labels: torch.Tensor) -> int:
    """Number of points whose true label is in their prediction set.

    Args:
        sets: Bool tensor [N, K].
        labels: Integer tensor [N].

    Returns:
        The count, an ``int``.
    """
    return int(_hits(sets, labels).sum())


def coverage(sets: torch.Tensor, labels: torch.Tensor) -> float:
    """Empirical coverage: the fraction of points whose true label is in their set.

    Args:
        sets: Bool tensor [N, K].
        labels: Integer tensor [N].

    Returns:
        A float in [0, 1].
    """
    return covered_count(sets, labels) / sets.shape[0]


def mean_set_size(sets: torch.Tensor) -> float:
    """Mean number of labels per prediction set.

    Args:
        sets: Bool tensor [N, K].

    Returns:
        A float in [0, K].
    """
    return int(_check_sets(sets).sum()) / sets.shape[0]


def set_size_histogram(sets: torch.Tensor) -> list[int]:
    """How many sets have each size.

    Args:
        sets: Bool tensor [N, K].

    Returns:
        ``K + 1`` counts; item ``s`` is the number of sets of size ``s`` (0 = empty set).
    """
    sizes = _check_sets(sets).sum(dim=1)
    return torch.bincount(sizes, minlength=sets.shape[1] + 1).tolist()


def per_class_coverage(sets: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """Empirical coverage among the points of each true class.

    Args:
        sets: Bool tensor [N, K].
        labels: Integer tensor [N].
        num_classes: Number of classes ``K``.

    Returns:
        ``num_classes`` values; ``None`` (JSON ``null``, not NaN, which JSON cannot hold) for a class
        with no points.
    """
    hits = _hits(sets, labels)
    labels = torch.as_tensor(labels, device=sets.device).to(torch.int64)
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    totals = torch.bincount(labels, minlength=num_classes).tolist()
    covered = torch.bincount(labels[hits], minlength=num_classes).tolist()
    return [None if t == 0 else c / t for c, t in zip(covered, totals, strict=True)]


def observed_fuzziness(
    cal_label_scores: torch.Tensor, test_all_scores: torch.Tensor, test_labels: torch.Tensor
) -> float:
    """Observed fuzziness: mean over test points of the p-values of the false labels.

    Vovk, Fedorova, Nouretdinov & Gammerman, "Criteria of Efficiency for Conformal Prediction",
    COPA 2016. ``OF = mean_x sum_{y != y_true} p^y(x)`` with
    ``p^y(x) = (#{i : s_i >= s(x, y)} + 1) / (n + 1)`` (algorithms.md §0.6); smaller is better. The
    counts are exact integers from ``searchsorted`` on the sorted calibration scores (both sides in
    float64), and the mean is one correctly rounded integer division.

    Args:
        cal_label_scores: Float tensor [n] of calibration scores at the true labels.
        test_all_scores: Float tensor [m, K] of every label's score on the test points.
        test_labels: Integer tensor [m] of the test points' true labels.

    Returns:
        The observed fuzziness, a float in [0, K - 1].
    """
    test = torch.as_tensor(test_all_scores).to(torch.float64)
    if test.dim() != 2 or test.shape[0] == 0:
        raise ValueError("test_all_scores must be a non-empty float tensor [m, K]")
    cal = torch.sort(torch.as_tensor(cal_label_scores).to(device=test.device, dtype=torch.float64)).values
    n, m = cal.shape[0], test.shape[0]
    labels = torch.as_tensor(test_labels, device=test.device).to(torch.int64)
    if labels.shape != (m,):
        raise ValueError(f"test_labels must have shape ({m},)")
    at_least = n - torch.searchsorted(cal, test.contiguous(), side="left")  # #{i : s_i >= s(x, y)}
    false = torch.ones_like(at_least, dtype=torch.bool).scatter_(1, labels.unsqueeze(1), False)
    total = int((at_least + 1)[false].sum())
    return total / (m * (n + 1))


def _check_count(covered: int, m: int) -> None:
    for name, value in (("covered", covered), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if not (m >= 1 and 0 <= covered <= m):
        raise ValueError(f"need 0 <= covered <= m and m >= 1, got covered={covered}, m={m}")


def p_value_marginal(covered: int, m: int, *, n: int, k: int) -> float:
    """Lower-tail p-value of ``covered`` hits among ``m`` test points for a marginal certificate.

    With continuous scores, coverage given the calibration set is ``Beta(k, n+1-k)`` (the ``k``-th
    order statistic of ``n`` uniforms), so the number covered among ``m`` new exchangeable points is
    Beta-Binomial``(m, k, n+1-k)`` (Vovk 2012; Angelopoulos & Bates 2021, §3.2). Equivalently, it is the
    count of test points below the ``k``-th smallest calibration score when all ``n + m`` ranks are a
    uniform random permutation, so it is exact for a random split of a fixed pool too. With ties
    coverage is only larger, so the p-value stays valid (conservative).

    Computed as ``log-sum-exp`` of the log pmf (``gammaln``/``betaln``), stable for tiny p-values.

    Args:
        covered: Test points whose true label is in their set.
        m: Number of test points.
        n: Number of calibration points the certificate used.
        k: Rank of its quantile.

    Returns:
        ``P(X <= covered)`` for ``X ~ BetaBinomial(m, k, n+1-k)``.
    """
    _check_count(covered, m)
    if not (isinstance(n, (int, np.integer)) and isinstance(k, (int, np.integer)) and 1 <= k <= n):
        raise ValueError(f"need integers 1 <= k <= n, got n={n!r}, k={k!r}")
    if covered >= m:
        return 1.0
    a, b = float(k), float(n + 1 - k)
    j = np.arange(int(covered) + 1, dtype=np.float64)
    log_pmf = (
        gammaln(m + 1.0) - gammaln(j + 1.0) - gammaln(m - j + 1.0) + betaln(j + a, m - j + b) - betaln(a, b)
    )
    return float(min(1.0, math.exp(logsumexp(log_pmf))))


def p_value_pac(covered: int, m: int, *, alpha: float) -> float:
    """Lower-tail p-value of ``covered`` hits among ``m`` test points for a PAC certificate.

    The certificate states coverage ``>= 1 - alpha`` given its calibration set (with probability
    ``>= 1 - delta``); then hits are stochastically larger than ``Bin(m, 1 - alpha)``, so
    ``P(Bin(m, 1-alpha) <= covered)`` is a valid p-value. A correct certificate therefore fails a test
    at significance ``s`` with probability at most ``delta + s`` (Vovk 2012).

    Args:
        covered: Test points whose true label is in their set.
        m: Number of test points.
        alpha: The certificate's target miscoverage.

    Returns:
        ``P(Bin(m, 1 - alpha) <= covered)``, from scipy's regularised incomplete beta (relative
        accuracy in the lower tail).
    """
    _check_count(covered, m)
    p = float(1 - decimal_fraction(alpha))
    return float(min(1.0, binom.cdf(int(covered), int(m), p)))
