"""Confident pruning: prune as far as Learn-then-Test certifies (Alvarez 2024; algorithms.md §2).

**Guarantee.** For a grid ``λ_1 < … < λ_m`` of pruning levels fixed before the risk data are seen,
hypothesis ``H_j: R(λ_j) > ε`` is tested with a super-uniform p-value computed on the ``n`` risk
examples; fixed-sequence testing rejects ``H_1, H_2, …`` while ``p_j <= δ`` and returns the last
rejected level ``λ̂``. Then ``P(R(λ̂) <= ε) >= 1 − δ`` over the draw of the risk data (Angelopoulos
et al. 2021, "Learn then Test"), for the model pruned exactly as here: same ranking, same BatchNorm
data, same level. Levels are pruned and evaluated lazily, only until the first failure.

**Only the test reads the risk data.** The importance ranking is computed once (``--method`` on
``--data``, or ``--scores``) and reused at every level; each level prunes a fresh copy of the dense
model and re-estimates its BatchNorm statistics on ``--data``, never on the risk data. The risk data
must differ (by sha256) from ``--data`` and from every data file the model or the scores already
used (exit 3), and they are recorded with role ``risk`` so that ``calibrate`` refuses them later.

The risks, their p-values and the set-size design: :mod:`prunecp_cli.pipeline.risktest`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecp_cli.errors import CalibrationError, CertificationFailed, DataError, PlanError, UsageError
from prunecp_cli.io.data import Dataset, open_dataset
from prunecp_cli.measure import flops_by_module
from prunecp_cli.options import DataSource, ModelSource, PruneOptions, RiskOptions, RunOptions
from prunecp_cli.pipeline.inference import collect_logits
from prunecp_cli.pipeline.risktest import (
    GRID_KINDS,
    RiskTest,
    SetSizeSplit,
    level_losses,
    parse_grid,
    read_set_size_split,
    risk_test,
    statement,
)
from prunecp_cli.pipeline.scoring import few_examples_warnings
from prunecp_cli.pipeline.setup import (
    PruneSetup,
    check_granularity,
    finalise,
    make_policy,
    prepare,
    recalibrate_model,
    seen_as,
    tie_warnings,
)
from prunecp_cli.riskcontrol.fixed_sequence import fixed_sequence_search
from prunecp_cli.runtime import Reporter
from prunecp_cli.surgery.groups import ModelGraph
from prunecp_cli.surgery.plan import apply_removal
from prunecp_cli.surgery.select import FlopsModel, Removal, select
from prunecp_cli.surgery.unstructured import NO_SPEEDUP, MagnitudeRanking, Sparsity
from prunecp_cli.types import PruneResult


@dataclass
class PrunedLevel:
    """One level's pruned model and how it was made."""

    model: nn.Module
    plan: dict[str, Any]
    channels: dict[str, tuple[int, int]]
    recalibrated: int
    sparsity: Sparsity | None = None


class LevelPruner:
    """Prunes a fresh copy of the dense model at any grid level, with the ranking computed once.

    Args:
        setup: the prepared dense model, its groups and scores (:func:`~prunecp_cli.pipeline.pruning.prepare`).
        granularity: ``channel`` (Torch-Pruning, physical removal) or ``weight`` (unstructured magnitude).
        grid_kind: ``ratio`` (a level is the fraction of channels, or weights, removed) or ``flops``
            (the fraction of the dense FLOPs removed).
        ignore: layers kept whole.
        bn_data: data for BatchNorm recalibration (the score split), or None for none.
        batch_size: examples per forward pass.
    """

    def __init__(self, setup: PruneSetup, *, granularity: str = "channel", grid_kind: str = "ratio",
                 ignore: tuple[str, ...] = (), bn_data: Dataset | None = None, batch_size: int = 128) -> None:
        self.setup, self.granularity, self.grid_kind, self.ignore = setup, granularity, grid_kind, ignore
        self.bn_data, self.batch_size = bn_data, batch_size
        session = setup.session
        self.ranking = MagnitudeRanking(session.model, ignore) if granularity == "weight" else None
        self.flops_model = None
        if granularity == "channel" and grid_kind == "flops":
            per_module = flops_by_module(session.model, session.example)
            self.flops_model = FlopsModel(session.model, setup.graph.groups, per_module)

    def removal(self, level: float) -> Removal:
        """Channels removed at ``level`` (channel granularity)."""
        groups, scores, policy = self.setup.graph.groups, self.setup.scores, self.setup.policy
        if self.grid_kind == "flops":
            return select(groups, scores, policy=policy, target_flops=round(1.0 - level, 12),
                          flops_model=self.flops_model)
        return select(groups, scores, policy=policy, ratio=level)

    def key(self, level: float) -> str:
        """Identifies the pruned model: equal keys (e.g. levels capped by --max-layer-ratio) give equal models."""
        if self.ranking is not None:
            return f"threshold:{self.ranking.threshold(level)!r}"
        return json.dumps(self.removal(level), sort_keys=True)

    def build(self, level: float) -> PrunedLevel:
        """A copy of the dense model pruned at ``level``, BatchNorm-recalibrated on ``bn_data``."""
        session = self.setup.session
        model, sparsity, channels = copy.deepcopy(session.model), None, {}
        plan = session.loaded.meta.plan
        if self.ranking is not None:
            sparsity = self.ranking.apply(model, level)
        else:
            removal = self.removal(level)
            plan = apply_removal(ModelGraph(model, session.example, ignore=self.ignore), removal,
                                 previous=plan or None)
            channels = {g.name: (g.channels, g.channels - len(removal.get(g.name, [])))
                        for g in self.setup.graph.groups}
        recalibrated = 0
        if self.bn_data is not None:
            recalibrated = recalibrate_model(model, self.bn_data, device=session.device, batch_size=self.batch_size,
                                             description=f"BN recalibration ({level:g})")
        return PrunedLevel(model, plan, channels, recalibrated, sparsity)


