"""``prunecp calibrate | certify | predict`` from the command line, the CI gate script, and report --cert."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from testsupport import assert_one_line_error, load_npz

from prunecp_cli.conformal.certificate import load_certificate
from prunecp_cli.conformal.nonconformity import LAC
from prunecp_cli.conformal.predictor import ConformalClassifier
from prunecp_cli.io.checkpoint import open_model, save_model
from prunecp_cli.options import RunOptions
from prunecp_cli.pipeline.calibration import calibrate

GATE = Path(__file__).parents[2] / "cli" / "ci-gate.sh"


@pytest.fixture(scope="module")
def work(tmp_path_factory, trained_digits, digits_files):
    """A folder with the model, its certificate, a one-weight-changed copy, and test-data variants."""
    folder = tmp_path_factory.mktemp("cli")
    loaded = open_model(trained_digits["safetensors"])
    model = folder / "model.safetensors"
    save_model(loaded.model, model, loaded.meta)
    cert = folder / "cert.json"
    calibrate(model, data=digits_files["calib"], alpha=0.1, output=cert, run=RunOptions(device="cpu"))
    with torch.no_grad():
        loaded.model.classifier.weight[3, 5] += 1e-3
    changed = folder / "changed.safetensors"
    save_model(loaded.model, changed, loaded.meta)
    x, y = load_npz(digits_files["test"])
    rotated = folder / "rotated.npz"
    np.savez(rotated, x=torch.rot90(x, 1, dims=(2, 3)).numpy(), y=y.numpy())
    bad_labels = folder / "bad_labels.npz"
    np.savez(bad_labels, x=x.numpy(), y=np.where(np.arange(len(y)) == 3, 10, y.numpy()))
    xc, yc = load_npz(digits_files["calib"])
    with torch.no_grad():
        scores = LAC().label_scores(trained_digits["model"](xc), yc)
    low = load_certificate(cert)
    low["quantile"] = float(torch.kthvalue(scores, math.ceil(0.7 * (len(yc) + 1))).values)
    lowered = folder / "lowered.json"
    lowered.write_text(json.dumps(low))
    return {"folder": folder, "model": model, "cert": cert, "changed": changed, "rotated": rotated,
            "bad_labels": bad_labels, "lowered": lowered, **{k: v for k, v in digits_files.items()}}


@pytest.mark.parametrize("options", [
    ["--alpha", "0.1"],
    ["--alpha", "0.2", "--delta", "0.1", "--nonconformity", "aps", "--randomized", "--seed", "3"],
    ["--alpha", "0.2", "-s", "raps", "--class-conditional"],
    ["-s", "raps", "--k-reg", "2", "--lambda-reg", "0.1"],
])
def test_calibrate_then_certify(cli, work, tmp_path, options):
    out = tmp_path / "c.json"
    result = cli("calibrate", work["model"], "--data", work["calib"], "-o", out, "--device", "cpu", *options)
    assert result.code == 0, result
    cert = load_certificate(out)
    assert cert["alpha"] == (float(options[options.index("--alpha") + 1]) if "--alpha" in options else 0.1)
    assert cert["delta"] == (0.1 if "--delta" in options else None)
    assert cert["class_conditional"] == ("--class-conditional" in options)
    verdict = cli("certify", work["model"], "--cert", out, "--data", work["test"], "--json", "--device", "cpu")
    assert verdict.code == 0, verdict
    assert json.loads(verdict.stdout)["passed"] is True


def test_certify_json_is_exactly_one_object(cli, work):
    result = cli("certify", work["model"], "--cert", work["cert"], "--data", work["test"], "--json")
    assert result.code == 0, result
    verdict = json.loads(result.stdout)  # the whole stdout is one JSON document
    for key in ("passed", "coverage", "mean_set_size", "n", "p_value", "alpha", "checks", "set_size_histogram",
                "per_class_coverage"):
        assert key in verdict, key
    assert [c["name"] for c in verdict["checks"]] == ["model-sha256", "test-data", "coverage"]
    assert all(set(c) == {"name", "passed", "detail"} for c in verdict["checks"])


def test_certify_panel(cli, work):
    result = cli("certify", work["model"], "--cert", work["cert"], "--data", work["test"])
    assert result.code == 0, result
    assert "certificate holds" in result.stdout and "p-value" in result.stdout


@pytest.mark.parametrize("case, contains", [
    ("changed", "model-sha256"), ("lowered", "improbably low"), ("rotated", "improbably low"),
])
def test_certify_exits_4(cli, work, case, contains):
    model = work["changed"] if case == "changed" else work["model"]
    cert = work["lowered"] if case == "lowered" else work["cert"]
    data = work["rotated"] if case == "rotated" else work["test"]
    result = cli("certify", model, "--cert", cert, "--data", data, "--json")
    assert_one_line_error(result, 4, contains=contains)
    verdict = json.loads(result.stdout)
    assert verdict["passed"] is False
    if case != "changed":
        assert verdict["coverage"] < 0.8  # coverage really dropped (0.9 is certified)
        honest = json.loads(cli("certify", work["model"], "--cert", work["cert"], "--data", work["test"],
                                "--json").stdout)
        assert verdict["coverage"] < honest["coverage"] - 0.1


BAD = {
    "alpha 0": (["calibrate", "{model}", "--data", "{calib}", "--alpha", "0"], 2, "alpha"),
    "alpha 1.5": (["calibrate", "{model}", "--data", "{calib}", "--alpha", "1.5"], 2, "alpha"),
    "delta 1": (["calibrate", "{model}", "--data", "{calib}", "--delta", "1"], 2, "delta"),
    "delta -0.1": (["calibrate", "{model}", "--data", "{calib}", "--delta", "-0.1"], 2, "delta"),
    "lac randomized": (["calibrate", "{model}", "--data", "{calib}", "--randomized"], 2, "randomized"),
    "too few points": (["calibrate", "{model}", "--data", "{calib}", "--alpha", "0.001"], 3, "at least 999"),
    "labels outside classes (calibrate)": (["calibrate", "{model}", "--data", "{bad_labels}"], 3, "labels"),
    "labels outside classes (certify)": (["certify", "{model}", "--cert", "{cert}", "--data", "{bad_labels}"], 3,
                                         "labels"),
    "wrong schema": (["certify", "{model}", "--cert", "{schema2}", "--data", "{test}"], 3, "schema_version"),
    "missing field": (["certify", "{model}", "--cert", "{nofield}", "--data", "{test}"], 3, "'guarantee.type'"),
    "another model (certify)": (["certify", "{changed}", "--cert", "{cert}", "--data", "{test}"], 4, "sha256"),
    "another model (predict)": (["predict", "{changed}", "--cert", "{cert}", "--data", "{test}"], 3,
                                "certified model"),
    "calibration data as test": (["certify", "{model}", "--cert", "{cert}", "--data", "{calib}"], 3,
                                 "calibration data"),
    "significance 2": (["certify", "{model}", "--cert", "{cert}", "--data", "{test}", "--significance", "2"], 2,
                       "significance"),
    "class names count": (["predict", "{model}", "--cert", "{cert}", "--data", "{test}", "--class-names",
                           "{names3}"], 3, "3 names"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs(cli, work, tmp_path, name):
    args, code, contains = BAD[name]
    cert = load_certificate(work["cert"])
    (tmp_path / "schema2.json").write_text(json.dumps({**cert, "schema_version": 99}))
    (tmp_path / "nofield.json").write_text(json.dumps({**cert, "guarantee": {
        k: v for k, v in cert["guarantee"].items() if k != "type"}}))
    (tmp_path / "names3.txt").write_text("a\nb\nc\n")
    paths = {**work, "schema2": tmp_path / "schema2.json", "nofield": tmp_path / "nofield.json",
             "names3": tmp_path / "names3.txt"}
    out = tmp_path / "out.json"  # an extension both calibrate and predict accept
    result = cli(*[a.format(**paths) for a in args], "-o" if args[0] != "certify" else "--quiet",
                 *([out] if args[0] != "certify" else []))
    assert_one_line_error(result, code, contains=contains)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.file")]  # no temporary leftovers


def test_calibrating_on_pruning_data_is_refused(cli, work, tmp_path):
    pruned = tmp_path / "pruned.safetensors"
    result = cli("prune", work["model"], "--method", "l1", "--data", work["score"], "--ratio", "0.25", "-o", pruned,
                 "--device", "cpu")
    assert result.code == 0, result
    out = tmp_path / "cert.json"
    refused = cli("calibrate", pruned, "--data", work["score"], "-o", out)
    assert_one_line_error(refused, 3, contains="bn-recalibration")
    assert "disjoint" in refused.stderr and not out.exists()
    assert cli("calibrate", pruned, "--data", work["calib"], "-o", out).code == 0
    verdict = cli("certify", pruned, "--cert", out, "--data", work["test"], "--json")
    assert verdict.code == 0, verdict
    again = cli("certify", pruned, "--cert", out, "--data", work["score"], "--json")
    assert_one_line_error(again, 3, contains="bn-recalibration")


def test_predict_writes_json_lines(cli, work, tmp_path, trained_digits):
    out = tmp_path / "sets.jsonl"
    result = cli("predict", work["model"], "--cert", work["cert"], "--data", work["test"], "-o", out)
    assert result.code == 0, result
    records = [json.loads(line) for line in out.read_text().splitlines()]
    x, y = load_npz(work["test"])
    assert len(records) == len(y) and [r["index"] for r in records] == list(range(len(y)))
    sets = ConformalClassifier(trained_digits["model"], work["cert"]).predict_sets(x)
    with torch.no_grad():
        top1 = trained_digits["model"](x).argmax(1)
    for r, s, t, label in zip(records, sets, top1.tolist(), y.tolist(), strict=True):
        assert set(r) == {"index", "top1", "set", "scores", "label"}
        assert r["set"] == s.nonzero().flatten().tolist() and r["top1"] == t and r["label"] == label
        assert len(r["scores"]) == 10 and all(r["scores"][c] <= load_certificate(work["cert"])["quantile"]
                                              for c in r["set"])
    stdout = cli("predict", work["model"], "--cert", work["cert"], "--data", work["test"])
    assert stdout.code == 0 and stdout.stdout == out.read_text()


@pytest.mark.parametrize("style", ["lines", "json"])
def test_predict_with_class_names(cli, work, tmp_path, style):
    names = [f"digit-{d}" for d in range(10)]
    path = tmp_path / "names.txt"
    path.write_text("\n".join(names) + "\n" if style == "lines" else json.dumps(names))
    result = cli("predict", work["model"], "--cert", work["cert"], "--data", work["test"], "--class-names", path)
    assert result.code == 0, result
    first = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(r["top1"] in names and r["label"] in names and set(r["set"]) <= set(names) for r in first)
    assert any(r["set"] == [r["top1"]] for r in first)


def test_report_shows_the_certificate(cli, work):
    table = cli("report", work["model"], "--cert", work["cert"], "--no-latency")
    assert table.code == 0, table
    assert "Conformal certificate" in table.stdout and "binds this model file" in table.stdout
    data = json.loads(cli("report", work["model"], "--cert", work["cert"], "--no-latency", "--format", "json").stdout)
    assert data["certificate"]["alpha"] == 0.1 and data["certificate"]["binds_model"] is True
    markdown = cli("report", work["changed"], "--cert", work["cert"], "--no-latency", "--format", "markdown").stdout
    assert "| binds this model file | NO (recalibrate) |" in markdown


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ci_gate_script(work, tmp_path):
    env = {**os.environ, "PRUNECP": f"{sys.executable} -m prunecp_cli"}
    good = subprocess.run(["bash", GATE, work["model"], work["cert"], work["test"], tmp_path / "ok.json", "--",
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["passed"] is True
    assert json.loads((tmp_path / "ok.json").read_text()) == json.loads(good.stdout)
    bad = subprocess.run(["bash", GATE, work["model"], work["lowered"], work["test"], tmp_path / "bad.json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 4, bad.stderr
    assert json.loads((tmp_path / "bad.json").read_text())["passed"] is False
    assert "improbably low" in bad.stderr
    usage = subprocess.run(["bash", GATE], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "Usage: cli/ci-gate.sh MODEL CERT TEST_DATA" in usage.stderr
