"""Does an export give the certified prediction sets? Set agreement at export time, binding at certify time.

* :func:`agreement` compares the exported model with the prunecp model on the same inputs: max
  ``|Δlogit|``, and the prediction sets at the certificate's q̂ (same nonconformity, same ``U`` draws for
  randomised scores), which must agree on every input.
* :func:`export_binding` is ``certify``'s ``model-sha256`` check for an export: its payload is the one
  recorded at export time, it was exported from the model the certificate binds, and it carries this
  certificate's q̂ (a failure is exit 4, as for a changed ``.safetensors`` file).

No onnx import here: the export is already a runnable module (see :mod:`prunecp_cli.io.exported`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecp_cli.conformal.nonconformity import from_parameters, prediction_sets
from prunecp_cli.conformal.predictor import certificate_threshold
from prunecp_cli.errors import CertificateError
from prunecp_cli.io.data import Dataset
from prunecp_cli.pipeline.inference import collect_logits
from prunecp_cli.reporting import SILENT, Reporter

VERIFY_STREAM = 3
"""Randomisation stream of the agreement check (both models get the same ``U`` values)."""

ESSENTIALS = ("alpha", "delta", "quantile", "class_conditional")


def agreement(reference: torch.Tensor, exported: torch.Tensor, *, certificate: dict[str, Any]) -> dict[str, Any]:
    """Compare the logits of the exported model with the prunecp model's (rows are the same inputs).

    Returns:
        ``{n, max_abs_logit_diff, max_abs_score_diff, set_agreement, disagreements, largest_gap,
        closest_margin}``: ``disagreements`` counts inputs whose sets differ, ``largest_gap`` is the
        largest ``|s - q̂|`` of a (input, class) score on the other side of q̂ in the export (None when
        the sets agree), ``closest_margin`` the smallest ``|s - q̂|`` of the reference scores (how
        much rounding the sets could absorb).
    """
    score = from_parameters(certificate["nonconformity"]["name"], certificate["nonconformity"]["parameters"])

    def scores(logits: torch.Tensor) -> torch.Tensor:
        generator = score.make_generator(stream=VERIFY_STREAM) if score.randomized else None
        return score.all_scores(logits, generator=generator)

    qhat = certificate_threshold(certificate)
    s_ref, s_exp = scores(reference), scores(exported)
    sets_ref, sets_exp = prediction_sets(s_ref, qhat), prediction_sets(s_exp, qhat)
    flipped = sets_ref != sets_exp
    differ = flipped.any(dim=1)
    q = qhat if isinstance(qhat, float) else qhat.unsqueeze(0)
    n = int(reference.shape[0])
    return {
        "n": n,
        "max_abs_logit_diff": float((reference - exported).abs().max()) if n else 0.0,
        "max_abs_score_diff": float((s_ref - s_exp).abs().max()) if n else 0.0,
        "set_agreement": 1.0 - float(differ.double().mean()) if n else 1.0,
        "disagreements": int(differ.sum()),
        "largest_gap": float((s_exp - q).abs()[flipped].max()) if bool(flipped.any()) else None,
        "closest_margin": float((s_ref - q).abs().min()) if n else None,
    }


def compare_on(reference: nn.Module, exported: nn.Module, data: Dataset, *, certificate: dict[str, Any],
               num_classes: int, batch_size: int, reporter: Reporter = SILENT) -> dict[str, Any]:
    """:func:`agreement` of two models on every input of ``data`` (both on the CPU)."""
    cpu = torch.device("cpu")
    ref, _ = collect_logits(reference, data, device=cpu, batch_size=batch_size, num_classes=num_classes,
                            reporter=reporter, description="verify: PyTorch")
    exp, _ = collect_logits(exported, data, device=cpu, batch_size=batch_size, num_classes=num_classes,
                            reporter=reporter, description="verify: export")
    return agreement(ref, exp, certificate=certificate)


def disagreement_message(result: dict[str, Any], *, output: str | Path) -> str:
    """The exit-4 line of a failed agreement check."""
    return (f"the export's prediction sets differ from the certified model's on {result['disagreements']} of "
            f"{result['n']} inputs (largest score gap to q̂ {result['largest_gap']:.3g}, max |Δlogit| "
            f"{result['max_abs_logit_diff']:.3g}); {Path(output).name} was not written: export with another "
            "--opset or without optimisations, or recalibrate the exported model")


def _same_essentials(record: dict[str, Any], certificate: dict[str, Any]) -> bool:
    if any(record.get(key) != certificate[key] for key in ESSENTIALS):
        return False
    return record.get("nonconformity") == {"name": certificate["nonconformity"]["name"],
                                           "parameters": certificate["nonconformity"]["parameters"]}


def export_binding(loaded, certificate: dict[str, Any]) -> dict[str, Any] | None:
    """``certify``'s ``model-sha256`` check for an export (None when ``loaded`` is not one)."""
    info = getattr(loaded, "export", None)
    if info is None:
        return None
    name, record = loaded.path.name, info.record
    expected = certificate["model"]["sha256"]
    source = record.get("source") or {}
    if not info.intact:
        detail = (f"{name}'s content hash is {info.actual_content_sha256[:16]}…, but it recorded "
                  f"{str(info.content_sha256)[:16]}… at export: the export was changed after prunecp export; "
                  "export the certified model again")
    elif source.get("sha256") != expected:
        detail = (f"{name} was exported from {source.get('file')} (sha256 {str(source.get('sha256'))[:16]}…), but "
                  f"the certificate binds {certificate['model']['file']} (sha256 {expected[:16]}…); export the "
                  "certified model with this certificate")
    elif not _same_essentials(record, certificate):
        detail = (f"{name} carries another certificate (q̂ {record.get('quantile')}, alpha {record.get('alpha')}) "
                  f"than the one given (q̂ {certificate['quantile']}, alpha {certificate['alpha']}); export again "
                  "with this certificate")
    else:
        return {"name": "model-sha256", "passed": True, "detail": (
            f"{name} (sha256 {loaded.sha256[:16]}…) is an intact {info.format} export of the certified model "
            f"{source.get('file')} (sha256 {expected[:16]}…) carrying this certificate")}
    return {"name": "model-sha256", "passed": False, "detail": detail}


def check_binding(loaded, certificate: dict[str, Any]) -> bool:
    """For ``predict``: refuse an export the certificate does not bind (True when ``loaded`` is an export).

    Raises:
        CertificateError: a changed export, or one of another model or certificate.
    """
    check = export_binding(loaded, certificate)
    if check is None:
        return False
    if not check["passed"]:
        raise CertificateError(check["detail"])
    return True
