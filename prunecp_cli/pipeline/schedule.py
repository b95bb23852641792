"""Pruning schedules: one shot, or S equal steps with re-scoring and fine-tuning between them.

A step removes channels, re-estimates BatchNorm statistics on the score split, fine-tunes (when
asked) and logs top-1 accuracy and split-conformal set size on the score split. With ``steps = S``
the budget is reached in S equal steps: after step s the model keeps 1 − s·R/S of its channels
(``--ratio R``) or 1 − s·(1 − F)/S of the dense FLOPs (``--target-flops F``), each step measured
against what the previous one left, and the channels are re-scored on the current model before every
step after the first (so ``--method`` is needed, not a fixed ``--scores`` file).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from prunecp_cli.conformal.nonconformity import LAC, prediction_sets
from prunecp_cli.conformal.quantile import conformal_quantile
from prunecp_cli.errors import UsageError
from prunecp_cli.finetune import FinetuneConfig, finetune
from prunecp_cli.io.data import Dataset
from prunecp_cli.measure import count_flops, flops_by_module
from prunecp_cli.pipeline.allocation import allocate
from prunecp_cli.pipeline.flops_target import FLOPS_TOLERANCE, flops_removal
from prunecp_cli.pipeline.inference import collect_logits
from prunecp_cli.pipeline.scoring import compute_importance
from prunecp_cli.pipeline.setup import LEFT_WHOLE_NOTE, left_whole_note, recalibrate_model, tie_warnings
from prunecp_cli.runtime import SILENT, Reporter
from prunecp_cli.surgery.groups import ModelGraph
from prunecp_cli.surgery.plan import remove_keeping_whole, retrace
from prunecp_cli.surgery.select import FlopsModel, Removal, select

LOG_ALPHA = 0.1


@dataclass(frozen=True)
class Schedule:
    """How to reach the target.

    Attributes:
        steps: equal steps to reach the budget (1 = one shot).
        finetune: fine-tuning after each step (None: no fine-tuning).
        finetune_data: data to fine-tune on (labelled unless the loss is ``kd``).
    """

    steps: int = 1
    finetune: FinetuneConfig | None = None
    finetune_data: Dataset | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UsageError(f"{{steps}} {self.steps} must be at least 1", arguments={"steps": "steps"})
        if (self.finetune is None) != (self.finetune_data is None):
            raise UsageError("fine-tuning needs {finetune_data} and settings together", arguments={"finetune_data": "finetune_data"})


@dataclass
class ScheduleResult:
    """What the schedule did to the model (pruned in place).

    Attributes:
        plan: the replayable plan (all steps).
        channels: per group of the first step, ``(before, after)`` channel counts.
        recalibrated: examples used for BatchNorm recalibration (last step).
        log: one record per step (FLOPs kept, accuracy, set size, fine-tuning losses).
        warnings: ties found on the way.
    """

    plan: dict[str, Any]
    channels: dict[str, tuple[int, int]]
    recalibrated: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def step_target(value: float, step: int, steps: int, *, kept_before: float) -> float:
    """The step's target relative to the current model.

    Args:
        value: the final target: fraction removed (``--ratio``) or kept (``--target-flops``), given as
            the fraction to *keep* at the end.
        step: 1-based step.
        steps: total steps.
        kept_before: fraction of the original kept before this step.
    """
    goal = 1.0 - step * (1.0 - value) / steps
    return min(goal / kept_before, 1.0)


def score_split_metrics(model, data: Dataset, *, device, batch_size: int, num_classes: int, seed: int
                        ) -> dict[str, float]:
    """Top-1 accuracy and LAC split-conformal coverage and set size (α 0.1) on two halves of ``data``."""
    logits, labels = collect_logits(model, data, device=device, batch_size=batch_size, num_classes=num_classes)
    if labels is None or len(labels) < 40:
        return {}
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    cal, test = order[: len(order) // 2], order[len(order) // 2 :]
    score = LAC()
    qhat = conformal_quantile(score.label_scores(logits[cal], labels[cal]), LOG_ALPHA).qhat
    sets = prediction_sets(score.all_scores(logits[test]), qhat)
    return {
        "accuracy": float((logits.argmax(1) == labels).float().mean()),
        "mean_set_size": float(sets.sum(1).float().mean()),
        "coverage": float(sets[torch.arange(len(test)), labels[test]].float().mean()),
    }


def run_schedule(
    setup,
    *,
    ratio: float | None,
    target_flops: float | None,
    schedule: Schedule,
    method: str | None,
    ignore: tuple[str, ...],
    bn_recalibrate: bool,
    batch_size: int,
    seed: int,
    max_samples: int | None,
    reporter: Reporter = SILENT,
) -> ScheduleResult:
    """Prune ``setup``'s model in place following ``schedule``.

    Args:
        setup: a :class:`~prunecp_cli.pipeline.setup.PruneSetup` (model, graph, first scores).
        ratio: final fraction of channels to remove (or None).
        target_flops: final fraction of dense FLOPs to keep (or None).
        schedule: steps and fine-tuning.
        method: importance method for re-scoring between steps.
        ignore: layers kept whole.
        bn_recalibrate: re-estimate BatchNorm statistics on the score split after each step.
        batch_size: examples per forward pass.
        seed: seed.
        max_samples: cap on scoring examples.
        reporter: progress and messages.

    Raises:
        UsageError: several steps with a fixed scores file.
    """

    if schedule.steps > 1 and method is None:
        raise UsageError("{steps} > 1 re-scores the model between steps: use {method} instead of {scores}", arguments={"steps": "steps", "method": "method", "scores": "scores"})
    session, graph, scores = setup.session, setup.graph, setup.scores
    model, example = session.model, session.example
    flops_dense = setup.flops_before or count_flops(model, example)  # prepare counted this very model
    channels_dense = {g.name: g.channels for g in graph.groups}
    total_dense = sum(channels_dense.values())
    plan = session.loaded.meta.plan or None
    result = ScheduleResult(plan={}, channels={})
    # The KD losses distil the model as it was before any step (the dense teacher), kept aside on the CPU.
    teacher = copy.deepcopy(model).eval() if schedule.finetune is not None and schedule.finetune.distils else None
    for step in range(1, schedule.steps + 1):
        if step > 1:
            graph = ModelGraph(model, example, ignore=ignore)
            scores, _ = compute_importance(session, graph, method=method, options=setup.method_params,
                                           batch_size=batch_size, seed=seed + step, max_samples=max_samples,
                                           reporter=reporter)
        with reporter.status(f"step {step}/{schedule.steps}: removing channels"):
            plan, graph, removal, kept_whole, flops_now = _remove_step(
                setup, graph, scores, step, schedule.steps, plan, ratio=ratio, target_flops=target_flops,
                flops_dense=flops_dense, total_dense=total_dense)
        if step == 1:
            setup.graph = graph  # its left_whole now names the groups kept whole here too
        result.warnings += tie_warnings(scores, removal, graph.groups)
        if kept_whole:  # one note for all groups kept whole: those found at tracing and those found here
            setup.warnings = [w for w in setup.warnings if not w.startswith(LEFT_WHOLE_NOTE)]
            result.warnings = [w for w in result.warnings if not w.startswith(LEFT_WHOLE_NOTE)]
            result.warnings += left_whole_note(graph.left_whole, strict=False)
        if bn_recalibrate:
            result.recalibrated = recalibrate_model(model, session.data, device=session.device,
                                                    batch_size=batch_size, reporter=reporter)
        record: dict[str, Any] = {"step": step, "flops_kept": flops_now / flops_dense}
        if schedule.finetune is not None:
            losses = finetune(model, schedule.finetune_data, schedule.finetune, device=session.device,
                              reporter=reporter, teacher=teacher)
            record["finetune"] = losses[-1] if losses else {}
        if session.data is not None and session.data.has_labels:
            record.update(score_split_metrics(model, session.data, device=session.device, batch_size=batch_size,
                                              num_classes=session.num_classes, seed=seed))
        result.log.append(record)
        say = reporter.detail if reporter.verbose else reporter.info
        say(f"step {step}/{schedule.steps}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in record.items() if isinstance(v, float)))
    result.plan = plan
    result.channels = {name: (count, _width(model, name)) for name, count in channels_dense.items()}
    return result


def _remove_step(setup, graph: ModelGraph, scores, step: int, steps: int, plan, *, ratio, target_flops,
                 flops_dense: int, total_dense: int):
    """Remove one step's channels in place; returns (plan, graph, removal, groups kept whole, FLOPs after).

    For a FLOPs target the selection first trusts the analytic FLOPs estimate; when the pruned model's
    FLOPs differ from that estimate by more than :data:`~prunecp_cli.pipeline.flops_target.FLOPS_TOLERANCE`
    (couplings the estimate understates), the model is restored and the selection is redone on
    measured prunings of copies.
    """
    model, example = setup.session.model, setup.session.example
    before = copy.deepcopy(model) if target_flops is not None else None
    flops_start = count_flops(model, example) if step > 1 and target_flops is not None else flops_dense
    for measured in (False, True):
        chosen: dict[str, Removal] = {}

        def choose(graph: ModelGraph, measured: bool = measured, chosen=chosen) -> Removal:
            chosen["removal"], chosen["predicted"] = _step_removal(
                setup, graph, scores, step, steps, ratio=ratio, target_flops=target_flops, flops_dense=flops_dense,
                total_dense=total_dense, measured=measured)
            return chosen["removal"]

        new_plan, graph, kept_whole = remove_keeping_whole(graph, choose, previous=plan, strict=setup.strict)
        flops_now = count_flops(model, example)
        predicted = flops_now if chosen.get("predicted") is None else chosen["predicted"]
        if measured or target_flops is None or abs(flops_now - predicted) <= FLOPS_TOLERANCE * flops_start:
            return new_plan, graph, chosen["removal"], kept_whole, flops_now
        model.__dict__.update(copy.deepcopy(before).__dict__)  # undo, and select on measured prunings
        graph = retrace(graph, kept_whole)
    raise AssertionError("unreachable")


def _step_removal(setup, graph: ModelGraph, scores, step: int, steps: int, *, ratio, target_flops,
                  flops_dense: int, total_dense: int, measured: bool = False) -> tuple[Removal, float | None]:
    """The step's removal, with its predicted FLOPs (None when the FLOPs are not the target or were measured)."""
    model, example = setup.session.model, setup.session.example
    if target_flops is not None:
        by_module = flops_by_module(model, example)  # one trace gives the total ('') and the parts
        kept = by_module[""] / flops_dense
        relative = step_target(target_flops, step, steps, kept_before=kept)
        if relative >= 1.0:
            return {}, None
        flops_model = FlopsModel(model, graph.groups, by_module)
        scores, policy = allocate(graph.groups, scores, policy=setup.policy, allocation=setup.allocation,
                                  target_flops=relative, flops_model=flops_model, model=model, data=setup.session.data)
        if measured:
            return flops_removal(graph, scores, policy=policy, relative=relative, by_module=by_module), None
        removal = select(graph.groups, scores, policy=policy, target_flops=relative, flops_model=flops_model)
        return removal, flops_model(removal)
    kept = sum(g.channels for g in graph.groups) / total_dense
    relative = step_target(1.0 - ratio, step, steps, kept_before=kept)
    if relative >= 1.0:
        return {}, None
    return select(graph.groups, scores, policy=setup.policy, ratio=1.0 - relative), None


def _width(model, name: str) -> int:
    module = dict(model.named_modules())[name]
    return module.out_channels if hasattr(module, "out_channels") else module.out_features
