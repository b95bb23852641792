"""Which channels fall together: prunable groups from Torch-Pruning's dependency graph.

A *group* is a set of coupled channels rooted at one convolution's output channels: the convolution,
its BatchNorm, every layer that reads those channels (in-channels), and, through residual additions,
depthwise convolutions and concatenations, every other layer whose channels must be removed with
them. Torch-Pruning (Fang et al., CVPR 2023, "DepGraph") traces the coupling; this module turns its
groups into plain records that importance methods, the channel gates and the planner share.

Channel ``i`` of a group is channel ``i`` of its root convolution; each member records which of its
own channels correspond to which root channel.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from prunecp_cli.errors import PlanError, UsageError, brief
from prunecp_cli.surgery.tracing import build_dependency

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)


@dataclass(frozen=True)
class Member:
    """One layer's share of a group.

    Attributes:
        module: the layer's qualified name.
        direction: ``"out"`` when the layer's output channels are removed, ``"in"`` for its inputs.
        member_idxs: the layer's own channel indices in this group.
        root_idxs: for each entry of ``member_idxs``, the group channel it belongs to.
        kind: ``"conv"``, ``"linear"``, ``"norm"`` or ``"other"``.
    """

    module: str
    direction: str
    member_idxs: tuple[int, ...]
    root_idxs: tuple[int, ...]
    kind: str = "other"


@dataclass
class ChannelGroup:
    """A prunable group of coupled channels.

    Attributes:
        name: qualified name of the root convolution.
        channels: number of channels in the group.
        members: every layer touched by removing the group's channels.
        gate_points: the layers whose outputs carry the group's channels after normalisation:
            zeroing those output channels is equivalent to removing the channels.
        channel_groups: the group's channels fall into this many equal consecutive blocks that
            must shrink together (a grouped convolution, RegNet's and ResNeXt's, keeps its number
            of groups: Torch-Pruning removes the same offsets from every block); 0 when the
            grouping cannot be followed and the group must stay whole.
    """

    name: str
    channels: int
    members: list[Member] = field(default_factory=list)
    gate_points: list[Member] = field(default_factory=list)
    channel_groups: int = 1

    @property
    def modules(self) -> list[str]:
        """Names of every layer in the group, in discovery order, without repeats."""
        return list(dict.fromkeys(m.module for m in self.members))

    def producers(self) -> list[Member]:
        """Members whose output channels are removed and that hold filters (convs, linears)."""
        return [m for m in self.members if m.direction == "out" and m.kind in ("conv", "linear")]


def _kind(module: nn.Module) -> str:
    if isinstance(module, CONV_TYPES):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, NORM_TYPES):
        return "norm"
    return "other"


def _silence_tp():
    warnings.filterwarnings("ignore", module="torch_pruning")


def layer_width(module: nn.Module, out: bool) -> int | None:
    """The number of output (``out``) or input channels of a layer, when it has such a notion."""
    if isinstance(module, nn.Linear):
        return module.out_features if out else module.in_features
    if isinstance(module, CONV_TYPES):
        return module.out_channels if out else module.in_channels
    if isinstance(module, NORM_TYPES[:3]):
        return module.num_features
    return None


def find_head(model: nn.Module, example: torch.Tensor) -> str | None:
    """Name of the final classifier: the last convolution or linear layer to run on ``example``."""
    order: list[str] = []
    hooks = [
        module.register_forward_hook(lambda m, i, o, name=name: order.append(name))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, *CONV_TYPES))
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return order[-1] if order else None


class ModelGraph:
    """The dependency graph of one model and its prunable groups.

    Args:
        model: the model (eval mode); it is modified in place by :meth:`prune_group`.
        example: an example input batch used for tracing.
        ignore: layer names to keep whole (their groups are not prunable).
        protect_head: keep the final classifier's outputs (default True).

    Raises:
        UsageError: an ``ignore`` name is not a layer of the model.
        PlanError: the model cannot be traced.
    """

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        *,
        ignore: Sequence[str] = (),
        protect_head: bool = True,
    ) -> None:

        _silence_tp()
        self.model = model
        self.example = example
        modules = dict(model.named_modules())
        unknown = [name for name in ignore if name not in modules]
        if unknown:
            close = [n for n in modules if n and unknown[0].split(".")[-1] in n][:4]
            hint = f" (layers with similar names: {', '.join(close)})" if close else ""
            raise UsageError(f"--ignore {unknown[0]}: the model has no layer of that name{hint}")
        self.head = find_head(model, example) if protect_head else None
        self.ignored = list(dict.fromkeys([*ignore, *([self.head] if self.head else [])]))
        try:
            self.dg, self.opaque = build_dependency(model, example)
        except Exception as exc:
            raise PlanError(
                f"cannot trace the model's dependencies ({type(exc).__name__}: {brief(exc)}); "
                "the architecture uses an operation Torch-Pruning cannot follow"
            ) from None
        self.unmappable: list[str] = []
        self.groups = self._collect_groups()
        self.by_name = {g.name: g for g in self.groups}

    @property
    def left_whole(self) -> list[str]:
        """Groups prunecp keeps whole by itself: their channel mapping or grouping cannot be followed.

        These are the root layers of groups Torch-Pruning could not map (left out of :attr:`groups`)
        and of groups whose grouped layers see their channels re-ordered (``channel_groups == 0``).
        The user's ``--ignore`` layers and the protected classifier are not among them.
        """
        return list(dict.fromkeys([*self.unmappable, *(g.name for g in self.groups if g.channel_groups == 0)]))

    def _collect_groups(self) -> list[ChannelGroup]:
        module2name = {m: n for n, m in self.model.named_modules()}
        ignored_modules = [dict(self.model.named_modules())[n] for n in self.ignored]
        groups = []
        for tp_group in self._tp_groups(ignored_modules):
            root = tp_group[0].dep.target.module
            group = ChannelGroup(name=module2name[root], channels=len(tp_group[0].idxs))
            whole = False
            for item in tp_group:
                whole = whole or item.dep.target in self.opaque or item.dep.source in self.opaque
                module = item.dep.target.module
                if not isinstance(module, nn.Module) or module not in module2name:
                    continue  # functional ops (add, relu, cat, ...) carry no parameters
                direction = "out" if self.dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
                member = Member(
                    module=module2name[module],
                    direction=direction,
                    member_idxs=tuple(int(i) for i in item.idxs),
                    root_idxs=tuple(int(i) for i in item.root_idxs),
                    kind=_kind(module),
                )
                group.members.append(member)
                width = layer_width(module, direction == "out")
                if width is not None and member.member_idxs and max(member.member_idxs) >= width:
                    whole = True  # an index mapping Torch-Pruning got wrong (res2net's split widths)
            group.gate_points = self._gate_points(group)
            group.channel_groups = 0 if whole else self._channel_groups(group)
            groups.append(group)
        return groups

    def _tp_groups(self, ignored: list[nn.Module]):
        """Torch-Pruning's groups rooted at convolutions (as ``get_all_groups``), skipping unmappable ones.

        A group whose index mapping Torch-Pruning cannot form (a split of channels that passed
        through a reshape it cannot map, e.g. ShuffleNet's chunk after a channel shuffle) is
        left out: its layers are kept whole.
        """
        ignored = [*ignored, *self.dg.IGNORED_LAYERS_IN_TRACING]
        visited = set()
        for module in list(self.dg.module2node):
            if module in ignored or not isinstance(module, CONV_TYPES) or module in visited:
                continue
            pruner = self.dg.get_pruner_of_module(module)
            if pruner is None or pruner.get_out_channels(module) is None:
                continue
            try:
                group = self.dg.get_pruning_group(module, pruner.prune_out_channels,
                                                  list(range(pruner.get_out_channels(module))))
            except (IndexError, ZeroDivisionError):
                self.unmappable.append(self._name_of(module) or "?")
                continue
            prunable = True
            for dep, _ in group:
                if self.dg.is_out_channel_pruning_fn(dep.handler):
                    visited.add(dep.target.module)
                    prunable = prunable and dep.target.module not in ignored
            if prunable:
                yield group

    def _channel_groups(self, group: ChannelGroup) -> int:
        """How many equal blocks of the group's channels must shrink together (see ChannelGroup)."""
        modules = dict(self.model.named_modules())
        blocks = 1
        for member in group.members:
            module = modules[member.module]
            if not isinstance(module, CONV_TYPES) or module.groups == 1:
                continue
            width = module.out_channels if member.direction == "out" else module.in_channels
            if module.groups == module.in_channels and module.in_channels == module.out_channels:
                continue  # depthwise: Torch-Pruning shrinks its groups with its channels
            offsets = {m - r for m, r in zip(member.member_idxs, member.root_idxs, strict=True)}
            if len(member.member_idxs) != width or width != group.channels or offsets != {0}:
                return 0  # the grouped layer sees the group's channels re-ordered or in part
            blocks = math.lcm(blocks, module.groups)
        return blocks if group.channels % blocks == 0 else 0

    def _gate_points(self, group: ChannelGroup) -> list[Member]:
        """Outputs to zero so that a channel is silenced exactly as if it were removed.

        A normalisation layer re-adds its shift to a zero input, so the gate sits after the
        normalisation when one follows the layer, and on the layer's own output otherwise.
        """
        modules = dict(self.model.named_modules())
        outs = {m.module: m for m in group.members if m.direction == "out"}
        followed_by_norm = set()
        for name in outs:
            node = self.dg.module2node.get(modules[name])
            if node is None:
                continue
            for nxt in node.outputs:
                if isinstance(nxt.module, NORM_TYPES) and self._name_of(nxt.module) in outs:
                    followed_by_norm.add(name)
        return [m for name, m in outs.items() if name not in followed_by_norm]

    def _name_of(self, module: nn.Module) -> str | None:
        return self.dg._module2name.get(module)

    def prune_group(self, name: str, idxs: Sequence[int]) -> None:
        """Remove channels ``idxs`` of group ``name`` physically from the model (and its couplings)."""
        if not idxs:
            return
        module = dict(self.model.named_modules())[name]
        pruner = self.dg.get_pruner_of_module(module)
        group = self.dg.get_pruning_group(module, pruner.prune_out_channels, [int(i) for i in idxs])
        group.prune()
        sync_split_widths(self.model)

    def history(self) -> list[list]:
        """Torch-Pruning's replayable history: ``[module name, is_out, [indices]]`` per pruning step."""
        return [[str(n), bool(out), [int(i) for i in idxs]] for n, out, idxs in self.dg.pruning_history()]


def replay_history(model: nn.Module, history: list, example: torch.Tensor) -> None:
    """Apply a recorded pruning history to a freshly built (unpruned) model in place.

    Raises:
        PlanError: the history does not fit the model (another architecture or arguments).
    """

    _silence_tp()
    try:
        dg, _ = build_dependency(model, example)
        dg.load_pruning_history([(n, bool(out), list(idxs)) for n, out, idxs in history])
        sync_split_widths(model)
    except (AttributeError, IndexError, ValueError, RuntimeError) as exc:
        raise PlanError(
            f"the stored pruning plan does not fit the architecture ({type(exc).__name__}: {brief(exc)}); "
            "the file was written for another architecture or --arch-kwargs"
        ) from None


def sync_split_widths(model: nn.Module) -> None:
    """Keep the split sizes a module stores for ``torch.split`` equal to its convolutions' widths.

    timm's ``MixedConv2d`` splits its input with ``self.splits`` and runs one convolution per part;
    Torch-Pruning narrows the convolutions (and its own split node) but not that attribute, so the
    pruned module would split at the old sizes. A module whose ``splits`` list has one entry per
    child (or per item of its one ``ModuleList``/``ModuleDict``), every one a convolution, gets their
    input widths (and its ``in_channels``/``out_channels`` their sums).
    """
    for module in model.modules():
        splits, children = getattr(module, "splits", None), list(module.children())
        if len(children) == 1 and isinstance(children[0], (nn.ModuleList, nn.ModuleDict)):
            children = list(children[0].children())  # the convolutions held in one list
        if not (isinstance(splits, list) and children and len(splits) == len(children)
                and all(isinstance(child, CONV_TYPES) for child in children)):
            continue
        module.splits = [child.in_channels for child in children]
        for attr in ("in_channels", "out_channels"):
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, sum(getattr(child, attr) for child in children))
