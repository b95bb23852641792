"""Channel gates: multiply a group's channels by chosen values without changing the model.

A gate of group ``g`` is a tensor of shape ``[C]`` (one value per channel, shared by the batch) or
``[B, C]`` (one row per example, so a single forward pass can evaluate many channel masks). Forward
hooks on the group's gate points (:attr:`ChannelGroup.gate_points`) multiply those layers' outputs
channel-wise. A zero gate silences a channel exactly as removing it would (in eval mode); the
gradient of the loss with respect to a gate of ones is the first-order Taylor term Σ_hw a·∂L/∂a.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager

import torch
from torch import nn

from prunecp_cli.surgery.groups import ChannelGroup


class ChannelGates(AbstractContextManager):
    """Install gates on ``groups`` of ``model`` for the duration of a ``with`` block.

    Example:
        >>> with ChannelGates(model, graph.groups) as gates:
        ...     gates.set("layer1.conv", torch.tensor([1.0, 0.0, 1.0]))
        ...     out = model(x)  # channel 1 of layer1.conv's group is silenced

    Args:
        model: the model.
        groups: the groups that may be gated.
    """

    def __init__(self, model: nn.Module, groups: Iterable[ChannelGroup]) -> None:
        self.model = model
        self.groups = {g.name: g for g in groups}
        self.values: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self._points: dict[nn.Module, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        for group in self.groups.values():
            for point in group.gate_points:
                entry = (
                    group.name,
                    torch.tensor(point.member_idxs, dtype=torch.long),
                    torch.tensor(point.root_idxs, dtype=torch.long),
                )
                self._points.setdefault(modules[point.module], []).append(entry)
        self._handles: list = []

    def __enter__(self) -> ChannelGates:
        self._handles = [m.register_forward_hook(self._hook) for m in self._points]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.values.clear()

    def set(self, group: str, value: torch.Tensor | None) -> None:
        """Gate group ``group`` with ``value`` (``[C]`` or ``[B, C]``); None removes the gate."""
        if value is None:
            self.values.pop(group, None)
            return
        channels = self.groups[group].channels
        if value.shape[-1] != channels:
            raise ValueError(f"gate for {group} has {value.shape[-1]} channels, the group has {channels}")
        self.values[group] = value

    def clear(self) -> None:
        """Remove every gate value (hooks stay installed and pass outputs through)."""
        self.values.clear()

    def ones(self, group: str, *, batch: int | None = None, requires_grad: bool = False,
             device: torch.device | None = None) -> torch.Tensor:
        """Set and return an all-ones gate (per example when ``batch`` is given)."""
        channels = self.groups[group].channels
        shape = (batch, channels) if batch is not None else (channels,)
        value = torch.ones(shape, device=device, requires_grad=requires_grad)
        self.set(group, value)
        return value

    def _hook(self, module: nn.Module, inputs, output):
        multiplier = None
        for group, member_idx, root_idx in self._points[module]:
            gate = self.values.get(group)
            if gate is None:
                continue
            channel_dim = output.dim() - 1 if isinstance(module, nn.Linear) else 1
            size = output.shape[channel_dim]
            if multiplier is None:
                multiplier = output.new_ones((*gate.shape[:-1], size))
            member_idx = member_idx.to(output.device)
            multiplier = multiplier.index_copy(
                -1, member_idx, gate[..., root_idx.to(gate.device)].to(output.dtype)
            )
        if multiplier is None:
            return None
        return output * _broadcast(multiplier, output, channel_dim)


def _broadcast(multiplier: torch.Tensor, output: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Shape a ``[M]`` or ``[B, M]`` multiplier to broadcast over ``output`` along ``channel_dim``."""
    shape = [1] * output.dim()
    shape[channel_dim] = multiplier.shape[-1]
    if multiplier.dim() == 2:
        if multiplier.shape[0] != output.shape[0]:
            raise ValueError(
                f"per-example gate has {multiplier.shape[0]} rows but the batch has {output.shape[0]}"
            )
        shape[0] = multiplier.shape[0]
    return multiplier.reshape(shape)
