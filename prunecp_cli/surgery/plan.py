"""Apply a channel removal to a model, check it, and replay it later without pickle.

A *plan* is the JSON object stored in a pruned model's metadata::

    {"version": 1,
     "history": [[module name, is_out_channels, [indices]], ...],   # Torch-Pruning's record
     "groups": {group name: {"channels": C, "removed": [indices]}}}  # what was removed, per group

``history`` replays on a freshly built model of the original architecture (in order; repeated
prunings append to it); ``groups`` is for people and reports.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from prunecp_cli.errors import PlanError
from prunecp_cli.surgery.gates import ChannelGates
from prunecp_cli.surgery.groups import ModelGraph, replay_history
from prunecp_cli.surgery.select import Removal

PLAN_VERSION = 1


def silenced_output(model: nn.Module, graph: ModelGraph, removal: Removal, example: torch.Tensor) -> torch.Tensor:
    """Output of the unpruned ``model`` with the channels of ``removal`` gated to zero.

    In eval mode this is exactly what a correct physical removal must compute.
    """
    with ChannelGates(model, graph.groups) as gates, torch.no_grad():
        for name, idxs in removal.items():
            if idxs:
                mask = torch.ones(graph.by_name[name].channels)
                mask[list(idxs)] = 0
                gates.set(name, mask)
        return model(example)


def forward_check(model: nn.Module, example: torch.Tensor, reference: torch.Tensor) -> str | None:
    """Why ``model``'s output on ``example`` is unacceptable, or None when it matches ``reference``.

    The pruned model must run, keep the output shape, give finite values, and compute what the
    unpruned model computes with the removed channels silenced (to float tolerance).
    """
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    if not isinstance(out, torch.Tensor):
        return f"the output is a {type(out).__name__}, not a tensor"
    if tuple(out.shape) != tuple(reference.shape):
        return f"the output shape changed from {list(reference.shape)} to {list(out.shape)}"
    if not torch.isfinite(out).all():
        return "the output holds NaN or infinite values"
    scale = float(reference.abs().max().clamp_min(1.0))
    gap = float((out - reference).abs().max())
    if gap > 1e-3 * scale:
        return (f"the pruned model computes something else than the model with those channels silenced "
                f"(max difference {gap:.3g}): its channels were re-wired wrongly")
    return None


def apply_removal(graph: ModelGraph, removal: Removal, *, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Remove the chosen channels from ``graph.model`` in place, validate it, and return the plan.

    The model is checked by a forward pass on the graph's example: it must keep the output shape,
    give finite values, and match the unpruned model with the removed channels gated to zero (a
    channel split or slice that Torch-Pruning follows wrongly gives a model that runs but computes
    something else; this catches it). When the check fails, each group is tried alone on a copy of
    the original model to name the groups whose removal breaks the model.

    Args:
        graph: the model's dependency graph (built on the unpruned state of this step).
        removal: channel indices to remove per group name.
        previous: the plan the model already carries (its history is kept in front).

    Raises:
        PlanError: the pruned model fails the forward check; names the culprit groups and the fix.
    """
    model = graph.model
    reference = silenced_output(model, graph, removal, graph.example)
    pristine = copy.deepcopy(model)
    try:
        for name, idxs in removal.items():
            graph.prune_group(name, idxs)
        problem = forward_check(model, graph.example, reference)
    except Exception as exc:  # Torch-Pruning can fail inside a pruning function
        problem = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    if problem is not None:
        culprits = _find_culprits(pristine, graph, removal)
        names = ", ".join(culprits) if culprits else "several groups together"
        fix = " ".join(f"--ignore {c}" for c in culprits) if culprits else "--ignore on the layers involved"
        raise PlanError(
            f"pruning breaks the model ({problem}); the culprit group(s): {names}. "
            f"Its forward code probably splits or slices channels; keep them whole with {fix}"
        )
    groups = {name: {"channels": graph.by_name[name].channels, "removed": sorted(int(i) for i in idxs)}
              for name, idxs in removal.items()}
    history = list((previous or {}).get("history", [])) + graph.history()
    steps = list((previous or {}).get("steps", [])) + [groups]
    return {"version": PLAN_VERSION, "history": history, "groups": groups, "steps": steps}


def _find_culprits(pristine: nn.Module, graph: ModelGraph, removal: Removal) -> list[str]:
    culprits = []
    for name, idxs in removal.items():
        if not idxs:
            continue
        trial = copy.deepcopy(pristine)
        try:
            trial_graph = ModelGraph(trial, graph.example, ignore=(), protect_head=False)
            reference = silenced_output(trial, trial_graph, {name: idxs}, graph.example)
            trial_graph.prune_group(name, idxs)
            problem = forward_check(trial, graph.example, reference)
        except Exception as exc:
            problem = str(exc)
        if problem is not None:
            culprits.append(name)
    return culprits


def replay_plan(model: nn.Module, plan: dict[str, Any], *, input_shape: list[int]) -> None:
    """Re-apply a stored plan to a freshly built model of the original architecture, in place.

    Raises:
        PlanError: unknown plan version or a plan that does not fit the model.
    """
    version = plan.get("version")
    if version != PLAN_VERSION:
        raise PlanError(f"pruning plan version {version!r} is not supported (expected {PLAN_VERSION}); upgrade prunecp")
    if not input_shape:
        raise PlanError("the model file records no input shape, so its plan cannot be replayed; re-run prune")
    example = torch.zeros((1, *input_shape))
    replay_history(model, plan.get("history", []), example)
