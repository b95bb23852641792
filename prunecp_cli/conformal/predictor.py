"""Prediction sets from a model and its certificate.

:class:`ConformalClassifier` rebuilds the certificate's nonconformity and threshold and turns inputs
(or precomputed logits) into bool sets ``[N, K]``: ``C(x) = {y : s(x, y) <= q̂}`` (``q̂[y]`` for a
class-conditional certificate).

Randomised APS/RAPS draw ``U`` from the seed recorded in the certificate, on a stream per use, so
that test or new points never reuse the ``U`` values of the calibration points (which would break
their exchangeability): :data:`CALIBRATION_STREAM` for ``calibrate``, :data:`CERTIFY_STREAM` for
``certify`` and :data:`PREDICT_STREAM` for ``predict``. A classifier keeps one continuing generator,
so successive calls get fresh ``U`` values; :meth:`ConformalClassifier.reset` starts it again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunecp_cli.conformal.certificate import load_certificate, validate_certificate
from prunecp_cli.conformal.nonconformity import Nonconformity, from_parameters, prediction_sets
from prunecp_cli.errors import CertificateError, DataError

__all__ = ["CALIBRATION_STREAM", "CERTIFY_STREAM", "PREDICT_STREAM", "ConformalClassifier", "certificate_threshold"]

CALIBRATION_STREAM = 0
CERTIFY_STREAM = 1
PREDICT_STREAM = 2


def certificate_threshold(certificate: dict[str, Any]) -> float | torch.Tensor:
    """The certificate's q̂: a float, or a float64 tensor ``[K]`` when class-conditional.

    Raises:
        CertificateError: A group-conditional certificate (its thresholds depend on each point's group,
            which only ``certify --groups`` and :func:`prunecp_cli.pipeline.certification.verdict_from_logits`
            take).
    """
    if certificate.get("groups"):
        raise CertificateError(
            f"the certificate is group-conditional (one threshold for each of {len(certificate['groups']['labels'])} "
            "groups from calibrate --groups), so sets need each point's group: certify it with --groups; predict "
            "and export take no group labels, so calibrate without --groups for them")
    q = certificate["quantile"]
    return torch.tensor(q, dtype=torch.float64) if isinstance(q, list) else float(q)


class ConformalClassifier:
    """A model wrapped with its conformal certificate.

    Args:
        model: A ``torch.nn.Module``, or a model file (loaded with ``load_model``; its sha256 must be
            the one the certificate binds).
        certificate: A certificate dict, or the path of a ``certificate.json``.
        stream: Randomisation stream for randomised scores (default :data:`PREDICT_STREAM`).
        device: Where to run the model.
        trust_arch: For a model file: build its architecture even from an untrusted module (see
            ``load_model``).

    Raises:
        CertificateError: The certificate is invalid, or a model file is not the certified one.

    Example::

        clf = prunecp_cli.ConformalClassifier("pruned.safetensors", "cert.json")
        sets = clf.predict_sets(x)          # BoolTensor [N, K]
    """

    def __init__(self, model: nn.Module | str | Path, certificate: dict[str, Any] | str | Path, *,
                 stream: int = PREDICT_STREAM, device: str | torch.device = "cpu", trust_arch: bool = False) -> None:
        if isinstance(certificate, (str, Path)):
            certificate = load_certificate(certificate)
        else:
            certificate = validate_certificate(certificate)
        self.certificate = certificate
        if isinstance(model, (str, Path)):
            from prunecp_cli.io.checkpoint import open_model

            loaded = open_model(model, trust_arch=trust_arch)
            check_model_hash(loaded.sha256, certificate, path=Path(model))
            model = loaded.model
        self.model = model.eval()
        self.device = torch.device(device)
        self.nonconformity: Nonconformity = from_parameters(
            certificate["nonconformity"]["name"], certificate["nonconformity"]["parameters"]
        )
        self.qhat = certificate_threshold(certificate)
        self.num_classes = int(certificate["model"]["num_classes"])
        self.stream = stream
        self.reset()

    def reset(self) -> None:
        """Restart the randomisation stream (identical ``U`` values again)."""
        self._generator = (self.nonconformity.make_generator(stream=self.stream)
                           if self.nonconformity.randomized else None)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits ``[N, K]`` on ``x`` (eval mode, no gradients).

        Raises:
            DataError: The model's output does not have the certificate's ``K`` classes.
        """
        self.model.to(self.device)
        out = self.model(x.to(self.device))
        self._check_logits(out)
        return out

    def _check_logits(self, logits: torch.Tensor) -> None:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise DataError(
                f"the model outputs shape {list(logits.shape)}, but the certificate is for {self.num_classes} "
                "classes; use the model the certificate was made for"
            )

    def scores_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Nonconformity score of every label, float64 ``[N, K]`` (larger = stranger)."""
        self._check_logits(logits)
        return self.nonconformity.all_scores(logits, generator=self._generator)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Nonconformity score of every label of inputs ``x``, float64 ``[N, K]``."""
        return self.scores_from_logits(self.logits(x))

    def sets_from_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Prediction sets from nonconformity scores ``[N, K]``."""
        qhat = self.qhat.to(scores.device) if isinstance(self.qhat, torch.Tensor) else self.qhat
        return prediction_sets(scores, qhat)

    def sets_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Prediction sets ``[N, K]`` (bool) from precomputed logits."""
        return self.sets_from_scores(self.scores_from_logits(logits))

    def predict_sets(self, x: torch.Tensor) -> torch.Tensor:
        """Prediction sets of inputs ``x``: a bool tensor ``[N, K]``, ``True`` for labels in the set."""
        return self.sets_from_logits(self.logits(x))

    def __repr__(self) -> str:
        c = self.certificate
        return (f"ConformalClassifier({self.nonconformity!r}, alpha={c['alpha']}, delta={c['delta']}, "
                f"class_conditional={c['class_conditional']})")


def check_model_hash(sha256: str, certificate: dict[str, Any], *, path: Path) -> None:
    """Refuse a model file that is not the one the certificate binds.

    Raises:
        CertificateError: The hashes differ (exit 3; ``certify`` reports it as a failed check instead).
    """
    expected = certificate["model"]["sha256"]
    if sha256 != expected:
        raise CertificateError(
            f"the certificate was made for model {certificate['model']['file']} (sha256 {expected[:12]}…), but "
            f"{path.name} has sha256 {sha256[:12]}…; pass the certified model, or recalibrate this one"
        )
