"""``calibrate``: compute the conformal threshold of a model on the calibration split, as a certificate.

The work is split in two (style.md §3.6):

* the data loop, :func:`collect_logits`: logits and labels of every calibration example, sharded
  across ranks under torchrun and gathered back in dataset order (:func:`prunecp_cli.dist.gather_rows`);
* the maths, :func:`certificate_from_logits`: scores → quantile → guarantee → certificate, a pure
  function of the logits that tests call directly.

**Disjointness.** The guarantee needs calibration points the model never saw. A calibration file
whose sha256 the model's metadata lists as used (``score``, ``bn-recalibration``, ``fine-tune``,
``risk``, ...) is refused with a :class:`~prunecp_cli.errors.CalibrationError` naming the role.

**RAPS ``k_reg``.** When ``k_reg`` is not given it is chosen as algorithms.md §0.1 suggests, the
``(1 − alpha)``-quantile of the true label's rank, but on a seeded random ``tune_fraction`` (20 %) of
the calibration file that is then left out of the quantile. Choosing it on the calibration points
themselves would make the score depend on them, so calibration and test scores would no longer be
exchangeable; on a disjoint part the remaining points stay exchangeable with test points given the
choice, and the guarantee holds exactly with ``n`` = the remaining points (the certificate records
both, under ``nonconformity.tuning``). Pass ``k_reg`` to use every point for the quantile.
``lambda_reg`` defaults to 0.01, inside the range the RAPS paper uses (0.001 to 0.5) and the
nonconformity module's own default.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunecp_cli import dist
from prunecp_cli.conformal.certificate import build_certificate, class_conditional_guarantee
from prunecp_cli.conformal.conditional import conditional_metrics
from prunecp_cli.conformal.mondrian import (
    group_guarantee,
    group_index,
    group_quantiles,
    groups_section,
    sorted_labels,
)
from prunecp_cli.conformal.nonconformity import (
    NONCONFORMITY,
    RAPS,
    SAPS,
    Nonconformity,
    choose_k_reg,
    prediction_sets,
)
from prunecp_cli.conformal.predictor import CALIBRATION_STREAM
from prunecp_cli.conformal.quantile import (
    class_conditional_quantiles,
    conformal_quantile,
    decimal_fraction,
    guarantee,
    min_calibration_size,
)
from prunecp_cli.conformal.stats import coverage, mean_set_size, per_class_coverage, set_size_histogram
from prunecp_cli.errors import CalibrationError, DataError, UsageError
from prunecp_cli.io.data import split_indices
from prunecp_cli.io.digest import weights_sha256
from prunecp_cli.io.files import write_json
from prunecp_cli.measure import FLOPS_UNIT, count_flops, count_params
from prunecp_cli.options import DataSource, ModelSource, RunOptions
from prunecp_cli.pipeline.groups import read_groups
from prunecp_cli.pipeline.inference import collect_logits
from prunecp_cli.pipeline.risk_record import risk_record
from prunecp_cli.pipeline.session import Session, open_source
from prunecp_cli.types import UsedData

__all__ = [
    "DEFAULT_LAMBDA_REG",
    "TUNE_FRACTION",
    "calibrate",
    "certificate_from_logits",
    "check_labels",
    "check_unused",
    "make_nonconformity",
    "model_record",
    "set_metrics",
]

DEFAULT_LAMBDA_REG = 0.01
DEFAULT_SAPS_WEIGHT = 0.2
"""SAPS's ranking weight when ``lambda_reg`` is not given (TorchCP's default; the paper tunes 0.02 to 0.6)."""
TUNE_FRACTION = 0.2
RANDOMIZABLE = ("aps", "raps", "topk", "saps")


def make_nonconformity(name: str, *, randomized: bool = False, k_reg: int | None = None,
                       lambda_reg: float | None = None, seed: int = 0) -> Nonconformity:
    """The nonconformity ``name`` (``lac``, ``aps``, ``raps``, ``topk``, ``saps`` or ``margin``) with its options.

    ``k_reg=None`` gives RAPS ``k_reg = 1`` here (:func:`calibrate` chooses it on held-out points
    instead); ``lambda_reg`` is RAPS's penalty per rank beyond ``k_reg`` (None: :data:`DEFAULT_LAMBDA_REG`)
    and SAPS's ranking weight, its penalty per rank beyond the first (None: :data:`DEFAULT_SAPS_WEIGHT`).

    Raises:
        UsageError: An unknown name, or an option that does not apply to it.
    """
    if name not in NONCONFORMITY:
        raise UsageError(f"{{nonconformity}} {name!r} is unknown; use one of {', '.join(NONCONFORMITY)}", arguments={"nonconformity": "nonconformity"})
    if name not in RANDOMIZABLE and randomized:
        raise UsageError(f"{{randomized}} applies to {', '.join(RANDOMIZABLE)} only; {name} has no random part", arguments={"randomized": "randomized"})
    if name != "raps" and k_reg is not None:
        raise UsageError("{k_reg} applies to {nonconformity} raps only", arguments={"k_reg": "k_reg", "nonconformity": "nonconformity"})
    if name not in ("raps", "saps") and lambda_reg is not None:
        raise UsageError("{lambda_reg} applies to {nonconformity} raps and saps only", arguments={"lambda_reg": "lambda_reg", "nonconformity": "nonconformity"})
    if name in ("lac", "margin"):
        return NONCONFORMITY[name]()
    if name in ("aps", "topk"):
        return NONCONFORMITY[name](randomized=randomized, seed=seed if randomized else None)
    if name == "saps":
        return SAPS(weight=DEFAULT_SAPS_WEIGHT if lambda_reg is None else lambda_reg, randomized=randomized,
                    seed=seed if randomized else None)
    return RAPS(lambda_reg=DEFAULT_LAMBDA_REG if lambda_reg is None else lambda_reg,
                k_reg=1 if k_reg is None else k_reg, randomized=randomized, seed=seed if randomized else None)


def set_metrics(sets: torch.Tensor, labels: torch.Tensor, *, logits: torch.Tensor) -> dict[str, Any]:
    """Coverage, mean set size, top-1 accuracy, set-size histogram and per-class coverage of sets."""
    labels = labels.to(sets.device)
    return {
        "coverage": coverage(sets, labels),
        "mean_set_size": mean_set_size(sets),
        "top1_accuracy": float((logits.argmax(1).to(labels.device) == labels).double().mean()),
        "set_size_histogram": set_size_histogram(sets),
        "per_class_coverage": per_class_coverage(sets, labels, sets.shape[1]),
    }


def certificate_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    delta: float | None = None,
    nonconformity: Nonconformity,
    class_conditional: bool = False,
    model: dict[str, Any],
    data: dict[str, Any],
    tuning: dict[str, Any] | None = None,
    risk_control: dict[str, Any] | None = None,
    groups: tuple[list[Any], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The certificate of calibration logits: scores, quantile(s), guarantee, in-sample metrics.

    Randomised scores draw ``U`` from the nonconformity's :data:`CALIBRATION_STREAM`.

    Args:
        logits: Calibration logits ``[n, K]``.
        labels: Their labels ``[n]``.
        alpha: Target miscoverage in (0, 1).
        delta: PAC failure probability in (0, 1), or None for the marginal guarantee.
        nonconformity: The score.
        class_conditional: One threshold per class (Mondrian).
        model: The certificate's ``model`` record (``num_classes`` must equal ``K``).
        data: The certificate's ``data`` record; ``n`` is set here.
        tuning: How a score parameter was chosen on held-out points, or None.
        risk_control: The model's Learn-then-Test record, or None.
        groups: ``(one group label per point, {file, sha256})`` for Mondrian calibration by user group
            (:mod:`prunecp_cli.conformal.mondrian`), or None.

    Raises:
        UsageError: Both ``class_conditional`` and ``groups``.
        CalibrationError: Too few points (naming the smallest n that works) or non-finite scores.
        DataError: Labels outside the model's classes.
    """
    labels = check_labels(labels, logits)
    model = {"num_classes": logits.shape[1], **model}
    if model["num_classes"] != logits.shape[1]:
        raise ValueError(f"model record says {model['num_classes']} classes but the logits have {logits.shape[1]}")
    all_scores = nonconformity.all_scores(logits, generator=nonconformity.make_generator(stream=CALIBRATION_STREAM))
    label_scores = all_scores.gather(1, labels.to(all_scores.device).unsqueeze(1)).squeeze(1)
    num_classes = logits.shape[1]
    section = None
    if groups is not None:
        if class_conditional:
            raise UsageError("{class_conditional} and {groups} are two Mondrian taxonomies; choose one",
                             arguments={"class_conditional": "class_conditional", "groups": "groups"})
        names = sorted_labels(groups[0])
        index = group_index(groups[0], names, where="the calibration group labels")
        results = group_quantiles(label_scores, index, names, alpha, delta=delta)
        cpu_scores = label_scores.cpu()
        claim = group_guarantee([guarantee(r, label_scores=cpu_scores[index == g]) for g, r in enumerate(results)],
                                delta=delta)
        qhat = torch.tensor([r.qhat for r in results], dtype=torch.float64)[index].unsqueeze(1).to(all_scores.device)
        section = groups_section(results, names, groups[1])
    elif class_conditional:
        results = class_conditional_quantiles(label_scores, labels, num_classes, alpha, delta=delta)
        per_class = [guarantee(r, label_scores=label_scores[labels.to(label_scores.device) == c])
                     for c, r in enumerate(results)]
        claim = class_conditional_guarantee(per_class, alpha=alpha, delta=delta)
        qhat: Any = torch.tensor([r.qhat for r in results], dtype=torch.float64)
    else:
        results = conformal_quantile(label_scores, alpha, delta=delta)
        claim = guarantee(results, label_scores=label_scores)
        qhat = results.qhat
    sets = prediction_sets(all_scores, qhat)
    return build_certificate(
        model=model, data={**data, "n": int(labels.shape[0])}, nonconformity=nonconformity, alpha=alpha,
        delta=delta, results=results, guarantee=claim,
        calibration={**set_metrics(sets, labels, logits=logits), **conditional_metrics(sets, labels, alpha=alpha)},
        tuning=tuning, risk_control=risk_control, groups=section,
    )


