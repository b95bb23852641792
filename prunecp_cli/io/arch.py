"""Resolve ``--arch`` specs into freshly initialised ``nn.Module`` instances.

Two forms are accepted:

* ``torchvision:NAME``: a torchvision classification model, always built with ``weights=None`` so
  nothing is downloaded (the weights come from the user's checkpoint).
* ``package.module:factory``: any callable importable from the current directory or ``PYTHONPATH``
  that returns an ``nn.Module`` (a class works too).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any

from torch import nn

from prunecp_cli.errors import CheckpointError, UsageError


def parse_arch_kwargs(text: str | None) -> dict[str, Any]:
    """Parse ``--arch-kwargs`` (a JSON object) into a dict.

    Raises:
        UsageError: the text is not a JSON object.
    """
    if text is None or text.strip() == "":
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"--arch-kwargs is not valid JSON ({exc.msg} at column {exc.colno}); "
            'write a JSON object such as \'{"num_classes": 10}\''
        ) from None
    if not isinstance(value, dict):
        raise UsageError('--arch-kwargs must be a JSON object such as \'{"num_classes": 10}\'')
    return value


def build_model(spec: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate the architecture named by ``spec`` with ``kwargs``, in eval mode.

    Args:
        spec: ``torchvision:resnet18`` or ``package.module:factory``.
        kwargs: keyword arguments for the factory.

    Raises:
        UsageError: the spec cannot be resolved (unknown model, module or attribute).
        CheckpointError: the factory fails with the given arguments or returns no module.
    """
    kwargs = dict(kwargs or {})
    if ":" not in spec:
        raise UsageError(
            f"--arch {spec!r} is not a model spec; use torchvision:NAME (e.g. torchvision:resnet18) "
            "or package.module:factory"
        )
    source, _, name = spec.partition(":")
    if source == "torchvision":
        factory = _torchvision_factory(name)
        kwargs.setdefault("weights", None)
    else:
        factory = _import_factory(source, name)
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise CheckpointError(f"--arch {spec} rejected --arch-kwargs {json.dumps(kwargs)}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"--arch {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _torchvision_factory(name: str):
    import torchvision

    available = set(torchvision.models.list_models(module=torchvision.models))
    if name not in available:
        close = sorted(m for m in available if name.lower()[:4] in m)[:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"--arch torchvision:{name}: torchvision has no classification model {name!r}{hint}")
    return lambda **kw: torchvision.models.get_model(name, **kw)


def _import_factory(module_name: str, attr: str):
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UsageError(
            f"--arch {module_name}:{attr}: cannot import {exc.name!r}; run from the folder that holds "
            "it or add that folder to PYTHONPATH"
        ) from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise UsageError(f"--arch {module_name}:{attr}: module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise UsageError(f"--arch {module_name}:{attr} is not callable; name a function or class")
    return factory
