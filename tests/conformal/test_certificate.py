"""The certificate format: golden copy, field-by-field validation, and q̂ against an exact reference."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from testsupport import load_npz

from prunecp_cli.conformal.certificate import SCHEMA_VERSION, load_certificate, validate_certificate
from prunecp_cli.errors import CalibrationError, CertificateError
from prunecp_cli.io.files import write_json
from prunecp_cli.pipeline.calibration import certificate_from_logits, make_nonconformity

GOLDEN = Path(__file__).parents[1] / "golden" / "certificate_v2.json"
GOLDEN_V1 = Path(__file__).parents[1] / "golden" / "certificate_v1.json"
MODEL = {"file": "m.safetensors", "sha256": "a" * 64, "arch": "prunecp_cli.models:digits_cnn", "num_classes": 10,
         "params": 100, "flops": 1000, "flops_unit": "FLOPs"}
DATA = {"file": "calib.npz", "sha256": "b" * 64}


@pytest.fixture(scope="module")
def calib_logits(trained_digits, digits_files):
    """The trained DigitsCNN's logits and labels on the calibration split (real, imperfect outputs)."""
    x, y = load_npz(digits_files["calib"])
    with torch.no_grad():
        return trained_digits["model"](x), y


def _cert(logits, labels, name="lac", **kwargs):
    return certificate_from_logits(logits, labels, alpha=kwargs.pop("alpha", 0.1),
                                   nonconformity=make_nonconformity(name, **kwargs.pop("nc", {})),
                                   model=MODEL, data=DATA, **kwargs)


def _keys(obj, prefix=""):
    """Dotted paths of every dict key (lists of dicts are walked through their first element)."""
    out = set()
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.add(prefix + key)
            out |= _keys(value, prefix + key + ".")
    elif isinstance(obj, list) and obj and isinstance(obj[0], dict):
        out |= _keys(obj[0], prefix + "[].")
    return out


def test_golden_certificate_loads_and_validates():
    cert = load_certificate(GOLDEN)
    assert cert["schema_version"] == SCHEMA_VERSION == 2
    assert cert["guarantee"]["type"] == "marginal" and cert["delta"] is None
    n, k = cert["data"]["n"], cert["rank"]
    assert k == math.ceil((n + 1) * 9 / 10) and cert["quantile_level"] == k / n
    calib = cert["calibration"]
    hist = calib["set_size_histogram"]
    assert calib["singleton_rate"] == hist[1] / n and calib["empty_rate"] == hist[0] / n
    per_class = calib["per_class_coverage"]
    assert calib["worst_class"]["coverage"] == min(per_class) == per_class[calib["worst_class"]["class"]]
    assert math.isclose(calib["class_coverage_gap"], sum(abs(c - 0.9) for c in per_class) / len(per_class))


def test_schema_1_certificates_still_load():
    """A certificate written before schema 2 (no calibration conditional metrics) still reads."""
    cert = load_certificate(GOLDEN_V1)
    assert cert["schema_version"] == 1 and "sscv" not in cert["calibration"]
    v2 = json.loads(GOLDEN.read_text())
    v2["calibration"].pop("sscv")
    with pytest.raises(CertificateError, match="'calibration.sscv' is missing"):
        validate_certificate(v2)


def test_fresh_certificate_has_the_golden_layout(calib_logits):
    fresh = _cert(*calib_logits)
    golden = json.loads(GOLDEN.read_text())
    assert _keys(fresh) == _keys(golden)
    assert list(fresh) == list(golden)  # same order of top-level fields, for stable diffs


