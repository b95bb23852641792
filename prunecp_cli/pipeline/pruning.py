"""``prune``: remove channels physically, check the result, recalibrate BatchNorm, save safetensors."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import torch

from prunecp_cli import dist
from prunecp_cli import importance as registry
from prunecp_cli.errors import UsageError
from prunecp_cli.io.checkpoint import ModelMeta, save_model
from prunecp_cli.io.data import Preprocess
from prunecp_cli.measure import FLOPS_UNIT, count_flops, count_params, flops_by_module
from prunecp_cli.pipeline.scoring import (
    compute_importance,
    degenerate_warnings,
    read_importance,
    scores_for_graph,
)
from prunecp_cli.pipeline.session import Session, open_session
from prunecp_cli.runtime import SILENT, Reporter
from prunecp_cli.surgery.batchnorm import recalibrate_batchnorm
from prunecp_cli.surgery.groups import ModelGraph
from prunecp_cli.surgery.plan import apply_removal
from prunecp_cli.surgery.select import FlopsModel, Policy, Removal, select
from prunecp_cli.types import PruneResult, UsedData


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


def recalibrate(session: Session, *, batch_size: int, reporter: Reporter) -> int:
    """Re-estimate BatchNorm statistics on the session's data (this rank's shard)."""
    data = dist.shard_dataset(session.data)
    batches = (b.x for b in reporter.track(data.batches(batch_size, device=session.device),
                                            total=-(-len(data) // batch_size), description="BN recalibration"))
    model = session.model.to(session.device)
    seen = recalibrate_batchnorm(model, batches, reduce=dist.all_reduce_sum)
    model.cpu()
    return seen


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

    Raises:
        UsageError: contradictory options.
        ScoresError: the scores file does not belong to this model.
        PlanError: the target is unreachable, or the pruned model fails its forward check.
    """
    if (scores is None) == (method is None):
        raise UsageError("give exactly one of --scores (an importance.json) and --method")
    if bn_recalibrate and data is None:
        raise UsageError("--bn-recalibrate needs --data (the score split) to re-estimate statistics on")
    policy = Policy(scope=scope, max_layer_ratio=max_layer_ratio, round_to=round_to,
                    protect=(0.1 if scope == "global" else 0.0) if protect is None else protect)
    session = open_session(checkpoint, data=data, arch=arch, arch_kwargs=arch_kwargs, input_shape=input_shape,
                           preprocess=preprocess, device=device)
    model, example = session.model, session.example
    graph = ModelGraph(model, example, ignore=ignore)
    used = session.used_data()
    if scores is not None:
        table = read_importance(scores)
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
        if info.needs_data and session.data is not None:
            used.append(UsedData(session.data.sha256, "score", session.data.path.name))
    warnings = degenerate_warnings(group_scores)
    params_before, flops_before = count_params(model), count_flops(model, example)
    flops_model = FlopsModel(model, graph.groups, flops_by_module(model, example)) if target_flops else None
    removal = select(graph.groups, group_scores, policy=policy, ratio=ratio, target_flops=target_flops,
                     flops_model=flops_model)
    warnings += tie_warnings(group_scores, removal)
    before = {g.name: g.channels for g in graph.groups}
    with reporter.status("removing channels"):
        plan = apply_removal(graph, removal, previous=session.loaded.meta.plan or None)
    recalibrated = 0
    if bn_recalibrate is None:
        bn_recalibrate = session.data is not None
    if bn_recalibrate:
        recalibrated = recalibrate(session, batch_size=batch_size, reporter=reporter)
        used.append(UsedData(session.data.sha256, "bn-recalibration", session.data.path.name))
    for message in warnings:
        reporter.warn(message)
    params_after, flops_after = count_params(model), count_flops(model, example)
    meta = session.loaded.meta
    extra = dict(meta.extra)
    extra.update({
        "source_sha256": session.loaded.sha256,
        "method": method_name,
        "method_params": method_params,
        "data_sha256": _unique([u.__dict__ for u in used]),
        "target": {"ratio": ratio, "target_flops": target_flops, "scope": scope, "max_layer_ratio": max_layer_ratio,
                   "round_to": round_to, "protect": policy.protect, "ignore": list(ignore)},
        "bn_recalibrated_examples": recalibrated,
        "params_before": extra.get("params_before", params_before),
        "params_after": params_after,
        "flops_before": extra.get("flops_before", flops_before),
        "flops_after": flops_after,
        "flops_unit": FLOPS_UNIT,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    new_meta = ModelMeta(arch=meta.arch, arch_kwargs=meta.arch_kwargs, input_shape=session.input_shape,
                         plan=plan, extra=extra)
    digest = save_model(model, output, new_meta) if dist.rank() == 0 else ""
    dist.barrier()
    channels = {name: (count, count - len(removal.get(name, []))) for name, count in before.items()}
    return PruneResult(str(output), digest, params_before, params_after, flops_before, flops_after, channels,
                       warnings=warnings)


def _unique(records: list[dict[str, str]]) -> list[dict[str, str]]:
    seen, out = set(), []
    for record in records:
        key = (record["sha256"], record["role"])
        if key not in seen:
            seen.add(key)
            out.append(record)
    return out
