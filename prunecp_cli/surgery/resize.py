"""Rebuild a pruned model fast: set each module's widths directly instead of replaying the pruning.

Replaying a pruning history traces the dependency graph of the dense model, which costs many
seconds on a large network. A pruned model differs from its dense architecture only in the shapes of
its weights and in a few integer attributes of its modules (``out_channels``, ``in_features``,
``groups``, ``num_features``, ``normalized_shape`` ...). :func:`width_record` writes down those
attributes when the model is saved; :func:`resize_to` sets them on a freshly built dense model and
gives every weight the shape the file holds, after which the weights load as usual.

A record is stored only when it provably rebuilds the model: :func:`fast_reload_record` resizes a new
dense model, loads the pruned weights into it and requires the same output, bit for bit, on the
example. Otherwise the plan's history is replayed as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from prunecp_cli.errors import PlanError

#: Most attribute values one record may hold (a module has a handful; a network, a few thousand modules).
MAX_RECORD_VALUES = 200_000


def _is_width(value: Any) -> bool:
    """An int, or a short tuple/list of ints (``normalized_shape``), the only attributes a record holds."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return (isinstance(value, (tuple, list)) and 0 < len(value) <= 8
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value))


def width_record(pruned: nn.Module, dense: nn.Module) -> dict[str, dict[str, Any]] | None:
    """The integer attributes pruning changed, per module name; None when the structure itself differs.

    Args:
        pruned: the pruned model.
        dense: a freshly built model of the same architecture (any device, ``meta`` included).
    """
    dense_modules = dict(dense.named_modules())
    pruned_modules = dict(pruned.named_modules())
    if set(dense_modules) != set(pruned_modules):
        return None
    record: dict[str, dict[str, Any]] = {}
    for name, module in pruned_modules.items():
        ref = dense_modules[name]
        if type(ref) is not type(module):
            return None
        changed = {}
        for attr, value in vars(module).items():
            if attr.startswith("_") or attr == "training":
                continue
            old = vars(ref).get(attr)
            if _is_width(value) and _is_width(old) and value != old:
                changed[attr] = list(value) if isinstance(value, (tuple, list)) else value
        if changed:
            record[name] = changed
    return record


def record_problem(record: Any) -> str | None:
    """What is wrong with the form of a stored record, or None (its fit to a model is checked by :func:`resize_to`)."""
    if not isinstance(record, dict):
        return f"has modules that are not a JSON object ({type(record).__name__})"
    total = 0
    for name, attrs in record.items():
        if not isinstance(attrs, dict) or not attrs:
            return f"module {str(name)[:80]!r} has no attribute object"
        for attr, value in attrs.items():
            if not (isinstance(attr, str) and attr.isidentifier() and not attr.startswith("_")):
                return f"module {name[:80]!r} names attribute {str(attr)[:80]!r}, which is not a public name"
            values = value if isinstance(value, list) else [value]
            if not _is_width(value) or any(v < 0 for v in values):
                return f"module {name[:80]!r} attribute {attr!r} is not a width (an int >= 0 or a short list of them)"
            total += len(values)
    if total > MAX_RECORD_VALUES:
        return f"lists more than {MAX_RECORD_VALUES:,} widths"
    return None


def resize_to(model: nn.Module, record: Mapping[str, Mapping[str, Any]], state: Mapping[str, torch.Tensor]) -> None:
    """Give the freshly built dense ``model`` the widths of ``record`` and the tensor shapes of ``state``.

    Only widths may shrink: an attribute must exist on the module as a width no smaller than the
    recorded one, and a weight may only lose size along its dimensions. The values are not loaded
    here (``load_state_dict`` does that).

    Raises:
        PlanError: the record names a module or attribute the architecture lacks, or grows a width.
    """
    modules = dict(model.named_modules())
    for name, attrs in record.items():
        module = modules.get(name)
        if module is None:
            raise PlanError(f"the stored widths name {name[:80]!r}, which is not a layer of the architecture; the "
                            "file was written for another architecture or --arch-kwargs, or is damaged")
        for attr, value in attrs.items():
            old = vars(module).get(attr)
            new = tuple(value) if isinstance(value, list) else value
            olds = old if isinstance(old, (tuple, list)) else (old,)
            news = new if isinstance(new, tuple) else (new,)
            if (not _is_width(old) or isinstance(old, (tuple, list)) != isinstance(new, tuple)
                    or len(olds) != len(news) or any(n > o for n, o in zip(news, olds, strict=True))):
                raise PlanError(f"the stored widths set {name}.{attr} to {value}, which the architecture's "
                                f"{type(module).__name__} cannot take (it has {old!r}); the file is damaged")
            setattr(module, attr, type(old)(new) if isinstance(old, (tuple, list)) else new)
    for name, module in modules.items():
        prefix = f"{name}." if name else ""
        for table in (module._parameters, module._buffers):
            for key, tensor in list(table.items()):
                saved = state.get(prefix + key)
                if tensor is None or saved is None or saved.shape == tensor.shape:
                    continue
                if saved.dim() != tensor.dim() or any(s > d for s, d in zip(saved.shape, tensor.shape, strict=True)):
                    raise PlanError(f"the file's {prefix + key} has shape {list(saved.shape)}, which is not a "
                                    f"narrowing of the architecture's {list(tensor.shape)}; the file is damaged")
                fresh = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)
                if isinstance(tensor, nn.Parameter):
                    table[key] = nn.Parameter(fresh, requires_grad=tensor.requires_grad)
                else:
                    table[key] = fresh


def fast_reload_record(pruned: nn.Module, build: Callable[[], nn.Module],
                       example: torch.Tensor) -> dict[str, dict[str, Any]] | None:
    """A width record that rebuilds ``pruned`` exactly from ``build()``, or None when none does.

    Args:
        pruned: the pruned model (eval mode is used for the check).
        build: makes a fresh dense model of the architecture.
        example: an input batch shape to check on; the rebuilt model must give the same output on random
            inputs of that shape (two of them), bit for bit.
    """
    fresh = build()
    record = width_record(pruned, fresh)
    if record is None:
        return None
    state = pruned.state_dict()
    try:
        resize_to(fresh, record, state)
        fresh.load_state_dict(state, strict=True)
        device = next(iter(state.values())).device if state else torch.device("cpu")
        x = torch.randn((2, *example.shape[1:]), generator=torch.Generator().manual_seed(0)).to(device)
        was_training = pruned.training
        pruned.eval(), fresh.to(device).eval()
        with torch.no_grad():
            same = torch.equal(fresh(x), pruned(x))
        pruned.train(was_training)
    except Exception:  # a module whose shape lives somewhere a record cannot reach: replay instead
        return None
    return record if same else None
