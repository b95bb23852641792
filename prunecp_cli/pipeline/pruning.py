"""``prune``: remove channels physically, check the result, recalibrate BatchNorm, save safetensors."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecp_cli import dist
from prunecp_cli import importance as registry
from prunecp_cli.checks import MODEL_SUFFIXES, check_output
from prunecp_cli.errors import UsageError
from prunecp_cli.io.checkpoint import ModelMeta, save_model
from prunecp_cli.io.data import Dataset, Preprocess
from prunecp_cli.io.digest import weights_sha256
from prunecp_cli.measure import FLOPS_UNIT, count_flops, count_params
from prunecp_cli.pipeline.schedule import Schedule, run_schedule
from prunecp_cli.pipeline.scoring import (
    compute_importance,
    degenerate_warnings,
    few_examples_warnings,
    read_importance,
    scores_for_graph,
    scoring_data_warnings,
)
from prunecp_cli.pipeline.session import Session, open_session
from prunecp_cli.runtime import SILENT, Reporter
from prunecp_cli.surgery.batchnorm import recalibrate_batchnorm
from prunecp_cli.surgery.groups import ModelGraph
from prunecp_cli.surgery.select import Policy, Removal, check_target
from prunecp_cli.surgery.unstructured import NO_SPEEDUP, magnitude_prune
from prunecp_cli.types import PruneResult, UsedData

GRANULARITIES = ("channel", "weight")
PER_MODEL_RECORDS = ("risk_control", "sparsity", "schedule", "finetune")
"""Metadata records that describe one model's weights; a new model made from it never inherits them."""


def tie_warnings(scores: dict[str, torch.Tensor], removal: Removal) -> list[str]:
    """Warn when the cut inside a group falls between channels of equal importance."""
    tied = []
    for name, removed in removal.items():
        value = scores[name]
        if not removed or len(removed) == value.numel():
            continue
        kept = sorted(set(range(value.numel())) - set(removed))
        if float(value[removed].max()) >= float(value[kept].min()):
            tied.append(name)
    if not tied:
        return []
    return [f"the cut falls inside tied scores in {len(tied)} group(s) ({', '.join(tied[:5])}); "
            "ties were broken by channel index"]


