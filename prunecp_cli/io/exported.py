"""Read and write deployable exports (``.onnx``, ``.pt2``) that carry their certificate's essentials.

An export holds a ``prunecp`` record (JSON): the certificate's nonconformity and parameters, ``alpha``,
``delta``, q̂, the guarantee in words, the sha256 of the source model and of the certificate, the
input shape and the data the source model used. ONNX keeps it in ``metadata_props`` (key
``prunecp.certificate``), a ``.pt2`` archive in the extra file ``prunecp.json``. Beside it,
``content_sha256`` is the sha256 of the export's payload without that record (ONNX: the model
protobuf serialised deterministically with the ``prunecp.*`` entries removed; ``.pt2``: every archive
member except ``extra/`` and the serialisation id, by name), so a changed weight, node or graph shows as a mismatch.

Reading is pickle-free: an ONNX file is a protobuf; a ``.pt2`` archive is opened with
``torch.export.load`` only after every pickled member it holds has been checked to load with
``torch.load(weights_only=True)`` and no weight or constant is stored as a pickle (torch.export would
unpickle those without that restriction). onnx and onnxruntime are imported only here and by the
export command.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecp_cli.errors import CheckpointError, brief
from prunecp_cli.io.checkpoint import LoadedModel, ModelMeta
from prunecp_cli.io.files import sha256_file

EXPORT_SUFFIXES = (".onnx", ".pt2")
RECORD_KEY = "prunecp.certificate"
CONTENT_KEY = "prunecp.content_sha256"
PT2_EXTRA = "prunecp.json"
EXPORT_SCHEMA = 1


def is_export(path: str | Path) -> bool:
    """Whether ``path`` names an export (by its suffix)."""
    return Path(path).suffix.lower() in EXPORT_SUFFIXES


def export_format(path: str | Path) -> str:
    """``onnx`` or ``pt2`` from the file's suffix."""
    return Path(path).suffix.lower().lstrip(".")


# ---------------------------------------------------------------- ONNX


def onnx_content_sha256(proto) -> str:
    """sha256 of an ONNX model without its ``prunecp.*`` metadata (deterministic serialisation)."""
    clone = type(proto)()
    clone.CopyFrom(proto)
    kept = [(p.key, p.value) for p in clone.metadata_props if not p.key.startswith("prunecp.")]
    del clone.metadata_props[:]
    for key, value in kept:
        clone.metadata_props.add(key=key, value=value)
    return hashlib.sha256(clone.SerializeToString(deterministic=True)).hexdigest()


def embed_onnx(proto, record: dict[str, Any]) -> bytes:
    """The serialised ONNX model with ``record`` and its content hash in ``metadata_props``."""
    content = onnx_content_sha256(proto)
    for key, value in ((RECORD_KEY, json.dumps(record, sort_keys=True, allow_nan=False)), (CONTENT_KEY, content)):
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


def read_onnx_bytes(data: bytes):
    """The ``ModelProto`` of serialised ONNX bytes."""
    import onnx

    return onnx.load_model_from_string(data)


def _read_onnx(data: bytes, path: Path):
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable ONNX model ({brief(exc)}); export it again with "
                              "prunecp export") from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise CheckpointError(f"{path} keeps weights in external files; prunecp reads self-contained ONNX "
                              "models: export it again with prunecp export")
    props = {p.key: p.value for p in proto.metadata_props}
    return proto, props.get(RECORD_KEY), props.get(CONTENT_KEY), lambda: onnx_content_sha256(proto)