@pytest.mark.parametrize("name", ["lac", "aps", "raps"])
def test_quantile_equals_exact_reference_on_real_logits(calib_logits, name):
    """q̂ is the k-th smallest true-label score, k = ceil((n+1)(1-alpha)), from a brute-force reference."""
    logits, labels = calib_logits
    cert = _cert(logits, labels, name, alpha=0.1)
    probs = np.exp(logits.double().numpy() - logits.double().numpy().max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    ref = []
    for p, y in zip(probs, labels.tolist(), strict=True):
        if name == "lac":
            ref.append(1.0 - p[y])
            continue
        order = sorted(range(10), key=lambda j: (-p[j], j))
        rank = order.index(y) + 1
        ref.append(sum(p[j] for j in order[:rank]) + (0.01 * max(0, rank - 1) if name == "raps" else 0.0))
    n = len(ref)
    k = -((-(n + 1) * 9) // 10)  # ceil((n+1)*9/10) in integers
    assert cert["rank"] == k and cert["data"]["n"] == n
    assert math.isclose(cert["quantile"], sorted(ref)[k - 1], rel_tol=1e-12, abs_tol=1e-15)
    assert cert["calibration"]["coverage"] >= k / n - 1e-12  # in-sample: at least the k points at or below q̂


def test_round_trip_through_json(tmp_path, calib_logits):
    cert = _cert(*calib_logits, "raps", nc={"randomized": True, "seed": 3}, delta=0.1)
    write_json(tmp_path / "c.json", cert)
    back = load_certificate(tmp_path / "c.json")
    assert back == cert
    assert back["quantile"] == cert["quantile"]  # repr of a float round-trips exactly
    assert back["nonconformity"]["parameters"] == {"randomized": True, "seed": 3, "lambda_reg": 0.01, "k_reg": 1}


def test_class_conditional_certificate(calib_logits):
    logits, labels = calib_logits
    cert = _cert(logits, labels, class_conditional=True)
    counts = torch.bincount(labels, minlength=10).tolist()
    assert cert["class_counts"] == counts and len(cert["quantile"]) == 10
    assert cert["rank"] == [-((-(m + 1) * 9) // 10) for m in counts]
    assert len(cert["guarantee"]["per_class"]) == 10
    assert all(g["type"] == "marginal" for g in cert["guarantee"]["per_class"])
    broken = copy.deepcopy(cert)
    broken["quantile"] = broken["quantile"][:9]
    with pytest.raises(CertificateError, match="'quantile'.*10 values"):
        validate_certificate(broken)


def test_too_few_points_names_the_smallest_n(calib_logits):
    logits, labels = calib_logits
    with pytest.raises(CalibrationError, match="at least 999 calibration points"):
        _cert(logits[:200], labels[:200], alpha=0.001)


MUTATIONS = [
    ("missing model.sha256", lambda c: c["model"].pop("sha256"), "'model.sha256' is missing"),
    ("missing data.n", lambda c: c["data"].pop("n"), "'data.n' is missing"),
    ("missing guarantee", lambda c: c.pop("guarantee"), "'guarantee' is missing"),
    ("missing guarantee.statement", lambda c: c["guarantee"].pop("statement"), "'guarantee.statement'"),
    ("missing calibration.top1_accuracy", lambda c: c["calibration"].pop("top1_accuracy"),
     "'calibration.top1_accuracy'"),
    ("alpha as a string", lambda c: c.update(alpha="0.1"), "'alpha' must be a finite number"),
    ("alpha of 1", lambda c: c.update(alpha=1.0), "'alpha'"),
    ("delta of 0", lambda c: c.update(delta=0.0), "'delta'"),
    ("infinite quantile", lambda c: c.update(quantile=float("inf")), "'quantile'"),
    ("short sha256", lambda c: c["model"].update(sha256="abc"), "'model.sha256' must be a sha256"),
    ("unknown nonconformity", lambda c: c["nonconformity"].update(name="thr"), "'nonconformity.name'"),
    ("bad nonconformity parameters", lambda c: c["nonconformity"].update(parameters={"k_reg": 2}), "parameters"),
    ("edited rank", lambda c: c.update(rank=c["rank"] - 5), "'rank' is"),
    ("type without delta", lambda c: c["guarantee"].update(type="training-conditional"), "'guarantee.type'"),
    ("histogram length", lambda c: c["calibration"].update(set_size_histogram=[1, 2]), "set_size_histogram"),
    ("class_conditional not bool", lambda c: c.update(class_conditional="no"), "'class_conditional'"),
]


@pytest.mark.parametrize("mutate, expected", [(m, e) for _, m, e in MUTATIONS], ids=[i for i, _, _ in MUTATIONS])
def test_validation_names_the_field(tmp_path, mutate, expected):
    cert = json.loads(GOLDEN.read_text())
    mutate(cert)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cert))
    with pytest.raises(CertificateError) as info:
        load_certificate(path)
    message = str(info.value)
    assert expected in message and "\n" not in message, message


@pytest.mark.parametrize("version", [0, 3, "1", "2", None, True])
def test_unknown_schema_version_is_rejected(tmp_path, version):
    cert = json.loads(GOLDEN.read_text())
    cert["schema_version"] = version
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cert))
    with pytest.raises(CertificateError, match="schema_version"):
        load_certificate(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(CertificateError, match="does not exist"):
        load_certificate(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CertificateError, match="not valid JSON"):
        load_certificate(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(CertificateError, match="not a JSON object"):
        load_certificate(tmp_path / "list.json")


def test_risk_control_is_optional_and_kept(calib_logits):
    record = {"procedure": "learn-then-test, fixed-sequence", "risk": "error", "max_risk": 0.05, "delta": 0.1}
    cert = _cert(*calib_logits, risk_control=record)
    assert cert["risk_control"] == record
    assert "risk_control" not in _cert(*calib_logits)
