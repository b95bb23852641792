"""Conditional-coverage metrics of prediction sets: by class, by set size, by user group.

A marginal guarantee says nothing about coverage within a class, a set size or a subpopulation;
these descriptive metrics show how far from ``1 - alpha`` each is on the data at hand (they are not
tests and never change a verdict):

* ``class_coverage_gap``: mean over the classes present of ``|cov_c - (1 - alpha)|``;
* ``worst_class``: the class with the lowest coverage ``{class, n, coverage}`` (lowest index on ties);
* ``sscv``, the size-stratified coverage violation of Angelopoulos, Bates, Malik & Jordan, "Uncertainty
  Sets for Image Classifiers using Conformal Prediction", ICLR 2021, §4: the largest
  ``|coverage in bin - (1 - alpha)|`` over the set-size bins that hold points. The bins are the paper's,
  :data:`SIZE_BINS` ``0-1, 2-3, 4-10, 11-100, 101-1000`` and ``1001+`` (bins beyond ``K`` never hold points);
  ``size_strata`` lists each non-empty bin's ``{sizes, n, coverage}``;
* ``singleton_rate`` and ``empty_rate``: shares of sets with one label and with none.

:func:`group_metrics` gives the same per user group (one label per point): ``n``, ``coverage``,
``mean_set_size``, ``singleton_rate``, ``empty_rate`` and ``sscv`` for each group, with
``group_coverage_gap`` and ``worst_group`` across them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["SIZE_BINS", "conditional_metrics", "group_metrics"]

SIZE_BINS: tuple[tuple[int, int | None], ...] = ((0, 1), (2, 3), (4, 10), (11, 100), (101, 1000), (1001, None))
"""Set-size bins of SSCV (inclusive bounds; ``None``: no upper bound), as in Angelopoulos et al. 2021."""


def _hits_and_sizes(sets: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(sets, torch.Tensor) or sets.dim() != 2 or sets.dtype != torch.bool or sets.shape[0] == 0:
        raise ValueError("sets must be a non-empty bool tensor [N, K] from prediction_sets")
    labels = torch.as_tensor(labels, device=sets.device).to(torch.int64)
    if labels.shape != (sets.shape[0],):
        raise ValueError(f"labels must have shape ({sets.shape[0]},)")
    hits = sets.gather(1, labels.unsqueeze(1)).squeeze(1)
    return hits, sets.sum(dim=1), labels


def _bin_name(low: int, high: int | None) -> str:
    return f"{low}+" if high is None else f"{low}-{high}"


def _size_strata(hits: torch.Tensor, sizes: torch.Tensor, target: float) -> tuple[float, list[dict[str, Any]]]:
    strata = []
    for low, high in SIZE_BINS:
        mask = sizes >= low if high is None else (sizes >= low) & (sizes <= high)
        count = int(mask.sum())
        if count:
            strata.append({"sizes": _bin_name(low, high), "n": count, "coverage": int(hits[mask].sum()) / count})
    return max(abs(s["coverage"] - target) for s in strata), strata


def _basic(hits: torch.Tensor, sizes: torch.Tensor, target: float) -> dict[str, Any]:
    n = int(hits.shape[0])
    sscv, strata = _size_strata(hits, sizes, target)
    return {"n": n, "coverage": int(hits.sum()) / n, "mean_set_size": int(sizes.sum()) / n,
            "singleton_rate": int((sizes == 1).sum()) / n, "empty_rate": int((sizes == 0).sum()) / n,
            "sscv": sscv, "size_strata": strata}


def conditional_metrics(sets: torch.Tensor, labels: torch.Tensor, *, alpha: float) -> dict[str, Any]:
    """Class coverage gap, worst class, SSCV (with its strata), singleton and empty rates.

    Args:
        sets: Bool prediction sets ``[N, K]``.
        labels: True labels ``[N]``.
        alpha: The target miscoverage; the reference coverage is ``1 - alpha``.

    Returns:
        ``{class_coverage_gap, worst_class, sscv, size_strata, singleton_rate, empty_rate}`` (see the
        module docstring), plain Python numbers.
    """
    hits, sizes, labels = _hits_and_sizes(sets, labels)
    target = 1.0 - float(alpha)
    basic = _basic(hits, sizes, target)
    totals = torch.bincount(labels, minlength=sets.shape[1]).tolist()
    covered = torch.bincount(labels[hits], minlength=sets.shape[1]).tolist()
    per_class = [(c, t, covered[c] / t) for c, t in enumerate(totals) if t]
    worst = min(per_class, key=lambda r: (r[2], r[0]))
    return {
        "class_coverage_gap": sum(abs(cov - target) for _, _, cov in per_class) / len(per_class),
        "worst_class": {"class": worst[0], "n": worst[1], "coverage": worst[2]},
        "sscv": basic["sscv"],
        "size_strata": basic["size_strata"],
        "singleton_rate": basic["singleton_rate"],
        "empty_rate": basic["empty_rate"],
    }


def group_metrics(sets: torch.Tensor, labels: torch.Tensor, groups: Sequence[Any], *, alpha: float) -> dict[str, Any]:
    """The same metrics per user group, and the gap and worst group across groups.

    Args:
        sets: Bool prediction sets ``[N, K]``.
        labels: True labels ``[N]``.
        groups: One group label (int or str) per point, ``N`` of them.
        alpha: The target miscoverage.

    Returns:
        ``{per_group: [{group, n, coverage, mean_set_size, singleton_rate, empty_rate, sscv, size_strata}],
        group_coverage_gap, worst_group: {group, n, coverage}}``; groups in sorted order.
    """
    hits, sizes, _ = _hits_and_sizes(sets, labels)
    if len(groups) != hits.shape[0]:
        raise ValueError(f"need one group label per point ({hits.shape[0]}), got {len(groups)}")
    target = 1.0 - float(alpha)
    index: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        index.setdefault(g, []).append(i)
    per_group = []
    for g in sorted(index, key=lambda v: (str(type(v)), v)):
        rows = torch.tensor(index[g], dtype=torch.int64, device=hits.device)
        per_group.append({"group": g, **_basic(hits[rows], sizes[rows], target)})
    worst = min(per_group, key=lambda r: r["coverage"])
    return {
        "per_group": per_group,
        "group_coverage_gap": sum(abs(r["coverage"] - target) for r in per_group) / len(per_group),
        "worst_group": {"group": worst["group"], "n": worst["n"], "coverage": worst["coverage"]},
    }
