"""Shared set-up of every pruning route: open and rank once, recalibrate BatchNorm, write the result.

:func:`prepare` opens the model and the score data, traces the coupled channel groups and ranks
them (from an ``importance.json`` or by running a method); :func:`finalise` writes the pruned model
with its metadata. One-shot pruning (:mod:`~prunecp_cli.pipeline.pruning`), iterative schedules
(:mod:`~prunecp_cli.pipeline.schedule`) and Learn-then-Test pruning
(:mod:`~prunecp_cli.pipeline.confident`) all build on these, so none of them imports another.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecp_cli import dist
from prunecp_cli import importance as registry
from prunecp_cli.errors import PlanError, UsageError
from prunecp_cli.io.arch import build_model
from prunecp_cli.io.checkpoint import ModelMeta, save_model
from prunecp_cli.io.data import Dataset
from prunecp_cli.io.digest import weights_sha256
from prunecp_cli.measure import FLOPS_UNIT, count_flops, count_params
from prunecp_cli.options import DataSource, ModelSource, PruneOptions, RunOptions
from prunecp_cli.pipeline.allocation import Allocation
from prunecp_cli.pipeline.scoring import (
    compute_importance,
    degenerate_warnings,
    read_importance,
    scores_for_graph,
    scoring_data_warnings,
)
from prunecp_cli.pipeline.session import Session, open_source
from prunecp_cli.runtime import SILENT, Reporter
from prunecp_cli.surgery.batchnorm import recalibrate_batchnorm
from prunecp_cli.surgery.groups import ChannelGroup, ModelGraph
from prunecp_cli.surgery.resize import fast_reload_record
from prunecp_cli.surgery.select import Policy, Removal
from prunecp_cli.types import PruneResult, UsedData

GRANULARITIES = ("channel", "weight")
PER_MODEL_RECORDS = ("risk_control", "sparsity", "schedule", "finetune", "auto")
"""Metadata records that describe one model's weights; a new model made from it never inherits them."""


def tie_warnings(scores: dict[str, torch.Tensor], removal: Removal, groups: list[ChannelGroup] = ()) -> list[str]:
    """Warn when the cut inside a group falls between channels of equal importance.

    A group among ``groups`` whose channels shrink block by block (grouped convolutions) is judged
    on its block offsets, as it was selected.
    """
    blocks = {g.name: g.channel_groups for g in groups}
    tied = []
    for name, removed in removal.items():
        value = scores[name]
        k = blocks.get(name, 1)
        if k > 1 and value.numel() % k == 0:
            width = value.numel() // k
            value = value.double().reshape(k, width).mean(0)
            removed = sorted({int(i) % width for i in removed})
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


#: How the note of :func:`left_whole_note` starts (a model gets one such line).
LEFT_WHOLE_NOTE = "kept whole: "


def left_whole_note(names: list[str], *, strict: bool) -> list[str]:
    """The one-line note on groups kept whole because their channels cannot be cut safely.

    These are the groups whose channel mapping cannot be followed (found when the model is traced)
    and those whose removal was found to break the model.

    Raises:
        PlanError: ``strict`` and there are such groups.
    """
    if not names:
        return []
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    text = f"{len(names)} group(s) whose channels cannot be cut safely ({shown})"
    if strict:
        raise PlanError(f"{text}; drop {{strict}} to keep them whole and prune the other groups",
                        arguments={"strict": "strict"})
    return [f"{LEFT_WHOLE_NOTE}{text}; the other groups are pruned (--strict makes this an error)"]


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
        allocation: how groups share a FLOPs target (:mod:`~prunecp_cli.pipeline.allocation`).
        params_before: parameters of the input model.
        flops_before: FLOPs of the input model.
        strict: fail instead of keeping groups whole that cannot be cut (``--strict``).
        extras: per-group extra arrays of the scores (e.g. ``auto``'s candidates), by group name.
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
    strict: bool = False
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)
    allocation: Allocation = field(default_factory=Allocation)


def make_policy(pruning: PruneOptions) -> Policy:
    """The selection :class:`Policy`; ``protect`` defaults to 0.1 with ``scope="global"``, 0 with ``local``."""
    protect = pruning.protect
    return Policy(scope=pruning.scope, max_layer_ratio=pruning.max_layer_ratio, round_to=pruning.round_to,
                  protect=(0.1 if pruning.scope == "global" else 0.0) if protect is None else protect)


