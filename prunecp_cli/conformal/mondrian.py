"""Mondrian calibration by user groups (``calibrate --groups``): one threshold per group.

Vovk et al., "Algorithmic Learning in a Random World", 2005, §4.5, with the taxonomy given by the user
(as MAPIE's and crepes' Mondrian predictors): each calibration example carries a group label, the
threshold of group ``g`` is the conformal quantile of the scores of group ``g`` alone, and the
guarantee of group ``g`` holds for test points of group ``g`` exchangeable with its calibration points.

**Group labels at use.** A test or new point is thresholded by its own group's q̂, so the group of
every point must be known where the sets are made: ``certify --groups`` (one label per test example,
required for such a certificate) and the Python API; ``predict`` and ``export`` refuse a
group-conditional certificate (they take no group labels), naming the fix, rather than fall back to
another threshold. A test group the calibration did not see has no threshold and is refused.
Unlike classes, groups are known at prediction time, so the sets need no label.

Certificate layout: ``quantile``, ``quantile_level`` and ``rank`` are null at the top level and the
``groups`` section holds ``{file, sha256, labels, counts, quantile, quantile_level, rank}`` (lists in
the order of ``labels``, which are sorted); ``guarantee.per_group`` holds one guarantee per group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from prunecp_cli.checks import is_finite_number, is_int
from prunecp_cli.conformal.quantile import QuantileResult, conformal_quantile, min_calibration_size
from prunecp_cli.errors import CalibrationError, CertificateError, DataError

__all__ = ["MAX_LABEL_LENGTH", "check_groups_section", "group_guarantee", "group_index", "group_quantiles",
           "groups_section", "sorted_labels"]

MAX_LABEL_LENGTH = 200


def sorted_labels(groups: Sequence[Any]) -> list[Any]:
    """The distinct group labels, sorted (integers before strings)."""
    return sorted(set(groups), key=lambda v: (isinstance(v, str), v))


def group_index(groups: Sequence[Any], labels: Sequence[Any], *, where: str) -> torch.Tensor:
    """Each point's position in ``labels`` (an int64 tensor).

    Raises:
        DataError: A group that ``labels`` does not hold (it has no threshold).
    """
    position = {label: i for i, label in enumerate(labels)}
    unknown = sorted({g for g in groups if g not in position}, key=lambda v: (isinstance(v, str), v))
    if unknown:
        shown = ", ".join(map(repr, unknown[:5])) + (" …" if len(unknown) > 5 else "")
        raise DataError(f"{where} name {len(unknown)} group(s) the certificate has no threshold for ({shown}); "
                        "calibrate with examples of every group, or leave these points out")
    return torch.tensor([position[g] for g in groups], dtype=torch.int64)


def group_quantiles(label_scores: torch.Tensor, index: torch.Tensor, labels: Sequence[Any], alpha: float, *,
                    delta: float | None = None) -> list[QuantileResult]:
    """One :func:`conformal_quantile` per group.

    Raises:
        CalibrationError: Some groups have too few points; the message names them.
    """
    scores = label_scores.cpu()
    counts = torch.bincount(index, minlength=len(labels)).tolist()
    need = min_calibration_size(alpha, delta)
    short = [(labels[g], counts[g]) for g in range(len(labels)) if counts[g] < need]
    if short:
        listing = ", ".join(f"group {g!r} has {c}" for g, c in short[:5]) + (" …" if len(short) > 5 else "")
        raise CalibrationError(
            f"group-conditional calibration at alpha={alpha}" + ("" if delta is None else f", delta={delta}")
            + f" needs at least {need} calibration points in every group, but {len(short)} of {len(labels)} groups "
            f"have fewer ({listing}); merge small groups, add data, or raise alpha")
    return [conformal_quantile(scores[index == g], alpha, delta=delta) for g in range(len(labels))]


def group_guarantee(per_group: Sequence[dict[str, Any]], *, delta: float | None) -> dict[str, Any]:
    """The certificate's ``guarantee`` for per-group guarantees (``per_group`` in the groups' order)."""
    uppers = [g["coverage_at_most"] for g in per_group]
    first = per_group[0]
    if first["type"] == "marginal":
        statement = (f"Group-conditional (Mondrian by user group) guarantee: for every group g, a new test point of "
                     f"group g exchangeable with the calibration points of group g gets a prediction set containing "
                     f"its true label with probability at least {first['coverage_at_least']:.6g}; the group of every "
                     "point must be given where the sets are made; each group's statement is under per_group.")
    else:
        statement = (f"Group-conditional training-conditional (PAC) guarantee: for each group g separately, with "
                     f"probability at least {1 - delta:.6g} over the draw of its calibration points, the coverage of "
                     f"test points of group g is at least {first['coverage_at_least']:.6g}; all {len(per_group)} "
                     f"groups hold together with probability at least {max(0.0, 1 - len(per_group) * delta):.6g} "
                     "(union bound); each group's statement is under per_group.")
    return {"type": first["type"], "coverage_at_least": first["coverage_at_least"],
            "coverage_at_most": None if any(u is None for u in uppers) else max(uppers),
            "confidence": first["confidence"], "statement": statement, "per_group": [dict(g) for g in per_group]}


def groups_section(results: Sequence[QuantileResult], labels: Sequence[Any], record: dict[str, Any]) -> dict[str, Any]:
    """The certificate's ``groups`` section."""
    return {**record, "labels": list(labels), "counts": [r.n for r in results], "quantile": [r.qhat for r in results],
            "quantile_level": [r.level for r in results], "rank": [r.k for r in results]}


def check_groups_section(section: Any, *, source: str, n: int, rank_of) -> list[Any]:
    """Validate a certificate's ``groups`` section; returns its labels.

    Raises:
        CertificateError: The first problem, naming the field.
    """
    def bad(field: str, problem: str) -> CertificateError:
        return CertificateError(f"{source}: field 'groups.{field}' {problem}; recalibrate with prunecp calibrate "
                                "to write a fresh certificate")

    if not isinstance(section, dict):
        raise bad("", "must be a JSON object or null")
    labels = section.get("labels")
    if not isinstance(labels, list) or not labels or not all(
            (is_int(v) or (isinstance(v, str) and 0 < len(v) <= MAX_LABEL_LENGTH)) for v in labels):
        raise bad("labels", "must be a non-empty list of integer or string group labels")
    if labels != sorted_labels(labels) or len(set(labels)) != len(labels):
        raise bad("labels", "must be distinct and sorted")
    size = len(labels)
    checks = {"counts": lambda v: is_int(v) and v >= 1, "quantile": is_finite_number,
              "quantile_level": lambda v: is_finite_number(v) and 0 < v <= 1, "rank": is_int}
    for key, check in checks.items():
        values = section.get(key)
        if not isinstance(values, list) or len(values) != size or not all(check(v) for v in values):
            raise bad(key, f"must be a list of {size} values (one per group)")
    if sum(section["counts"]) != n:
        raise bad("counts", f"sums to {sum(section['counts'])}, not data.n={n}")
    for g, (k, m) in enumerate(zip(section["rank"], section["counts"], strict=True)):
        if k != rank_of(m):
            raise bad(f"rank[{g}]", f"is {k}, but n={m} gives {rank_of(m)}")
    for key in ("file", "sha256"):
        if not isinstance(section.get(key), str):
            raise bad(key, "must be a string")
    return labels
