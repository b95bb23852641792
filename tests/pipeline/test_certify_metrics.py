"""certify's verdict schema 2: power, conditional metrics, groups and the PAC test, against hand references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from testsupport import FAKE_DATA, FAKE_MODEL, held_out_pool, load_npz

from prunecp_cli.conformal.conditional import SIZE_BINS
from prunecp_cli.conformal.nonconformity import from_parameters, prediction_sets
from prunecp_cli.conformal.power import CoverageLaw, min_detectable_drop
from prunecp_cli.conformal.predictor import CERTIFY_STREAM
from prunecp_cli.conformal.stats import p_value_marginal, p_value_pac
from prunecp_cli.errors import DataError, UsageError
from prunecp_cli.io.checkpoint import open_model, save_model
from prunecp_cli.options import RunOptions
from prunecp_cli.pipeline.calibration import calibrate, certificate_from_logits, make_nonconformity
from prunecp_cli.pipeline.certification import verdict_from_logits
from prunecp_cli.pipeline.groups import read_groups

MODEL, DATA = FAKE_MODEL, FAKE_DATA


@pytest.fixture(scope="module")
def halves(trained_digits, digits_files):
    x, logits, y = held_out_pool(trained_digits["model"], digits_files)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cal, test = order[: len(y) // 2], order[len(y) // 2:]
    return logits[cal], y[cal], logits[test], y[test]


def _sets(cert, logits):
    score = from_parameters(cert["nonconformity"]["name"], cert["nonconformity"]["parameters"])
    gen = score.make_generator(stream=CERTIFY_STREAM) if score.randomized else None
    q = cert["quantile"]
    return prediction_sets(score.all_scores(logits, generator=gen), torch.tensor(q) if isinstance(q, list) else q)


def _reference_metrics(sets, labels, alpha):
    """Plain-Python reference of the conditional metrics."""
    sets, labels = sets.tolist(), labels.tolist()
    hits = [row[y] for row, y in zip(sets, labels, strict=True)]
    sizes = [sum(row) for row in sets]
    cov = {}
    for h, y in zip(hits, labels, strict=True):
        cov.setdefault(y, []).append(h)
    per_class = {c: sum(v) / len(v) for c, v in cov.items()}
    strata = []
    for low, high in SIZE_BINS:
        inside = [h for h, s in zip(hits, sizes, strict=True) if s >= low and (high is None or s <= high)]
        if inside:
            strata.append(sum(inside) / len(inside))
    worst = min(sorted(per_class), key=lambda c: per_class[c])
    return {"class_coverage_gap": sum(abs(v - (1 - alpha)) for v in per_class.values()) / len(per_class),
            "worst_class": {"class": worst, "n": len(cov[worst]), "coverage": per_class[worst]},
            "sscv": max(abs(v - (1 - alpha)) for v in strata),
            "singleton_rate": sizes.count(1) / len(sizes), "empty_rate": sizes.count(0) / len(sizes)}


@pytest.mark.parametrize("name, options, alpha", [("lac", {}, 0.1), ("aps", {}, 0.05), ("raps", {"k_reg": 1}, 0.2)])
def test_verdict_metrics_equal_the_reference(halves, name, options, alpha):
    cal_x, cal_y, test_x, test_y = halves
    cert = certificate_from_logits(cal_x, cal_y, alpha=alpha, nonconformity=make_nonconformity(name, **options),
                                   model=MODEL, data=DATA)
    verdict = verdict_from_logits(test_x, test_y, certificate=cert)
    assert verdict["schema_version"] == 2
    want = _reference_metrics(_sets(cert, test_x), test_y, alpha)
    for key, value in want.items():
        assert verdict[key] == (pytest.approx(value, abs=1e-12) if isinstance(value, float) else value), key
    assert sum(s["n"] for s in verdict["size_strata"]) == len(test_y)
    law = CoverageLaw(len(test_y), n=cert["data"]["n"], k=cert["rank"])
    assert verdict["min_detectable_drop"] == min_detectable_drop([law], 0.01) and verdict["detection_power"] == 0.8
    calib_want = _reference_metrics(_sets(cert, cal_x), cal_y, alpha)  # non-randomised: same sets as calibrate's
    for key, value in calib_want.items():
        assert cert["calibration"][key] == (pytest.approx(value, abs=1e-12) if isinstance(value, float) else value)


def test_pac_certificates_use_the_beta_binomial_at_the_pac_rank(halves):
    cal_x, cal_y, test_x, test_y = halves
    cert = certificate_from_logits(cal_x, cal_y, alpha=0.1, delta=0.1, nonconformity=make_nonconformity("lac"),
                                   model=MODEL, data=DATA)
    m = len(test_y)
    default = verdict_from_logits(test_x, test_y, certificate=cert)
    assert default["pac_test"] == "beta-binomial" and "at the PAC rank" in default["test"]
    assert default["p_value"] == p_value_marginal(default["covered"], m, n=cert["data"]["n"], k=cert["rank"])
    old = verdict_from_logits(test_x, test_y, certificate=cert, pac_test="binomial")
    assert old["pac_test"] == "binomial" and old["p_value"] == p_value_pac(old["covered"], m, alpha=0.1)
    assert old["min_detectable_drop"] == min_detectable_drop([CoverageLaw(m, coverage=0.9)], 0.01)
    with pytest.raises(UsageError, match="pac_test"):
        verdict_from_logits(test_x, test_y, certificate=cert, pac_test="exact")


def test_class_conditional_power_is_over_the_classes(halves):
    cal_x, cal_y, test_x, test_y = halves
    cert = certificate_from_logits(cal_x, cal_y, alpha=0.1, nonconformity=make_nonconformity("lac"),
                                   class_conditional=True, model=MODEL, data=DATA)
    verdict = verdict_from_logits(test_x, test_y, certificate=cert)
    laws = [CoverageLaw(r["n"], n=cert["class_counts"][r["class"]], k=cert["rank"][r["class"]])
            for r in verdict["per_class"] if r["n"]]
    assert verdict["min_detectable_drop"] == min_detectable_drop(laws, 0.01)


def test_group_metrics_equal_the_reference(halves):
    cal_x, cal_y, test_x, test_y = halves
    cert = certificate_from_logits(cal_x, cal_y, alpha=0.1, nonconformity=make_nonconformity("lac"), model=MODEL,
                                   data=DATA)
    groups = ["even" if int(y) % 2 == 0 else "odd" for y in test_y]
    verdict = verdict_from_logits(test_x, test_y, certificate=cert, groups=groups)
    sets = _sets(cert, test_x)
    by = verdict["groups"]
    assert [g["group"] for g in by["per_group"]] == ["even", "odd"]
    for g in by["per_group"]:
        rows = [i for i, name in enumerate(groups) if name == g["group"]]
        ref = _reference_metrics(sets[rows], test_y[rows], 0.1)
        hits = sets[rows].gather(1, test_y[rows].unsqueeze(1)).squeeze(1)
        assert g["n"] == len(rows) and g["coverage"] == pytest.approx(float(hits.double().mean()), abs=1e-12)
        assert g["sscv"] == pytest.approx(ref["sscv"], abs=1e-12)
        assert g["singleton_rate"] == pytest.approx(ref["singleton_rate"], abs=1e-12)
    worst = min(by["per_group"], key=lambda g: g["coverage"])
    assert by["worst_group"] == {"group": worst["group"], "n": worst["n"], "coverage": worst["coverage"]}
    assert by["group_coverage_gap"] == pytest.approx(np.mean([abs(g["coverage"] - 0.9) for g in by["per_group"]]))


def test_group_files(tmp_path):
    np.save(tmp_path / "g.npy", np.array([0, 1, 1, 2]))
    (tmp_path / "g.txt").write_text("0\n1\n1\n2\n")
    (tmp_path / "s.txt").write_text("north\nsouth\nnorth\nwest\n")
    assert read_groups(tmp_path / "g.npy", n=4)[0] == read_groups(tmp_path / "g.txt", n=4)[0] == [0, 1, 1, 2]
    labels, record = read_groups(tmp_path / "s.txt", n=4)
    assert labels == ["north", "south", "north", "west"] and record["file"] == "s.txt" and len(record["sha256"]) == 64
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(tmp_path / "two.npy", np.zeros((2, 2), dtype=np.int64))
    (tmp_path / "blank.txt").write_text("a\n\nb\n")
    for name, n, match in [("g.npy", 5, "has 4 labels but the data have 5"), ("obj.npy", 2, "without pickle"),
                           ("two.npy", 2, "1-D integer or string"), ("blank.txt", 3, "line 2 is blank"),
                           ("missing.txt", 1, "does not exist"), ("g.csv", 1, "use a .npy array or a .txt")]:
        with pytest.raises(DataError, match=match):
            read_groups(tmp_path / name, n=n)


def test_certify_command_with_groups_and_pac_test(cli, tmp_path, trained_digits, digits_files):
    loaded = open_model(trained_digits["safetensors"])
    model, cert = tmp_path / "model.safetensors", tmp_path / "cert.json"
    save_model(loaded.model, model, loaded.meta)
    calibrate(model, data=digits_files["calib"], alpha=0.1, delta=0.1, output=cert, run=RunOptions(device="cpu"))
    _, y = load_npz(digits_files["test"])
    (tmp_path / "groups.txt").write_text("".join(f"{'low' if int(v) < 5 else 'high'}\n" for v in y))
    result = cli("certify", model, "--cert", cert, "--data", digits_files["test"], "--groups", tmp_path / "groups.txt",
                 "--pac-test", "binomial", "--json")
    assert result.code == 0, result.stderr
    verdict = json.loads(result.stdout)
    assert verdict["pac_test"] == "binomial" and verdict["test"].startswith("Binomial(")
    assert {g["group"] for g in verdict["groups"]["per_group"]} == {"low", "high"}
    assert verdict["groups_file"]["file"] == "groups.txt"
    for key in ("min_detectable_drop", "class_coverage_gap", "worst_class", "sscv", "singleton_rate", "empty_rate"):
        assert verdict[key] is not None, key
    panel = cli("certify", model, "--cert", cert, "--data", digits_files["test"], "--groups", tmp_path / "groups.txt")
    text = " ".join(panel.stdout.replace("│", " ").split())
    assert panel.code == 0 and "detected with probability 0.8" in text and "group coverage" in text, text
    bad = cli("certify", model, "--cert", cert, "--data", digits_files["test"], "--groups", tmp_path / "g.csv")
    assert bad.code == 3 and ".npy array or a .txt" in bad.stderr


@pytest.mark.parametrize("options", [["-s", "topk", "--randomized"], ["-s", "saps", "--lambda-reg", "0.1"],
                                     ["-s", "margin"]])
def test_new_scores_calibrate_and_certify(cli, tmp_path, trained_digits, digits_files, options):
    loaded = open_model(trained_digits["safetensors"])
    model, cert = tmp_path / "model.safetensors", tmp_path / "cert.json"
    save_model(loaded.model, model, loaded.meta)
    made = cli("calibrate", model, "--data", digits_files["calib"], "-o", cert, "--device", "cpu", *options)
    assert made.code == 0, made.stderr
    written = json.loads(cert.read_text())
    assert written["nonconformity"]["name"] == options[1] and written["schema_version"] == 2
    verdict = cli("certify", model, "--cert", cert, "--data", digits_files["test"], "--json")
    assert verdict.code == 0 and json.loads(verdict.stdout)["passed"]


def test_report_rows_show_the_calibration_conditional_metrics():
    from pathlib import Path

    from prunecp_cli.present import certificate_rows

    golden = Path(__file__).parents[1] / "golden"
    v2 = dict(certificate_rows(json.loads((golden / "certificate_v2.json").read_text())))
    assert v2["calibration class coverage gap"].startswith("0.0480") and "worst class 8" in v2[
        "calibration class coverage gap"]
    assert v2["calibration size-stratified coverage"].startswith("SSCV 0.0037")
    assert v2["calibration singleton / empty sets"] == "0.9037 / 0.0963"
    v1 = dict(certificate_rows(json.loads((golden / "certificate_v1.json").read_text())))
    assert "calibration class coverage gap" not in v1 and v1["calibration n"].startswith("270")
