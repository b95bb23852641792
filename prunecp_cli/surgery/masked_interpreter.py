"""The ``torch.fx`` interpreter of :class:`~prunecp_cli.surgery.masked.MaskedEvaluator`.

:func:`execute` runs some nodes of a traced graph (:class:`~prunecp_cli.surgery.masked_plan.Traced`)
for ``copies`` masks at once, reading the recorded clean values of the nodes it does not run and
freeing each value after its last use; a skip connection that adds a masked value to a clean one
broadcasts the clean value instead of copying it. :func:`times_mask` and :func:`repeat_batch`
build "clean ⊙ mask" values and stacked copies along the batch dimension.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from prunecp_cli.surgery.masked_plan import ADD, Traced

_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def execute(graph: Traced, nodes: list[fx.Node], values: dict, preset: dict, x: torch.Tensor, *, copies: int,
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
            repeated[node] = repeat_batch(value, copies) if batched else value
        return repeated[node]

    for i, node in enumerate(nodes):
        if node.op == "placeholder":
            env[node] = x
            continue
        shared = node.op == "call_function" and copies > 1 and node.target in ADD and _one_clean_operand(graph, node, env)
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


def _one_clean_operand(graph: Traced, node: fx.Node, env: dict) -> bool:
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
        return node.target(*(repeat_batch(v, copies) if v is clean else v for v in (a, b)))
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


def times_mask(clean: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """``[M·B, C, ...]``: the clean ``[B, C, ...]`` value times each of the ``[M, C]`` channel multipliers."""
    shape = (multiplier.shape[0], 1, multiplier.shape[1]) + (1,) * (clean.dim() - 2)
    out = clean.unsqueeze(0) * multiplier.to(clean.dtype).reshape(shape)
    return out.reshape(-1, *clean.shape[1:])


def _get_attr(module: nn.Module, target: str):
    value = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def repeat_batch(tensor: torch.Tensor, copies: int) -> torch.Tensor:
    """``copies`` stacked copies along the batch dimension (always a new tensor)."""
    return tensor.repeat(copies, *([1] * (tensor.dim() - 1)))
