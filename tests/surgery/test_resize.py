"""Fast reload: a pruned file records its widths and rebuilds without replaying the dependency graph."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import prunecp_cli
from prunecp_cli import api
from prunecp_cli.errors import CheckpointError, PlanError
from prunecp_cli.surgery import plan as plan_module
from prunecp_cli.surgery.resize import record_problem, resize_to, width_record


@pytest.fixture(scope="module")
def pruned_file(tmp_path_factory, trained_digits, digits_files):
    out = tmp_path_factory.mktemp("resize") / "pruned.safetensors"
    api.prune(api.ModelSource(trained_digits["safetensors"]), out, method="l1", data=digits_files["score"],
              pruning=api.PruneOptions(target_flops=0.5), run=api.RunOptions(device="cpu"))
    return out


def _metadata(path):
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata())


def _rewrite(path, out, **plan_changes):
    meta = _metadata(path)
    plan = json.loads(meta["prunecp.plan"])
    plan.update(plan_changes)
    plan = {k: v for k, v in plan.items() if v is not None}
    meta["prunecp.plan"] = json.dumps(plan)
    save_file(load_file(str(path)), str(out), metadata=meta)
    return out


def test_pruned_file_records_widths_and_reloads_without_replay(pruned_file, monkeypatch, digits_files):
    plan = json.loads(_metadata(pruned_file)["prunecp.plan"])
    assert plan["modules"], "the pruned digits CNN must carry a width record"
    assert any("out_channels" in attrs for attrs in plan["modules"].values())
    slow = prunecp_cli.load_model(_rewrite(pruned_file, pruned_file.with_name("replay.safetensors"), modules=None))

    def no_replay(*args, **kwargs):
        raise AssertionError("the dependency graph was replayed")

    monkeypatch.setattr(plan_module, "replay_history", no_replay)
    fast = prunecp_cli.load_model(pruned_file)
    x = torch.from_numpy(__import__("numpy").load(digits_files["test"])["x"][:64]).float()
    with torch.no_grad():
        assert torch.equal(fast(x), slow(x))  # the same model, bit for bit
    saved = load_file(str(pruned_file))
    assert {k: v.shape for k, v in fast.state_dict().items()} == {k: v.shape for k, v in saved.items()}


def test_width_record_names_only_changed_integer_attributes():
    dense = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 4, 1))
    pruned = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5), torch.nn.Conv2d(5, 4, 1))
    assert width_record(pruned, dense) == {"0": {"out_channels": 5}, "1": {"num_features": 5},
                                           "2": {"in_channels": 5}}
    fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 4, 1))
    resize_to(fresh, width_record(pruned, dense), pruned.state_dict())
    fresh.load_state_dict(pruned.state_dict())
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(fresh.eval()(x), pruned.eval()(x))
    assert width_record(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), dense) is None  # structure differs


@pytest.mark.parametrize("modules, needle", [
    ({"nope.conv": {"out_channels": 3}}, "not a layer"),
    ({"features.0.0": {"out_channels": 10_000}}, "cannot take"),
    ({"features.0.0": {"_private": 1}}, "public name"),
    ({"features.0.0": {"out_channels": -1}}, "not a width"),
    ({"features.0.0": {"out_channels": True}}, "not a width"),
    ([1, 2], "not a JSON object"),
])
def test_damaged_width_record_is_a_one_line_error(pruned_file, tmp_path, modules, needle):
    bad = _rewrite(pruned_file, tmp_path / "bad.safetensors", modules=modules)
    with pytest.raises((CheckpointError, PlanError), match=needle):
        prunecp_cli.load_model(bad)


def test_record_problem_accepts_lists_for_shapes():
    assert record_problem({"norm": {"normalized_shape": [24]}}) is None
    assert "not a width" in record_problem({"norm": {"normalized_shape": [24, "x"]}})
