"""Super-uniform p-values for the null "the risk exceeds alpha", as used by Learn-then-Test.

For one candidate pruning level, the null hypothesis is ``H: R > alpha``, where ``R`` is the true
(population) risk of a loss bounded in ``[0, 1]``. Given the empirical risk ``risk_hat`` over ``n``
exchangeable calibration points, each function returns a p-value ``p`` with ``P(p <= u) <= u`` for
every ``u`` whenever ``H`` holds. A small ``p`` is evidence that the risk is at most ``alpha``.

* :func:`binomial_pvalue`: exact for ``{0, 1}`` losses, ``P(Bin(n, alpha) <= n_losses)``.
* :func:`hoeffding_pvalue`: ``exp(-2 n (alpha - risk_hat)_+^2)`` for any loss in ``[0, 1]``.
* :func:`bentkus_pvalue`: ``e * P(Bin(n, alpha) <= ceil(n risk_hat))`` for any loss in ``[0, 1]``.
* :func:`hoeffding_bentkus_pvalue`: the minimum of the Hoeffding (Chernoff/KL form) and Bentkus
  p-values, Learn-then-Test's bound for bounded losses when only the mean is known.
* ``wsr``: the Waudby-Smith–Ramdas betting p-value, :func:`prunecp_cli.riskcontrol.betting.wsr_pvalue`;
  it needs the per-example losses, not just their mean, so :func:`pvalue` does not compute it.

References:
    Angelopoulos, Bates, Candès, Jordan, Lei (2021), "Learn then Test: Calibrating Predictive
    Algorithms to Achieve Risk Control", arXiv:2110.01052, Section 3 and Appendix B.
    Bates, Angelopoulos, Lei, Malik, Jordan (2021), "Distribution-Free, Risk-Controlling
    Prediction Sets" (RCPS), JACM 68(6), Section 3.1 (Hoeffding, Bentkus and HB bounds).

All p-values are capped at 1. Every function is pure maths on Python floats; no array input.
"""

from __future__ import annotations

import math
import operator

from scipy.special import bdtr

from prunecp_cli.errors import CalibrationError, UsageError

__all__ = [
    "PVALUE_METHODS",
    "bentkus_pvalue",
    "binomial_pvalue",
    "hoeffding_bentkus_pvalue",
    "hoeffding_pvalue",
    "pvalue",
]

#: Names accepted by :func:`pvalue`, in the order they are listed to users.
PVALUE_METHODS: tuple[str, ...] = ("binomial", "hoeffding", "bentkus", "hb")

# n * risk_hat within this relative distance of an integer is taken to be that integer, so that a
# risk computed as count / n in floating point does not gain one loss from ceil(). This loosens the
# bound only when the true n * risk_hat lies within 1e-9 (relative) above an integer.
_COUNT_RTOL = 1e-9


def _check_n(n: int) -> int:
    try:
        n_int = operator.index(n)
    except TypeError:
        raise CalibrationError(
            f"n={n!r} is not an integer; it must be the number of calibration points, e.g. 500"
        ) from None
    if n_int < 1:
        raise CalibrationError(
            f"n={n_int} calibration points cannot bound a risk; provide at least 1 (in practice hundreds)"
        )
    return n_int


def _check_alpha(alpha: float) -> float:
    a = float(alpha)
    if not 0.0 < a < 1.0:  # also rejects NaN
        raise UsageError(
            f"alpha={alpha!r} is not a valid risk level; it must lie strictly between 0 and 1, e.g. 0.05"
        )
    return a


def _check_risk(risk_hat: float) -> float:
    r = float(risk_hat)
    if math.isnan(r) or not -1e-12 <= r <= 1.0 + 1e-12:
        raise CalibrationError(
            f"empirical risk {risk_hat!r} is outside [0, 1]; the loss must be bounded in [0, 1] "
            "(rescale it, e.g. excess error as (l + 1) / 2)"
        )
    return min(max(r, 0.0), 1.0)


def _ceil_count(n: int, risk_hat: float) -> int:
    """``ceil(n * risk_hat)``, snapping floating-point noise around integers."""
    x = n * risk_hat
    k = round(x)
    if abs(x - k) <= _COUNT_RTOL * max(1.0, x):
        return min(int(k), n)
    return min(math.ceil(x), n)