def recalibrate_model(model: nn.Module, data: Dataset, *, device: torch.device, batch_size: int,
                      reporter: Reporter = SILENT, description: str = "BN recalibration") -> int:
    """Re-estimate ``model``'s BatchNorm statistics on ``data`` (this rank's shard); returns it on the CPU.

    Args:
        model: the model, modified in place.
        data: the data to re-estimate on (the score split; never calibration or risk data).
        device: where to compute.
        batch_size: examples per forward pass.
        reporter: progress.
        description: label of the progress bar.

    Returns:
        Number of examples seen on this rank.
    """
    shard = dist.shard_batches(data, batch_size)  # batch composition as in one process
    batches = (b.x for b in reporter.track(shard.batches(batch_size, device=device),
                                            total=-(-len(shard) // batch_size), description=description))
    model.to(device)
    seen = recalibrate_batchnorm(model, batches, reduce=dist.all_reduce_sum)
    model.cpu()
    return seen


def recalibrate(session: Session, *, batch_size: int, reporter: Reporter) -> int:
    """Re-estimate BatchNorm statistics on the session's data (this rank's shard)."""
    return recalibrate_model(session.model, session.data, device=session.device, batch_size=batch_size,
                             reporter=reporter)


@dataclass
class PruneSetup:
    """A model opened for pruning, with its groups and their importance, before anything is removed.

    Shared by :func:`prune` (one level) and confident pruning (one ranking reused at every level).

    Attributes:
        session: the model and the score data.
        graph: the dense model's dependency graph (None when channels are not ranked).
        scores: importance per group, higher = more important (empty when not ranked).
        policy: the selection constraints.
        method: importance method name.
        method_params: its options.
        used: data the model has seen so far (metadata plus the score data used here).
        warnings: degenerate or tied scores, and other things worth reading.
        params_before: parameters of the input model.
        flops_before: FLOPs of the input model.
    """

    session: Session
    graph: ModelGraph | None
    scores: dict[str, torch.Tensor]
    policy: Policy
    method: str
    method_params: dict[str, Any]
    used: list[UsedData]
    warnings: list[str] = field(default_factory=list)
    params_before: int = 0
    flops_before: int = 0


def make_policy(scope: str, max_layer_ratio: float, round_to: int, protect: float | None) -> Policy:
    """The selection :class:`Policy`; ``protect`` defaults to 0.1 with ``scope="global"``, 0 with ``local``."""
    return Policy(scope=scope, max_layer_ratio=max_layer_ratio, round_to=round_to,
                  protect=(0.1 if scope == "global" else 0.0) if protect is None else protect)


def prepare(
    checkpoint: str | Path,
    *,
    scores: str | Path | None = None,
    method: str | None = None,
    data: str | Path | None = None,
    policy: Policy,
    ignore: tuple[str, ...] = (),
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    input_shape: list[int] | None = None,
    options: dict[str, Any] | None = None,
    device: str = "auto",
    batch_size: int = 128,
    seed: int = 0,
    max_samples: int | None = None,
    preprocess: Preprocess | None = None,
    reporter: Reporter = SILENT,
    rank_channels: bool = True,
    trust_arch: bool = False,
) -> PruneSetup:
    """Open the model and the score data, trace its groups and rank their channels once.

    Args: see :func:`prune`; ``rank_channels=False`` skips tracing and ranking (unstructured pruning).

    Raises:
        UsageError: contradictory options.
        ScoresError: the scores file does not belong to this model.
    """
    if rank_channels and (scores is None) == (method is None):
        raise UsageError("give exactly one of --scores (an importance.json) and --method")
    table = read_importance(scores) if rank_channels and scores is not None else None
    if input_shape is None and table is not None and table.input_shape:
        input_shape = table.input_shape  # the shape the scores were traced with
    session = open_session(checkpoint, data=data, arch=arch, arch_kwargs=arch_kwargs, input_shape=input_shape,
                           preprocess=preprocess, device=device, trust_arch=trust_arch)
    model, example = session.model, session.example
    used = session.used_data()
    params_before, flops_before = count_params(model), count_flops(model, example)
    if not rank_channels:
        return PruneSetup(session, None, {}, policy, method or "", dict(options or {}), used,
                          params_before=params_before, flops_before=flops_before)
    graph = ModelGraph(model, example, ignore=ignore)
    warnings: list[str] = []
    if table is not None:
        group_scores = scores_for_graph(table, graph, model_sha256=session.loaded.sha256, path=scores)
        method_name, method_params = table.method, table.params
        if table.data_sha256:
            used.append(UsedData(table.data_sha256, "score", Path(scores).name))
    else:
        info = registry.info(method)
        method_params = {**{k: d for k, (d, _) in info.options.items()}, **(options or {})}
        group_scores, _ = compute_importance(session, graph, method=method, options=method_params,
                                             batch_size=batch_size, seed=seed, max_samples=max_samples,
                                             reporter=reporter)
        method_name = method
        warnings += scoring_data_warnings(session, method, info.needs_data, max_samples)
        if info.needs_data and session.data is not None:
            used.append(UsedData(session.data.sha256, "score", session.data.path.name))
    return PruneSetup(session, graph, group_scores, policy, method_name, method_params, used,
                      warnings=warnings + degenerate_warnings(group_scores), params_before=params_before,
                      flops_before=flops_before)


def finalise(
    setup: PruneSetup,
    model: nn.Module,
    output: str | Path,
    *,
    plan: dict[str, Any],
    channels: dict[str, tuple[int, int]],
    used: list[UsedData],
    target: dict[str, Any],
    recalibrated: int,
    extra: dict[str, Any] | None = None,
    warnings: list[str] | None = None,
) -> PruneResult:
    """Write the pruned ``model`` with its metadata (rank 0 only) and describe the result.

    Args:
        setup: what :func:`prepare` returned.
        model: the pruned model.
        output: the ``.safetensors`` file to write.
        plan: the replayable plan.
        channels: per group ``(before, after)`` channel counts.
        used: every data file the pruned model has seen (for the disjointness checks).
        target: what was asked for (ratio, FLOPs, scope, ...), recorded as ``extra["target"]``.
        recalibrated: examples used for BatchNorm recalibration.
        extra: further metadata fields (e.g. ``risk_control``), merged last.
        warnings: warnings to return (default: the setup's).
    """
    session = setup.session
    params_after, flops_after = count_params(model), count_flops(model, session.example)
    meta = session.loaded.meta
    # Records about the input model's own making or guarantees do not describe the new weights.
    fields = {k: v for k, v in meta.extra.items() if k not in PER_MODEL_RECORDS}
    fields.update({
        "source_sha256": session.loaded.sha256,
        "method": setup.method,
        "method_params": setup.method_params,
        "data_sha256": _unique([u.__dict__ for u in used]),
        "target": target,
        "bn_recalibrated_examples": recalibrated,
        "params_before": fields.get("params_before", setup.params_before),
        "params_after": params_after,
        "flops_before": fields.get("flops_before", setup.flops_before),
        "flops_after": flops_after,
        "flops_unit": FLOPS_UNIT,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    fields.update(extra or {})
    if "risk_control" in fields:  # bind the Learn-then-Test record to exactly these weights
        fields["risk_control"] = {**fields["risk_control"], "weights_sha256": weights_sha256(model)}
    new_meta = ModelMeta(arch=meta.arch, arch_kwargs=meta.arch_kwargs, input_shape=session.input_shape,
                         plan=plan, extra=fields)
    digest = save_model(model, output, new_meta) if dist.rank() == 0 else ""
    dist.barrier()
    return PruneResult(str(output), digest, setup.params_before, params_after, setup.flops_before, flops_after,
                       channels, warnings=list(setup.warnings if warnings is None else warnings),
                       extra=dict(extra or {}))


def prune(
    checkpoint: str | Path,
    output: str | Path,
    *,
    scores: str | Path | None = None,
    method: str | None = None,
    data: str | Path | None = None,
    ratio: float | None = None,
    target_flops: float | None = None,
    scope: str = "local",
    max_layer_ratio: float = 0.9,
    round_to: int = 1,
    protect: float | None = None,
    ignore: tuple[str, ...] = (),
    bn_recalibrate: bool | None = None,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    input_shape: list[int] | None = None,
    options: dict[str, Any] | None = None,
    device: str = "auto",
    batch_size: int = 128,
    seed: int = 0,
    max_samples: int | None = None,
    preprocess: Preprocess | None = None,
    reporter: Reporter = SILENT,
    granularity: str = "channel",
    schedule: Schedule | None = None,
    trust_arch: bool = False,
) -> PruneResult:
    """Prune a model to a ratio or a FLOPs target and write it as ``.safetensors``.

    Args:
        checkpoint: dense checkpoint or prunecp model file.
        output: the ``.safetensors`` file to write.
        scores: an ``importance.json`` from ``score`` (or give ``method``).
        method: importance method to run now on ``data``.
        data: the score split: used by ``method`` and for BatchNorm recalibration.
        ratio: fraction of channels to remove.
        target_flops: fraction of the dense FLOPs to keep.
        scope: ``local`` (per group) or ``global`` (ranked across groups).
        max_layer_ratio: most any group may lose.
        round_to: keep channel counts multiples of this.
        protect: fraction of each group's top channels kept out of a global ranking
            (default 0.1 with ``scope="global"``, 0 with ``local``).
        ignore: layers to keep whole (the classifier is always kept).
        bn_recalibrate: re-estimate BatchNorm statistics on ``data`` (default: when data are given).
        arch: architecture spec for dense checkpoints.
        arch_kwargs: its keyword arguments.
        input_shape: example shape when no data are given.
        options: method options.
        device: compute device.
        batch_size: examples per forward pass.
        seed: seed for randomness.
        max_samples: cap on examples used for scoring.
        preprocess: image preprocessing for folder data.
        reporter: progress and messages.
        granularity: ``channel`` (remove filters physically) or ``weight`` (zero the ``ratio`` smallest
            weights globally, unstructured; shapes and FLOPs unchanged, no speed-up).
        schedule: iterative steps and fine-tuning (default: one shot, no fine-tuning); see
            :mod:`prunecp_cli.pipeline.schedule`.
        trust_arch: build a prunecp file's architecture even from an untrusted module (``--trust-arch``).

    Raises:
        UsageError: contradictory options.
        ScoresError: the scores file does not belong to this model.
        PlanError: the target is unreachable, or the pruned model fails its forward check.
    """
    check_output(output, suffixes=MODEL_SUFFIXES, inputs=[("checkpoint", checkpoint), ("scores", scores),
                                                          ("data", data)])
    check_granularity(granularity, scores=scores, method=method, target_flops=target_flops)
    if granularity == "channel" and (scores is None) == (method is None):
        raise UsageError("give exactly one of --scores (an importance.json) and --method")
    if bn_recalibrate and data is None:
        raise UsageError("--bn-recalibrate needs --data (the score split) to re-estimate statistics on")
    policy = make_policy(scope, max_layer_ratio, round_to, protect)
    if granularity == "channel":
        check_target(ratio, target_flops)
    schedule = schedule or Schedule()
    if granularity == "weight":
        if schedule.steps > 1 or schedule.finetune is not None:
            raise UsageError("--granularity weight is one-shot magnitude pruning: drop --steps and --finetune-data")
        if ratio is None:
            raise UsageError("--granularity weight needs --ratio, the fraction of weights to zero")
        setup = prepare(checkpoint, data=data, policy=policy, arch=arch, arch_kwargs=arch_kwargs,
                        input_shape=input_shape, device=device, preprocess=preprocess, rank_channels=False,
                        trust_arch=trust_arch)
        return prune_weights(setup, output, ratio, ignore=ignore, bn_recalibrate=bn_recalibrate,
                             batch_size=batch_size, reporter=reporter)
    setup = prepare(checkpoint, scores=scores, method=method, data=data, policy=policy, ignore=ignore, arch=arch,
                    arch_kwargs=arch_kwargs, input_shape=input_shape, options=options, device=device,
                    batch_size=batch_size, seed=seed, max_samples=max_samples, preprocess=preprocess,
                    reporter=reporter, trust_arch=trust_arch)
    session = setup.session
    used = list(setup.used)
    if bn_recalibrate is None:
        bn_recalibrate = session.data is not None
    if bn_recalibrate:
        setup.warnings += few_examples_warnings(len(session.data), "BatchNorm recalibration")
    if schedule.finetune_data is not None:
        schedule.finetune_data.require_labels(session.num_classes)
    done = run_schedule(setup, ratio=ratio, target_flops=target_flops, schedule=schedule, method=method,
                        ignore=ignore, bn_recalibrate=bn_recalibrate, batch_size=batch_size, seed=seed,
                        max_samples=max_samples, reporter=reporter)
    if bn_recalibrate:
        used.append(UsedData(session.data.sha256, "bn-recalibration", session.data.path.name))
    if schedule.finetune_data is not None:
        used.append(UsedData(schedule.finetune_data.sha256, "fine-tune", schedule.finetune_data.path.name))
    warnings = setup.warnings + done.warnings
    for message in warnings:
        reporter.warn(message)
    target = {"ratio": ratio, "target_flops": target_flops, "scope": scope, "max_layer_ratio": max_layer_ratio,
              "round_to": round_to, "protect": setup.policy.protect, "ignore": list(ignore), "steps": schedule.steps}
    extra = {"schedule": done.log}
    if schedule.finetune is not None:
        extra["finetune"] = schedule.finetune.to_json()
    return finalise(setup, session.model, output, plan=done.plan, channels=done.channels, used=used,
                    target=target, recalibrated=done.recalibrated, warnings=warnings, extra=extra)


def check_granularity(granularity: str, *, scores: object, method: str | None, target_flops: float | None) -> None:
    """Reject options that make no sense for the granularity.

    Raises:
        UsageError: unknown granularity, or weight granularity with scores, a non-magnitude method or a
            FLOPs target (zeroing weights removes no FLOPs).
    """
    if granularity not in GRANULARITIES:
        raise UsageError(f"--granularity {granularity!r}: use {' or '.join(GRANULARITIES)}")
    if granularity != "weight":
        return
    if scores is not None or method not in (None, "l1", "l2"):
        raise UsageError("--granularity weight ranks single weights by magnitude; drop --scores and --method "
                         "(or use --method l1)")
    if target_flops is not None:
        raise UsageError("--granularity weight zeroes weights and removes no FLOPs; use --ratio (fraction of "
                         "weights) instead of --target-flops")


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
        used.append(UsedData(session.data.sha256, "bn-recalibration", session.data.path.name))
    reporter.info(f"--granularity weight: {NO_SPEEDUP}")
    setup.method, setup.method_params = "magnitude-unstructured", {}
    target = {"ratio": fraction, "granularity": "weight", "ignore": list(ignore)}
    return finalise(setup, session.model, output, plan=session.loaded.meta.plan, channels={}, used=used,
                    target=target, recalibrated=recalibrated, extra={"sparsity": sparsity.to_json()})


def _unique(records: list[dict[str, str]]) -> list[dict[str, str]]:
    seen, out = set(), []
    for record in records:
        key = (record["sha256"], record["role"])
        if key not in seen:
            seen.add(key)
            out.append(record)
    return out