def level_text(level: float, *, granularity: str, grid_kind: str) -> str:
    """``35% of channels removed`` and the like."""
    unit = "weights zeroed" if granularity == "weight" else (
        "FLOPs removed" if grid_kind == "flops" else "channels removed")
    return f"{level * 100:g}% of {unit}"


def _check_disjoint(risk: Dataset, setup: PruneSetup) -> None:
    seen = [(u.sha256, u.role, u.file) for u in setup.used]
    if setup.session.data is not None:
        seen.append((setup.session.data.sha256, "score/BN", setup.session.data.path.name))
    for sha, role, file in seen:
        if sha == risk.sha256:
            raise CalibrationError(
                f"--risk-data {risk.path.name} has the same sha256 as {file} (already used for {role}); the test is "
                "only valid on data nothing else has seen: pass a disjoint split")


def prune_confident(
    model: str | Path | ModelSource,
    output: str | Path,
    *,
    risk: RiskOptions,
    scores: str | Path | None = None,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    data: str | Path | DataSource | None = None,
    pruning: PruneOptions = PruneOptions(),
    run: RunOptions = RunOptions(),
) -> PruneResult:
    """Prune to the largest grid level whose risk Learn-then-Test certifies, and save it.

    Guarantees ``P(risk of the pruned model <= max_risk) >= 1 − delta`` over the risk data (see the
    module docstring). The metadata gain ``extra["risk_control"]`` and a ``risk`` data record.

    Args:
        model: dense checkpoint or prunecp model file (a path, or a :class:`ModelSource`).
        output: the ``.safetensors`` file to write (nothing is written when no level is certified).
        risk: the risk data, ε, δ, the risk, the grid and its kind, the p-value, and for ``set-size``
            the bound and the certificate (see :class:`~prunecp_cli.options.RiskOptions`).
        scores: an ``importance.json`` (or give ``method``; neither is needed for ``weight``).
        method: importance method run once on ``data``.
        options: method options.
        data: the score split, for importance and BatchNorm statistics (never the risk data).
        pruning: scope, per-layer limits, layers to keep, BatchNorm recalibration and granularity, as
            for :func:`~prunecp_cli.pipeline.pruning.prune` (its ``ratio``/``target_flops`` are unused:
            the level is chosen on the grid).
        run: device, batch size (default 128), seed (also of the set-size split) and reporter.

    Raises:
        UsageError: a missing, contradictory or out-of-range option.
        CalibrationError: the risk data were already used, or are too few for the set-size quantile.
        DataError: the risk data lack labels the risk needs, or do not fit the model.
        CertificationFailed: not even the first level is certified (nothing is written).
    """
    model, data = ModelSource.of(model), DataSource.of(data)
    risk_data, max_risk, delta, grid, grid_kind = risk.risk_data, risk.max_risk, risk.delta, risk.grid, risk.grid_kind
    pvalue_method, max_set_size, cert = risk.pvalue, risk.max_set_size, risk.cert
    risk_name = risk.risk
    granularity, ignore, bn_recalibrate = pruning.granularity, pruning.ignore, pruning.bn_recalibrate
    batch_size, seed, reporter = run.batch(128), run.seed, run.rep
    preprocess = data.preprocess if data is not None else None
    levels = parse_grid(grid)
    if grid_kind not in GRID_KINDS:
        raise UsageError(f"{{grid_kind}} {grid_kind!r}: use ratio (fraction of channels) or flops (fraction of FLOPs removed)", arguments={"grid_kind": "grid_kind"})
    check_granularity(granularity, scores=scores, method=method, target_flops=None)
    if granularity == "weight" and grid_kind == "flops":
        raise UsageError("{granularity} weight removes no FLOPs; use {grid_kind} ratio (fraction of weights zeroed)", arguments={"granularity": "granularity", "grid_kind": "grid_kind"})
    if (risk_name == "set-size") != (cert is not None):
        raise UsageError("{risk} set-size needs {cert} (the certificate whose nonconformity and alpha make the sets), "
                         "and {cert} is only used by {risk} set-size", arguments={"risk": "risk", "cert": "cert"})
    if bn_recalibrate and data is None:
        raise UsageError("{bn_recalibrate} needs {data} (the score split) to re-estimate statistics on", arguments={"bn_recalibrate": "bn_recalibrate", "data": "data"})
    if data is not None and Path(risk_data).resolve() == Path(data.path).resolve():
        raise CalibrationError(f"--risk-data {Path(risk_data).name} is also --data; the test needs data nothing else "
                               "has seen: pass a disjoint split")
    setup = prepare(model, scores=scores, method=method, options=options, data=data, policy=make_policy(pruning),
                    ignore=ignore, run=run, rank_channels=granularity == "channel", strict=pruning.strict)
    session = setup.session
    test = risk_test(risk_name, num_classes=session.num_classes, max_risk=max_risk, max_set_size=max_set_size,
                     delta=delta, pvalue_method=pvalue_method)
    risk_set = open_dataset(risk_data, preprocess=preprocess, default_channels=session.input_shape[0])
    _check_disjoint(risk_set, setup)
    if len(risk_set) == 0:
        raise DataError(f"--risk-data {risk_set.path.name} holds no examples; the test needs hundreds or more")
    if list(risk_set.sample_shape) != session.input_shape:
        raise DataError(f"--risk-data {risk_set.path.name}: examples have shape {list(risk_set.sample_shape)}, the "
                        f"model takes {session.input_shape}; pass risk data of the model's input shape")
    labels = None
    if test.spec.needs_labels or risk_name == "set-size":
        if not risk_set.has_labels:
            raise DataError(f"--risk {risk_name} needs labels, but {risk_set.path.name} has none (no 'y'); use --risk "
                            "disagreement for unlabelled data")
        risk_set.require_labels(session.num_classes)
        labels = torch.from_numpy(risk_set.labels)
    split = read_set_size_split(cert, len(risk_set), seed=seed) if risk_name == "set-size" else None
    if split is not None and split.certificate["data_sha256"] == risk_set.sha256:
        raise CalibrationError(f"--cert {Path(cert).name} was calibrated on --risk-data {risk_set.path.name} itself; "
                               "the set-size test recalibrates q-hat on half of the risk data and needs a "
                               "certificate from other data: calibrate --cert on a disjoint split")
    bn_data = session.data if (bn_recalibrate or (bn_recalibrate is None and session.data is not None)) else None
    pruner = LevelPruner(setup, granularity=granularity, grid_kind=grid_kind, ignore=ignore, bn_data=bn_data,
                         batch_size=batch_size)
    levels = _reachable(levels, pruner, reporter)
    dense_top1 = collect_logits(session.model, risk_set, device=session.device, batch_size=batch_size,
                                num_classes=session.num_classes)[0].argmax(1)
    records, cache, certified = _run_test(levels, pruner, test, risk_set, dense_top1=dense_top1, labels=labels,
                                          split=split, batch_size=batch_size, reporter=reporter)
    n = len(split.test) if split is not None else len(risk_set)
    text = lambda level: level_text(level, granularity=granularity, grid_kind=grid_kind)  # noqa: E731
    if certified is None:
        first = records[0]
        raise CertificationFailed(
            f"no pruning level is certified: at the first level ({text(first['level'])}) the {risk_name} risk is "
            f"{first['risk_hat']:.4g} on n={n} risk examples, p-value {first['p_value']:.3g} > delta {delta}; nothing "
            f"was written. Allow a larger {'--max-set-size' if split else '--max-risk'} or --delta, start --grid "
            "lower, or use more risk data")
    chosen = cache[pruner.key(certified)]
    used = list(setup.used)
    if bn_data is not None:
        used.append(seen_as(bn_data, "bn-recalibration"))
    used.append(seen_as(risk_set, "risk"))
    control = {
        "procedure": "learn-then-test, fixed-sequence", "risk": risk_name, "risk_description": test.spec.description,
        "max_risk": max_risk, "max_set_size": max_set_size, "loss_level": test.loss_alpha, "delta": delta,
        "confidence": 1.0 - delta, "n": n, "pvalue": test.pvalue, "granularity": granularity,
        "grid_kind": grid_kind, "grid": levels, "level": certified, "level_text": text(certified),
        "levels": records, "data_sha256": risk_set.sha256, "data_file": risk_set.path.name,
        "statement": statement(test, n=n, file=risk_set.path.name, level=text(certified), count=len(levels),
                                split=split),
    }
    if split is not None:
        control["set_size"] = {**split.certificate, "calibration_n": len(split.calibration), "test_n": n, "seed": seed}
    extra = {"risk_control": control}
    if chosen.sparsity is not None:
        extra["sparsity"] = chosen.sparsity.to_json()
        reporter.info(f"--granularity weight: {NO_SPEEDUP}")
    target = {"ratio": certified if grid_kind == "ratio" else None, "granularity": granularity,
              "ignore": list(ignore), "risk_control": True}
    warnings = list(setup.warnings)
    if bn_data is not None:
        warnings += few_examples_warnings(len(bn_data), "BatchNorm recalibration")
    if granularity == "weight":
        setup.method, setup.method_params = "magnitude-unstructured", {}
    else:
        warnings += tie_warnings(setup.scores, pruner.removal(certified), setup.graph.groups)
        target.update({"target_flops": 1.0 - certified if grid_kind == "flops" else None, "scope": pruning.scope,
                       "max_layer_ratio": pruning.max_layer_ratio, "round_to": pruning.round_to,
                       "protect": setup.policy.protect})
    for message in warnings:
        reporter.warn(message)
    return finalise(setup, chosen.model, output, plan=chosen.plan, channels=chosen.channels, used=used,
                    target=target, recalibrated=chosen.recalibrated, extra=extra, warnings=warnings)


