"""Outputs never clobber inputs, are checked before torch loads, respect the umask; result lines reach logs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from testsupport import assert_one_line_error


def _copy_inputs(tmp_path, trained_digits, digits_files):
    model = tmp_path / "model.safetensors"
    shutil.copy(trained_digits["safetensors"], model)
    data = {name: tmp_path / f"{name}.npz" for name in ("score", "calib", "test")}
    for name, path in data.items():
        shutil.copy(digits_files[name], path)
    return model, data


@pytest.mark.parametrize("case", ["calibrate-onto-data", "calibrate-onto-model", "prune-onto-itself",
                                  "score-onto-data", "prune-onto-scores", "predict-onto-cert"])
def test_output_onto_an_input_is_refused_and_the_input_is_untouched(tmp_path, cli, trained_digits, digits_files,
                                                                     case):
    model, data = _copy_inputs(tmp_path, trained_digits, digits_files)
    scores = tmp_path / "importance.json"
    scores.write_text("{}")
    cert = tmp_path / "certificate.json"
    cert.write_text("{}")
    args = {
        "calibrate-onto-data": ["calibrate", model, "--data", data["calib"], "-o", data["calib"]],
        "calibrate-onto-model": ["calibrate", model, "--data", data["calib"], "-o", tmp_path / "." / model.name],
        "prune-onto-itself": ["prune", model, "--method", "l1", "--ratio", "0.2", "-o", model],
        "score-onto-data": ["score", model, "--data", data["score"], "-o", data["score"]],
        "prune-onto-scores": ["prune", model, "--scores", scores, "--ratio", "0.2", "-o", scores],
        "predict-onto-cert": ["predict", model, "--cert", cert, "--data", data["test"], "-o", cert],
    }[case]
    target = Path(args[-1])
    before = target.read_bytes()
    result = cli(*args)
    assert_one_line_error(result, 2, contains="would destroy that input")
    assert target.read_bytes() == before


def test_output_through_a_symlink_to_an_input_is_refused(tmp_path, cli, trained_digits, digits_files):
    model, data = _copy_inputs(tmp_path, trained_digits, digits_files)
    link = tmp_path / "cert.json"
    link.symlink_to(data["calib"])
    before = data["calib"].read_bytes()
    result = cli("calibrate", model, "--data", data["calib"], "-o", link)
    assert_one_line_error(result, 2, contains="would destroy that input")
    assert data["calib"].read_bytes() == before


@pytest.mark.parametrize(("command", "out", "wanted"), [
    (["calibrate", "{model}", "--data", "{calib}"], "cert.npz", ".json"),
    (["score", "{model}", "--data", "{score}"], "scores.txt", ".json"),
    (["prune", "{model}", "--method", "l1", "--ratio", "0.2"], "pruned.pt", ".safetensors"),
    (["predict", "{model}", "--cert", "{cert}", "--data", "{test}"], "sets.csv", ".jsonl"),
    (["report", "{model}", "--format", "json"], "report.md", ".json"),
])
def test_output_with_the_wrong_extension_is_a_usage_error(tmp_path, cli, trained_digits, digits_files, command,
                                                          out, wanted):
    model, data = _copy_inputs(tmp_path, trained_digits, digits_files)
    names = {"model": model, "cert": tmp_path / "c.json", **{k: str(v) for k, v in data.items()}}
    result = cli(*[str(a).format(**names) for a in command], "-o", tmp_path / out)
    assert_one_line_error(result, 2, contains=wanted)
    assert not (tmp_path / out).exists()


@pytest.fixture
def no_torch(tmp_path):
    """An environment in which importing torch (or numpy) fails loudly."""
    fake = tmp_path / "fake-site"
    for name in ("torch", "numpy"):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(f"raise ImportError('{name} was imported')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(fake) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.parametrize(("args", "contains"), [
    (["calibrate", "m.safetensors", "--data", "calib.npz", "--alpha", "1.5"], "--alpha 1.5"),
    (["calibrate", "m.safetensors", "--data", "calib.npz", "--delta", "0"], "--delta"),
    (["calibrate", "m.safetensors", "--data", "calib.npz", "-o", "calib.npz"], "would destroy"),
    (["calibrate", "m.safetensors", "--data", "calib.npz", "-o", "cert.txt"], ".json"),
    (["prune", "m.safetensors", "--method", "l1", "--ratio", "1.2"], "--ratio"),
    (["prune", "m.safetensors", "--method", "l1", "--ratio", "0.2", "--target-flops", "0.5"], "exactly one of --ratio"),
    (["prune", "m.safetensors", "--method", "l1"], "exactly one of --ratio and --target-flops"),
    (["prune", "m.safetensors", "--method", "l1", "--target-flops", "0.5", "-o", "m.safetensors"], "would destroy"),
    (["prune", "m.safetensors", "--method", "l1", "--ratio", "0.2", "--arch-kwargs", "{bad"], "--arch-kwargs"),
    (["score", "m.safetensors", "--input-shape", "3,-1,8"], "--input-shape"),
    (["score", "m.safetensors", "--input-shape", "3,100000,100000"], "limit of 4,194,304"),
    (["report", "m.safetensors", "--input-shape", "1,1,3,8,8"], "at most 4 sizes"),
    (["certify", "m.safetensors", "--cert", "c.json", "--data", "t.npz", "--significance", "2"], "--significance"),
    (["report", "m.safetensors", "--format", "markdown", "-o", "r.json"], ".md"),
    (["calibrate", "m.safetensors", "--data", "calib.npz", "--mean", "0.5,abc"], "--mean"),
    (["calibrate", "m.safetensors", "--data", "calib.npz", "--std", "0.5,0"], "--std"),
])
def test_checks_that_need_no_model_run_before_torch_is_imported(tmp_path, no_torch, args, contains):
    run = subprocess.run([sys.executable, "-m", "prunecp_cli", *args], cwd=tmp_path, env=no_torch,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunecp: error:") and contains in lines[0], run.stderr


def test_outputs_get_the_permissions_open_would_give(tmp_path, cli, trained_digits, digits_files):
    model, data = _copy_inputs(tmp_path, trained_digits, digits_files)
    old = os.umask(0o027)
    try:
        cert = tmp_path / "certificate.json"
        assert cli("calibrate", model, "--data", data["calib"], "--device", "cpu", "-o", cert).code == 0
        scores = tmp_path / "importance.json"
        assert cli("score", model, "--method", "l1", "--input-shape", "1,8,8", "-o", scores).code == 0
        pruned = tmp_path / "pruned.safetensors"
        assert cli("prune", model, "--scores", scores, "--ratio", "0.2", "--device", "cpu", "-o", pruned).code == 0
        sets = tmp_path / "sets.jsonl"
        assert cli("predict", model, "--cert", cert, "--data", data["test"], "--device", "cpu", "-o", sets).code == 0
    finally:
        os.umask(old)
    for path in (cert, scores, pruned, sets):
        assert path.stat().st_mode & 0o777 == 0o640, path


def _run_logged(tmp_path, *args):
    """Run prunecp in a subprocess with stdout and stderr redirected to files, as a CI step does."""
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with open(out, "w") as o, open(err, "w") as e:
        code = subprocess.run([sys.executable, "-m", "prunecp_cli", *map(str, args)], stdout=o, stderr=e,
                              timeout=300).returncode
    return code, out.read_text(), err.read_text()


def test_result_lines_reach_stdout_when_it_is_a_file(tmp_path, trained_digits, digits_files):
    model, data = _copy_inputs(tmp_path, trained_digits, digits_files)
    pruned, cert = tmp_path / "pruned.safetensors", tmp_path / "certificate.json"
    code, out, err = _run_logged(tmp_path, "prune", model, "--method", "l1", "--data", data["score"],
                                 "--target-flops", "0.5", "--device", "cpu", "-o", pruned)
    assert code == 0, err
    assert f"wrote {pruned}" in out and "FLOPs" in out
    code, out, err = _run_logged(tmp_path, "calibrate", pruned, "--data", data["calib"], "--device", "cpu",
                                 "-o", cert)
    assert code == 0, err
    assert f"wrote {cert}" in out and "q̂ =" in out
    assert "\x1b[" not in out + err  # no progress bars or colours in a log
    code, out, err = _run_logged(tmp_path, "calibrate", pruned, "--data", data["calib"], "--device", "cpu",
                                 "-o", cert, "--quiet")
    assert code == 0 and out == "" and err == ""


def test_machine_readable_stdout_stays_parseable(tmp_path, trained_digits, digits_files):
    model, data = _copy_inputs(tmp_path, trained_digits, digits_files)
    cert = tmp_path / "certificate.json"
    assert _run_logged(tmp_path, "calibrate", model, "--data", data["calib"], "--device", "cpu", "-o", cert)[0] == 0
    code, out, err = _run_logged(tmp_path, "certify", model, "--cert", cert, "--data", data["test"], "--device",
                                 "cpu", "--json")
    assert code in (0, 4), err
    assert json.loads(out)["n"] == len(__import__("numpy").load(data["test"])["y"])
    code, out, err = _run_logged(tmp_path, "predict", model, "--cert", cert, "--data", data["test"], "--device",
                                 "cpu")
    assert code == 0, err
    assert all(json.loads(line)["set"] is not None for line in out.splitlines())
