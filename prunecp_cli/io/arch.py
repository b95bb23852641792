"""Resolve ``--arch`` specs into freshly initialised ``nn.Module`` instances.

Two forms are accepted:

* ``torchvision:NAME``: a torchvision classification model, always built with ``weights=None`` so
  nothing is downloaded (the weights come from the user's checkpoint).
* ``timm:NAME``: a timm model (extra ``prunecp[timm]``), always built with ``pretrained=False``.
* ``package.module:factory``: any callable importable from the current directory or ``PYTHONPATH``
  that returns an ``nn.Module`` (a class works too).

A prunecp model file names its own architecture, and building it imports and calls what the file
names. So a spec read from a file is built only when it is trusted (:data:`TRUSTED_SOURCES`) or the
user allowed it (the same ``--arch``, or ``--trust-arch``): :func:`check_file_arch` decides that
before anything is imported.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from torch import nn

from prunecp_cli.checks import parse_json_object
from prunecp_cli.errors import CheckpointError, UsageError, brief


def parse_arch_kwargs(text: str | None) -> dict[str, Any]:
    """Parse ``--arch-kwargs`` (a JSON object) into a dict.

    Raises:
        UsageError: the text is not a JSON object.
    """
    return parse_json_object(text, option="--arch-kwargs")


#: Architecture sources that a prunecp file may name and that prunecp builds without asking: their
#: factories only construct modules (``timm:NAME`` goes through ``timm.create_model`` with
#: ``pretrained=False`` and only names in timm's model registry).
TRUSTED_SOURCES: tuple[str, ...] = ("torchvision", "timm", "prunecp_cli.models")

#: The most parameter and buffer elements a model may hold (2**30, 4 GiB of float32). A trusted
#: architecture is first built on the ``meta`` device to count them, so arguments that ask for a
#: gigantic model are refused before anything is allocated.
MAX_MODEL_ELEMENTS = 2**30

#: The longest architecture spec accepted.
MAX_SPEC_LENGTH = 200

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_SPEC = re.compile(rf"{_NAME}(?:\.{_NAME})*:{_NAME}(?:\.{_NAME})*")
_TRUSTED_TEXT = ", ".join(f"{source}:" for source in TRUSTED_SOURCES[:-1]) + f" and {TRUSTED_SOURCES[-1]}:"


def is_spec(spec: Any) -> bool:
    """Whether ``spec`` is a well-formed ``module:factory`` string (dotted Python names, ASCII)."""
    return isinstance(spec, str) and len(spec) <= MAX_SPEC_LENGTH and _SPEC.fullmatch(spec) is not None


def is_trusted(spec: str) -> bool:
    """Whether prunecp builds ``spec`` from a file's metadata without the user's consent.

    Only a public top-level name of a module in :data:`TRUSTED_SOURCES` qualifies:
    ``prunecp_cli.models:digits_cnn`` does; ``prunecp_cli.models:nn.Module`` and
    ``prunecp_cli.models:_conv_bn`` do not.
    """
    source, _, name = spec.partition(":")
    return source in TRUSTED_SOURCES and name.isidentifier() and not name.startswith("_")


def check_file_arch(spec: str, *, path: str | Path, arch: str | None = None, trust_arch: bool = False) -> None:
    """Refuse a file's architecture when building it would import a module the user did not allow.

    A file may name any ``module:factory``; prunecp imports it only when it is trusted
    (:func:`is_trusted`), when the user gave the same spec as ``--arch``, or with ``--trust-arch``.
    Nothing is imported here.

    Args:
        spec: the architecture the file records (``prunecp.arch``).
        path: the file, for the message.
        arch: the ``--arch`` the user gave, or None.
        trust_arch: the user passed ``--trust-arch`` (``trust_arch=True`` in the API).

    Raises:
        CheckpointError: the spec is malformed, or names a module that is neither trusted nor allowed.
    """
    if not is_spec(spec):
        raise CheckpointError(
            f"{path}: architecture {str(spec)[:80]!r} is not a module:factory spec; the file is damaged or was "
            "not written by prunecp"
        )
    if is_trusted(spec) or trust_arch or (arch is not None and arch == spec):
        return
    module = spec.partition(":")[0]
    raise CheckpointError(
        f"{path} asks to import module {module!r} (arch {spec}) to build its architecture; prunecp imports only "
        f"{_TRUSTED_TEXT} by itself. If you trust this file, pass --arch {spec} or --trust-arch"
    )


def build_model(spec: str, kwargs: dict[str, Any] | None = None, *, origin: str | Path | None = None) -> nn.Module:
    """Instantiate the architecture named by ``spec`` with ``kwargs``, in eval mode.

    A spec read from a file must have passed :func:`check_file_arch` first: this function imports and
    calls what ``spec`` names.

    Args:
        spec: ``torchvision:resnet18`` or ``package.module:factory``.
        kwargs: keyword arguments for the factory (a dict with string keys).
        origin: the file whose metadata names ``spec``, or None when the user gave it as ``--arch``.
            Every error about a file's architecture is a :class:`CheckpointError` naming the file.

    Raises:
        UsageError: a user's spec cannot be resolved (unknown model, module or attribute).
        CheckpointError: a file's spec cannot be resolved, or the factory fails with the given
            arguments, asks for more than :data:`MAX_MODEL_ELEMENTS` elements or returns no module.
    """
    where = f"--arch {spec}" if origin is None else f"{origin}: architecture {spec}"
    unresolved = UsageError if origin is None else CheckpointError
    if not is_spec(spec):
        if origin is not None:
            check_file_arch(spec, path=origin, trust_arch=True)  # the malformed-spec message
        raise UsageError(
            f"--arch {str(spec)[:80]!r} is not a model spec; use torchvision:NAME (e.g. torchvision:resnet18), "
            "timm:NAME or package.module:factory"
        )
    if kwargs is not None and (not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs)):
        what = "--arch-kwargs" if origin is None else "its arch_kwargs"
        raise unresolved(f"{where}: {what} must be a JSON object with string keys such as {{\"num_classes\": 10}}")
    kwargs = dict(kwargs or {})
    source, _, name = spec.partition(":")
    if source == "torchvision":
        factory = _torchvision_factory(name, where=where, error=unresolved)
        if kwargs.get("weights") is not None:
            raise unresolved(f"{where}: prunecp never downloads pretrained weights (the weights come from the "
                             f"checkpoint); drop \"weights\" from the arguments")
        kwargs["weights"] = None
    elif source == "timm":
        factory = _timm_factory(name, kwargs, where=where, error=unresolved)
    else:
        factory = _import_factory(source, name, where=where, error=unresolved)
    if is_trusted(spec):
        _check_size(factory, kwargs, where=where)
    try:
        model = factory(**kwargs)
    except Exception as exc:  # a factory can fail in any way on arguments it does not expect
        raise CheckpointError(
            f"{where} cannot be built with arguments {_short(json.dumps(kwargs, default=repr), 120)} "
            f"({type(exc).__name__}: {_first_line(exc)}); pass the architecture arguments the weights were "
            "trained with"
        ) from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{where} returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _check_size(factory, kwargs: dict[str, Any], *, where: str) -> None:
    """Refuse arguments that make a trusted factory build a model too large to allocate.

    The factory runs once on the ``meta`` device (no memory is used); when it cannot (some factories
    compute with tensor values), the real build below reports any problem instead.
    """
    import torch

    try:
        with torch.device("meta"):
            probe = factory(**kwargs)
    except Exception:
        return
    if not isinstance(probe, nn.Module):
        return
    elements = sum(t.numel() for t in probe.parameters()) + sum(t.numel() for t in probe.buffers())
    if elements > MAX_MODEL_ELEMENTS:
        raise CheckpointError(
            f"{where} with arguments {_short(json.dumps(kwargs, default=repr), 120)} would hold {elements:,} "
            f"parameters, more than prunecp's limit of {MAX_MODEL_ELEMENTS:,}; pass the arguments the weights were "
            "trained with"
        )


def _torchvision_factory(name: str, *, where: str, error: type[Exception]):
    import torchvision

    available = set(torchvision.models.list_models(module=torchvision.models))
    if name not in available:
        close = sorted(m for m in available if name.lower()[:4] in m)[:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise error(f"{where}: torchvision has no classification model {name!r}{hint}")
    return lambda **kw: torchvision.models.get_model(name, **kw)


#: timm arguments that would load or download weights; prunecp takes weights only from the checkpoint.
_TIMM_WEIGHT_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")


def _timm_factory(name: str, kwargs: dict[str, Any], *, where: str, error: type[Exception]):
    try:
        import timm
    except ModuleNotFoundError:
        raise UsageError(f"{where} needs timm: pip install 'prunecp[timm]'") from None
    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:5]}*")[:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise error(f"{where}: timm has no model {name!r}{hint}")
    given = [key for key in _TIMM_WEIGHT_ARGS if key in kwargs]
    if given:
        raise error(f"{where}: prunecp never loads pretrained weights through timm (the weights come from the "
                    f"checkpoint); drop {given[0]!r} from the arguments")
    return lambda **kw: timm.create_model(name, pretrained=False, **kw)


def _import_factory(module_name: str, attr: str, *, where: str, error: type[Exception]):
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise error(
            f"{where}: cannot import {exc.name!r}; run from the folder that holds it or add that folder to "
            "PYTHONPATH"
        ) from None
    except Exception as exc:  # the module's own code failed while importing
        raise error(f"{where}: importing module {module_name!r} failed ({type(exc).__name__}: "
                    f"{_first_line(exc)})") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise error(f"{where}: module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise error(f"{where} is not callable; name a function or class")
    if module_name in TRUSTED_SOURCES and getattr(factory, "__module__", None) != module_name:
        raise error(f"{where} is not a model factory of {module_name}; name one defined there")
    return factory


def _first_line(exc: BaseException) -> str:
    return brief(exc) if str(exc).strip() else "no message"


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
