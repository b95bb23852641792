"""The risk side of confident pruning: levels, losses on the risk data, p-values, the statement.

**Risks** (:mod:`prunecp_cli.riskcontrol.losses`): ``disagreement`` (label-free, pruned top-1 ≠
dense top-1), ``error`` (pruned top-1 error), ``excess-error`` (pruned minus dense error, loss
rescaled to ``[0, 1]``, tested at ``(ε + 1) / 2``) and ``set-size`` (mean conformal set size ≤ B).
p-values: exact binomial for the 0/1 losses, WSR betting (:mod:`prunecp_cli.riskcontrol.betting`) for the
bounded ones; ``hb``, ``hoeffding`` and ``bentkus`` on request.

**Set size.** A set size depends on a conformal threshold q̂ that must be calibrated on labelled
data disjoint from the test points. The risk data are therefore split in two halves by a permutation
seeded with ``seed`` and fixed before anything is computed: at each level the first half calibrates
q̂ of the certificate's nonconformity at the certificate's alpha (and delta), for that pruned model,
and the second half carries the test (``n`` is its size). Given the first half, q̂ is fixed and the
second half's losses are i.i.d., so the p-values stay valid. The statement is about sets thresholded
at that q̂ (recorded per level); a later ``calibrate`` draws its own q̂ from fresh data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunecp_cli.errors import UsageError
from prunecp_cli.io.data import split_indices
from prunecp_cli.io.files import sha256_file
from prunecp_cli.riskcontrol.betting import wsr_pvalue
from prunecp_cli.riskcontrol.fixed_sequence import FixedSequenceResult, fixed_sequence_search
from prunecp_cli.riskcontrol.losses import RiskSpec, get_risk
from prunecp_cli.riskcontrol.pvalues import PVALUE_METHODS, pvalue

RISK_PVALUES = ("binomial", "wsr", *[m for m in PVALUE_METHODS if m != "binomial"])
"""p-values a risk test accepts: the mean-based ones of :mod:`~prunecp_cli.riskcontrol.pvalues` and ``wsr``."""
DEFAULT_GRID = tuple(round(0.05 * j, 2) for j in range(1, 20))
GRID_KINDS = ("ratio", "flops")
_PHRASES = {
    "disagreement": "the share of inputs on which the pruned model's top-1 prediction differs from the dense model's",
    "error": "the pruned model's top-1 error rate",
    "excess-error": "the pruned model's top-1 error rate minus the dense model's",
    "set-size": "the mean size of the pruned model's conformal prediction sets",
}


def parse_grid(text: str | Sequence[float] | None) -> list[float]:
    """Levels from ``0.05,0.1,0.2`` or ``START:STOP:STEP`` (inclusive), default 0.05 … 0.95.

    Raises:
        UsageError: unparsable, outside (0, 1), or not strictly increasing.
    """
    if text is None:
        return list(DEFAULT_GRID)
    shown = text if isinstance(text, str) else ",".join(map(str, text))
    try:
        if not isinstance(text, str):
            levels = [float(v) for v in text]
        elif ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if not step > 0:
                raise ValueError
            levels = [round(start + i * step, 10) for i in range(math.floor((stop - start) / step + 1e-9) + 1)]
        else:
            levels = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{{grid}} {shown!r} is not a list of levels; give e.g. 0.05,0.1,0.2 or "
                         "START:STOP:STEP such as 0.01:0.99:0.01", arguments={"grid": "grid"}) from None
    if not levels or not all(0.0 < v < 1.0 for v in levels) or any(b <= a for a, b in zip(levels, levels[1:], strict=False)):
        raise UsageError(f"{{grid}} {shown!r}: levels must lie in (0, 1) and increase strictly, because the test "
                         "runs from the least to the most aggressive level; e.g. 0.05,0.1,0.2", arguments={"grid": "grid"})
    return levels


def check_open(flag: str, value: float | None) -> None:
    if value is not None and not 0.0 < float(value) < 1.0:  # also rejects NaN
        raise UsageError(f"{flag} {value} must lie strictly between 0 and 1, e.g. {flag} 0.05")


@dataclass(frozen=True)
class RiskTest:
    """How one risk is tested at every level.

    Attributes:
        spec: the risk (loss, labels needed, binary or bounded).
        target: the user's bound: ε for a risk, ``B`` for ``set-size``.
        loss_alpha: the level the mean loss is tested at (ε, ``(ε+1)/2`` or ``(B−1)/(K−1)``).
        pvalue: p-value method (``binomial``, ``wsr``, ``hb``, ``hoeffding`` or ``bentkus``).
        delta: family-wise error rate.
        num_classes: classes of the model.
    """

    spec: RiskSpec
    target: float
    loss_alpha: float
    pvalue: str
    delta: float
    num_classes: int

    def pvalue_of(self, losses: np.ndarray) -> tuple[float, float]:
        """``(mean loss, p-value of H: risk > target)`` for per-example losses in ``[0, 1]``."""
        losses = np.asarray(losses, dtype=np.float64)
        mean = float(losses.sum()) / losses.size if losses.size else 0.0
        if self.pvalue == "wsr":
            return mean, wsr_pvalue(losses, self.loss_alpha, delta=self.delta)
        return mean, pvalue(self.pvalue, mean, losses.size, self.loss_alpha, binary=self.spec.binary)

    def in_user_units(self, loss_mean: float) -> float:
        """The risk the user bounded: the mean loss, the excess error ``2m − 1``, or the set size."""
        if self.spec.name == "excess-error":
            return 2.0 * loss_mean - 1.0
        if self.spec.name == "set-size":
            return 1.0 + (self.num_classes - 1) * loss_mean
        return loss_mean


def risk_test(risk: str, *, num_classes: int, max_risk: float | None = None, max_set_size: float | None = None,
              delta: float = 0.05, pvalue_method: str | None = None) -> RiskTest:
    """Validate the risk options and turn them into a :class:`RiskTest`.

    Raises:
        UsageError: a missing, contradictory or out-of-range option.
    """
    spec = get_risk(risk)
    check_open("--delta", delta)
    check_open("--max-risk", max_risk)
    if spec.target == "alpha":
        if max_risk is None:
            raise UsageError(f"{{risk}} {risk} needs {{max_risk}}, the largest tolerated risk, e.g. {{max_risk}} 0.02", arguments={"risk": "risk", "max_risk": "max_risk"})
        if max_set_size is not None:
            raise UsageError("{max_set_size} only applies to {risk} set-size; drop it or use {risk} set-size", arguments={"max_set_size": "max_set_size", "risk": "risk"})
        target = float(max_risk)
    else:
        if max_set_size is None or max_risk is not None:
            raise UsageError("{risk} set-size bounds the mean set size: give {max_set_size} B (and {cert}) instead "
                             "of {max_risk}", arguments={"risk": "risk", "max_set_size": "max_set_size", "cert": "cert", "max_risk": "max_risk"})
        target = float(max_set_size)
    method = pvalue_method or spec.pvalue_method
    if method not in RISK_PVALUES:
        raise UsageError(f"{{pvalue}} {method!r} is unknown; use one of {', '.join(RISK_PVALUES)}", arguments={"pvalue": "pvalue"})
    if method == "binomial" and not spec.binary:
        raise UsageError(f"{{pvalue}} binomial needs a 0/1 loss, but {{risk}} {risk} is bounded, not binary; use wsr or hb", arguments={"pvalue": "pvalue", "risk": "risk"})
    return RiskTest(spec, target, spec.loss_alpha(target, num_classes=num_classes), method, float(delta),
                    num_classes)


def certify_losses(losses_by_level: Sequence[np.ndarray], test: RiskTest) -> FixedSequenceResult:
    """Learn-then-Test on per-example losses already computed for every level (``losses_by_level[j]``)."""
    return fixed_sequence_search(range(len(losses_by_level)), lambda j: test.pvalue_of(losses_by_level[j])[1],
                                 test.delta)


@dataclass(frozen=True)
class SetSizeSplit:
    """The set-size risk's conformal setup: the certificate's nonconformity and levels, and the two halves.

    Attributes:
        nonconformity: the nonconformity function.
        alpha: miscoverage of the sets.
        delta: PAC failure probability of q̂, or None (marginal).
        class_conditional: one q̂ per class (Mondrian) instead of one for all.
        calibration: risk-data positions that calibrate q̂.
        test: risk-data positions that carry the test.
        certificate: what the metadata records about the certificate.
    """

    nonconformity: Any
    alpha: float
    delta: float | None
    class_conditional: bool
    calibration: np.ndarray
    test: np.ndarray
    certificate: dict[str, Any] = field(default_factory=dict)


def read_set_size_split(cert: str | Path, n: int, *, seed: int) -> SetSizeSplit:
    """Read a certificate's nonconformity, alpha and delta, and split ``n`` risk examples in seeded halves.

    Raises:
        CertificateError: the certificate is missing or invalid.
    """
    from prunecp_cli.conformal.certificate import load_certificate
    from prunecp_cli.conformal.nonconformity import from_parameters

    obj = load_certificate(cert)
    if obj.get("groups"):
        raise UsageError("{cert} is group-conditional (calibrate --groups); the set-size risk needs a certificate "
                         "without groups", arguments={"cert": "cert"})
    name, params = obj["nonconformity"]["name"], obj["nonconformity"].get("parameters", {})
    delta = obj.get("delta")
    calibration, test = split_indices(n, [0.5, 0.5], seed=seed)
    record = {"file": Path(cert).name, "sha256": sha256_file(cert), "data_sha256": obj["data"]["sha256"],
              "nonconformity": {"name": name, "parameters": params}, "alpha": obj["alpha"], "delta": delta,
              "class_conditional": bool(obj.get("class_conditional", False))}
    return SetSizeSplit(from_parameters(name, params), float(obj["alpha"]), None if delta is None else float(delta),
                        record["class_conditional"], calibration, test, record)


def level_losses(test: RiskTest, logits: torch.Tensor, *, dense_top1: torch.Tensor, labels: torch.Tensor | None,
                 set_size: SetSizeSplit | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-example losses of one pruned model on the risk data, and per-level facts (q̂ for set size).

    Args:
        test: the risk test.
        logits: the pruned model's logits on the risk data ``[N, K]``.
        dense_top1: the dense model's top-1 classes ``[N]``.
        labels: true classes ``[N]`` (None for label-free risks).
        set_size: the set-size split (required for ``set-size``).

    Returns:
        Losses in ``[0, 1]`` (for ``set-size`` only on the test half) and a dict of per-level facts.
    """
    top1 = logits.argmax(1)
    name = test.spec.name
    if name == "set-size":
        from prunecp_cli.conformal.nonconformity import prediction_sets
        from prunecp_cli.conformal.quantile import class_conditional_quantiles, conformal_quantile

        ss = set_size
        nc, cal, held = ss.nonconformity, torch.from_numpy(ss.calibration), torch.from_numpy(ss.test)
        scores = nc.label_scores(logits[cal], labels[cal], generator=nc.make_generator(stream=0))
        if ss.class_conditional:
            per_class = class_conditional_quantiles(scores, labels[cal], test.num_classes, ss.alpha, delta=ss.delta)
            qhat: Any = [q.qhat for q in per_class]
        else:
            qhat = conformal_quantile(scores, ss.alpha, delta=ss.delta).qhat
        sets = prediction_sets(nc.all_scores(logits[held], generator=nc.make_generator(stream=1)),
                               torch.tensor(qhat, dtype=torch.float64))
        return np.asarray(test.spec.loss(sets.sum(1).numpy(), test.target, test.num_classes)), {"qhat": qhat}
    if name == "disagreement":
        return np.asarray(test.spec.loss(top1.numpy(), dense_top1.numpy())), {}
    if name == "error":
        return np.asarray(test.spec.loss(top1.numpy(), labels.numpy())), {}
    return np.asarray(test.spec.loss(top1.numpy(), dense_top1.numpy(), labels.numpy())), {}


def statement(test: RiskTest, *, n: int, file: str, level: str, count: int, split: SetSizeSplit | None) -> str:
    """The guarantee in words, for the metadata and the certificate's ``risk_control`` section."""
    bound = f"{test.target:g}" if test.spec.name == "set-size" else f"{test.target * 100:g}%"
    phrase = _PHRASES[test.spec.name]
    if split is not None:
        nc = split.certificate["nonconformity"]["name"]
        phrase += (f" ({nc}, alpha {split.alpha:g}, threshold calibrated on the other {len(split.calibration)} "
                   "risk examples)")
    return (f"With probability at least {1 - test.delta:.4g} over the draw of the {n} risk examples ({file}), "
            f"{phrase} is at most {bound} on data exchangeable with them, for this model, pruned with {level} "
            f"(Learn-then-Test: fixed-sequence testing over {count} levels, {test.pvalue} p-values).")
