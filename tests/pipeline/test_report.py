"""The ``report`` step (``api.report``): per-layer channels, parameters and FLOPs against the dense baseline, as data."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from prunecp_cli import api
from prunecp_cli.io.checkpoint import open_model
from prunecp_cli.measure import count_flops, count_params

CPU = api.RunOptions(device="cpu")
LAYERS = {"features.0.0": 16, "features.1.0": 32, "features.3.0": 32, "classifier": 10}


def _widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_features if isinstance(m, nn.Linear) else m.out_channels for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.fixture(scope="module")
def pruned(trained_digits, digits_files, tmp_path_factory):
    """The trained digits model pruned by L1 to half its channels, and its certificate."""
    folder = tmp_path_factory.mktemp("report")
    path = folder / "pruned.safetensors"
    api.prune(trained_digits["safetensors"], path, method="l1", data=digits_files["score"],
              pruning=api.PruneOptions(ratio=0.5), run=CPU)
    cert = folder / "certificate.json"
    api.calibrate(path, digits_files["calib"], alpha=0.1, output=cert, run=CPU)
    return path, cert


def test_pruned_file_against_its_unpruned_architecture(pruned, trained_digits):
    path, _ = pruned
    data = api.report(path, latency=False, run=CPU)
    small, dense = open_model(path).model, trained_digits["model"]
    assert data.baseline == "unpruned architecture" and data.input_shape == [1, 8, 8]
    after = _widths(small)
    assert after != LAYERS and after["classifier"] == 10
    assert {r.name: (r.kind, r.channels_before, r.channels_after) for r in data.rows} == {
        name: ("Linear" if name == "classifier" else "Conv2d", LAYERS[name], after[name]) for name in LAYERS}
    example = torch.zeros(1, 1, 8, 8)
    assert data.flops == {"before": count_flops(dense, example), "after": count_flops(small, example)}
    assert data.params == {"before": count_params(dense), "after": count_params(small)}
    modules = dict(small.named_modules())
    for row in data.rows:
        assert row.params_after == sum(p.numel() for p in modules[row.name].parameters(recurse=False))
        assert 0 < row.flops_after <= row.flops_before and row.params_after <= row.params_before
    assert data.latency == {"before": None, "after": None}
    assert data.metadata["method"] == "l1" and data.certificate is None
    extra = open_model(path).meta.extra
    assert (data.flops["before"], data.flops["after"]) == (extra["flops_before"], extra["flops_after"])


def test_json_form_holds_the_reductions(pruned):
    path, _ = pruned
    data = api.report(path, latency=False, run=CPU)
    out = json.loads(json.dumps(data.to_json()))  # JSON-serialisable as it is
    assert out["reduction"]["flops"] == pytest.approx(1 - data.flops["after"] / data.flops["before"])
    assert out["reduction"]["params"] == pytest.approx(1 - data.params["after"] / data.params["before"])
    assert out["reduction"]["latency"] is None and out["flops_unit"] == data.flops_unit
    assert [row["name"] for row in out["rows"]] == [row.name for row in data.rows]


def test_dense_file_has_no_baseline(trained_digits):
    data = api.report(trained_digits["safetensors"], latency=False, run=CPU)
    assert data.baseline is None and data.flops["before"] is None and data.params["before"] is None
    assert all(r.channels_before is None and r.flops_before is None for r in data.rows)
    assert {r.name: r.channels_after for r in data.rows} == LAYERS
    assert data.to_json()["reduction"] == {"params": None, "flops": None, "latency": None}


def test_explicit_baseline_and_measured_latency(pruned, trained_digits):
    path, _ = pruned
    data = api.report(path, baseline=trained_digits["pt"], repeats=3, run=CPU)
    implicit = api.report(path, latency=False, run=CPU)
    assert data.baseline == str(trained_digits["pt"]) and data.flops == implicit.flops and data.rows == implicit.rows
    for side in ("before", "after"):
        assert data.latency[side].median_ms > 0 and data.latency[side].repeats >= 3  # at least 3, more to fill min time
        assert data.latency[side].batch_size == 32


def test_certificate_is_summarised_with_whether_it_binds_the_model(pruned, trained_digits):
    path, cert = pruned
    bound = api.report(path, cert=cert, latency=False, run=CPU).certificate
    assert bound["alpha"] == 0.1 and bound["binds_model"] is True
    other = api.report(trained_digits["safetensors"], cert=cert, latency=False, run=CPU).certificate
    assert other["binds_model"] is False