class OrtModule(nn.Module):
    """An ONNX Runtime session behind the ``nn.Module`` call prunecp's steps use (CPU, float32 logits).

    A model exported with a fixed batch size runs in chunks of that size (the last one padded).
    """

    def __init__(self, data: bytes, *, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.fixed_batch = first.shape[0] if isinstance(first.shape[0], int) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = _in_chunks(lambda a: torch.from_numpy(self.session.run(None, {self.input_name: a})[0]), array,
                         self.fixed_batch)
        return out.to(x.device)


def _in_chunks(call, x, fixed: int | None):
    """``call`` on ``x`` whole, or in chunks of ``fixed`` rows (the last padded by repeating its first row)."""
    if fixed is None or len(x) == fixed:
        return call(x)
    parts = []
    for start in range(0, len(x), fixed):
        chunk = x[start:start + fixed]
        size = len(chunk)
        if size < fixed:
            pad = [chunk[:1]] * (fixed - size)
            chunk = (torch.cat([chunk, *pad]) if isinstance(chunk, torch.Tensor)
                     else __import__("numpy").concatenate([chunk, *pad]))
        parts.append(call(chunk)[:size])
    return torch.cat(parts)


# ---------------------------------------------------------------- .pt2


def _members(archive: zipfile.ZipFile) -> list[tuple[str, bytes]]:
    """(name without the archive's top folder, bytes) of every member, sorted.

    CRCs are not checked: torch.export.load does not check them either, so a changed byte must show
    as a content-hash mismatch (a failed check, exit 4), not as an unreadable file.
    """
    out = []
    for info in archive.infolist():
        if info.is_dir():
            continue
        name = info.filename.split("/", 1)[1] if "/" in info.filename else info.filename
        with archive.open(info) as handle:
            handle._expected_crc = None  # zipfile's own check; the content hash is prunecp's
            out.append((name, handle.read()))
    return sorted(out)


def pt2_content_sha256(data: bytes) -> str:
    """sha256 of a ``.pt2`` archive's members except ``extra/`` and the serialisation id (names and bytes)."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for name, blob in _members(archive):
            if name.startswith("extra/") or name == ".data/serialization_id":  # the id hashes the extra files too
                continue
            digest.update(name.encode() + b"\0" + hashlib.sha256(blob).hexdigest().encode() + b"\n")
    return digest.hexdigest()


def _check_pt2_pickles(members: dict[str, bytes], path: Path) -> None:
    """Refuse an archive torch.export.load would unpickle without ``weights_only``."""
    for name, blob in members.items():
        if name.endswith("_config.json") and name.startswith(("data/weights/", "data/constants/")):
            config = json.loads(blob).get("config", {})
            if any(isinstance(v, dict) and v.get("use_pickle") for v in config.values()):
                raise CheckpointError(f"{path} stores weights as pickles; prunecp reads pickle-free exports only: "
                                      "export it again with prunecp export")
        elif name.startswith("data/constants/") and not name.endswith(".json"):
            raise CheckpointError(f"{path} holds serialised objects ({name}); prunecp reads tensor-only exports: "
                                  "export it again with prunecp export")
        elif name.startswith("data/sample_inputs/"):
            try:
                torch.load(io.BytesIO(blob), weights_only=True)
            except Exception:  # noqa: BLE001 - any failure means it is not a plain tensor archive
                raise CheckpointError(f"{path}: {name} is not a plain tensor archive; prunecp refuses to unpickle "
                                      "it: export it again with prunecp export") from None


def _read_pt2(data: bytes, path: Path):
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = dict(_members(archive))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        damage = f"damaged archive ({brief(exc)})"
        return None, None, None, lambda: damage
    record = members.get(f"extra/{PT2_EXTRA}")
    record_json = None
    content = None
    if record is not None:
        try:
            stored = json.loads(record)
            record_json, content = json.dumps(stored.get("certificate")), stored.get("content_sha256")
        except (ValueError, AttributeError):
            record_json = None
    return members, record_json, content, lambda: pt2_content_sha256(data)


def load_pt2_program(data: bytes, path: Path) -> nn.Module:
    """The runnable module of a checked ``.pt2`` archive (CPU)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        _check_pt2_pickles(dict(_members(archive)), path)
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive
        raise CheckpointError(f"{path} is not a loadable torch.export program ({brief(exc)}); export it again "
                              "with prunecp export") from None
    return ProgramModule(program)


class ProgramModule(nn.Module):
    """A loaded ``torch.export`` program as a module (CPU; fixed-batch programs run in chunks)."""

    def __init__(self, program) -> None:
        super().__init__()
        self._run = (program.module(),)  # a tuple: .to() must not move the program's own tensors
        spec = program.graph_signature.user_inputs
        node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name in spec)
        shape = node.meta["val"].shape
        self.fixed_batch = int(shape[0]) if isinstance(shape[0], int) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _in_chunks(self._run[0], x.detach().to("cpu", torch.float32), self.fixed_batch)
        return out.to(x.device)


# ---------------------------------------------------------------- opening


@dataclass
class ExportInfo:
    """What an export says about itself, and whether its payload is intact.

    Attributes:
        format: ``onnx`` or ``pt2``.
        record: the embedded certificate essentials (None: none, or unreadable).
        content_sha256: the payload hash the file records (None: none).
        actual_content_sha256: the payload hash recomputed now (a message instead when unreadable).
    """

    format: str
    record: dict[str, Any] | None
    content_sha256: str | None
    actual_content_sha256: str

    @property
    def intact(self) -> bool:
        """The payload is the one the export recorded."""
        return self.content_sha256 is not None and self.content_sha256 == self.actual_content_sha256


@dataclass
class LoadedExport(LoadedModel):
    """A :class:`LoadedModel` read from an export; ``export`` says what it carries."""

    export: ExportInfo = field(default=None)  # type: ignore[assignment]


def _record(text: str | None) -> dict[str, Any] | None:
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) and value.get("schema_version") == EXPORT_SCHEMA else None


def read_export(path: str | Path) -> tuple[ExportInfo, bytes, Any]:
    """The export's :class:`ExportInfo`, its bytes and its parsed payload (ONNX proto or member dict)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc.strerror or type(exc).__name__}); check the path") from None
    fmt = export_format(path)
    parsed, record, content, actual = (_read_onnx if fmt == "onnx" else _read_pt2)(data, path)
    return ExportInfo(fmt, _record(record), content, actual()), data, parsed


def open_exported(path: str | Path) -> LoadedExport:
    """Open an export as a :class:`LoadedExport` (its module runs ONNX Runtime or the loaded program).

    A damaged payload still opens when it can run, so that ``certify`` reports the mismatch as a failed
    check (exit 4); only a file that cannot be run at all is bad input.

    Raises:
        CheckpointError: not an export prunecp can read or run, or one without a prunecp record.
    """
    path = Path(path)
    info, data, parsed = read_export(path)
    if info.record is None:
        raise CheckpointError(f"{path} carries no prunecp certificate record; export it with prunecp export")
    if parsed is None:
        raise CheckpointError(f"{path}: {info.actual_content_sha256}; export it again with prunecp export")
    if info.format == "onnx":
        try:
            model: nn.Module = OrtModule(data)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise CheckpointError(f"{path} cannot be run by ONNX Runtime ({brief(exc)}); export it again with "
                                  "prunecp export") from None
    else:
        model = load_pt2_program(data, path)
    record = info.record
    meta = ModelMeta(arch=str(record.get("arch", "export")), arch_kwargs=dict(record.get("arch_kwargs") or {}),
                     input_shape=list(record.get("input_shape") or []),
                     extra={"data_sha256": list(record.get("data_sha256") or [])})
    return LoadedExport(model.eval(), meta, path, sha256_file(path), False, export=info)
