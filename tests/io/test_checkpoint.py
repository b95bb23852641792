"""Checkpoint reading (no pickle), prefix handling, mismatch messages, and prunecp model files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from prunecp_cli.errors import CheckpointError, UsageError
from prunecp_cli.io.checkpoint import ModelMeta, load_model, open_model, read_state_dict, save_model
from prunecp_cli.models import digits_cnn

ARCH = "prunecp_cli.models:digits_cnn"


@pytest.fixture
def net():
    torch.manual_seed(0)
    return digits_cnn().eval()


def _same(a, b):
    return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "model_state_dict", "ddp", "lightning"])
def test_pt_variants_load(tmp_path, net, wrap):
    state = net.state_dict()
    if wrap == "ddp":
        obj = {f"module.{k}": v for k, v in state.items()}
    elif wrap == "lightning":
        obj = {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}
    elif wrap == "plain":
        obj = state
    else:
        obj = {wrap: state, "optimizer": {"lr": 0.1}}
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    assert _same(load_model(path, ARCH), net)


def test_safetensors_dense_load(tmp_path, net):
    path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    assert _same(load_model(path, ARCH), net)


def test_pickled_module_is_refused(tmp_path, net):
    path = tmp_path / "whole.pt"
    torch.save(net, path)  # a pickled nn.Module, which weights_only loading must refuse
    with pytest.raises(CheckpointError, match="weights-only"):
        read_state_dict(path)


def test_mismatch_names_first_missing_unexpected_misshaped(tmp_path, net):
    state = dict(net.state_dict())
    state.pop("classifier.bias")
    state["extra.weight"] = torch.zeros(1)
    state["features.0.0.weight"] = torch.zeros(3, 1, 3, 3)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path, ARCH)
    message = str(info.value)
    assert "1 missing (first: classifier.bias)" in message
    assert "1 unexpected (first: extra.weight)" in message
    assert "features.0.0.weight is [3, 1, 3, 3] in the file, [16, 1, 3, 3] in the model" in message
    assert "\n" not in message


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="not a readable .safetensors"):
        read_state_dict(path)


def test_dense_checkpoint_without_arch_is_usage_error(tmp_path, net):
    path = tmp_path / "dense.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(UsageError, match="--arch"):
        load_model(path)


def test_prunecp_file_round_trip_and_metadata(tmp_path, net):
    path = tmp_path / "m.safetensors"
    meta = ModelMeta(arch=ARCH, arch_kwargs={"width": 16}, input_shape=[1, 8, 8], extra={"method": "l1"})
    digest = save_model(net, path, meta)
    loaded = open_model(path)
    assert loaded.is_prunecp_file and loaded.sha256 == digest
    assert loaded.meta.arch == ARCH and loaded.meta.arch_kwargs == {"width": 16}
    assert loaded.meta.extra["method"] == "l1"
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(loaded.model(x), net(x))


def test_save_is_atomic_on_failure(tmp_path, net):
    path = tmp_path / "m.pt"
    with pytest.raises(UsageError, match=".safetensors"):
        save_model(net, path, ModelMeta(arch=ARCH, arch_kwargs={}, input_shape=[1, 8, 8]))
    assert list(tmp_path.iterdir()) == []


def test_unknown_arch(tmp_path, net):
    path = tmp_path / "dense.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(UsageError, match="no classification model"):
        load_model(path, "torchvision:resnet1234")
    with pytest.raises(UsageError, match="cannot import"):
        load_model(path, "no_such_package.models:make")
