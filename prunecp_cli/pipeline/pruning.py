"""``prune``: remove channels physically, check the result, recalibrate BatchNorm, save safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunecp_cli.errors import UsageError
from prunecp_cli.options import DataSource, ModelSource, PruneOptions, RunOptions
from prunecp_cli.pipeline.allocation import Allocation
from prunecp_cli.pipeline.auto import choose as choose_auto
from prunecp_cli.pipeline.schedule import Schedule, run_schedule
from prunecp_cli.pipeline.scoring import few_examples_warnings
from prunecp_cli.pipeline.setup import (  # noqa: F401  (re-exported: the names callers used to find here)
    GRANULARITIES,
    PER_MODEL_RECORDS,
    PruneSetup,
    check_granularity,
    finalise,
    make_policy,
    prepare,
    recalibrate,
    recalibrate_model,
    seen_as,
    tie_warnings,
)
from prunecp_cli.runtime import SILENT, Reporter
from prunecp_cli.surgery.unstructured import NO_SPEEDUP, magnitude_prune
from prunecp_cli.types import PruneResult


def prune(
    model: str | Path | ModelSource,
    output: str | Path,
    *,
    scores: str | Path | None = None,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    data: str | Path | DataSource | None = None,
    pruning: PruneOptions = PruneOptions(),
    schedule: Schedule | None = None,
    run: RunOptions = RunOptions(),
) -> PruneResult:
    """Prune a model to a ratio or a FLOPs target and write it as ``.safetensors``.

    Args:
        model: dense checkpoint or prunecp model file (a path, or a :class:`ModelSource`).
        output: the ``.safetensors`` file to write.
        scores: an ``importance.json`` from ``score`` (or give ``method``).
        method: importance method to run now on ``data``.
        options: method options.
        data: the score split: used by ``method`` and for BatchNorm recalibration.
        pruning: the target (``ratio`` or ``target_flops``), scope, per-layer limits, layers to keep,
            BatchNorm recalibration and granularity (``channel`` removes filters physically;
            ``weight`` zeroes the ``ratio`` smallest weights globally: shapes and FLOPs unchanged).
        schedule: iterative steps and fine-tuning (default: one shot, no fine-tuning); see
            :mod:`prunecp_cli.pipeline.schedule`.
        run: device, batch size (default 128), seed and reporter.

    Raises:
        UsageError: contradictory options.
        ScoresError: the scores file does not belong to this model.
        PlanError: the target is unreachable, or the pruned model fails its forward check.
    """
    model, data = ModelSource.of(model), DataSource.of(data)
    ratio, target_flops, scope, ignore = pruning.ratio, pruning.target_flops, pruning.scope, pruning.ignore
    bn_recalibrate, granularity = pruning.bn_recalibrate, pruning.granularity
    batch_size, seed, reporter = run.batch(128), run.seed, run.rep
    max_samples = data.max_samples if data is not None else None
    check_granularity(granularity, scores=scores, method=method, target_flops=target_flops)
    if granularity == "channel" and (scores is None) == (method is None):
        raise UsageError("give exactly one of {scores} (an importance.json) and {method}", arguments={"scores": "scores", "method": "method"})
    if bn_recalibrate and data is None:
        raise UsageError("{bn_recalibrate} needs {data} (the score split) to re-estimate statistics on", arguments={"bn_recalibrate": "bn_recalibrate", "data": "data"})
    policy = make_policy(pruning)
    allocation = Allocation(pruning.allocation)
    if granularity == "channel":
        allocation.check(scope=scope, target_flops=target_flops, has_data=data is not None)
    schedule = schedule or Schedule()
    if granularity == "weight":
        if schedule.steps > 1 or schedule.finetune is not None:
            raise UsageError("{granularity} weight is one-shot magnitude pruning: drop {steps} and {finetune_data}", arguments={"granularity": "granularity", "steps": "steps", "finetune_data": "finetune_data"})
        if ratio is None:
            raise UsageError("{granularity} weight needs {ratio}, the fraction of weights to zero", arguments={"granularity": "granularity", "ratio": "ratio"})
        setup = prepare(model, data=data, policy=policy, run=run, rank_channels=False)
        return prune_weights(setup, output, ratio, ignore=ignore, bn_recalibrate=bn_recalibrate,
                             batch_size=batch_size, reporter=reporter)
    setup = prepare(model, scores=scores, method=method, options=options, data=data, policy=policy, ignore=ignore,
                    run=run, strict=pruning.strict)
    session = setup.session
    setup.allocation = allocation
    used = list(setup.used)
    if allocation.how == "measured":
        used.append(seen_as(session.data, "allocation"))
    if bn_recalibrate is None:
        bn_recalibrate = session.data is not None
    if bn_recalibrate:
        setup.warnings += few_examples_warnings(len(session.data), "BatchNorm recalibration")
    if schedule.finetune_data is not None and schedule.finetune.needs_labels:
        schedule.finetune_data.require_labels(session.num_classes)
    auto_record = None
    if setup.method == "auto":
        if schedule.steps > 1:
            raise UsageError("{method} auto chooses among one-shot prunings; use {steps} 1, or name the method for "
                             "iterative pruning", arguments={"method": "method", "steps": "steps"})
        auto_record = choose_auto(setup, ratio=ratio, target_flops=target_flops, ignore=ignore,
                                  bn_recalibrate=bn_recalibrate, batch_size=batch_size, seed=seed, reporter=reporter)
    done = run_schedule(setup, ratio=ratio, target_flops=target_flops, schedule=schedule, method=method,
                        ignore=ignore, bn_recalibrate=bn_recalibrate, batch_size=batch_size, seed=seed,
                        max_samples=max_samples, reporter=reporter)
    if bn_recalibrate:
        used.append(seen_as(session.data, "bn-recalibration"))
    if schedule.finetune_data is not None:
        used.append(seen_as(schedule.finetune_data, "fine-tune"))
    warnings = setup.warnings + done.warnings
    for message in warnings:
        reporter.warn(message)
    target = {"ratio": ratio, "target_flops": target_flops, "scope": scope, "max_layer_ratio": pruning.max_layer_ratio,
              "round_to": pruning.round_to, "protect": setup.policy.protect, "ignore": list(ignore),
              "allocation": allocation.how,
              "steps": schedule.steps}
    extra = {"schedule": done.log}
    if schedule.finetune is not None:
        extra["finetune"] = schedule.finetune.to_json()
    if auto_record is not None:
        extra["auto"] = auto_record
    return finalise(setup, session.model, output, plan=done.plan, channels=done.channels, used=used,
                    target=target, recalibrated=done.recalibrated, warnings=warnings, extra=extra)


def prune_weights(setup: PruneSetup, output: str | Path, fraction: float, *, ignore: tuple[str, ...] = (),
                  bn_recalibrate: bool | None = None, batch_size: int = 128,
                  reporter: Reporter = SILENT) -> PruneResult:
    """Zero the ``fraction`` smallest weights of the setup's model globally, recalibrate BN, save.

    See :mod:`prunecp_cli.surgery.unstructured`: shapes, parameters and FLOPs stay the same.
    """
    session = setup.session
    sparsity = magnitude_prune(session.model, fraction, ignore=ignore)
    used, recalibrated = list(setup.used), 0
    if bn_recalibrate or (bn_recalibrate is None and session.data is not None):
        for message in few_examples_warnings(len(session.data), "BatchNorm recalibration"):
            reporter.warn(message)
        recalibrated = recalibrate(session, batch_size=batch_size, reporter=reporter)
        used.append(seen_as(session.data, "bn-recalibration"))
    reporter.info(f"--granularity weight: {NO_SPEEDUP}")
    setup.method, setup.method_params = "magnitude-unstructured", {}
    target = {"ratio": fraction, "granularity": "weight", "ignore": list(ignore)}
    return finalise(setup, session.model, output, plan=session.loaded.meta.plan, channels={}, used=used,
                    target=target, recalibrated=recalibrated, extra={"sparsity": sparsity.to_json()})
