"""Guarantees stay with the model they were proven for: Learn-then-Test records never outlive their weights."""

from __future__ import annotations

import json

import pytest
import torch
from testsupport import assert_one_line_error

from prunecp_cli.io.checkpoint import ModelMeta, open_model, save_model
from prunecp_cli.io.digest import weights_sha256

GRID = ["--grid", "0.05,0.1,0.15"]


@pytest.fixture(scope="module")
def set_size_model(tmp_path_factory, trained_digits, digits_files):
    """A set-size Learn-then-Test model: sets of LAC at alpha 0.1 from a certificate on the test split."""
    from typer.testing import CliRunner

    from prunecp_cli.app import app

    folder = tmp_path_factory.mktemp("provenance")
    runner = CliRunner()
    cert = folder / "dense-cert.json"
    result = runner.invoke(app, ["calibrate", str(trained_digits["safetensors"]), "--data", str(digits_files["test"]),
                                 "--alpha", "0.1", "--device", "cpu", "-o", str(cert)])
    assert result.exit_code == 0, result.stderr
    out = folder / "pruned.safetensors"
    result = runner.invoke(app, ["prune", str(trained_digits["safetensors"]), "--method", "l1", "--data",
                                 str(digits_files["score"]), "--risk-data", str(digits_files["calib"]), "--risk",
                                 "set-size", "--max-set-size", "3", "--cert", str(cert), "--delta", "0.1",
                                 "--device", "cpu", *GRID, "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    return out


def test_the_record_is_bound_to_the_saved_weights(set_size_model):
    loaded = open_model(set_size_model)
    assert loaded.meta.extra["risk_control"]["weights_sha256"] == weights_sha256(loaded.model)


def test_re_pruning_drops_the_record(tmp_path, cli, set_size_model, digits_files):
    again = tmp_path / "again.safetensors"
    result = cli("prune", set_size_model, "--method", "l1", "--ratio", "0.1", "--data", digits_files["score"],
                 "--device", "cpu", "-o", again)
    assert result.code == 0, result
    assert "risk_control" not in open_model(again).meta.extra
    cert = tmp_path / "cert.json"
    assert cli("calibrate", again, "--data", digits_files["test"], "--device", "cpu", "-o", cert).code == 0
    assert "risk_control" not in json.loads(cert.read_text())
    report = cli("report", again, "--no-latency", "--format", "markdown")
    assert report.code == 0 and "Learn-then-Test" not in report.stdout


def test_a_record_for_other_weights_is_not_copied(tmp_path, cli, set_size_model, digits_files):
    loaded = open_model(set_size_model)
    with torch.no_grad():
        next(loaded.model.parameters()).mul_(1.01)  # the model changed after the test
    meta = ModelMeta(loaded.meta.arch, loaded.meta.arch_kwargs, loaded.meta.input_shape, loaded.meta.plan,
                     loaded.meta.extra)
    changed = tmp_path / "changed.safetensors"
    save_model(loaded.model, changed, meta)
    cert = tmp_path / "cert.json"
    result = cli("calibrate", changed, "--data", digits_files["test"], "--device", "cpu", "-o", cert)
    assert result.code == 0, result
    assert "not made for these weights" in result.stderr
    assert "risk_control" not in json.loads(cert.read_text())
    report = cli("report", changed, "--no-latency", "--format", "markdown")
    assert "no risk guarantee applies" in report.stdout and "with probability at least" not in report.stdout


def test_set_size_record_only_for_the_sets_it_tested(tmp_path, cli, set_size_model, digits_files):
    same, other = tmp_path / "same.json", tmp_path / "other.json"
    ok = cli("calibrate", set_size_model, "--data", digits_files["test"], "--alpha", "0.1", "--device", "cpu",
             "-o", same)
    assert ok.code == 0, ok
    control = json.loads(same.read_text())["risk_control"]
    assert control["risk"] == "set-size" and control["threshold"]["uses_quantile"] is True
    level = next(r for r in control["levels"] if r["level"] == control["level"])
    assert control["threshold"]["quantile_in_test"] == level["qhat"]
    assert "not this certificate's q-hat" in control["threshold"]["about"]
    changed = cli("calibrate", set_size_model, "--data", digits_files["test"], "--alpha", "0.2", "--device", "cpu",
                  "-o", other)
    assert changed.code == 0, changed
    assert "risk_control" not in json.loads(other.read_text())
    assert "alpha 0.1" in changed.stderr and "alpha 0.2" in changed.stderr
    aps = cli("calibrate", set_size_model, "--data", digits_files["test"], "--alpha", "0.1", "--nonconformity",
              "aps", "--device", "cpu", "-o", other)
    assert aps.code == 0 and "risk_control" not in json.loads(other.read_text())


def test_set_size_cert_calibrated_on_the_risk_data_is_refused(tmp_path, cli, trained_digits, digits_files):
    cert = tmp_path / "on-risk.json"
    assert cli("calibrate", trained_digits["safetensors"], "--data", digits_files["calib"], "--device", "cpu",
               "-o", cert).code == 0
    out = tmp_path / "pruned.safetensors"
    result = cli("prune", trained_digits["safetensors"], "--method", "l1", "--data", digits_files["score"],
                 "--risk-data", digits_files["calib"], "--risk", "set-size", "--max-set-size", "3", "--cert", cert,
                 "--device", "cpu", *GRID, "-o", out)
    assert_one_line_error(result, 3, contains="calibrated on --risk-data")
    assert not out.exists()
