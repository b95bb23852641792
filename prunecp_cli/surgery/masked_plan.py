"""Tracing and planning for :class:`~prunecp_cli.surgery.masked.MaskedEvaluator`.

The model is traced once with ``torch.fx`` (:func:`trace_model`). For each channel group,
:func:`plan_group` finds the group's *suffix* (every node that depends on one of its gate points)
and, inside it, the nodes whose masked value is their clean value times the mask (step 2 of
:mod:`prunecp_cli.surgery.masked`'s docstring) and the dense convolutions computed from im2col
columns (step 3). :func:`needed_values` names the clean values a masked pass reads. Executing a
plan is :mod:`prunecp_cli.surgery.masked_interpreter`'s job.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from prunecp_cli.surgery.gates import channels_last
from prunecp_cli.surgery.groups import ChannelGroup

# Channel-wise maps with f(0) = 0: a value that is "clean ⊙ mask" stays so through them.
_ZERO_PRESERVING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_ZERO_PRESERVING_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.silu, F.gelu, F.hardswish,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
}
_ZERO_PRESERVING_METHODS = {"relu", "relu_"}
ADD = {operator.add, torch.add}  # also read by the interpreter (skip connections)
CHANNELWISE_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclasses.dataclass(frozen=True)
class Traced:
    """A traced model: its graph module, nodes in order, output node and batch-carrying nodes."""

    module: fx.GraphModule
    nodes: list[fx.Node]
    output: fx.Node
    batched: frozenset[fx.Node]


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """How to evaluate masks of one group.

    Attributes:
        suffix: every node that depends on the group's gates, in order (the plain masked pass).
        run: the suffix nodes still executed with the shortcut (steps 2-3 of the module docstring).
        masked: the nodes whose masked value is their clean value times the mask and that ``run`` reads.
        linear: the convolutions computed from im2col columns (step 3), each with its input node.
        channel_maps: for every "clean ⊙ mask" node, the group channel of each of its channels, as an
            index into the mask extended by a column of ones (index C: never masked).
        shortcut: whether ``run``, ``masked`` and ``linear`` may be used (False after a failed check).
    """

    suffix: list[fx.Node]
    run: list[fx.Node]
    masked: set[fx.Node]
    linear: dict[fx.Node, fx.Node]
    channel_maps: dict[fx.Node, torch.Tensor]
    shortcut: bool = True


def trace_model(model: nn.Module) -> Traced | None:
    """``model`` traced with ``torch.fx``, or None when it cannot be traced."""
    try:
        traced = fx.symbolic_trace(model)
    except Exception:  # data-dependent control flow etc.: fall back to full passes
        return None
    nodes = list(traced.graph.nodes)
    batched: set[fx.Node] = set()  # values derived from the input carry the batch dimension
    for node in nodes:
        if node.op == "placeholder" or (node.op != "get_attr" and any(a in batched for a in node.all_input_nodes)):
            batched.add(node)
    output = next(n for n in nodes if n.op == "output")
    return Traced(traced, nodes, output, frozenset(batched))


def plan_group(graph: Traced, group: ChannelGroup) -> GroupPlan | None:
    """The suffix of ``group`` and which of its nodes are "clean ⊙ mask" or linear in such a value."""
    gate_maps = _gate_channel_maps(graph.module, group)
    starts = [n for n in graph.nodes if n.op == "call_module" and n.target in gate_maps]
    if len({n.target for n in starts}) < len(gate_maps):
        return None  # a gate point the trace does not show as a module call
    marked: set[fx.Node] = set(starts)
    for node in graph.nodes:  # topological order: one pass marks all descendants
        if node not in marked and any(a in marked for a in node.all_input_nodes):
            marked.add(node)
    suffix = [n for n in graph.nodes if n in marked]
    maps: dict[fx.Node, torch.Tensor] = {}
    for node in suffix:
        channel_map = _mask_channel_map(graph.module, node, marked, maps, gate_maps)
        if channel_map is not None:
            maps[node] = channel_map
    masked: set[fx.Node] = set()
    linear: dict[fx.Node, fx.Node] = {}
    for node in suffix:
        if node in maps:
            continue
        sources = [a for a in node.all_input_nodes if a in maps]
        if len(sources) == 1 and _is_dense_conv(graph.module, node, sources[0]):
            linear[node] = sources[0]
        else:
            masked.update(sources)
    run = [n for n in suffix if n not in maps and n not in linear]
    return GroupPlan(suffix, run, masked, linear, maps)


def _gate_channel_maps(module: nn.Module, group: ChannelGroup) -> dict[str, torch.Tensor | None]:
    """Per gate module of ``group``: the group channel of each output channel (C: not gated), or None."""
    maps: dict[str, torch.Tensor | None] = {}
    for point in group.gate_points:
        layer = module.get_submodule(point.module) if _has_submodule(module, point.module) else None
        width = _out_channels(layer)
        if point.module in maps and maps[point.module] is None:
            continue
        if width is None or channels_last(layer):
            maps[point.module] = None
            continue
        current = maps.get(point.module)
        if current is None:
            current = torch.full((width,), group.channels, dtype=torch.long)
        current[list(point.member_idxs)] = torch.tensor(point.root_idxs, dtype=torch.long)
        maps[point.module] = current
    return maps


def _mask_channel_map(module: nn.Module, node: fx.Node, suffix: set[fx.Node], maps: dict[fx.Node, torch.Tensor],
                      gate_maps: dict[str, torch.Tensor | None]) -> torch.Tensor | None:
    """The channel map of ``node`` if its masked value is its clean value times the mask, else None."""
    inputs = node.all_input_nodes
    only = inputs[0] if len(inputs) == 1 else None
    if node.op == "call_module":
        layer = module.get_submodule(node.target)
        if node.target in gate_maps:
            gate = gate_maps[node.target]
            if gate is None:
                return None
            if not any(a in suffix for a in inputs):
                return gate  # a gated layer of clean inputs
            if isinstance(layer, CHANNELWISE_NORMS) and only in maps and torch.equal(maps[only], gate):
                return gate  # channel-wise, then gated again with the same mask
            return None
        simple = len(node.args) == 1 and not node.kwargs and only in maps
        if simple and (isinstance(layer, _ZERO_PRESERVING_MODULES) or _is_depthwise_without_bias(layer)):
            return maps[only]
        return None
    if only is not None and only in maps and node.args and node.args[0] is only:
        if node.op == "call_function" and node.target in _ZERO_PRESERVING_FUNCTIONS:
            return maps[only]
        if node.op == "call_method" and node.target in _ZERO_PRESERVING_METHODS:
            return maps[only]
    if node.op == "call_function" and node.target in ADD and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        if a in maps and b in maps and torch.equal(maps[a], maps[b]):
            return maps[a]
    return None


def _is_dense_conv(module: nn.Module, node: fx.Node, source: fx.Node) -> bool:
    """Whether ``node`` is a dense (groups=1, zero- and number-padded) 2-d convolution of ``source`` alone."""
    if node.op != "call_module" or node.args != (source,) or node.kwargs:
        return False
    layer = module.get_submodule(node.target)
    return (isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.padding_mode == "zeros"
            and isinstance(layer.padding, tuple))


def _is_depthwise_without_bias(layer: nn.Module) -> bool:
    return (isinstance(layer, nn.Conv2d) and layer.bias is None and layer.groups == layer.in_channels
            == layer.out_channels and layer.padding_mode == "zeros")


def _out_channels(layer: nn.Module | None) -> int | None:
    for attr in ("num_features", "out_channels", "out_features"):
        if isinstance(getattr(layer, attr, None), int):
            return getattr(layer, attr)
    return None


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def needed_values(graph: Traced, plans: Iterable[GroupPlan | None]) -> set[fx.Node]:
    """The nodes whose clean values some masked pass reads: ``prepare`` keeps these, frees the rest."""
    keep = {graph.output}
    for plan in plans:
        if plan is None:
            continue
        inside = set(plan.suffix)
        keep.update(a for n in plan.suffix for a in n.all_input_nodes if a not in inside)
        keep.update(plan.masked)
        keep.update(plan.linear)
        keep.update(plan.linear.values())
    return keep
