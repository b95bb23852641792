"""The Waudby-Smith–Ramdas (WSR) betting p-value: variance-adaptive, for losses bounded in ``[0, 1]``.

For ``H: R > alpha`` (``R`` the mean loss), a gambler bets against the null on the losses in turn:
with a predictable bet ``nu_i in [0, 1]`` (it depends on ``L_1..L_{i-1}`` only) the wealth

    ``K_i = prod_{j <= i} (1 - nu_j (L_j - alpha))``

is a non-negative supermartingale under ``H`` (each factor has conditional mean ``1 - nu_j (R - alpha)
<= 1``, and is at least ``alpha > 0`` since ``L_j <= 1``), so by Ville's inequality
``P(max_i K_i >= 1/u) <= u`` for every ``u``: ``p = min(1, 1 / max_i K_i)`` is super-uniform.

The bets are those of the WSR bound in Bates, Angelopoulos, Lei, Malik & Jordan (2021),
"Distribution-Free, Risk-Controlling Prediction Sets", JACM 68(6), Section 3.1.5 (after
Waudby-Smith & Ramdas 2020, "Estimating means of bounded random variables by betting"):

* ``mu_i = (1/2 + sum_{j <= i} L_j) / (1 + i)`` and ``s2_i = (1/4 + sum_{j <= i} (L_j - mu_j)^2) / (1 + i)``;
* ``nu_i = min(1, sqrt(2 ln(1/delta) / (n s2_{i-1})))`` with ``s2_0 = 1/4``, where ``delta`` is the
  level the p-value will be compared with (Learn-then-Test's family-wise error rate).

Small variance means large bets, hence the power on low-variance losses such as ``excess-error``
(mostly 1/2) that Hoeffding–Bentkus, which assumes the worst-case variance, lacks.

**Order.** The bound needs the losses in an order fixed before they are seen; the data file's order
may be sorted (by class, by source), which would make successive losses dependent. :func:`wsr_pvalue`
therefore bets in the order of a permutation drawn from a fixed seed (:data:`ORDER_SEED`) that depends
only on ``n``: independent of the losses, so ``L_{pi(1)}, L_{pi(2)}, ...`` are i.i.d. when the risk data
are, and the p-value is reproducible.
"""

from __future__ import annotations

import math

import numpy as np

from prunecp_cli.errors import CalibrationError, UsageError

__all__ = ["ORDER_SEED", "wsr_pvalue", "wsr_pvalues"]

ORDER_SEED = 20211001
"""Seed of the betting order (a constant: the order must not depend on the losses)."""


def wsr_pvalues(losses: np.ndarray, alpha: float, *, delta: float) -> np.ndarray:
    """WSR p-values of many loss sequences at once, betting in the order given (no permutation).

    Args:
        losses: Array ``[..., n]`` of losses in ``[0, 1]``; the last axis is the betting order.
        alpha: The null's risk level, in (0, 1).
        delta: The level the bets are tuned for, in (0, 1).

    Returns:
        Array ``[...]`` of p-values in ``(0, 1]``.
    """
    x = np.asarray(losses, dtype=np.float64)
    n = x.shape[-1]
    steps = np.arange(1, n + 1, dtype=np.float64)
    mu = (0.5 + np.cumsum(x, axis=-1)) / (1.0 + steps)
    s2 = (0.25 + np.cumsum((x - mu) ** 2, axis=-1)) / (1.0 + steps)
    previous = np.concatenate([np.full(x.shape[:-1] + (1,), 0.25), s2[..., :-1]], axis=-1)
    nu = np.minimum(1.0, np.sqrt(2.0 * math.log(1.0 / delta) / (n * previous)))
    log_wealth = np.cumsum(np.log1p(-nu * (x - alpha)), axis=-1)
    return np.minimum(1.0, np.exp(-np.max(log_wealth, axis=-1)))


def wsr_pvalue(losses: np.ndarray, alpha: float, *, delta: float) -> float:
    """The WSR p-value of ``H: mean loss > alpha`` for one sample, betting in the :data:`ORDER_SEED` order.

    Args:
        losses: Per-example losses in ``[0, 1]``, at least one.
        alpha: Target risk, strictly between 0 and 1.
        delta: The level the p-value is compared with (Learn-then-Test's ``delta``), in (0, 1).

    Returns:
        The p-value in ``(0, 1]``.

    Raises:
        UsageError: ``alpha`` or ``delta`` outside (0, 1).
        CalibrationError: No losses, or losses outside ``[0, 1]``.
    """
    for name, value in (("alpha", alpha), ("delta", delta)):
        if not 0.0 < float(value) < 1.0:
            raise UsageError(f"{name}={value!r} must lie strictly between 0 and 1, e.g. 0.05")
    x = np.asarray(losses, dtype=np.float64).ravel()
    if x.size == 0:
        raise CalibrationError("no losses to bound; the risk data hold no examples")
    if not np.all((x >= -1e-12) & (x <= 1.0 + 1e-12)):
        raise CalibrationError("losses must lie in [0, 1] for the WSR p-value (rescale them, e.g. (l + 1) / 2)")
    order = np.random.default_rng(ORDER_SEED).permutation(x.size)
    return float(wsr_pvalues(np.clip(x[order], 0.0, 1.0), float(alpha), delta=float(delta)))
