"""Read checkpoints without pickle, and write prunecp model files.

Dense checkpoints are ``.safetensors`` files or ``.pt``/``.pth``/``.bin``/``.ckpt`` state dicts read
with ``torch.load(weights_only=True)``; nested ``state_dict``/``model``/``model_state_dict`` entries and
``module.``/``model.`` key prefixes are handled. The one class allowed beyond torch's weights-only
defaults is ``argparse.Namespace``, which PyTorch Lightning stores as ``hyper_parameters``.

A prunecp model file is a ``.safetensors`` state dict whose string metadata (all keys start with
``prunecp.``) names the architecture, its keyword arguments, the example input shape and the
replayable pruning plan. :func:`load_model` rebuilds such a file from that metadata alone.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecp_cli import __version__
from prunecp_cli.errors import CheckpointError, UsageError, brief
from prunecp_cli.io.arch import build_model, check_file_arch, is_spec
from prunecp_cli.io.files import atomic_write_path, sha256_file
from prunecp_cli.io.hub import read_hub_folder
from prunecp_cli.io.metadata import (
    check_arch_kwargs,
    check_extra,
    check_input_shape,
    check_plan_field,
    field_error,
    parse_field,
)

SCHEMA_VERSION = 1
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("module.", "model.")


@dataclass
class ModelMeta:
    """What a prunecp model file records besides its weights.

    Attributes:
        arch: the ``--arch`` spec that builds the unpruned architecture.
        arch_kwargs: keyword arguments of that factory.
        input_shape: shape of one input example, without the batch dimension.
        plan: the replayable pruning plan (see :mod:`prunecp_cli.surgery.plan`); empty when unpruned.
        extra: every other ``prunecp.*`` field (hashes, method, FLOPs, risk control, ...), JSON values.
    """

    arch: str
    arch_kwargs: dict[str, Any]
    input_shape: list[int]
    plan: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        """The safetensors metadata dict (str to str)."""
        meta = {
            "prunecp.schema_version": str(SCHEMA_VERSION),
            "prunecp.version": __version__,
            "prunecp.arch": self.arch,
            "prunecp.arch_kwargs": json.dumps(self.arch_kwargs, sort_keys=True),
            "prunecp.input_shape": json.dumps(list(self.input_shape)),
            "prunecp.plan": json.dumps(self.plan, separators=(",", ":")),
        }
        for key, value in self.extra.items():
            meta[f"prunecp.{key}"] = json.dumps(value, sort_keys=True)
        return meta

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], *, path: Path) -> ModelMeta:
        """Parse and check safetensors metadata written by :meth:`to_metadata`.

        Every field is checked for type, range and size (see :mod:`prunecp_cli.io.metadata`);
        nothing is imported or called, so this is safe on any file.

        Raises:
            CheckpointError: a field is missing, not JSON, of the wrong type or range, or of a newer schema.
        """
        version = meta.get("prunecp.schema_version")
        if version is None:
            raise CheckpointError(f"{path}: prunecp metadata lacks 'schema_version'; the file is damaged")
        if not isinstance(version, str) or re.fullmatch(r"[0-9]{1,6}", version) is None or int(version) < 1:
            raise CheckpointError(f"{path}: prunecp model schema {str(version)[:20]!r} is not a schema number; "
                                  "the file is damaged or was not written by prunecp")
        if int(version) > SCHEMA_VERSION:
            raise CheckpointError(
                f"{path}: prunecp model schema {version!r} is not supported by prunecp {__version__} "
                f"(supports up to {SCHEMA_VERSION}); upgrade prunecp"
            )
        fields = {
            key[len("prunecp.") :]: value
            for key, value in meta.items()
            if isinstance(key, str) and key.startswith("prunecp.")
            and key not in ("prunecp.schema_version", "prunecp.version")
        }
        for key in ("arch", "arch_kwargs", "input_shape", "plan"):
            if key not in fields:
                raise CheckpointError(f"{path}: prunecp metadata lacks {key!r}; the file is damaged")
        arch = fields.pop("arch")
        if not is_spec(arch):
            raise field_error(path, "arch", f"is {str(arch)[:80]!r}, not a module:factory spec")
        arch_kwargs = check_arch_kwargs(path, parse_field(path, "arch_kwargs", fields.pop("arch_kwargs")))
        input_shape = check_input_shape(path, parse_field(path, "input_shape", fields.pop("input_shape")))
        plan = check_plan_field(path, parse_field(path, "plan", fields.pop("plan")))
        extra = check_extra(path, {key: parse_field(path, key, value) for key, value in fields.items()})
        return cls(arch=arch, arch_kwargs=arch_kwargs, input_shape=input_shape, plan=plan, extra=extra)


@dataclass
class LoadedModel:
    """A model with where it came from.

    Attributes:
        model: the module, in eval mode, on the CPU.
        meta: its prunecp metadata (for a dense checkpoint: built from ``--arch`` and the data shape).
        path: the file it was read from.
        sha256: hex digest of that file.
        is_prunecp_file: True when the file carried prunecp metadata.
    """

    model: nn.Module
    meta: ModelMeta
    path: Path
    sha256: str
    is_prunecp_file: bool


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read the tensors (and safetensors metadata) of a checkpoint, never unpickling objects.

    Raises:
        CheckpointError: missing, unreadable or of an unsupported format.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file; check the path")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{path} is not a readable .safetensors file ({brief(exc)}); re-export it"
            ) from None
        return tensors, metadata
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):  # Lightning's hyper_parameters
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            raise CheckpointError(_weights_only_failure(path, exc)) from None
        return _find_state_dict(obj, path), {}
    raise CheckpointError(f"{path}: unknown checkpoint type {suffix!r}; use .safetensors, .pt, .pth or .bin")


def _weights_only_failure(path: Path, exc: Exception) -> str:
    """The one-line message for a ``torch.load(weights_only=True)`` failure, without torch's advice to unpickle."""
    fix = "save it with torch.save(model.state_dict(), path) or as .safetensors"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"{path} holds a pickled {found.group(1)}, which prunecp's weights-only load refuses (it unpickles "
                f"nothing but tensors, plain containers and argparse.Namespace); {fix}")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    unpickler = [line for line in lines if line.startswith("WeightsUnpickler error:")]
    reason = (unpickler or lines or [type(exc).__name__])[0]
    return f"{path} cannot be read as a weights-only state dict ({type(exc).__name__}: {reason}); {fix}"


