"""``predict``: prediction sets for new inputs, as JSON Lines.

One record per input, in data order::

    {"index": 0, "top1": 7, "set": [7, 1], "scores": [0.98, 0.41, ...], "label": 7}

``top1`` is the most probable class, ``set`` the classes in the conformal prediction set (ordered by
class index), ``scores`` the nonconformity score of every class (the set is the classes whose score
is at most the certificate's q̂), and ``label`` the true label when the data have one. For image
files and folders, ``path`` (after ``index``) is the input's file, as found under the ``--data`` path
given (relative when it was relative). With class names, ``top1``, ``set`` and ``label`` hold names
instead of indices.

The model must be the file the certificate binds (its sha256 is checked). Randomised scores use the
certificate's seed on the predict stream, distinct from the calibration and certify streams.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunecp_cli.conformal.certificate import load_certificate, validate_certificate
from prunecp_cli.conformal.predictor import ConformalClassifier, check_model_hash
from prunecp_cli.errors import DataError
from prunecp_cli.io.data import Dataset
from prunecp_cli.io.files import atomic_write_path
from prunecp_cli.options import DataSource, ModelSource, RunOptions
from prunecp_cli.pipeline.export_check import check_binding
from prunecp_cli.pipeline.session import open_source
from prunecp_cli.runtime import SILENT, Reporter

__all__ = ["Prediction", "open_prediction", "predict", "read_class_names"]


def read_class_names(path: str | Path, num_classes: int) -> list[str]:
    """Class names from a file: a JSON list of strings, or one name per line.

    Raises:
        DataError: The file is missing or unreadable, or does not hold exactly ``num_classes`` names.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--class-names {path} cannot be read ({type(exc).__name__}); pass a text file") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"--class-names {path} is not a valid JSON list ({exc.msg}); "
                            "write a JSON list of strings or one name per line") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"--class-names {path} must be a JSON list of strings")
    else:
        names = [line.strip() for line in text.splitlines()]
        while names and not names[-1]:
            names.pop()
    if len(names) != num_classes:
        raise DataError(f"--class-names {path} holds {len(names)} names, but the model has {num_classes} classes; "
                        "give one name per class, in class-index order")
    return names


@dataclass
class Prediction:
    """A model, its certificate and the input data, checked and ready to stream records."""

    classifier: ConformalClassifier
    data: Dataset
    device: torch.device
    batch_size: int
    class_names: list[str] | None = None
    reporter: Reporter | None = None

    def records(self) -> Iterator[dict[str, Any]]:
        """Yield one record per input, in data order (see the module docstring)."""
        name = (lambda c: self.class_names[c]) if self.class_names else (lambda c: c)  # noqa: E731
        files = self.data.files
        position = 0
        total = -(-len(self.data) // self.batch_size)
        for batch in (self.reporter or SILENT).track(self.data.batches(self.batch_size, device=self.device), total=total,
                                         description="predict"):
            logits = self.classifier.logits(batch.x)
            scores = self.classifier.scores_from_logits(logits)
            sets = self.classifier.sets_from_scores(scores).cpu()
            top1 = logits.argmax(1).cpu().tolist()
            scores = scores.cpu().tolist()
            labels = batch.y.cpu().tolist() if batch.y is not None else None
            rows = batch.index.tolist()
            for i in range(len(top1)):
                record: dict[str, Any] = {"index": position}
                if files is not None:
                    record["path"] = str(files[rows[i]])
                record.update({"top1": name(top1[i]), "set": [name(c) for c in sets[i].nonzero().flatten().tolist()],
                               "scores": scores[i]})
                if labels is not None:
                    record["label"] = name(labels[i])
                position += 1
                yield record
        self.classifier.model.cpu()


def open_prediction(
    model: str | Path | ModelSource,
    data: str | Path | DataSource,
    *,
    cert: str | Path | dict[str, Any],
    class_names: str | Path | list[str] | None = None,
    run: RunOptions = RunOptions(),
) -> Prediction:
    """Load and check everything ``predict`` needs, before any record is produced.

    Arguments as for :func:`predict`.

    Raises:
        CertificateError: The certificate is invalid or was made for another model file.
        DataError: Data that do not fit the model, labels outside its classes, or bad class names.
    """
    certificate = validate_certificate(cert) if isinstance(cert, dict) else load_certificate(cert)
    session = open_source(ModelSource.of(model), DataSource.of(data), device=run.device)
    if not check_binding(session.loaded, certificate):  # an export is bound through its record
        check_model_hash(session.loaded.sha256, certificate, path=session.loaded.path)
    if isinstance(class_names, (str, Path)):
        class_names = read_class_names(class_names, session.num_classes)
    elif class_names is not None and len(class_names) != session.num_classes:
        raise DataError(f"{len(class_names)} class names given for a model with {session.num_classes} classes")
    classifier = ConformalClassifier(session.model, certificate, device=session.device)
    return Prediction(classifier, session.data, session.device, run.batch(256), class_names, run.rep)


def predict(
    model: str | Path | ModelSource,
    data: str | Path | DataSource,
    *,
    cert: str | Path | dict[str, Any],
    out: str | Path | None = None,
    class_names: str | Path | list[str] | None = None,
    run: RunOptions = RunOptions(),
) -> list[dict[str, Any]]:
    """Prediction sets of every input of ``data``; written as JSON Lines to ``out`` when given.

    Args:
        model: The certified model file (a path, or a :class:`ModelSource`).
        data: Inputs (``y`` optional).
        cert: Its certificate (path or dict).
        out: JSON Lines file to write atomically (None: only return the records).
        class_names: A file of names (JSON list or one per line), or a list, in class-index order.
        run: Device, batch size (default 256) and reporter.

    Returns:
        The records (see the module docstring). For data too large to hold, iterate
        ``open_prediction(...).records()`` instead.
    """
    prediction = open_prediction(model, data, cert=cert, class_names=class_names, run=run)
    records = list(prediction.records())
    if out is not None:
        with atomic_write_path(out) as tmp, open(tmp, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, allow_nan=False) + "\n")
    return records