def prepare(
    model: ModelSource,
    *,
    scores: str | Path | None = None,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    data: DataSource | None = None,
    policy: Policy,
    ignore: tuple[str, ...] = (),
    run: RunOptions = RunOptions(),
    rank_channels: bool = True,
    strict: bool = False,
) -> PruneSetup:
    """Open the model and the score data, trace its groups and rank their channels once.

    Args: see :func:`prune`; ``rank_channels=False`` skips tracing and ranking (unstructured pruning);
        ``strict`` refuses a model with groups that must be kept whole (:func:`left_whole_note`).

    Raises:
        UsageError: contradictory options.
        ScoresError: the scores file does not belong to this model.
        PlanError: ``strict`` and some groups cannot be cut.
    """
    batch_size, seed, reporter = run.batch(128), run.seed, run.rep
    max_samples = data.max_samples if data is not None else None
    if rank_channels and (scores is None) == (method is None):
        raise UsageError("give exactly one of {scores} (an importance.json) and {method}", arguments={"scores": "scores", "method": "method"})
    table = read_importance(scores) if rank_channels and scores is not None else None
    if model.input_shape is None and table is not None and table.input_shape:
        model = replace(model, input_shape=table.input_shape)  # the shape the scores were traced with
    session = open_source(model, data, device=run.device)
    model, example = session.model, session.example
    used = session.used_data()
    params_before, flops_before = count_params(model), count_flops(model, example)
    if not rank_channels:
        return PruneSetup(session, None, {}, policy, method or "", dict(options or {}), used,
                          params_before=params_before, flops_before=flops_before)
    graph = ModelGraph(model, example, ignore=ignore)
    warnings = left_whole_note(graph.left_whole, strict=strict)
    if table is not None:
        group_scores = scores_for_graph(table, graph, model_sha256=session.loaded.sha256, path=scores)
        method_name, method_params = table.method, table.params
        extras = {g.name: g.extras for g in table.groups}
        if table.data_sha256:
            used.append(UsedData(table.data_sha256, "score", Path(scores).name))
    else:
        info = registry.info(method)
        method_params = {**{k: d for k, (d, _) in info.options.items()}, **(options or {})}
        method_params = registry.bind_scope(method, method_params, policy.scope)
        group_scores, extras = compute_importance(session, graph, method=method, options=method_params,
                                             batch_size=batch_size, seed=seed, max_samples=max_samples,
                                             reporter=reporter)
        method_name = method
        warnings += scoring_data_warnings(session, method, info.needs_data, max_samples)
        if info.needs_data and session.data is not None:
            used.append(seen_as(session.data, "score"))
    if registry.comparable_across_groups(method_name, method_params):
        policy = replace(policy, normalise="none")  # e.g. cp-bruteforce's global greedy rounds: one scale already
    return PruneSetup(session, graph, group_scores, policy, method_name, method_params, used,
                      warnings=warnings + degenerate_warnings(group_scores), params_before=params_before,
                      flops_before=flops_before, extras=extras, strict=strict)


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
        "source_file": session.loaded.path.name,
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
        "groups_left_whole": setup.graph.left_whole if setup.graph is not None else [],
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    fields.update(extra or {})
    if "risk_control" in fields:  # bind the Learn-then-Test record to exactly these weights
        fields["risk_control"] = {**fields["risk_control"], "weights_sha256": weights_sha256(model)}
    if plan:  # widths that rebuild the model without replaying the plan, when they provably do
        record = fast_reload_record(model, lambda: build_model(meta.arch, meta.arch_kwargs), session.example)
        plan = {**plan, "modules": record} if record is not None else plan
    new_meta = ModelMeta(arch=meta.arch, arch_kwargs=meta.arch_kwargs, input_shape=session.input_shape,
                         plan=plan, extra=fields)
    digest = save_model(model, output, new_meta) if dist.rank() == 0 else ""
    dist.barrier()
    return PruneResult(str(output), digest, setup.params_before, params_after, setup.flops_before, flops_after,
                       channels, warnings=list(setup.warnings if warnings is None else warnings),
                       extra=dict(extra or {}))


def check_granularity(granularity: str, *, scores: object, method: str | None, target_flops: float | None) -> None:
    """Reject options that make no sense for the granularity.

    Raises:
        UsageError: unknown granularity, or weight granularity with scores, a non-magnitude method or a
            FLOPs target (zeroing weights removes no FLOPs).
    """
    if granularity not in GRANULARITIES:
        raise UsageError(f"{{granularity}} {granularity!r}: use {' or '.join(GRANULARITIES)}", arguments={"granularity": "granularity"})
    if granularity != "weight":
        return
    if scores is not None or method not in (None, "l1", "l2"):
        raise UsageError("{granularity} weight ranks single weights by magnitude; drop {scores} and {method} "
                         "(or use {method} l1)", arguments={"granularity": "granularity", "scores": "scores", "method": "method"})
    if target_flops is not None:
        raise UsageError("{granularity} weight zeroes weights and removes no FLOPs; use {ratio} (fraction of "
                         "weights) instead of {target_flops}", arguments={"granularity": "granularity", "ratio": "ratio", "target_flops": "target_flops"})


def _unique(records: list[dict[str, str]]) -> list[dict[str, str]]:
    seen, out = set(), []
    for record in records:
        key = (record["sha256"], record["role"])
        if key not in seen:
            seen.add(key)
            out.append(record)
    return out


def seen_as(dataset: Dataset, role: str) -> UsedData:
    """The provenance record of ``dataset`` seen in ``role`` (``score``, ``bn-recalibration``, ``fine-tune``, ``risk``)."""
    return UsedData(dataset.sha256, role, dataset.path.name)