def _binom_cdf(k: int, n: int, p: float) -> float:
    """``P(Bin(n, p) <= k)`` for ``0 <= k <= n``."""
    if k >= n:
        return 1.0
    return float(bdtr(k, n, p))


def _h1(a: float, b: float) -> float:
    """Bernoulli KL divergence ``a ln(a/b) + (1-a) ln((1-a)/(1-b))`` with ``0 ln 0 = 0``."""
    first = a * math.log(a / b) if a > 0.0 else 0.0
    second = (1.0 - a) * math.log((1.0 - a) / (1.0 - b)) if a < 1.0 else 0.0
    return first + second


def binomial_pvalue(n_losses: int, n: int, alpha: float) -> float:
    """Exact p-value for a ``{0, 1}`` loss: ``P(Bin(n, alpha) <= n_losses)``.

    Under ``H: R > alpha`` the number of losses stochastically dominates ``Bin(n, alpha)``, so this
    p-value is super-uniform and it is the tightest valid one for binary losses (Learn then Test,
    Angelopoulos et al. 2021, Section 3; RCPS, Bates et al. 2021, Section 3.1.2).

    Args:
        n_losses: Number of calibration points with loss 1, in ``[0, n]``.
        n: Number of calibration points, at least 1.
        alpha: Target risk, strictly between 0 and 1.

    Returns:
        The p-value in ``[0, 1]``.

    Raises:
        CalibrationError: ``n`` or ``n_losses`` is not a valid count.
        UsageError: ``alpha`` is outside ``(0, 1)``.
    """
    n = _check_n(n)
    a = _check_alpha(alpha)
    k = float(n_losses)
    if not k.is_integer() or not 0 <= k <= n:
        raise CalibrationError(
            f"n_losses={n_losses!r} is not a count between 0 and n={n}; the binomial p-value needs "
            "{0, 1} losses (use the 'hb' p-value for bounded losses)"
        )
    return min(1.0, _binom_cdf(int(k), n, a))


def hoeffding_pvalue(risk_hat: float, n: int, alpha: float) -> float:
    """Hoeffding p-value ``exp(-2 n (alpha - risk_hat)_+^2)`` for a loss in ``[0, 1]``.

    Valid but loose; see RCPS (Bates et al. 2021, Section 3.1.1) and Learn then Test
    (Angelopoulos et al. 2021, Appendix B).

    Args:
        risk_hat: Empirical risk, the mean loss over the calibration points, in ``[0, 1]``.
        n: Number of calibration points, at least 1.
        alpha: Target risk, strictly between 0 and 1.

    Returns:
        The p-value in ``[0, 1]``; exactly 1 when ``risk_hat >= alpha``.

    Raises:
        CalibrationError: ``n`` or ``risk_hat`` is invalid.
        UsageError: ``alpha`` is outside ``(0, 1)``.
    """
    n = _check_n(n)
    a = _check_alpha(alpha)
    r = _check_risk(risk_hat)
    gap = max(a - r, 0.0)
    return min(1.0, math.exp(-2.0 * n * gap * gap))


def bentkus_pvalue(risk_hat: float, n: int, alpha: float) -> float:
    """Bentkus p-value ``e * P(Bin(n, alpha) <= ceil(n risk_hat))``, capped at 1.

    Valid for any loss in ``[0, 1]`` (Bentkus 2004; RCPS, Bates et al. 2021, Section 3.1.3).
    ``n * risk_hat`` within a relative ``1e-9`` of an integer is rounded to it before the ceiling.

    Args:
        risk_hat: Empirical risk in ``[0, 1]``.
        n: Number of calibration points, at least 1.
        alpha: Target risk, strictly between 0 and 1.

    Returns:
        The p-value in ``[0, 1]``.

    Raises:
        CalibrationError: ``n`` or ``risk_hat`` is invalid.
        UsageError: ``alpha`` is outside ``(0, 1)``.
    """
    n = _check_n(n)
    a = _check_alpha(alpha)
    r = _check_risk(risk_hat)
    return min(1.0, math.e * _binom_cdf(_ceil_count(n, r), n, a))


