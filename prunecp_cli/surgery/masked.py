"""Evaluate a model under many channel masks of one group, fast and exactly.

Brute-force importance (the change of a measure when a channel is silenced) and Shapley values
(the measure on many coalitions of channels) need the model's output under thousands of channel
masks of one group. Two things make that affordable:

1. **Prefix reuse.** The model is traced once with ``torch.fx``. For a group, the *suffix* is every
   graph node that depends on one of the group's gate points; everything else (the *prefix*) does
   not depend on the mask. :meth:`MaskedEvaluator.prepare` runs the whole graph once per batch and
   keeps every node's value; a masked pass then runs only the suffix nodes, reading prefix values
   from that record. Only the prefix tensors the suffix consumes (the gate's input, skip
   connections) are repeated for the masks.
2. **Masks in the batch.** M masks of a batch of B examples run as one batch of M·B rows: the
   consumed prefix tensors are repeated M times and the group's gate is per row (row m·B + b gets
   mask m), so the suffix runs once on a large batch instead of M times on a small one.

The result equals running the whole model once per mask. Each group's suffix is checked once
against a full gated forward pass on one mask; a model that ``torch.fx`` cannot trace, or a group
whose check fails (e.g. in-place tricks the trace cannot see), falls back to full forward passes
with the masks still batched. The model must be in eval mode and deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from prunecp_cli.surgery.gates import ChannelGates
from prunecp_cli.surgery.groups import ChannelGroup


class MaskedEvaluator:
    """Logits of a model under per-group channel masks, reusing the computation before the group.

    Example:
        >>> with MaskedEvaluator(model, graph.groups) as ev:
        ...     clean = ev.prepare(x)                          # [B, K]
        ...     masks = 1 - torch.eye(C)                        # one channel off per mask
        ...     logits = ev.evaluate("layer2.0.conv1", masks)   # [C, B, K]

    Args:
        model: the model, in eval mode.
        groups: the groups whose channels may be masked.
        max_rows: most rows (masks × examples) in one pass; larger requests are chunked.
        use_fx: trace with torch.fx for prefix reuse (False: always full forward passes).
    """

    def __init__(self, model: nn.Module, groups: Iterable[ChannelGroup], *, max_rows: int = 256,
                 use_fx: bool = True) -> None:
        self.model = model
        self.groups = {g.name: g for g in groups}
        self.max_rows = max_rows
        self.gates = ChannelGates(model, self.groups.values())
        self._graph = _trace(model) if use_fx else None
        self._suffix: dict[str, list[fx.Node] | None] = {}
        self._verified: set[str] = set()
        self._values: dict[fx.Node, Any] = {}
        self._x: torch.Tensor | None = None

    def __enter__(self) -> MaskedEvaluator:
        self.gates.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.gates.__exit__(*exc)
        self._values = {}
        self._x = None

    @property
    def traced(self) -> bool:
        """Whether the model was traced (prefix reuse available)."""
        return self._graph is not None

    @torch.no_grad()
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Run the clean model on ``x``, keep every intermediate value, return the clean logits."""
        self.gates.clear()
        self._x = x
        if self._graph is None:
            self._values = {}
            return self.model(x)
        self._values = _run(self._graph, {}, None, x, copies=1)
        return self._values[self._graph.output]

    def suffix_fraction(self, group: str) -> float:
        """Share of the traced graph's nodes a masked pass of ``group`` runs (1.0 without a trace)."""
        suffix = self._suffix_nodes(group)
        return 1.0 if suffix is None else len(suffix) / len(self._graph.nodes)

    @torch.no_grad()
    def evaluate(self, group: str, masks: torch.Tensor) -> torch.Tensor:
        """Logits ``[M, B, K]`` of the prepared batch under each of ``masks`` (``[M, C]``) of ``group``."""
        if self._x is None:
            raise RuntimeError("call prepare(x) before evaluate()")
        batch = self._x.shape[0]
        per_pass = max(1, self.max_rows // batch)
        outputs = [self._masked(group, masks[s : s + per_pass]) for s in range(0, len(masks), per_pass)]
        return torch.cat(outputs).reshape(len(masks), batch, -1)

    def _masked(self, group: str, masks: torch.Tensor) -> torch.Tensor:
        copies = masks.shape[0]
        gate = masks.to(self._x.device, torch.float32).repeat_interleave(self._x.shape[0], dim=0)
        self.gates.set(group, gate)
        try:
            suffix = self._suffix_nodes(group)
            if suffix is not None and group not in self._verified:
                suffix = self._verify(group, suffix, masks[:1])
                self.gates.set(group, gate)
            if suffix is None:
                return self.model(_repeat(self._x, copies))
            out = _run(self._graph, self._values, suffix, self._x, copies=copies)[self._graph.output]
            return out
        finally:
            self.gates.set(group, None)

    def _verify(self, group: str, suffix: list[fx.Node], mask: torch.Tensor) -> list[fx.Node] | None:
        """Compare the suffix pass with a full gated pass on one mask; drop the trace for this group if they differ."""
        gate = mask.to(self._x.device, torch.float32).repeat_interleave(self._x.shape[0], dim=0)
        self.gates.set(group, gate)
        try:
            fast = _run(self._graph, self._values, suffix, self._x, copies=1)[self._graph.output]
            full = self.model(self._x)
            ok = isinstance(fast, torch.Tensor) and fast.shape == full.shape and torch.equal(fast, full)
        except Exception:  # a trace that does not replay is not an error, just slower
            ok = False
        self._verified.add(group)
        if not ok:
            self._suffix[group] = None
        return suffix if ok else None

    def _suffix_nodes(self, group: str) -> list[fx.Node] | None:
        if self._graph is None:
            return None
        if group not in self._suffix:
            gate_names = {p.module for p in self.groups[group].gate_points}
            starts = [n for n in self._graph.nodes if n.op == "call_module" and n.target in gate_names]
            if len(starts) < len(gate_names):
                self._suffix[group] = None  # a gate point the trace does not show as a module call
            else:
                marked: set[fx.Node] = set(starts)
                for node in self._graph.nodes:  # topological order: one pass marks all descendants
                    if node not in marked and any(a in marked for a in node.all_input_nodes):
                        marked.add(node)
                self._suffix[group] = [n for n in self._graph.nodes if n in marked]
        return self._suffix[group]


@dataclass(frozen=True)
class _Traced:
    """A traced model: its graph module, nodes in order, output node and batch-carrying nodes."""

    module: fx.GraphModule
    nodes: list[fx.Node]
    output: fx.Node
    batched: frozenset[fx.Node]


def _trace(model: nn.Module) -> _Traced | None:
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
    return _Traced(traced, nodes, output, frozenset(batched))


def _run(graph: _Traced, values: dict, suffix: list[fx.Node] | None, x: torch.Tensor, *, copies: int) -> dict:
    """Execute the traced graph (all nodes, or only ``suffix`` reading other values from ``values``)."""
    module = graph.module
    env: dict[fx.Node, Any] = {}
    repeated: dict[fx.Node, Any] = {}

    def fetch(node: fx.Node):
        if node in env:
            return env[node]
        if node not in repeated:
            value = values[node]
            # always a copy: an in-place suffix op must never change the recorded prefix value
            batched = node in graph.batched and isinstance(value, torch.Tensor)
            repeated[node] = _repeat(value, copies) if batched else value
        return repeated[node]

    for node in graph.nodes if suffix is None else suffix:
        if node.op == "placeholder":
            env[node] = x
            continue
        args = fx.node.map_arg(node.args, fetch)
        kwargs = fx.node.map_arg(node.kwargs, fetch)
        if node.op == "call_module":
            env[node] = module.get_submodule(node.target)(*args, **kwargs)
        elif node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        elif node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        elif node.op == "get_attr":
            env[node] = _get_attr(module, node.target)
        elif node.op == "output":
            env[node] = args[0]
    return env


def _get_attr(module: nn.Module, target: str):
    value = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _repeat(tensor: torch.Tensor, copies: int) -> torch.Tensor:
    """``copies`` stacked copies along the batch dimension (always a new tensor)."""
    return tensor.repeat(copies, *([1] * (tensor.dim() - 1)))
