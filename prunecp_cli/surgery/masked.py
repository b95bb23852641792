"""Evaluate a model under many channel masks of one group, fast and exactly.

Brute-force importance (the change of a measure when a channel is silenced) and Shapley values
(the measure on many coalitions of channels) need the model's output under thousands of channel
masks of one group. Four things make that affordable:

1. **Prefix reuse.** The model is traced once with ``torch.fx``. For a group, the *suffix* is every
   graph node that depends on one of the group's gate points; everything else (the *prefix*) does
   not depend on the mask. :meth:`MaskedEvaluator.prepare` runs the whole graph once per batch and
   keeps the values the suffixes read; a masked pass then runs only the suffix nodes.
2. **Masked values without recomputation.** For a 0/1 mask m, many suffix nodes equal their clean
   value times the mask, channel by channel: the gated normalisation layer itself, and everything
   after it that maps zero channels to zero channel-wise (ReLU-like activations, pooling, depthwise
   convolutions without bias, further gated BatchNorms, sums of two such values). Those nodes are
   not re-run; their value is the recorded clean value times the mask.
3. **Linearity of the first convolution.** A dense convolution K reading such a value r ⊙ m gives
   ``K(r ⊙ m) = K(r) − W[:, S] X[S]``, where S are the input channels m switches off, X the im2col
   columns of r (``F.unfold``, once per batch) and W the weights. One batched matrix product per
   mask replaces the convolution; with one channel off it costs 1/C of it. This equals K(r ⊙ m) up
   to float rounding (a different summation order), about 1e-7 relative.
4. **Masks in the batch.** M masks of a batch of B examples run as one batch of M·B rows (at most
   ``max_rows``); the group's gate is per row (row m·B + b gets mask m). On a CPU this gains little
   (on 2 cores 128 rows per pass was the fastest of 128, 256, 512 and 1,024); larger
   passes are meant for GPUs, where they were not measured.

Each group's plan is checked once against full gated forward passes on two masks (to a relative
1e-4: a wrong trace is off by far more, float reordering by far less). A model that ``torch.fx``
cannot trace, or a plan whose check fails (e.g. in-place tricks the trace cannot see), falls back
to re-running the suffix, then to full forward passes with the masks still batched. Masks that
are not 0/1 skip steps 2-3. The model must be in eval mode and deterministic.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from prunecp_cli.surgery.gates import ChannelGates
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
_ADD = {operator.add, torch.add}
_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
_CHANNELWISE_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


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
        linear_budget_mb: most memory for one convolution's im2col columns (step 3 of the module
            docstring) for one batch; a larger one runs that convolution per mask instead.
    """

    def __init__(self, model: nn.Module, groups: Iterable[ChannelGroup], *, max_rows: int = 256,
                 use_fx: bool = True, linear_budget_mb: float = 256.0) -> None:
        self.groups = {g.name: g for g in groups}
        self.max_rows = max_rows
        self.linear_budget = linear_budget_mb * 2**20
        self._graph = _trace(model) if use_fx else None
        self.model = model
        self.gates = ChannelGates(model, self.groups.values())
        self._plans: dict[str, _Plan | None] = {}
        if self._graph is not None:
            self._plans = {name: _plan(self._graph, group) for name, group in self.groups.items()}
        self._keep = _needed_values(self._graph, self._plans.values()) if self._graph is not None else set()
        self._verified: set[str] = set()
        self._values: dict[fx.Node, Any] = {}
        self._columns: dict[fx.Node, torch.Tensor | None] = {}
        self._x: torch.Tensor | None = None

    def __enter__(self) -> MaskedEvaluator:
        self.gates.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.gates.__exit__(*exc)
        self._values = {}
        self._columns = {}
        self._x = None

    @property
    def traced(self) -> bool:
        """Whether the model was traced (prefix reuse available)."""
        return self._graph is not None

    @torch.no_grad()
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Run the clean model on ``x``, keep the values the masked passes read, return the clean logits."""
        self.gates.clear()
        self._x = x
        self._columns = {}
        if self._graph is None:
            self._values = {}
            return self.model(x)
        self._values = _execute(self._graph, self._graph.nodes, {}, {}, x, copies=1, keep=self._keep)
        return self._values[self._graph.output]

    def suffix_fraction(self, group: str) -> float:
        """Share of the traced graph's nodes a masked pass of ``group`` runs (1.0 without a trace)."""
        plan = self._plans.get(group)
        return 1.0 if plan is None else len(plan.suffix) / len(self._graph.nodes)

    def shortcut_nodes(self, group: str) -> int:
        """How many suffix nodes of ``group`` steps 2-3 of the module docstring skip (0 without a plan)."""
        plan = self._plans.get(group)
        return 0 if plan is None or not plan.shortcut else len(plan.suffix) - len(plan.run)

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
        masks = masks.to(self._x.device, torch.float32)
        gate = masks.repeat_interleave(self._x.shape[0], dim=0)
        self.gates.set(group, gate)
        try:
            if group not in self._verified and self._plans.get(group) is not None:
                self._verify(group, masks[:2])
                self.gates.set(group, gate)
            plan = self._plans.get(group)
            if plan is None:
                return self.model(_repeat(self._x, copies))
            binary = bool(((masks == 0) | (masks == 1)).all())
            return self._run_plan(plan, masks, shortcut=plan.shortcut and binary)
        finally:
            self.gates.set(group, None)

    def _run_plan(self, plan: _Plan, masks: torch.Tensor, *, shortcut: bool) -> torch.Tensor:
        """The suffix pass of ``plan`` for ``masks``; with ``shortcut``, steps 2-3 of the module docstring."""
        copies = masks.shape[0]
        if not shortcut:
            return _execute(self._graph, plan.suffix, self._values, {}, self._x, copies=copies)[self._graph.output]
        extended = torch.cat([masks, masks.new_ones(copies, 1)], dim=1)  # column C: "never masked"
        preset: dict[fx.Node, torch.Tensor] = {}
        for node in plan.masked:
            preset[node] = _times_mask(self._values[node], extended[:, plan.channel_maps[node].to(extended.device)])
        for node, source in plan.linear.items():
            channel_map = plan.channel_maps[source].to(extended.device)
            preset[node] = self._linear(node, source, channel_map, extended)
        return _execute(self._graph, plan.run, self._values, preset, self._x, copies=copies)[self._graph.output]

    def _linear(self, node: fx.Node, source: fx.Node, channel_map: torch.Tensor, extended: torch.Tensor
                ) -> torch.Tensor:
        """``K(r ⊙ m)`` for every mask: the clean ``K(r)`` minus the switched-off input channels' share.

        With im2col columns X of r (``F.unfold``, once per batch) and K's weights W, the share of input
        channels S is ``W[:, S] X[S]``, one batched product per mask, which for one channel costs 1/C of
        the convolution. A mask with more than half its channels off, or columns over the memory budget,
        runs K on the masked input instead.
        """
        conv = self._graph.module.get_submodule(node.target)
        clean = self._values[node]
        columns = self._im2col(node, source)
        gated = channel_map < extended.shape[1] - 1  # input channels the mask reaches
        off = (extended[:, channel_map] == 0) & gated  # [M, I]
        batch, outs = clean.shape[0], clean.shape[1]
        out = clean.new_empty((extended.shape[0], batch, outs, clean[0, 0].numel()))
        flat = clean.reshape(batch, outs, -1)
        weight = conv.weight.reshape(outs, conv.weight.shape[1], -1)  # [O, I, kh·kw]
        for m, row in enumerate(off):
            channels = row.nonzero().squeeze(1)
            if len(channels) == 0:
                out[m].copy_(flat)
            elif columns is not None and 2 * len(channels) <= int(gated.sum()):
                share = weight[:, channels].reshape(outs, -1).expand(batch, -1, -1)
                torch.baddbmm(flat, share, columns[:, channels].reshape(batch, share.shape[-1], -1), alpha=-1,
                              out=out[m])
            else:
                masked = _times_mask(self._values[source], extended[m : m + 1, channel_map])
                out[m].copy_(conv(masked).reshape(batch, outs, -1))
        return out.reshape(-1, *clean.shape[1:])

    def _im2col(self, node: fx.Node, source: fx.Node) -> torch.Tensor | None:
        """``[B, I, kh·kw, L]`` columns of convolution ``node``'s input for this batch (None: over budget)."""
        if node not in self._columns:
            conv = self._graph.module.get_submodule(node.target)
            r = self._values[source]
            area = conv.kernel_size[0] * conv.kernel_size[1]
            positions = self._values[node][0, 0].numel()
            if 4 * r.shape[0] * r.shape[1] * area * positions > self.linear_budget:
                self._columns[node] = None
            else:
                cols = F.unfold(r, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
                self._columns[node] = cols.reshape(r.shape[0], r.shape[1], area, positions)
        return self._columns[node]

    def _verify(self, group: str, mask: torch.Tensor) -> None:
        """Check the plan on one or two masks against full gated passes; fall back step by step if it differs."""
        self._verified.add(group)
        full = []
        for row in mask:
            self.gates.set(group, row)
            full.append(self.model(self._x))
        full = torch.cat(full)
        self.gates.set(group, mask.repeat_interleave(self._x.shape[0], dim=0))
        plan = self._plans[group]
        for shortcut in ((True, False) if plan.shortcut else (False,)):
            try:
                fast = self._run_plan(plan, mask, shortcut=shortcut)
            except Exception:  # a trace that does not replay is not an error, just slower
                continue
            if isinstance(fast, torch.Tensor) and fast.shape == full.shape:
                # a wrong trace is off by O(1); float reordering (other batch sizes, step 3) by ~1e-7
                scale = float(full.abs().max()) if full.numel() else 0.0
                if torch.allclose(fast, full, rtol=1e-4, atol=1e-5 * (1.0 + scale)):
                    if not shortcut:
                        self._plans[group] = dataclasses.replace(plan, shortcut=False)
                    return
        self._plans[group] = None


@dataclasses.dataclass(frozen=True)
class _Traced:
    """A traced model: its graph module, nodes in order, output node and batch-carrying nodes."""

    module: fx.GraphModule
    nodes: list[fx.Node]
    output: fx.Node
    batched: frozenset[fx.Node]


@dataclasses.dataclass(frozen=True)
class _Plan:
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


def _plan(graph: _Traced, group: ChannelGroup) -> _Plan | None:
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
    return _Plan(suffix, run, masked, linear, maps)


def _gate_channel_maps(module: nn.Module, group: ChannelGroup) -> dict[str, torch.Tensor | None]:
    """Per gate module of ``group``: the group channel of each output channel (C: not gated), or None."""
    maps: dict[str, torch.Tensor | None] = {}
    for point in group.gate_points:
        layer = module.get_submodule(point.module) if _has_submodule(module, point.module) else None
        width = _out_channels(layer)
        if point.module in maps and maps[point.module] is None:
            continue
        if width is None or isinstance(layer, nn.Linear):
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
            if isinstance(layer, _CHANNELWISE_NORMS) and only in maps and torch.equal(maps[only], gate):
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
    if node.op == "call_function" and node.target in _ADD and len(node.args) == 2 and not node.kwargs:
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


def _needed_values(graph: _Traced, plans: Iterable[_Plan | None]) -> set[fx.Node]:
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


def _execute(graph: _Traced, nodes: list[fx.Node], values: dict, preset: dict, x: torch.Tensor, *, copies: int,
             keep: set[fx.Node] | None = None) -> dict:
    """Execute ``nodes`` of the traced graph in order.

    Inputs come from ``preset`` (values for these copies), earlier nodes of the run, or the recorded
    clean ``values`` (repeated ``copies`` times along the batch when batch-carrying). A value is freed
    after its last use unless it is in ``keep``; the output node's value is always kept.
    """
    module = graph.module
    env: dict[fx.Node, Any] = dict(preset)
    repeated: dict[fx.Node, Any] = {}
    last_use: dict[fx.Node, int] = {}
    for i, node in enumerate(nodes):
        for a in node.all_input_nodes:
            last_use[a] = i
    keep = (keep or set()) | {graph.output}
    saved: dict[fx.Node, torch.Tensor] = {}

    def fetch(node: fx.Node):
        if node in env:
            return env[node]
        if node not in repeated:
            value = values[node]
            # always a copy: an in-place suffix op must never change the recorded prefix value
            batched = node in graph.batched and isinstance(value, torch.Tensor)
            repeated[node] = _repeat(value, copies) if batched else value
        return repeated[node]

    for i, node in enumerate(nodes):
        if node.op == "placeholder":
            env[node] = x
            continue
        shared = node.op == "call_function" and copies > 1 and node.target in _ADD and _one_clean_operand(graph, node, env)
        args = () if shared else fx.node.map_arg(node.args, fetch)
        kwargs = {} if shared else fx.node.map_arg(node.kwargs, fetch)
        if shared:  # masked + clean (a skip connection): broadcast the clean value, do not copy it
            env[node] = _add_to_every_copy(node, env, values, copies)
        elif node.op == "call_module":
            env[node] = module.get_submodule(node.target)(*args, **kwargs)
        elif node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        elif node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        elif node.op == "get_attr":
            env[node] = _get_attr(module, node.target)
        elif node.op == "output":
            env[node] = args[0]
        if node in keep and isinstance(env[node], torch.Tensor) and _changed_in_place(module, node):
            saved[node] = env[node].clone()  # the recorded clean value must survive the in-place user
        for a in node.all_input_nodes:
            if last_use.get(a) == i and a not in keep:
                env.pop(a, None)
                repeated.pop(a, None)
    env.update(saved)
    return env


def _one_clean_operand(graph: _Traced, node: fx.Node, env: dict) -> bool:
    """Whether ``node`` adds two batch-carrying values of which exactly one is recorded (clean)."""
    if len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    ours = [a in env for a in node.args]
    return ours[0] != ours[1] and all(a in graph.batched for a in node.args)


def _add_to_every_copy(node: fx.Node, env: dict, values: dict, copies: int) -> Any:
    """``a + b`` with one operand ``[copies·B, ...]`` from this run and the other the clean ``[B, ...]``."""
    a, b = (env[n] if n in env else values[n] for n in node.args)
    masked, clean = (a, b) if node.args[0] in env else (b, a)
    if not (isinstance(masked, torch.Tensor) and isinstance(clean, torch.Tensor)):
        return node.target(a, b)
    if masked.shape[0] != copies * clean.shape[0] or masked.shape[1:] != clean.shape[1:]:
        return node.target(*(_repeat(v, copies) if v is clean else v for v in (a, b)))
    stacked = masked.reshape(copies, *clean.shape)
    out = stacked + clean if node.args[0] in env else clean + stacked
    return out.reshape(masked.shape)


def _changed_in_place(module: nn.Module, node: fx.Node) -> bool:
    """Whether a user of ``node`` may overwrite its value (``x += y``, ``x.relu_()``, ``ReLU(inplace=True)``).

    Users that return their input itself (identity, eval-mode dropout) pass the question on to their
    own users.
    """
    for user in node.users:
        if user.op == "call_function" and user.target in _IN_PLACE_OPERATORS:
            return True
        if user.op == "call_method" and user.target.endswith("_"):
            return True
        if user.kwargs.get("inplace"):
            return True
        if user.op == "call_module":
            layer = module.get_submodule(user.target)
            if getattr(layer, "inplace", False):
                return True
            if isinstance(layer, (nn.Identity, nn.Dropout, nn.Dropout2d)) and _changed_in_place(module, user):
                return True
    return False


def _times_mask(clean: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """``[M·B, C, ...]``: the clean ``[B, C, ...]`` value times each of the ``[M, C]`` channel multipliers."""
    shape = (multiplier.shape[0], 1, multiplier.shape[1]) + (1,) * (clean.dim() - 2)
    out = clean.unsqueeze(0) * multiplier.to(clean.dtype).reshape(shape)
    return out.reshape(-1, *clean.shape[1:])


def _get_attr(module: nn.Module, target: str):
    value = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _repeat(tensor: torch.Tensor, copies: int) -> torch.Tensor:
    """``copies`` stacked copies along the batch dimension (always a new tensor)."""
    return tensor.repeat(copies, *([1] * (tensor.dim() - 1)))
