"""Meet a FLOPs target on the model as pruned, not only on the analytic estimate.

Selection for ``--target-flops`` bisects on :class:`~prunecp_cli.surgery.select.FlopsModel`, which
predicts a pruned model's FLOPs from the dense per-layer counts and the groups' channel mappings.
On most networks the prediction is exact to a fraction of a percent. Where channels are coupled in
ways a group's index mapping understates (GhostNet's ghost modules concatenate a convolution with a
depthwise copy of itself and add the result to a residual, so removing a channel in one half also
removes its twin), the pruned model keeps far fewer FLOPs than predicted. :func:`flops_removal`
then bisects the target handed to the selection on *trial prunings*: each trial removes the channels
in place with the model's own dependency graph, reads the widths every layer ended with, and puts the
model back exactly as it was (:class:`~prunecp_cli.surgery.trial.Trial`), so no re-tracing and no FLOP counting pass is needed.
"""

from __future__ import annotations

import torch
from torch import nn

from prunecp_cli.surgery.groups import CONV_TYPES, NORM_TYPES, ModelGraph
from prunecp_cli.surgery.select import FlopsModel, Policy, Removal, select
from prunecp_cli.surgery.trial import Trial

#: Largest accepted gap between the FLOPs kept and the target, as a fraction of the model's FLOPs.
FLOPS_TOLERANCE = 0.01
#: Most trial prunings when the estimate misses.
MAX_TRIALS = 12


def _cost(module: nn.Module) -> int | None:
    """What a layer's FLOPs are proportional to, at fixed spatial size (None for other modules)."""
    if isinstance(module, CONV_TYPES):
        return module.in_channels // module.groups * module.out_channels
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    if isinstance(module, NORM_TYPES):
        weight = getattr(module, "weight", None)
        if weight is not None:
            return weight.numel()
        return getattr(module, "num_features", None) or getattr(module, "num_channels", None)
    return None


def flops_removal(graph: ModelGraph, scores: dict[str, torch.Tensor], *, policy: Policy, relative: float,
                  by_module: dict[str, int]) -> Removal:
    """The removal that keeps ``relative`` of ``graph.model``'s FLOPs, measured on trial prunings.

    Args:
        graph: the model's dependency graph (the model is left as it was).
        scores: importance per group.
        policy: selection constraints.
        relative: fraction of the current model's FLOPs to keep.
        by_module: fvcore FLOPs per module of the current model (``''`` is the total).
    """
    flops_model = FlopsModel(graph.model, graph.groups, by_module)
    total = by_module[""]
    trial = Trial(graph)
    layers = {name: (by_module[name], cost) for name, module in trial.modules.items()
              if name and by_module.get(name) and (cost := _cost(module))}
    fixed = total - sum(flops for flops, _ in layers.values())

    def kept(asked: float) -> tuple[Removal, float]:
        removal = select(graph.groups, scores, policy=policy, target_flops=asked, flops_model=flops_model)
        try:
            for name, idxs in removal.items():
                graph.prune_group(name, idxs)
            flops = fixed + sum(f * _cost(trial.modules[n]) / cost for n, (f, cost) in layers.items())
        finally:
            trial.restore()
        return removal, flops / total

    removal, ratio = kept(relative)
    best = (abs(ratio - relative), removal)
    low, high = (relative, 1.0) if ratio < relative else (0.0, relative)
    for _ in range(MAX_TRIALS):
        if best[0] <= FLOPS_TOLERANCE:
            break
        asked = (low + high) / 2
        removal, ratio = kept(asked)
        best = min(best, (abs(ratio - relative), removal), key=lambda item: item[0])
        low, high = (asked, high) if ratio < relative else (low, asked)
    return best[1]
