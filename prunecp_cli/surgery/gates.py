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
            channel_dim = output_channel_dim(module, output)
            size = output.shape[channel_dim]
            if multiplier is None:
                multiplier = output.new_ones((*gate.shape[:-1], size))
            member_idx = member_idx.to(output.device)
            multiplier = multiplier.index_copy(
                -1, member_idx, gate[..., root_idx.to(gate.device)].to(output.dtype)
            )
        if multiplier is None:
            return None
        if _normalises_channels(module):
            output = _masked_layer_norm(module, inputs[0], multiplier, channel_dim)
        return output * _broadcast(multiplier, output, channel_dim)


def _normalises_channels(module: nn.Module) -> bool:
    """True for a layer norm over the channels alone (ConvNeXt's channels-last ``LayerNorm``, ``LayerNorm2d``)."""
    return isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1


def _masked_layer_norm(module: nn.LayerNorm, x: torch.Tensor, multiplier: torch.Tensor,
                       channel_dim: int) -> torch.Tensor:
    """``module``'s output on ``x`` with the statistics taken over the channels ``multiplier`` keeps.

    A layer norm over the channels mixes them through its mean and variance, so zeroing a channel's
    output is not what removing it does: the pruned layer normalises over the remaining channels
    only. Weighting the statistics by the gate makes a zero gate exactly a removal (and a gate of
    ones exactly the layer itself).
    """
    weights = _broadcast(multiplier, x, channel_dim).to(x.dtype)
    count = weights.sum(dim=channel_dim, keepdim=True).clamp_min(1e-12)
    mean = (x * weights).sum(dim=channel_dim, keepdim=True) / count
    var = (((x - mean) ** 2) * weights).sum(dim=channel_dim, keepdim=True) / count
    y = (x - mean) * torch.rsqrt(var + module.eps)
    shape = [1] * x.dim()
    shape[channel_dim] = x.shape[channel_dim]
    if module.weight is not None:
        y = y * module.weight.reshape(shape)
    if module.bias is not None:
        y = y + module.bias.reshape(shape)
    return y


def channels_last(module: nn.Module) -> bool:
    """True when ``module`` writes its channels on the last dimension of its output.

    A linear layer does, and so does a plain :class:`torch.nn.LayerNorm` over one trailing
    dimension (ConvNeXt's channels-last blocks). Subclasses that override ``forward`` to permute
    back to channels-first (torchvision's ``LayerNorm2d``) write them on dimension 1.
    """
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.LayerNorm):
        return type(module).forward is nn.LayerNorm.forward and len(module.normalized_shape) == 1
    return False


def output_channel_dim(module: nn.Module, output: torch.Tensor) -> int:
    """The dimension of ``output`` (the output of ``module``) that holds its channels.

    Channels-first (dimension 1) unless :func:`channels_last` says otherwise; when the layer's
    own width is known and only the other candidate dimension has that size, that one is taken
    (for instance a ``LayerNorm`` subclass that keeps channels last).
    """
    preferred = output.dim() - 1 if channels_last(module) else 1
    if output.dim() < 2:
        return output.dim() - 1
    width = _width(module)
    if width is None or output.shape[preferred] == width:
        return preferred
    other = 1 if preferred == output.dim() - 1 else output.dim() - 1
    return other if output.shape[other] == width else preferred


def _width(module: nn.Module) -> int | None:
    """Number of output channels of ``module`` when its parameters say so."""
    for attr in ("out_channels", "out_features", "num_features"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return int(module.normalized_shape[0])
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    return None


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
