"""``export``: write the certified model as ONNX or a ``torch.export`` program, checked against the certificate.

ONNX goes through ``torch.onnx.export(..., dynamo=True)``, the torch.export-based exporter (the default
since torch 2.9): the TorchScript exporter is deprecated and announced for removal. On this project's
CPUs it took 2.3 s for a resnet18 at 3×32×32 (5.2 s cold) against 0.3 s (1.4 s cold) for the
TorchScript one; a few seconds per export is a fair price for the maintained path. ``.pt2`` goes through
``torch.export.export`` and ``torch.export.save``. Both carry the certificate's essentials (see
:mod:`prunecp_cli.io.exported`).

The exported bytes are run before anything is written (ONNX Runtime for ``.onnx``, the loaded program
for ``.pt2``) on the ``data`` inputs and compared with the prunecp model (:mod:`export_check`); the
file is written atomically only when every input's prediction set agrees.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecp_cli import __version__, dist
from prunecp_cli.conformal.certificate import load_certificate, validate_certificate
from prunecp_cli.conformal.predictor import check_model_hash
from prunecp_cli.errors import CertificateError, CertificationFailed, CheckpointError, UsageError, brief
from prunecp_cli.io import exported as ex
from prunecp_cli.io.files import atomic_write_path, sha256_file
from prunecp_cli.options import DataSource, ModelSource, RunOptions
from prunecp_cli.pipeline.export_check import compare_on, disagreement_message
from prunecp_cli.pipeline.session import open_source

FORMATS = ("onnx", "pt2")


def certificate_record(certificate: dict[str, Any], *, cert_file: str | None, cert_sha256: str, loaded,
                       fmt: str, dynamic_batch: bool) -> dict[str, Any]:
    """The essentials an export carries (see :mod:`prunecp_cli.io.exported`)."""
    return {
        "schema_version": ex.EXPORT_SCHEMA,
        "format": fmt,
        "source": {"file": loaded.path.name, "sha256": loaded.sha256},
        "certificate": {"file": cert_file, "sha256": cert_sha256},
        "nonconformity": {"name": certificate["nonconformity"]["name"],
                          "parameters": certificate["nonconformity"]["parameters"]},
        "alpha": certificate["alpha"],
        "delta": certificate["delta"],
        "quantile": certificate["quantile"],
        "quantile_level": certificate["quantile_level"],
        "class_conditional": certificate["class_conditional"],
        "num_classes": certificate["model"]["num_classes"],
        "guarantee": certificate["guarantee"],
        "arch": loaded.meta.arch,
        "arch_kwargs": loaded.meta.arch_kwargs,
        "input_shape": list(loaded.meta.input_shape),
        "data_sha256": list(loaded.meta.extra.get("data_sha256", [])),
        "dynamic_batch": dynamic_batch,
        "prunecp_version": __version__,
        "torch_version": torch.__version__,
    }


def _dynamic_shapes(example: torch.Tensor, dynamic: bool):
    if not dynamic:
        return example, None
    # a batch of 1 would be specialised by torch.export: trace with 2
    return example.expand(2, *example.shape[1:]).contiguous(), ({0: torch.export.Dim("batch", min=1)},)


def onnx_proto(model: nn.Module, example: torch.Tensor, *, opset: int | None, dynamic: bool):
    """The ONNX ``ModelProto`` of ``model`` (dynamo exporter), without a prunecp record."""
    example, shapes = _dynamic_shapes(example, dynamic)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                                        verbose=False, input_names=["input"], output_names=["logits"])
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        raise CheckpointError(f"torch.onnx.export cannot export this model ({brief(exc)}); try --format pt2, or "
                              "another --opset") from None
    return program.model_proto


def build_onnx(model: nn.Module, example: torch.Tensor, *, record: dict[str, Any], opset: int | None,
               dynamic: bool) -> tuple[bytes, int]:
    """The ONNX model (dynamo exporter) with ``record`` embedded, and its default-domain opset."""
    proto = onnx_proto(model, example, opset=opset, dynamic=dynamic)
    used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset or 0)
    if opset is not None and used != opset:
        raise CheckpointError(f"the exporter wrote opset {used}, not the {opset} asked for; give --opset {used} "
                              "or leave --opset out")
    record = {**record, "opset": used, "exporter": "torch.onnx.export(dynamo=True)"}
    return ex.embed_onnx(proto, record), used


def build_pt2(model: nn.Module, example: torch.Tensor, *, record: dict[str, Any], dynamic: bool) -> bytes:
    """The ``torch.export`` archive with ``record`` (and the payload hash) in its extra file."""
    example, shapes = _dynamic_shapes(example, dynamic)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (example,), dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"torch.export.export cannot export this model ({brief(exc)}); try --format onnx")\
            from None
    bare = io.BytesIO()
    torch.export.save(program, bare)
    content = ex.pt2_content_sha256(bare.getvalue())
    record = {**record, "exporter": "torch.export.export"}
    full = io.BytesIO()
    torch.export.save(program, full, extra_files={ex.PT2_EXTRA: json.dumps(
        {"certificate": record, "content_sha256": content}, sort_keys=True, allow_nan=False)})
    data = full.getvalue()
    if ex.pt2_content_sha256(data) != content:  # the extra file must be the only difference
        raise RuntimeError("torch.export.save wrote different payloads for one program")
    return data


def run_export(payload: bytes, fmt: str, *, path: Path) -> nn.Module:
    """The exported bytes as a runnable module (ONNX Runtime, or the loaded program)."""
    return ex.OrtModule(payload) if fmt == "onnx" else ex.load_pt2_program(payload, path)


def export(
    model: ModelSource,
    output: str | Path,
    *,
    cert: str | Path | dict[str, Any],
    fmt: str = "onnx",
    data: DataSource | None = None,
    opset: int | None = None,
    dynamic_batch: bool = False,
    verify: bool = True,
    run: RunOptions = RunOptions(),
) -> dict[str, Any]:
    """Export the certified model, verify the export's prediction sets on ``data``, write it atomically.

    Returns:
        ``{output, format, sha256, content_sha256, bytes, opset, dynamic_batch, source, certificate,
        verification}`` (``verification`` None with ``verify=False``).

    Raises:
        UsageError: an unknown format, or no data to verify on without ``verify=False``.
        CertificateError: the certificate does not bind this model.
        CheckpointError: the model cannot be exported.
        CertificationFailed: the export's prediction sets differ on some input (nothing is written).
    """
    if fmt not in FORMATS:
        raise UsageError(f"{{fmt}} {fmt!r}: give onnx or pt2", arguments={"fmt": "format"})
    if verify and data is None:
        raise UsageError("pass {data} to check the export's prediction sets against the certified model, or "
                         "{no_verify} to skip that check", arguments={"data": "data", "no_verify": "no_verify"})
    output = Path(output)
    certificate = validate_certificate(cert) if isinstance(cert, dict) else load_certificate(cert)
    if certificate.get("groups"):  # per-group thresholds: an export carries one quantile, and no group labels
        raise CertificateError(f"{cert if not isinstance(cert, dict) else 'the certificate'} is group-conditional "
                               "(one threshold per --groups label); an export carries one threshold: calibrate "
                               "without --groups to export")
    if isinstance(cert, dict):
        cert_file, cert_sha = None, hashlib.sha256(json.dumps(cert, sort_keys=True).encode()).hexdigest()
    else:
        cert_file, cert_sha = Path(cert).name, sha256_file(cert)
    if ex.is_export(model.checkpoint):
        raise UsageError("{model} is an export already; export the prunecp model it came from",
                         arguments={"model": "model"})
    session = open_source(model, data, device="cpu", need_labels=False)
    loaded = session.loaded
    check_model_hash(loaded.sha256, certificate, path=loaded.path)
    record = certificate_record(certificate, cert_file=cert_file, cert_sha256=cert_sha, loaded=loaded, fmt=fmt,
                                dynamic_batch=dynamic_batch)
    reference = session.model.cpu().eval()
    with run.rep.status(f"exporting to {fmt}"):
        if fmt == "onnx":
            payload, opset = build_onnx(reference, session.example, record=record, opset=opset,
                                        dynamic=dynamic_batch)
        else:
            payload, opset = build_pt2(reference, session.example, record=record, dynamic=dynamic_batch), None
    verification = None
    if verify:
        exported = run_export(payload, fmt, path=output)
        verification = compare_on(reference, exported, session.data, certificate=certificate,
                                  num_classes=session.num_classes, batch_size=run.batch(256), reporter=run.rep)
        if verification["disagreements"]:
            raise CertificationFailed(disagreement_message(verification, output=output))
    if dist.rank() == 0:  # under torchrun rank 0 alone writes
        with atomic_write_path(output) as tmp:
            tmp.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    content = ex.onnx_content_sha256(ex.read_onnx_bytes(payload)) if fmt == "onnx" else ex.pt2_content_sha256(payload)
    return {"output": str(output), "format": fmt, "sha256": digest, "content_sha256": content,
            "bytes": len(payload), "opset": opset, "dynamic_batch": dynamic_batch,
            "source": record["source"], "certificate": record["certificate"], "verification": verification}
