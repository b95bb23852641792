"""timm models: ``--arch timm:NAME`` and hub-style folders (config.json beside model.safetensors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

import prunecp_cli  # noqa: E402
from prunecp_cli import api  # noqa: E402
from prunecp_cli.errors import CheckpointError, UsageError  # noqa: E402
from prunecp_cli.io.arch import build_model, check_file_arch  # noqa: E402

NAME = "lcnet_050"  # small, with depthwise and squeeze-excitation blocks


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False, num_classes=10)
    (folder / "hub").mkdir()
    (folder / "hub" / "config.json").write_text(json.dumps({"architecture": NAME, "num_classes": 10,
                                                            "model_args": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "hub" / "model.safetensors"))
    rng = np.random.default_rng(0)
    np.savez(folder / "data.npz", x=rng.standard_normal((48, 3, 32, 32)).astype(np.float32), y=rng.integers(0, 10, 48))
    return folder, model


def test_arch_timm_builds_without_weights_and_is_trusted():
    model = build_model(f"timm:{NAME}", {"num_classes": 7})
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 7)
    check_file_arch(f"timm:{NAME}", path="m.safetensors")  # a file may name it without --trust-arch


@pytest.mark.parametrize("spec, kwargs, error, needle", [
    ("timm:not_a_model_xyz", {}, UsageError, "timm has no model"),
    (f"timm:{NAME}", {"pretrained": True}, UsageError, "never loads pretrained"),
    (f"timm:{NAME}", {"checkpoint_path": "/etc/passwd"}, UsageError, "never loads pretrained"),
])
def test_bad_timm_specs_are_refused(spec, kwargs, error, needle):
    with pytest.raises(error, match=needle):
        build_model(spec, kwargs)


def test_hub_folder_scores_prunes_and_reloads_without_arch(hub, cli):
    folder, dense = hub
    scores, out = folder / "s.json", folder / "p.safetensors"
    assert cli("score", folder / "hub", "--method", "l1", "--data", folder / "data.npz", "-o", scores).code == 0
    result = cli("prune", folder / "hub", "--scores", scores, "--data", folder / "data.npz", "--target-flops", "0.5",
                 "-o", out)
    assert result.code == 0, result.stderr
    reloaded = prunecp_cli.load_model(out)  # trusted: no --arch, no --trust-arch
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert reloaded(x).shape == (2, 10)
    loaded = api.load_model(folder / "hub")  # the folder itself loads like a checkpoint
    with torch.no_grad():
        assert torch.equal(loaded(x), dense.eval()(x))


@pytest.mark.parametrize("config, needle", [
    (None, "without config.json"),
    ("{not json", "not valid JSON"),
    (json.dumps({"architecture": "os.system"}), "must name a timm model"),
    (json.dumps({"architecture": NAME, "num_classes": -3}), "positive integer"),
    (json.dumps({"architecture": NAME, "model_args": [1]}), "must be a JSON object"),
])
def test_malformed_hub_folder_is_a_one_line_error(tmp_path, config, needle):
    folder = tmp_path / "hub"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=needle):
        api.load_model(folder)


def test_hub_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architecture": NAME}))
    with pytest.raises(CheckpointError, match="no weights"):
        api.load_model(tmp_path)
