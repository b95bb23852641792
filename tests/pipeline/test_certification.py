"""``certify``: honest audits pass, and changed models, lowered thresholds and shifted data fail.

Honest audits use random calibration/test splits of the trained CNN's outputs on digits it was not
trained on (the same pool as test_calibration.py), through :func:`verdict_from_logits`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from testsupport import load_npz

from prunecp_cli.errors import CalibrationError, CertificateError, DataError, UsageError
from prunecp_cli.io.checkpoint import open_model, save_model
from prunecp_cli.options import RunOptions
from prunecp_cli.pipeline.calibration import calibrate, certificate_from_logits, make_nonconformity
from prunecp_cli.pipeline.certification import certify, failure_message, verdict_from_logits

CPU = RunOptions(device="cpu")

MODEL = {"file": "m.safetensors", "sha256": "a" * 64, "arch": "prunecp_cli.models:digits_cnn", "num_classes": 10,
         "params": 1, "flops": 1}
DATA = {"file": "pool.npz", "sha256": "b" * 64}
SIGNIFICANCE = 0.01


@pytest.fixture(scope="module")
def pool(trained_digits, digits_files):
    parts = [load_npz(digits_files[name]) for name in ("score", "calib", "test")]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    with torch.no_grad():
        return trained_digits["model"](x), y


def _splits(n_pool: int, count: int, seed: int) -> torch.Tensor:
    return torch.argsort(torch.rand(count, n_pool, generator=torch.Generator().manual_seed(seed)), dim=1)


def _cert(logits, labels, name="lac", *, alpha=0.1, delta=None, class_conditional=False, **options):
    return certificate_from_logits(logits, labels, alpha=alpha, delta=delta,
                                   nonconformity=make_nonconformity(name, **options),
                                   class_conditional=class_conditional, model=MODEL, data=DATA)


@pytest.mark.parametrize("name, options, delta, class_conditional, count", [
    ("lac", {}, None, False, 200),
    ("aps", {"randomized": True, "seed": 1}, None, False, 200),
    ("lac", {}, 0.1, False, 200),
    ("lac", {}, None, True, 100),
])
def test_honest_audits_pass(pool, name, options, delta, class_conditional, count):
    """At significance 0.01 a valid certificate passes >= 98% of honest audits (>= 1-delta-s-3SE for PAC)."""
    logits, labels = pool
    n_cal = len(labels) // 2
    passed = 0
    for row in _splits(len(labels), count, seed=11):
        cal, test = row[:n_cal], row[n_cal:]
        cert = _cert(logits[cal], labels[cal], name, delta=delta, class_conditional=class_conditional, **options)
        verdict = verdict_from_logits(logits[test], labels[test], certificate=cert, significance=SIGNIFICANCE)
        passed += verdict["passed"]
        assert verdict["passed"] == (verdict["p_value"] >= SIGNIFICANCE)
    if delta is None:
        assert passed / count >= 0.98, passed
    else:
        bound = delta + SIGNIFICANCE  # a PAC certificate may fail when its calibration draw was unlucky
        assert 1 - passed / count <= bound + 3 * math.sqrt(bound * (1 - bound) / count), passed


def test_a_threshold_lowered_to_70_percent_fails(pool):
    logits, labels = pool
    n_cal = len(labels) // 2
    coverages = []
    for row in _splits(len(labels), 50, seed=12):
        cal, test = row[:n_cal], row[n_cal:]
        cert = _cert(logits[cal], labels[cal])
        scores = make_nonconformity("lac").label_scores(logits[cal], labels[cal])
        cert["quantile"] = float(torch.kthvalue(scores, math.ceil(0.7 * (n_cal + 1))).values)
        verdict = verdict_from_logits(logits[test], labels[test], certificate=cert, significance=SIGNIFICANCE)
        assert not verdict["passed"] and verdict["p_value"] < 1e-6
        coverages.append(verdict["coverage"])
    assert 0.6 < np.mean(coverages) < 0.8


def test_verdict_fields(pool):
    logits, labels = pool
    cert = _cert(logits[:450], labels[:450], class_conditional=True)
    verdict = verdict_from_logits(logits[450:], labels[450:], certificate=cert)
    for key in ("passed", "coverage", "mean_set_size", "n", "p_value", "alpha", "checks", "set_size_histogram",
                "per_class_coverage"):
        assert key in verdict
    assert verdict["n"] == len(labels) - 450 and sum(verdict["set_size_histogram"]) == verdict["n"]
    assert len(verdict["per_class"]) == 10 and "Bonferroni over 10 classes" in verdict["test"]
    worst = min(r["p_value"] for r in verdict["per_class"])
    assert verdict["p_value"] == pytest.approx(min(1.0, 10 * worst))
    assert verdict["checks"][0]["name"] == "coverage"
    with pytest.raises(UsageError):
        verdict_from_logits(logits, labels, certificate=cert, significance=1.0)
    with pytest.raises(DataError):
        verdict_from_logits(logits[:, :9], labels, certificate=cert)


# --- certify on files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certified(tmp_path_factory, trained_digits, digits_files):
    """A copy of the trained CNN, its certificate on the calibration split, and a changed copy."""
    folder = tmp_path_factory.mktemp("certify")
    loaded = open_model(trained_digits["safetensors"])
    model_path = folder / "model.safetensors"
    save_model(loaded.model, model_path, loaded.meta)
    cert_path = folder / "cert.json"
    calibrate(model_path, data=digits_files["calib"], alpha=0.1, output=cert_path, run=CPU)
    changed = open_model(model_path)
    with torch.no_grad():
        changed.model.classifier.weight[0, 0] += 1e-3  # one weight
    changed_path = folder / "changed.safetensors"
    save_model(changed.model, changed_path, changed.meta)
    return {"model": model_path, "cert": cert_path, "changed": changed_path, "folder": folder}


def test_certify_passes_on_held_out_data(certified, digits_files):
    verdict = certify(certified["model"], cert=certified["cert"], data=digits_files["test"], run=CPU)
    assert verdict["passed"], failure_message(verdict)
    assert [c["name"] for c in verdict["checks"]] == ["model-sha256", "test-data", "coverage"]
    assert verdict["n"] == len(load_npz(digits_files["test"])[1])


def test_certify_fails_when_one_weight_changed(certified, digits_files):
    verdict = certify(certified["changed"], cert=certified["cert"], data=digits_files["test"], run=CPU)
    assert not verdict["passed"]
    check = verdict["checks"][0]
    assert check["name"] == "model-sha256" and not check["passed"] and "sha256" in check["detail"]
    assert "model-sha256" in failure_message(verdict)


def test_certify_fails_under_distribution_shift(certified, digits_files):
    """Digits rotated by 90 degrees: the model's coverage really drops, and the audit catches it."""
    x, y = load_npz(digits_files["test"])
    shifted = certified["folder"] / "rotated.npz"
    np.savez(shifted, x=torch.rot90(x, 1, dims=(2, 3)).numpy(), y=y.numpy())
    honest = certify(certified["model"], cert=certified["cert"], data=digits_files["test"], run=CPU)
    verdict = certify(certified["model"], cert=certified["cert"], data=shifted, run=CPU)
    assert verdict["coverage"] < 0.7 < honest["coverage"]
    assert not verdict["passed"] and verdict["p_value"] < SIGNIFICANCE
    assert "improbably low" in failure_message(verdict)


def test_test_data_must_be_held_out(certified, digits_files):
    with pytest.raises(CalibrationError, match="is the calibration data"):
        certify(certified["model"], cert=certified["cert"], data=digits_files["calib"], run=CPU)


def test_bad_certificates_and_options(tmp_path, certified, digits_files):
    with pytest.raises(UsageError, match="significance"):
        certify(certified["model"], cert=certified["cert"], data=digits_files["test"], significance=0.0)
    with pytest.raises(CertificateError, match="does not exist"):
        certify(certified["model"], cert=tmp_path / "none.json", data=digits_files["test"], run=CPU)
