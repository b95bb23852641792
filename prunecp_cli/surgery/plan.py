"""Apply a channel removal to a model, check it, and replay it later without pickle.

A *plan* is the JSON object stored in a pruned model's metadata::

    {"version": 1,
     "history": [[module name, is_out_channels, [indices]], ...],   # Torch-Pruning's record
     "groups": {group name: {"channels": C, "removed": [indices]}}}  # what was removed, per group

``history`` replays on a freshly built model of the original architecture (in order; repeated
prunings append to it); ``groups`` is for people and reports. An optional ``modules`` record
(``{module name: {attribute: width}}``, see :mod:`prunecp_cli.surgery.resize`) rebuilds the model
without replaying: it is written only when it provably gives the same model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prunecp_cli.errors import PlanError, PrunecpError, brief
from prunecp_cli.surgery.gates import ChannelGates
from prunecp_cli.surgery.groups import ModelGraph, layer_width, replay_history
from prunecp_cli.surgery.resize import record_problem, resize_to
from prunecp_cli.surgery.select import Removal
from prunecp_cli.surgery.trial import Trial

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
        return f"{type(exc).__name__}: {brief(exc)}"
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
    something else; this catches it). When the check fails, the model is restored in place and the
    groups whose removal alone breaks it are found by trial prunings (:func:`_find_culprits`).

    Args:
        graph: the model's dependency graph (built on the unpruned state of this step).
        removal: channel indices to remove per group name.
        previous: the plan the model already carries (its history is kept in front).

    Raises:
        PlanError: the pruned model fails the forward check; names the culprit groups and the fix.
    """
    model = graph.model
    reference = silenced_output(model, graph, removal, graph.example)
    trial = Trial(graph)
    try:
        for name, idxs in removal.items():
            graph.prune_group(name, idxs)
        problem = forward_check(model, graph.example, reference)
    except Exception as exc:  # Torch-Pruning can fail inside a pruning function
        problem = f"{type(exc).__name__}: {brief(exc)}"
    if problem is not None:
        trial.restore()  # back to the unpruned model, in place
        culprits = _find_culprits(graph, removal, trial)
        names = ", ".join(culprits) if culprits else "several groups together"
        fix = " ".join(f"--ignore {c}" for c in culprits[:4]) if culprits else "--ignore on the layers involved"
        error = PlanError(
            f"pruning breaks the model ({problem}); the culprit group(s): {names[:300]}. "
            f"Its forward code probably splits or slices channels; keep them whole with {fix}"
        )
        error.culprits = culprits
        raise error
    groups = {name: {"channels": graph.by_name[name].channels, "removed": sorted(int(i) for i in idxs)}
              for name, idxs in removal.items()}
    history = list((previous or {}).get("history", [])) + graph.history()
    steps = list((previous or {}).get("steps", [])) + [groups]
    return {"version": PLAN_VERSION, "history": history, "groups": groups, "steps": steps}


def retrace(graph: ModelGraph, kept_whole: list[str]) -> ModelGraph:
    """A new graph of ``graph``'s (restored) model, with the groups named in ``kept_whole`` kept whole."""
    fresh = ModelGraph(graph.model, graph.example, ignore=graph.ignored)
    for name in kept_whole:
        if name in fresh.by_name:
            fresh.by_name[name].channel_groups = 0
    return fresh


#: Most rounds of :func:`remove_keeping_whole`: each keeps the groups found breaking the model whole.
MAX_KEEP_WHOLE_ROUNDS = 3


def remove_keeping_whole(
    graph: ModelGraph,
    choose: Callable[[ModelGraph], Removal],
    *,
    previous: dict[str, Any] | None = None,
    strict: bool = False,
) -> tuple[dict[str, Any], ModelGraph, list[str]]:
    """:func:`apply_removal` that keeps whole, by itself, the groups whose removal breaks the model.

    When the pruned model fails its check and single groups are to blame, the model is restored,
    those groups are kept whole, ``choose`` selects again on the re-traced graph (so a FLOPs target
    is still met by the other groups) and the removal is retried.

    Args:
        graph: the model's dependency graph.
        choose: the removal to make on a graph (groups with ``channel_groups == 0`` are kept whole).
        previous: the plan the model already carries.
        strict: raise the first failure instead of keeping groups whole.

    Returns:
        The plan, the graph the removal was made on, and the groups kept whole on the way.

    Raises:
        PlanError: the failure cannot be pinned on single groups, persists, or ``strict``.
    """
    kept_whole: list[str] = []
    for _ in range(MAX_KEEP_WHOLE_ROUNDS):
        try:
            return apply_removal(graph, choose(graph), previous=previous), graph, kept_whole
        except PlanError as exc:
            culprits = [c for c in getattr(exc, "culprits", []) if c not in kept_whole]
            if strict or not culprits:
                raise
            kept_whole += culprits
        graph = retrace(graph, kept_whole)
    return apply_removal(graph, choose(graph), previous=previous), graph, kept_whole


def _breaks(graph: ModelGraph, removal: Removal, names: list[str], trial: Trial) -> bool:
    """Whether removing only the groups ``names`` of ``removal`` breaks the model (which is restored)."""
    part = {name: removal[name] for name in names}
    try:
        reference = silenced_output(graph.model, graph, part, graph.example)
        for name in names:
            graph.prune_group(name, part[name])
        return forward_check(graph.model, graph.example, reference) is not None
    except Exception:
        return True
    finally:
        trial.restore()


