"""``prunecp export`` on a pruned torchvision resnet18 (weights=None) at 3×32×32: both formats, certify the export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunecp_cli import api
from prunecp_cli.io import exported as ex


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """A resnet18 pruned to half its channels, calibrated, with an ONNX (dynamic batch) and a .pt2 export."""
    import torchvision

    folder = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    dense = folder / "dense.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), dense)
    source = api.ModelSource(dense, arch="torchvision:resnet18", arch_kwargs={"num_classes": 10},
                             input_shape=[3, 32, 32])
    pruned = folder / "pruned.safetensors"
    api.prune(source, pruned, method="l1", pruning=api.PruneOptions(ratio=0.5))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((260, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():  # labels the model mostly gets right, as a trained model would
        y = api.load_model(pruned)(torch.from_numpy(x)).argmax(1).numpy()
    noisy = rng.random(len(y)) < 0.2
    y[noisy] = rng.integers(0, 10, int(noisy.sum()))
    parts = {}
    for name, rows in (("calib", slice(0, 120)), ("test", slice(120, 200)), ("check", slice(200, 260))):
        parts[name] = folder / f"{name}.npz"
        np.savez(parts[name], x=x[rows], y=y[rows])
    cert = folder / "cert.json"
    api.calibrate(pruned, parts["calib"], alpha=0.2, output=cert, run=api.RunOptions(device="cpu"))
    results = {"onnx": api.export(pruned, folder / "pruned.onnx", cert=cert, format="onnx", data=parts["check"],
                                  dynamic_batch=True),
               "pt2": api.export(pruned, folder / "pruned.pt2", cert=cert, format="pt2", data=parts["check"])}
    return {"pruned": pruned, "cert": cert, "results": results, **parts}


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_resnet18_exports_agree(resnet, fmt):
    check = resnet["results"][fmt]["verification"]
    assert check["n"] == 60 and check["disagreements"] == 0 and check["set_agreement"] == 1.0
    assert 0 <= check["max_abs_logit_diff"] < 1e-3
    loaded = ex.open_exported(resnet["results"][fmt]["output"])
    assert loaded.meta.input_shape == [3, 32, 32]
    assert loaded.model.fixed_batch == (None if fmt == "onnx" else 1)
    assert loaded.model(torch.zeros(5, 3, 32, 32)).shape == (5, 10)  # dynamic, or run in chunks of 1


def test_certify_resnet18_onnx_matches_the_safetensors_verdict(resnet):
    args = {"cert": resnet["cert"], "run": api.RunOptions(device="cpu")}
    export = api.certify(resnet["results"]["onnx"]["output"], resnet["test"], **args)
    source = api.certify(resnet["pruned"], resnet["test"], **args)
    assert export["passed"] == source["passed"] and export["covered"] == source["covered"]
    assert export["checks"][0]["passed"] and export["model"]["sha256"] == resnet["results"]["onnx"]["sha256"]
