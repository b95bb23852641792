"""torchvision models that used to fail score + prune --target-flops 0.5 + reload (issue 12).

Each runs the public API end to end on random weights and random 3×32×32 images: l1 scores,
pruning to half the FLOPs (within [0.45, 0.55]), a reload with ``load_model`` that must rebuild
exactly the saved pruned model, and a forward pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file

import prunecp_cli
from prunecp_cli import api


def _prune_zoo_model(tmp_path, name: str, *, size: int = 32, n: int = 64):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.standard_normal((n, 3, size, size)).astype(np.float32), y=rng.integers(0, 10, n))
    dense = tmp_path / "m.pt"
    torch.save(torchvision.models.get_model(name, weights=None, num_classes=10).state_dict(), dense)
    model = api.ModelSource(dense, arch=f"torchvision:{name}", arch_kwargs={"num_classes": 10})
    run = api.RunOptions(device="cpu")
    scores = tmp_path / "s.json"
    api.score(model, data, method="l1", output=scores, run=run)
    out = tmp_path / "p.safetensors"
    result = api.prune(model, out, scores=scores, data=data, pruning=api.PruneOptions(target_flops=0.5), run=run)
    assert 0.45 <= result.flops_ratio <= 0.55, result.flops_ratio

    reloaded = prunecp_cli.load_model(out).eval()
    saved = load_file(str(out))
    state = reloaded.state_dict()
    assert saved and set(saved) <= set(state)
    for key, tensor in saved.items():  # the reload is the pruned model, bit for bit
        assert state[key].shape == tensor.shape, key
        assert torch.equal(state[key], tensor), key
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        first, second = reloaded(x), prunecp_cli.load_model(out).eval()(x)
    assert first.shape == (2, 10) and torch.isfinite(first).all()
    assert torch.equal(first, second)
    return result


@pytest.mark.parametrize("name", ["convnext_tiny", "regnet_y_400mf", "shufflenet_v2_x0_5"])
def test_zoo_model_prunes_to_half_flops_and_reloads(tmp_path, name):
    _prune_zoo_model(tmp_path, name)