def _reachable(levels: list[float], pruner: LevelPruner, reporter: Reporter) -> list[float]:
    """Drop the grid's tail from the first level the policy cannot reach (this never looks at risk data)."""
    if pruner.ranking is not None:
        return levels
    for j, level in enumerate(levels):
        try:
            pruner.removal(level)
        except PlanError as exc:
            if j == 0:
                raise exc.prefixed(f"{{grid}} level {level:g} (FLOPs removed) cannot be reached: ", grid="grid") from None
            reporter.warn(f"the grid stops at {levels[j - 1]:g}: level {level:g} is unreachable ({exc})")
            return levels[:j]
    return levels


def _run_test(levels: list[float], pruner: LevelPruner, test: RiskTest, risk_set: Dataset, *,
              dense_top1: torch.Tensor, labels: torch.Tensor | None, split: SetSizeSplit | None, batch_size: int,
              reporter: Reporter) -> tuple[list[dict[str, Any]], dict[str, PrunedLevel], float | None]:
    """Fixed-sequence testing over ``levels``, pruning lazily; returns records, built models, certified level."""
    records: list[dict[str, Any]] = []
    cache: dict[str, PrunedLevel] = {}
    outcome: dict[str, tuple[float, float, dict[str, Any]]] = {}

    def evaluate(level: float) -> float:
        key = pruner.key(level)
        if key not in outcome:
            built = pruner.build(level)
            logits, _ = collect_logits(built.model, risk_set, device=pruner.setup.session.device, batch_size=batch_size,
                                       num_classes=pruner.setup.session.num_classes)
            losses, facts = level_losses(test, logits, dense_top1=dense_top1, labels=labels, set_size=split)
            mean, p = test.pvalue_of(losses)
            outcome[key] = (mean, p, facts)
            if p <= test.delta:
                cache.clear()
                cache[key] = built
        mean, p, facts = outcome[key]
        records.append({"level": level, "risk_hat": test.in_user_units(mean), "loss_mean": mean, "p_value": p,
                        "certified": p <= test.delta, **facts})
        reporter.info(f"level {level:g}: {test.spec.name} {records[-1]['risk_hat']:.4g}, p-value {p:.3g} "
                      f"({'certified' if p <= test.delta else 'not certified: stop'})")
        return p

    result = fixed_sequence_search(levels, evaluate, test.delta)
    return records, cache, None if result.last_certified is None else levels[result.last_certified]
