"""ConformalClassifier: sets equal a brute-force construction, streams, and model binding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from testsupport import load_npz

from prunecp_cli.conformal.predictor import (
    CALIBRATION_STREAM,
    CERTIFY_STREAM,
    PREDICT_STREAM,
    ConformalClassifier,
)
from prunecp_cli.errors import CertificateError, DataError
from prunecp_cli.io.files import sha256_file, write_json
from prunecp_cli.pipeline.calibration import certificate_from_logits, make_nonconformity


@pytest.fixture(scope="module")
def splits(trained_digits, digits_files):
    model = trained_digits["model"]
    out = {}
    for name in ("calib", "test"):
        x, y = load_npz(digits_files[name])
        with torch.no_grad():
            out[name] = (x, y, model(x))
    return out


def _certificate(trained_digits, splits, name, *, class_conditional=False, alpha=0.1, **options):
    _, y, logits = splits["calib"]
    model = {"file": "dense.safetensors", "sha256": sha256_file(trained_digits["safetensors"]),
             "arch": "prunecp_cli.models:digits_cnn", "num_classes": 10, "params": 1, "flops": 1}
    return certificate_from_logits(logits, y, alpha=alpha, nonconformity=make_nonconformity(name, **options),
                                   class_conditional=class_conditional, model=model,
                                   data={"file": "calib.npz", "sha256": "c" * 64})


def brute_force_sets(logits: torch.Tensor, cert: dict, u: np.ndarray | None = None) -> np.ndarray:
    """y in C(x) iff s(x, y) <= q̂ (q̂[y] per class), with every score computed label by label in Python."""
    name, params = cert["nonconformity"]["name"], cert["nonconformity"]["parameters"]
    probs = torch.softmax(logits.double(), 1).numpy()
    sets = np.zeros(probs.shape, dtype=bool)
    for i, p in enumerate(probs):
        order = sorted(range(len(p)), key=lambda j: (-p[j], j))
        for y in range(len(p)):
            rank = order.index(y) + 1
            if name == "lac":
                s = 1.0 - p[y]
            else:
                before = sum(p[j] for j in order[: rank - 1])
                s = before + (1.0 if u is None else u[i]) * p[y]
                if name == "raps":
                    s += params["lambda_reg"] * max(0, rank - params["k_reg"])
            q = cert["quantile"][y] if cert["class_conditional"] else cert["quantile"]
            sets[i, y] = s <= q + 1e-12 * max(1.0, abs(q))
    return sets


@pytest.mark.parametrize("name, options, class_conditional", [
    ("lac", {}, False), ("aps", {}, False), ("raps", {"k_reg": 2, "lambda_reg": 0.05}, False),
    ("lac", {}, True), ("aps", {}, True),
])
def test_sets_match_brute_force(trained_digits, splits, name, options, class_conditional):
    cert = _certificate(trained_digits, splits, name, class_conditional=class_conditional, alpha=0.05, **options)
    x, _, logits = splits["test"]
    clf = ConformalClassifier(trained_digits["model"], cert)
    sets = clf.predict_sets(x)
    assert sets.dtype == torch.bool and sets.shape == (len(x), 10)
    expected = brute_force_sets(logits, cert)
    mismatch = (sets.numpy() != expected).sum()
    assert mismatch == 0, mismatch
    assert torch.equal(clf.sets_from_logits(logits), sets)


def test_randomized_sets_use_the_predict_stream(trained_digits, splits):
    cert = _certificate(trained_digits, splits, "aps", randomized=True, seed=5)
    x, _, logits = splits["test"]
    clf = ConformalClassifier(trained_digits["model"], cert)
    first = clf.predict_sets(x)
    score = make_nonconformity("aps", randomized=True, seed=5)
    u = torch.rand(len(x), dtype=torch.float64, generator=score.make_generator(stream=PREDICT_STREAM)).numpy()
    assert (first.numpy() == brute_force_sets(logits, cert, u)).all()
    # Calibration, certify and predict never share U values.
    draws = {s: torch.rand(4, generator=score.make_generator(stream=s)) for s in
             (CALIBRATION_STREAM, CERTIFY_STREAM, PREDICT_STREAM)}
    assert len({tuple(v.tolist()) for v in draws.values()}) == 3
    second = clf.predict_sets(x)  # the generator continues: fresh U values
    assert not torch.equal(clf.scores_from_logits(logits), clf.scores_from_logits(logits))
    clf.reset()
    assert torch.equal(clf.predict_sets(x), first)
    assert second.shape == first.shape


def test_certificate_from_file_rebuilds_identical_sets(tmp_path, trained_digits, splits):
    cert = _certificate(trained_digits, splits, "raps", k_reg=1)
    write_json(tmp_path / "cert.json", cert)
    x = splits["test"][0]
    from_dict = ConformalClassifier(trained_digits["model"], cert).predict_sets(x)
    from_files = ConformalClassifier(trained_digits["safetensors"], tmp_path / "cert.json").predict_sets(x)
    assert torch.equal(from_dict, from_files)


def test_model_file_must_be_the_certified_one(tmp_path, trained_digits, splits):
    cert = _certificate(trained_digits, splits, "lac")
    cert["model"]["sha256"] = "0" * 64
    with pytest.raises(CertificateError, match="pass the certified model"):
        ConformalClassifier(trained_digits["safetensors"], cert)


def test_wrong_number_of_classes(trained_digits, splits):
    cert = _certificate(trained_digits, splits, "lac")
    clf = ConformalClassifier(trained_digits["model"], cert)
    with pytest.raises(DataError, match="10 classes"):
        clf.sets_from_logits(torch.zeros(3, 7))
