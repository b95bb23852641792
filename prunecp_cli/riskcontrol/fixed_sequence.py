"""Fixed-sequence testing: the family-wise error control step of Learn-then-Test.

Hypotheses ``H_0, H_1, ...`` (``H_j``: the risk at level ``lambda_j`` exceeds alpha) are ordered
before seeing the calibration data, from the least to the most aggressive pruning level. The
procedure rejects ``H_0, H_1, ...`` in turn while ``p_j <= delta`` and stops at the first ``j*``
with ``p_j > delta``; the certified level is ``lambda_{j*-1}``. Because every hypothesis is tested
at the full level ``delta`` only after all its predecessors were rejected, the probability of
rejecting any true null is at most ``delta`` (Angelopoulos, Bates, Candès, Jordan, Lei 2021,
"Learn then Test", Proposition 2 / Section 4; Bauer 1991), whatever the dependence between the
p-values.

**Rejection rule: non-strict, ``p_j <= delta``.** A p-value is super-uniform under its null,
``P(p <= u) <= u`` for every ``u``, so rejecting at ``p <= delta`` keeps the family-wise error rate
at most ``delta`` exactly, and it is the least conservative rule that does. (The reference code of
Alvarez 2024 uses ``p < delta``; the two differ only when a p-value equals ``delta`` exactly.)

When ``p_0 > delta`` nothing is certified and the result carries ``last_certified=None``, never the
index ``-1`` (the reference code returns ``lambda_{-1}`` in that case, which is a bug).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from prunecp_cli.errors import CalibrationError, UsageError

__all__ = ["FixedSequenceResult", "fixed_sequence_search", "fixed_sequence_test"]

L = TypeVar("L")


@dataclass(frozen=True)
class FixedSequenceResult:
    """Outcome of a fixed-sequence test.

    Attributes:
        last_certified: Index of the last rejected hypothesis (the most aggressive certified level),
            or ``None`` when even the first hypothesis was not rejected.
        tested: Number of hypotheses tested: the rejected ones plus the first failure, if any.
        rejected: ``rejected[j]`` is whether ``H_j`` was rejected (its level certified); it is
            ``True`` for ``j < tested`` except at the failure, and ``False`` for untested ones.
            Same length as ``pvalues``.
        pvalues: The p-values known to the procedure: all of those given to
            :func:`fixed_sequence_test`, or only the ``tested`` ones for
            :func:`fixed_sequence_search`.
    """

    last_certified: int | None
    tested: int
    rejected: list[bool]
    pvalues: list[float]

    @property
    def n_certified(self) -> int:
        """Number of certified levels, ``last_certified + 1`` or 0."""
        return 0 if self.last_certified is None else self.last_certified + 1


def _check_delta(delta: float) -> float:
    d = float(delta)
    if not 0.0 < d < 1.0:  # also rejects NaN
        raise UsageError(
            f"delta={delta!r} is not a valid failure probability; it must lie strictly between 0 and 1, "
            "e.g. 0.05"
        )
    return d


def _check_pvalue(p: Any, j: int) -> float:
    try:
        value = float(p)
    except (TypeError, ValueError):
        raise CalibrationError(f"p-value #{j} is {p!r}, not a number; it must be a float in [0, 1]") from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise CalibrationError(
            f"p-value #{j} is {value!r}, outside [0, 1]; the risk computation that produced it is broken"
        )
    return value


def fixed_sequence_test(pvalues: Sequence[float], delta: float) -> FixedSequenceResult:
    """Run fixed-sequence testing on p-values already computed, in the given order.

    Rejects ``H_j`` while ``p_j <= delta`` (non-strict, see the module docstring) and stops at the
    first ``p_j > delta``.

    Args:
        pvalues: p-values of ``H_0, H_1, ...`` in the order fixed before calibration (least
            aggressive level first). At least one.
        delta: Family-wise error rate, strictly between 0 and 1.

    Returns:
        The :class:`FixedSequenceResult`; ``rejected`` and ``pvalues`` cover every hypothesis given.

    Raises:
        UsageError: ``delta`` is outside ``(0, 1)`` or no p-value is given.
        CalibrationError: A p-value is NaN or outside ``[0, 1]``.
    """
    d = _check_delta(delta)
    ps = [_check_pvalue(p, j) for j, p in enumerate(pvalues)]
    if not ps:
        raise UsageError("no hypotheses to test: the grid of levels is empty; give at least one level")
    rejected = [False] * len(ps)
    tested = 0
    for j, p in enumerate(ps):
        tested = j + 1
        if p > d:
            break
        rejected[j] = True
    n_rejected = sum(rejected)
    return FixedSequenceResult(
        last_certified=n_rejected - 1 if n_rejected else None,
        tested=tested,
        rejected=rejected,
        pvalues=ps,
    )


def fixed_sequence_search(
    levels: Sequence[L], evaluate_pvalue: Callable[[L], float], delta: float
) -> FixedSequenceResult:
    """Lazy fixed-sequence testing: compute each p-value only when the procedure needs it.

    Calls ``evaluate_pvalue(levels[0])``, ``evaluate_pvalue(levels[1])``, ... in order and stops
    right after the first p-value above ``delta``, so the caller never prunes or evaluates the model
    at a level whose result cannot change the outcome. The result is identical to
    :func:`fixed_sequence_test` on the full list, except that ``pvalues`` and ``rejected`` hold only
    the ``tested`` hypotheses.

    Args:
        levels: Candidate levels in the order fixed before calibration (least aggressive first).
        evaluate_pvalue: Returns the p-value of ``H: risk(level) > alpha`` for one level.
        delta: Family-wise error rate, strictly between 0 and 1.

    Returns:
        The :class:`FixedSequenceResult`; ``last_certified`` indexes ``levels``.

    Raises:
        UsageError: ``delta`` is outside ``(0, 1)`` or ``levels`` is empty.
        CalibrationError: ``evaluate_pvalue`` returned NaN or a value outside ``[0, 1]``.
    """
    d = _check_delta(delta)
    if len(levels) == 0:
        raise UsageError("no hypotheses to test: the grid of levels is empty; give at least one level")
    ps: list[float] = []
    rejected: list[bool] = []
    for j, level in enumerate(levels):
        p = _check_pvalue(evaluate_pvalue(level), j)
        ps.append(p)
        rejected.append(p <= d)
        if p > d:
            break
    n_rejected = sum(rejected)
    return FixedSequenceResult(
        last_certified=n_rejected - 1 if n_rejected else None,
        tested=len(ps),
        rejected=rejected,
        pvalues=ps,
    )