def _find_culprits(graph: ModelGraph, removal: Removal, trial: Trial) -> list[str]:
    """The single groups of a breaking ``removal`` whose removal alone breaks the model.

    Group testing: a set of groups that prunes cleanly holds no culprit, so halves are tried and only
    breaking halves are split further (about k·log₂ n trial prunings for k culprits among n groups,
    each on the same graph, restored in place). A failure that needs several groups together and no
    single one is not pinned on any group.
    """
    def search(names: list[str]) -> list[str]:
        if len(names) == 1:
            return names
        halves = names[: len(names) // 2], names[len(names) // 2 :]
        return [c for half in halves if _breaks(graph, removal, half, trial) for c in search(half)]

    names = [name for name, idxs in removal.items() if idxs]
    return search(names) if names else []


#: Most channel indices a plan may list in all (a plan holds one index per removed channel).
MAX_PLAN_INDICES = 10_000_000


def _index_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)


def plan_problem(plan: Any) -> str | None:
    """What is wrong with the structure of a stored plan, or None when it is well formed.

    Only the form is checked (types, non-negative unique indices, sizes), not the fit to a model:
    :func:`replay_plan` checks that. An empty object is the plan of an unpruned model.
    """
    if not isinstance(plan, dict):
        return f"must be a JSON object, got {type(plan).__name__}"
    if not plan:
        return None
    version = plan.get("version")
    if version != PLAN_VERSION:
        return f"has version {str(version)[:20]!r}, but this prunecp replays only version {PLAN_VERSION}"
    history = plan.get("history")
    if not isinstance(history, list):
        return "lacks its history list"
    total = 0
    for i, step in enumerate(history):
        if (not isinstance(step, list) or len(step) != 3 or not isinstance(step[0], str) or not step[0]
                or not isinstance(step[1], bool) or not _index_list(step[2]) or not step[2]):
            return f"history entry {i} is not [module name, is_out_channels, [channel indices >= 0]]"
        if len(set(step[2])) != len(step[2]):
            return f"history entry {i} ({step[0][:80]!r}) repeats a channel index"
        total += len(step[2])
        if total > MAX_PLAN_INDICES:
            return f"lists more than {MAX_PLAN_INDICES:,} channel indices"
    if "modules" in plan:
        problem = record_problem(plan["modules"])
        if problem is not None:
            return problem
    groups = [plan["groups"]] if "groups" in plan else []
    steps = plan.get("steps", [])
    if not isinstance(steps, list):
        return "has steps that are not a list"
    for record in groups + steps:
        if not isinstance(record, dict):
            return "has a groups record that is not a JSON object"
        for name, group in record.items():
            if not (isinstance(group, dict) and isinstance(group.get("channels"), int)
                    and not isinstance(group.get("channels"), bool) and _index_list(group.get("removed"))
                    and all(i < group["channels"] for i in group["removed"])):
                return f"group {name[:80]!r} is not {{channels, removed: [indices below channels]}}"
            total += len(group["removed"])
            if total > MAX_PLAN_INDICES:
                return f"lists more than {MAX_PLAN_INDICES:,} channel indices"
    return None


def _fit_problem(model: nn.Module, history: list) -> str | None:
    """Why ``history`` cannot apply to the fresh ``model`` (checked before touching it), or None.

    Every entry must name a convolution, linear or BatchNorm layer of the model (prunecp's plans name
    the root convolution of each pruned group), and its indices must lie below that layer's width;
    the channels removed from a layer in all entries cannot exceed its width either (later entries
    index the already pruned layer, so this is necessary, not sufficient: the replay and the weight
    shapes check the rest).
    """
    modules = dict(model.named_modules())
    removed: dict[tuple[str, bool], int] = {}
    for i, (name, out, idxs) in enumerate(history):
        module = modules.get(name)
        if module is None or name == "":
            return f"history entry {i} names {name[:80]!r}, which is not a layer of the architecture"
        width = layer_width(module, out)
        if width is None:
            return f"history entry {i} names {name[:80]!r}, a {type(module).__name__} without channels to remove"
        if max(idxs) >= width:
            return (f"history entry {i} removes channel {max(idxs)} of {name}, which has "
                    f"{width} {'output' if out else 'input'} channels")
        removed[(name, out)] = removed.get((name, out), 0) + len(idxs)
        if removed[(name, out)] >= width:
            return f"the plan removes {removed[(name, out)]} channels of {name}, which has only {width}"
    return None


def replay_plan(model: nn.Module, plan: dict[str, Any], *, input_shape: list[int],
                state: dict[str, torch.Tensor] | None = None) -> None:
    """Re-apply a stored plan to a freshly built model of the original architecture, in place.

    The plan's form and its fit to ``model`` (layer names, index ranges) are checked before the
    model is touched. With a ``modules`` record and the file's tensors (``state``), the widths are
    set directly (fast); otherwise the history is replayed on the dependency graph.

    Raises:
        PlanError: unknown plan version, a malformed plan, or a plan that does not fit the model.
    """
    problem = plan_problem(plan)
    if problem is not None:
        raise PlanError(f"the stored pruning plan {problem}; the file is damaged or was not written by prunecp")
    if not plan:
        return
    if "modules" in plan and state is not None:
        resize_to(model, plan["modules"], state)
        return
    if not input_shape:
        raise PlanError("the model file records no input shape, so its plan cannot be replayed; re-run prune")
    history = plan["history"]
    problem = _fit_problem(model, history)
    if problem is not None:
        raise PlanError(f"the stored pruning plan does not fit the architecture: {problem}; the file was written "
                        "for another architecture or --arch-kwargs, or is damaged")
    example = torch.zeros((1, *input_shape))
    try:
        replay_history(model, history, example)
    except PrunecpError:
        raise
    except Exception as exc:  # Torch-Pruning fails in many ways on a history that does not fit
        first = brief(exc) if str(exc).strip() else "no message"
        raise PlanError(
            f"the stored pruning plan does not fit the architecture ({type(exc).__name__}: {first}); the file "
            "was written for another architecture or --arch-kwargs"
        ) from None