def hoeffding_bentkus_pvalue(risk_hat: float, n: int, alpha: float, *, binary: bool = False) -> float:
    """Hoeffding-Bentkus (HB) p-value of Learn then Test.

    ``min(exp(-n h1(min(risk_hat, alpha), alpha)), c * F_Bin(ceil(n risk_hat); n, alpha))`` with
    ``h1(a, b) = a ln(a/b) + (1-a) ln((1-a)/(1-b))`` (``0 ln 0 = 0``), ``c = e`` for a loss bounded
    in ``[0, 1]`` and ``c = 1`` for a ``{0, 1}`` loss, where the binomial term is exact (then HB
    equals :func:`binomial_pvalue`, since the Chernoff term is never below the binomial CDF).
    When ``risk_hat >= alpha`` the first term is ``exp(-n h1(alpha, alpha)) = 1``.
    Angelopoulos et al. (2021), Learn then Test, Proposition 3 / Appendix B; Bates et al. (2021),
    RCPS, Section 3.1.4.

    Args:
        risk_hat: Empirical risk in ``[0, 1]``.
        n: Number of calibration points, at least 1.
        alpha: Target risk, strictly between 0 and 1.
        binary: The loss takes only the values 0 and 1, so ``n * risk_hat`` is the loss count.

    Returns:
        The p-value in ``[0, 1]``.

    Raises:
        CalibrationError: ``n`` or ``risk_hat`` is invalid, or ``binary`` is set while
            ``n * risk_hat`` is not an integer.
        UsageError: ``alpha`` is outside ``(0, 1)``.
    """
    n = _check_n(n)
    a = _check_alpha(alpha)
    r = _check_risk(risk_hat)
    k = _ceil_count(n, r)
    if binary and abs(k - n * r) > _COUNT_RTOL * max(1.0, n * r):
        raise CalibrationError(
            f"risk_hat={risk_hat!r} over n={n} points is not a count / n, so the loss is not binary; "
            "call with binary=False"
        )
    hoeffding = math.exp(-n * _h1(min(r, a), a))
    bentkus = (1.0 if binary else math.e) * _binom_cdf(k, n, a)
    return min(1.0, hoeffding, bentkus)


def pvalue(method: str, risk_hat: float, n: int, alpha: float, *, binary: bool = False) -> float:
    """Dispatch to a p-value by name, always from the empirical risk.

    Args:
        method: One of :data:`PVALUE_METHODS`: ``"binomial"`` (needs ``n * risk_hat`` to be an
            integer, i.e. a ``{0, 1}`` loss), ``"hoeffding"``, ``"bentkus"`` or ``"hb"``.
        risk_hat: Empirical risk in ``[0, 1]``.
        n: Number of calibration points, at least 1.
        alpha: Target risk, strictly between 0 and 1.
        binary: Passed to :func:`hoeffding_bentkus_pvalue`; ignored by the other methods.

    Returns:
        The p-value in ``[0, 1]``.

    Raises:
        UsageError: ``method`` is unknown, or ``alpha`` is outside ``(0, 1)``.
        CalibrationError: ``n`` or ``risk_hat`` is invalid, or a binary method gets a non-binary risk.
    """
    if method == "binomial":
        n = _check_n(n)
        r = _check_risk(risk_hat)
        k = _ceil_count(n, r)
        if abs(k - n * r) > _COUNT_RTOL * max(1.0, n * r):
            raise CalibrationError(
                f"risk_hat={risk_hat!r} over n={n} points is not a count / n; the binomial p-value "
                "needs a {0, 1} loss (use method 'hb' for bounded losses)"
            )
        return binomial_pvalue(k, n, alpha)
    if method == "hoeffding":
        return hoeffding_pvalue(risk_hat, n, alpha)
    if method == "bentkus":
        return bentkus_pvalue(risk_hat, n, alpha)
    if method == "hb":
        return hoeffding_bentkus_pvalue(risk_hat, n, alpha, binary=binary)
    raise UsageError(
        f"unknown p-value method {method!r}; it has no bound implemented; use one of "
        + ", ".join(PVALUE_METHODS)
    )
