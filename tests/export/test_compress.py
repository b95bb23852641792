"""``prunecp compress`` on the digits: stratified reproducible splits, and the five separate commands reproduce it."""

from __future__ import annotations

import json
import shlex
import shutil

import numpy as np
import pytest
import torch

from prunecp_cli.io import exported as ex
from prunecp_cli.io.files import sha256_file
from prunecp_cli.pipeline.compress import stratified_split


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, trained_digits, digits_arrays):
    from typer.testing import CliRunner

    from prunecp_cli.app import app

    folder = tmp_path_factory.mktemp("compress")
    x, y = digits_arrays
    np.savez(folder / "all.npz", x=x, y=y)
    out = folder / "out"
    result = CliRunner().invoke(app, ["compress", str(trained_digits["safetensors"]), "--data", str(folder / "all.npz"),
                                      "--target-flops", "0.6", "--format", "pt2", "-o", str(out), "--seed", "3"])
    assert result.exit_code == 0, result.stderr
    return {"folder": folder, "out": out, "y": y}


def test_parts_are_disjoint_stratified_and_recorded(compressed):
    record = json.loads((compressed["out"] / "splits.json").read_text())
    parts = {name: np.array(p["indices"]) for name, p in record["parts"].items()}
    assert sum(len(v) for v in parts.values()) == len(compressed["y"]) == record["source"]["n"]
    assert len(np.unique(np.concatenate(list(parts.values())))) == len(compressed["y"])  # disjoint, complete
    y = compressed["y"]
    for name, rows in parts.items():
        assert record["parts"][name]["sha256"] == sha256_file(compressed["out"] / f"{name}.npz")
        share = record["fractions"][name]
        for c in range(10):  # each class split in the part's proportion (largest remainders: within one row)
            assert abs((y[rows] == c).sum() - share * (y == c).sum()) < 1.0 + 1e-9
        with np.load(compressed["out"] / f"{name}.npz") as f:
            assert np.array_equal(f["y"], y[rows])
    again = stratified_split(y, tuple(record["fractions"].values()), seed=3)
    assert all(np.array_equal(a, parts[n]) for a, n in zip(again, parts, strict=True))
    assert not all(np.array_equal(a, parts[n]) for a, n in zip(stratified_split(y, (0.5, 0.25, 0.25), seed=4),
                                                                parts, strict=True))


def _model(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118 - safe_open has no iter


def test_the_separate_commands_reproduce_every_file(compressed, cli):
    out, manual = compressed["out"], compressed["folder"] / "manual"
    manual.mkdir()
    for name in ("score.npz", "calib.npz", "test.npz"):
        shutil.copy(out / name, manual / name)
    lines = [line for line in (out / "commands.sh").read_text().splitlines() if line.startswith("prunecp ")]
    assert [shlex.split(line)[1] for line in lines] == ["score", "prune", "calibrate", "certify", "export"]
    outputs = {}
    for line in lines:
        result = cli(*shlex.split(line)[1:], cwd=manual)
        assert result.code == 0, result
        outputs[shlex.split(line)[1]] = result.stdout
    assert json.loads((out / "importance.json").read_text()) == json.loads((manual / "importance.json").read_text())
    (wa, ma), (wb, mb) = (_model(d / "pruned.safetensors") for d in (out, manual))
    assert ma.pop("prunecp.created_at") and mb.pop("prunecp.created_at") and ma == mb  # timestamps aside
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the model file's created_at changes its sha256, which the certificate, verdict and export name: set aside
    ours, theirs = (json.loads((d / "certificate.json").read_text()) for d in (out, manual))
    for cert in (ours, theirs):
        assert cert.pop("created_at") and cert["model"].pop("sha256")
    assert ours == theirs
    verdict, again = json.loads((out / "verdict.json").read_text()), json.loads(outputs["certify"])
    for key in ("passed", "coverage", "covered", "n", "p_value", "mean_set_size", "set_size_histogram",
                "per_class_coverage", "data"):
        assert verdict[key] == again[key], key
    a, b = (ex.read_export(d / "pruned.pt2")[0] for d in (out, manual))
    assert a.content_sha256 == b.content_sha256 and a.intact and b.intact
    for record in (a.record, b.record):
        assert record.pop("certificate") and record["source"].pop("sha256")
    assert a.record == b.record
    card = (out / "MODEL_CARD.md").read_text()
    assert f"| q̂ | {ours['quantile']:.6g} |" in card and (out / "MODEL_CARD_channels.png").exists()
