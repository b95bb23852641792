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

5. **Batch statistics** (``batch_statistics=True``). Pruning re-estimates BatchNorm on the score
   data, so a layer after a removed channel normalises with the statistics of its new input, not the
   dense model's. With this flag every BatchNorm layer normalises each mask's rows with their own
   batch mean and (biased) variance, as a training-mode layer does but per mask and without
   touching the running buffers: a mask's output is the model whose BatchNorm statistics were
   re-estimated on this batch. Channel-wise statistics keep steps 2-3 exact: a channel a mask does
   not reach sees the same input, so the same statistics.

Each group's plan is checked once against full gated forward passes on two masks (to a relative
1e-4: a wrong trace is off by far more, float reordering by far less). A model that ``torch.fx``
cannot trace, or a plan whose check fails (e.g. in-place tricks the trace cannot see), falls back
to re-running the suffix, then to full forward passes with the masks still batched. Masks that
are not 0/1 skip steps 2-3. The model must be in eval mode and deterministic.

On a CPU the model and the batches are held channels-last while the evaluator is open
(:func:`~prunecp_cli.surgery.layout.adopt_channels_last`, checked on the first batch against the
standard layout; restored on exit): the same values to float rounding, and on the benchmark's
MobileNet cp-bruteforce 1.4-1.5 times faster (63-68 s against 42-49 s on 100 score images).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from prunecp_cli.surgery.gates import ChannelGates
from prunecp_cli.surgery.groups import ChannelGroup
from prunecp_cli.surgery.layout import adopt_channels_last, restore, to_channels_last
from prunecp_cli.surgery.masked_interpreter import execute, repeat_batch, times_mask
from prunecp_cli.surgery.masked_plan import (
    CHANNELWISE_NORMS,
    GroupPlan,
    needed_values,
    plan_group,
    trace_model,
)


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
        batch_statistics: BatchNorm layers normalise every mask's rows with their own batch
            statistics (step 5 of the module docstring) instead of the running ones.
    """

    def __init__(self, model: nn.Module, groups: Iterable[ChannelGroup], *, max_rows: int = 256,
                 use_fx: bool = True, linear_budget_mb: float = 256.0, batch_statistics: bool = False) -> None:
        self.groups = {g.name: g for g in groups}
        self.max_rows = max_rows
        self.linear_budget = linear_budget_mb * 2**20
        self._graph = trace_model(model) if use_fx else None
        self.model = model
        self.gates = ChannelGates(model, self.groups.values())
        self._statistics = BatchStatistics(model) if batch_statistics else None
        self._plans: dict[str, GroupPlan | None] = {}
        if self._graph is not None:
            self._plans = {name: plan_group(self._graph, group) for name, group in self.groups.items()}
        self._keep = needed_values(self._graph, self._plans.values()) if self._graph is not None else set()
        self._verified: set[str] = set()
        self._values: dict[fx.Node, Any] = {}
        self._columns: dict[fx.Node, torch.Tensor | None] = {}
        self._x: torch.Tensor | None = None
        self._channels_last: bool | None = None  # decided on the first batch (surgery.layout), undone on exit
        self.base: dict[str, torch.Tensor] = {}

    def __enter__(self) -> MaskedEvaluator:
        self.gates.__enter__()
        if self._statistics is not None:
            self._statistics.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._statistics is not None:
            self._statistics.__exit__(*exc)
        self.gates.__exit__(*exc)
        if self._channels_last:
            restore(self.model)
        self._channels_last = None
        self._values = {}
        self._columns = {}
        self._x = None

    @property
    def traced(self) -> bool:
        """Whether the model was traced (prefix reuse available)."""
        return self._graph is not None

    def set_base(self, masks: dict[str, torch.Tensor]) -> None:
        """Channels silenced in every pass from the next :meth:`prepare` on (``{group: [C] 0/1 mask}``).

        The "clean" model becomes the model with these channels off (a greedy schedule's removals so
        far); :meth:`evaluate` masks of a group with a base mask must keep that mask's zeros.
        """
        self.base = dict(masks)

    @torch.no_grad()
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Run the clean model (with the base masks) on ``x``, keep the values the masked passes read, return its logits."""
        self.gates.clear()
        for name, mask in self.base.items():
            self.gates.set(name, mask.to(x.device, torch.float32))
        if self._statistics is not None:
            self._statistics.rows = x.shape[0]
        if self._channels_last is None:
            self._channels_last = adopt_channels_last(self.model, x)
        if self._channels_last:
            x = to_channels_last(x)
        self._x = x
        self._columns = {}
        if self._graph is None:
            self._values = {}
            return self.model(x)
        self._values = execute(self._graph, self._graph.nodes, {}, {}, x, copies=1, keep=self._keep)
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
                return self.model(repeat_batch(self._x, copies))
            binary = bool(((masks == 0) | (masks == 1)).all())
            return self._run_plan(plan, masks, shortcut=plan.shortcut and binary)
        finally:
            base = self.base.get(group)
            self.gates.set(group, None if base is None else base.to(self._x.device, torch.float32))

    def _run_plan(self, plan: GroupPlan, masks: torch.Tensor, *, shortcut: bool) -> torch.Tensor:
        """The suffix pass of ``plan`` for ``masks``; with ``shortcut``, steps 2-3 of the module docstring."""
        copies = masks.shape[0]
        if not shortcut:
            return execute(self._graph, plan.suffix, self._values, {}, self._x, copies=copies)[self._graph.output]
        extended = torch.cat([masks, masks.new_ones(copies, 1)], dim=1)  # column C: "never masked"
        preset: dict[fx.Node, torch.Tensor] = {}
        for node in plan.masked:
            preset[node] = times_mask(self._values[node], extended[:, plan.channel_maps[node].to(extended.device)])
        for node, source in plan.linear.items():
            channel_map = plan.channel_maps[source].to(extended.device)
            preset[node] = self._linear(node, source, channel_map, extended)
        return execute(self._graph, plan.run, self._values, preset, self._x, copies=copies)[self._graph.output]

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
                masked = times_mask(self._values[source], extended[m : m + 1, channel_map])
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



class BatchStatistics:
    """While entered, every BatchNorm layer of a model normalises with its input's own batch statistics.

    The input's rows are read as consecutive blocks of :attr:`rows` (one block per mask of a
    :class:`MaskedEvaluator` pass; None: all rows one block), and each block is normalised with its
    own per-channel mean and biased variance, then scaled and shifted by the layer's affine
    parameters: a training-mode forward per block that leaves the running buffers alone.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, CHANNELWISE_NORMS)]
        self.rows: int | None = None

    def __enter__(self) -> BatchStatistics:
        for layer in self.layers:
            layer.forward = functools.partial(self._forward, layer)  # instance attribute: hooks still run
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)

    def _forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows or x.shape[0]
        blocks = x.reshape(-1, rows, *x.shape[1:])  # [M, B, C, ...]
        dims = [1, *range(3, blocks.dim())]
        var, mean = torch.var_mean(blocks, dim=dims, keepdim=True, correction=0)
        out = (blocks - mean) * torch.rsqrt(var + layer.eps)
        if layer.affine:
            shape = (1, 1, -1) + (1,) * (blocks.dim() - 3)
            out = out * layer.weight.reshape(shape) + layer.bias.reshape(shape)
        return out.reshape(x.shape)