def _find_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(obj) / 2:
            return tensors
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _find_state_dict(obj[key], path)
    raise CheckpointError(
        f"{path} holds no state dict (looked at the top level and under {', '.join(_NESTED_KEYS)}); "
        "save it with torch.save(model.state_dict(), path)"
    )


def match_state_dict(model: nn.Module, state: dict[str, torch.Tensor], *, path: Path, arch: str) -> None:
    """Load ``state`` into ``model`` strictly, stripping DDP/Lightning prefixes when that makes keys match.

    Raises:
        CheckpointError: keys or shapes differ; the message names the first missing, unexpected and
            mis-shaped keys and how many of each there are.
    """
    expected = model.state_dict()
    state = _strip_prefixes(state, set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        if misshaped:
            k = misshaped[0]
            parts.append(
                f"{len(misshaped)} mis-shaped (first: {k} is {list(state[k].shape)} in the file, "
                f"{list(expected[k].shape)} in the model)"
            )
        raise CheckpointError(
            f"{path} does not match --arch {arch}: {'; '.join(parts)}; pass the architecture and "
            "--arch-kwargs the checkpoint was trained with"
        )
    if getattr(state, "_metadata", None) is None:
        # safetensors files, and some torch.load paths, drop the per-module versions that a few
        # layers check on load (torchvision's MNASNet refuses none); the model's own are the right ones.
        state = collections.OrderedDict(state)
        state._metadata = getattr(expected, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=True)


def _strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    current = state
    for _ in range(len(_PREFIXES)):
        if set(current) & expected:
            break
        for prefix in _PREFIXES:
            if current and all(k.startswith(prefix) for k in current):
                stripped = {k[len(prefix) :]: v for k, v in current.items()}
                if len(set(stripped) & expected) > len(set(current) & expected):
                    current = stripped
                    break
    return current


def load_model(
    path: str | Path,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    *,
    trust_arch: bool = False,
) -> nn.Module:
    """Load a model for inference: a prunecp file rebuilds itself; a dense checkpoint needs ``arch``.

    A prunecp file names the architecture to build. One from ``torchvision:`` or
    ``prunecp_cli.models:`` is built as is; any other ``module:factory`` is imported only when
    ``arch`` is that same spec or ``trust_arch`` is true, because importing it runs its code.

    Args:
        path: a prunecp ``.safetensors`` file, or a dense checkpoint.
        arch: ``--arch`` spec, required for dense checkpoints; for a prunecp file it must equal the
            recorded one (and then allows it).
        arch_kwargs: keyword arguments for the architecture factory.
        trust_arch: build whatever architecture a prunecp file names (only for files you trust).

    Returns:
        The model in eval mode on the CPU.

    Raises:
        CheckpointError: unreadable or malformed file, an architecture from an untrusted module, or
            weights that do not fit the architecture.
        UsageError: a dense checkpoint without ``arch``, or an ``arch`` that differs from the file's.
    """
    return open_model(path, arch=arch, arch_kwargs=arch_kwargs, trust_arch=trust_arch).model


def open_model(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    input_shape: list[int] | None = None,
    trust_arch: bool = False,
) -> LoadedModel:
    """Load a model with its metadata; see :func:`load_model`.

    For a prunecp file the metadata is checked field by field, then the architecture's trust
    (:func:`~prunecp_cli.io.arch.check_file_arch`); only then is anything the file names imported.

    Args:
        path: the model file, or a timm hub-style folder (:mod:`prunecp_cli.io.hub`).
        arch: ``--arch`` spec (dense checkpoints; for prunecp files it must match, and allows the file's
            architecture).
        arch_kwargs: factory keyword arguments.
        input_shape: example input shape for a dense checkpoint (usually from the data).
        trust_arch: build the architecture a prunecp file names even from an untrusted module.

    Raises:
        CheckpointError: unreadable or malformed file, an untrusted architecture, or weights that do
            not fit the architecture.
        UsageError: a dense checkpoint without ``arch``, or an ``arch`` that differs from the file's.
    """
    path = Path(path)
    if path.is_dir():  # a timm hub-style folder names its own architecture
        spec, kwargs, path = read_hub_folder(path)
        if arch is not None and arch != spec:
            raise UsageError(f"{path.parent} is a hub folder of {spec}, but --arch {arch} was given; drop --arch")
        arch, arch_kwargs = spec, {**kwargs, **(arch_kwargs or {})}
    state, metadata = read_state_dict(path)
    digest = sha256_file(path)
    if any(isinstance(key, str) and key.startswith("prunecp.") for key in metadata):
        meta = ModelMeta.from_metadata(metadata, path=path)
        if arch is not None and arch != meta.arch:
            raise UsageError(
                f"{path} is a prunecp model of {meta.arch}, but --arch {arch} was given; drop --arch"
            )
        check_file_arch(meta.arch, path=path, arch=arch, trust_arch=trust_arch)
        model = build_model(meta.arch, meta.arch_kwargs, origin=path)
        if meta.plan:
            from prunecp_cli.surgery.plan import replay_plan

            replay_plan(model, meta.plan, input_shape=meta.input_shape, state=state)
        match_state_dict(model, state, path=path, arch=meta.arch)
        return LoadedModel(model.eval(), meta, path, digest, True)
    if arch is None:
        raise UsageError(f"{path} is a plain checkpoint: pass --arch (e.g. --arch torchvision:resnet18)")
    kwargs = dict(arch_kwargs or {})
    model = build_model(arch, kwargs)
    match_state_dict(model, state, path=path, arch=arch)
    meta = ModelMeta(arch=arch, arch_kwargs=kwargs, input_shape=list(input_shape or []))
    return LoadedModel(model.eval(), meta, path, digest, False)


def save_model(model: nn.Module, path: str | Path, meta: ModelMeta) -> str:
    """Write ``model``'s state dict and ``meta`` to a ``.safetensors`` file atomically.

    Tensors that share memory (tied weights) are stored once each as contiguous copies.

    Returns:
        The sha256 hex digest of the written file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UsageError(f"output {path} must end in .safetensors (prunecp writes no pickle files)")
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_write_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta.to_metadata())
    return sha256_file(path)
