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
from prunecp_cli.surgery.groups import ModelGraph, replay_history
from prunecp_cli.surgery.select import Removal

PLAN_VERSION = 1


def forward_check(model: nn.Module, example: torch.Tensor, expected_shape: tuple[int, ...]) -> str | None:
    """Run ``model`` on ``example``; return why the output is unacceptable, or None if it is fine."""
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    if not isinstance(out, torch.Tensor):
        return f"the output is a {type(out).__name__}, not a tensor"
    if tuple(out.shape) != tuple(expected_shape):
        return f"the output shape changed from {list(expected_shape)} to {list(out.shape)}"
    if not torch.isfinite(out).all():
        return "the output holds NaN or infinite values"
    return None


def apply_removal(graph: ModelGraph, removal: Removal, *, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Remove the chosen channels from ``graph.model`` in place, validate it, and return the plan.

    The model is checked by a forward pass on the graph's example: it must give the dense output
    shape with finite values. When it does not, each group is tried alone on a copy of the original
    model to name the groups whose removal breaks the forward pass.

    Args:
        graph: the model's dependency graph (built on the unpruned state of this step).
        removal: channel indices to remove per group name.
        previous: the plan the model already carries (its history is kept in front).

    Raises:
        PlanError: the pruned model fails the forward check; names the culprit groups and the fix.
    """
    model = graph.model
    with torch.no_grad():
        expected = tuple(model(graph.example).shape)
    pristine = copy.deepcopy(model)
    try:
        for name, idxs in removal.items():
            graph.prune_group(name, idxs)
        problem = forward_check(model, graph.example, expected)
    except Exception as exc:  # Torch-Pruning can fail inside a pruning function
        problem = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    if problem is not None:
        culprits = _find_culprits(pristine, graph, removal, expected)
        names = ", ".join(culprits) if culprits else "several groups together"
        fix = " ".join(f"--ignore {c}" for c in culprits) if culprits else "--ignore on the layers involved"
        raise PlanError(
            f"pruning breaks the model's forward pass ({problem}); the culprit group(s): {names}. "
            f"Its forward code probably splits or slices channels; keep them whole with {fix}"
        )
    groups = {name: {"channels": graph.by_name[name].channels, "removed": sorted(int(i) for i in idxs)}
              for name, idxs in removal.items()}
    history = list((previous or {}).get("history", [])) + graph.history()
    steps = list((previous or {}).get("steps", [])) + [groups]
    return {"version": PLAN_VERSION, "history": history, "groups": groups, "steps": steps}


def _find_culprits(pristine: nn.Module, graph: ModelGraph, removal: Removal,
                   expected: tuple[int, ...]) -> list[str]:
    culprits = []
    for name, idxs in removal.items():
        if not idxs:
            continue
        trial = copy.deepcopy(pristine)
        try:
            trial_graph = ModelGraph(trial, graph.example, ignore=(), protect_head=False)
            trial_graph.prune_group(name, idxs)
            problem = forward_check(trial, graph.example, expected)
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