def check_labels(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Labels as int64, checked against the logits' shape.

    Raises:
        DataError: A count mismatch, no points, or a label outside ``0..K-1``.
    """
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0] or labels.is_floating_point():
        raise DataError(f"need one integer label per example ({logits.shape[0]}), got shape {list(labels.shape)}")
    if labels.numel() == 0:
        raise DataError("the data hold no labelled examples; pass a non-empty split")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= logits.shape[1]:
        raise DataError(f"labels span {low}..{high}, but the model has {logits.shape[1]} classes (0..{logits.shape[1] - 1}); "
                        "pass data labelled for this model")
    return labels.to(torch.int64)


def check_unused(sha256: str, used: list[UsedData], *, file: str, purpose: str = "calibration") -> None:
    """Refuse data the model has already seen.

    Raises:
        CalibrationError: ``sha256`` is among ``used``; the message names the role and the fix.
    """
    for record in used:
        if record.sha256 == sha256:
            raise CalibrationError(
                f"{file} was already used as {record.role} data for this model (recorded as {record.file}), so it "
                f"cannot serve as {purpose} data: the conformal guarantee needs points the model never saw; pass "
                "a disjoint split (score, calibration and test splits must be disjoint)"
            )


def model_record(session: Session) -> dict[str, Any]:
    """The certificate's ``model`` record of a session's model."""
    loaded = session.loaded
    return {
        "file": loaded.path.name,
        "sha256": loaded.sha256,
        "arch": loaded.meta.arch,
        "num_classes": session.num_classes,
        "params": count_params(session.model),
        "flops": count_flops(session.model, session.example),
        "flops_unit": FLOPS_UNIT,
    }


def _check_probability(name: str, value: float | None) -> None:
    if value is not None:
        decimal_fraction(value, name=name)  # UsageError outside (0, 1)


def calibrate(
    model: str | Path | ModelSource,
    data: str | Path | DataSource,
    *,
    alpha: float = 0.1,
    delta: float | None = None,
    nonconformity: str = "lac",
    randomized: bool = False,
    k_reg: int | None = None,
    lambda_reg: float | None = None,
    class_conditional: bool = False,
    tune_fraction: float = TUNE_FRACTION,
    output: str | Path | None = None,
    run: RunOptions = RunOptions(),
) -> dict[str, Any]:
    """Calibrate ``model`` on the calibration split and return (and optionally write) its certificate.

    Args:
        model: A prunecp model file, or a dense checkpoint (a :class:`ModelSource` with ``arch``).
        data: The calibration split (labelled; never seen by the model).
        alpha: Target miscoverage in (0, 1).
        delta: With it, the training-conditional (PAC) guarantee at confidence ``1 - delta``.
        nonconformity: ``lac``, ``aps``, ``raps``, ``topk``, ``saps`` or ``margin``.
        randomized: Randomised APS/RAPS/Top-K/SAPS (``U`` drawn from ``seed``, recorded in the certificate).
        k_reg: RAPS ranks left unpenalised; None chooses it on held-out points (module docstring).
        lambda_reg: RAPS penalty per rank beyond ``k_reg`` (None: 0.01); SAPS ranking weight (None: 0.2).
        class_conditional: One threshold per class (Mondrian), each class with its own guarantee.
            ``data.groups`` (a :class:`DataSource` with a groups file) instead gives one threshold per
            user group (:mod:`prunecp_cli.conformal.mondrian`).
        tune_fraction: Share of the calibration file held out to choose RAPS ``k_reg``.
        output: Write the certificate here (atomically, rank 0 only).
        run: Device, batch size (default 256), seed (of randomised scores and of the ``k_reg``
            hold-out) and reporter.

    Returns:
        The certificate dict (design.md §4).

    Raises:
        UsageError: ``alpha``/``delta`` outside (0, 1) or options that do not fit the nonconformity.
        CalibrationError: Data the model already used, or too few points (naming the smallest n).
        DataError: Unlabelled data, or labels outside the model's classes.
    """
    model, data = ModelSource.of(model), DataSource.of(data)
    batch_size, seed, reporter = run.batch(256), run.seed, run.rep
    _check_probability("alpha", alpha)
    _check_probability("delta", delta)
    if not 0 < tune_fraction < 1:
        raise UsageError(f"tune_fraction={tune_fraction} must lie in (0, 1)")
    score = make_nonconformity(nonconformity, randomized=randomized, k_reg=k_reg, lambda_reg=lambda_reg, seed=seed)
    session = open_source(model, data, device=run.device, need_labels=True)
    dataset = session.data
    check_unused(dataset.sha256, session.used_data(), file=dataset.path.name)
    weights = weights_sha256(session.model)
    logits, labels = collect_logits(session.model, dataset, device=session.device, batch_size=batch_size,
                                    num_classes=session.num_classes, reporter=reporter, description="calibration")
    groups = None
    if data.groups is not None:
        if class_conditional:
            raise UsageError("{class_conditional} and {groups} are two Mondrian taxonomies; choose one",
                             arguments={"class_conditional": "class_conditional", "groups": "groups"})
        groups = list(read_groups(data.groups, n=len(dataset)))
    tuning = None
    if isinstance(score, RAPS) and k_reg is None:
        logits, labels, score, tuning, rest = _tune_k_reg(logits, labels, score, alpha=alpha, delta=delta,
                                                          fraction=tune_fraction, seed=seed)
        if groups is not None:
            groups[0] = [groups[0][i] for i in rest.tolist()]
    control = risk_record(session.loaded.meta.extra.get("risk_control"), weights=weights, nonconformity=score,
                          alpha=alpha, delta=delta, class_conditional=class_conditional, reporter=reporter)
    cert = certificate_from_logits(
        logits, labels, alpha=alpha, delta=delta, nonconformity=score, class_conditional=class_conditional,
        model=model_record(session), data={"file": dataset.path.name, "sha256": dataset.sha256},
        tuning=tuning, risk_control=control, groups=None if groups is None else tuple(groups),
    )
    if output is not None and dist.rank() == 0:
        write_json(output, cert)
    dist.barrier()
    return cert


def _tune_k_reg(logits: torch.Tensor, labels: torch.Tensor, score: RAPS, *, alpha: float, delta: float | None,
                fraction: float, seed: int):
    """Choose RAPS ``k_reg`` on a held-out part; the remaining points, the tuned score, its record, their indices."""
    n = logits.shape[0]
    n_tune = max(1, int(round(fraction * n)))
    need = min_calibration_size(alpha, delta)
    if n - n_tune < need:
        total = math.ceil(need / (1 - fraction)) + 1
        raise CalibrationError(
            f"n={n} calibration points are too few for RAPS with an automatic k_reg: {n_tune} ({fraction:.0%}) are "
            f"held out to choose k_reg, leaving {n - n_tune}, but alpha={alpha}"
            + ("" if delta is None else f", delta={delta}")
            + f" needs at least {need}; use at least {total} calibration points, pass --k-reg to use them all, "
            "or a larger alpha"
        )
    tune, rest = split_indices(n, [fraction, 1 - fraction], seed=seed)
    if len(tune) == 0:
        tune, rest = rest[:1], rest[1:]
    labels = check_labels(labels, logits)
    tune_t, rest_t = torch.from_numpy(np.asarray(tune)), torch.from_numpy(np.asarray(rest))
    chosen = choose_k_reg(logits[tune_t], labels[tune_t], alpha)
    tuned = RAPS(lambda_reg=score.lambda_reg, k_reg=chosen, randomized=score.randomized, seed=score.seed)
    record = {
        "parameter": "k_reg", "value": chosen, "n": len(tune), "fraction": fraction, "seed": seed,
        "rule": "(1 - alpha)-quantile of the true label's rank on these held-out points, which are not among "
                "the data.n points the quantile was taken on",
    }
    return logits[rest_t], labels[rest_t], tuned, record, rest_t
