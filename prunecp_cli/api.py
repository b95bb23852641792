"""The Python API: one function per command, taking and returning plain objects.

The command-line interface is a thin layer over these functions::

    from prunecp_cli import api
    table = api.score("model.pt", method="l1", arch="torchvision:resnet18",
                      arch_kwargs={"num_classes": 10}, input_shape=[3, 32, 32])
    result = api.prune("model.pt", "pruned.safetensors", method="taylor", data="score.npz",
                       target_flops=0.5, arch="torchvision:resnet18", arch_kwargs={"num_classes": 10})
    model = api.load_model("pruned.safetensors")
"""

from __future__ import annotations

from prunecp_cli.conformal.certificate import load_certificate
from prunecp_cli.conformal.predictor import ConformalClassifier
from prunecp_cli.io.checkpoint import load_model, save_model
from prunecp_cli.pipeline.calibration import calibrate
from prunecp_cli.pipeline.certification import certify
from prunecp_cli.pipeline.confident import prune_confident
from prunecp_cli.pipeline.prediction import predict
from prunecp_cli.pipeline.pruning import prune
from prunecp_cli.pipeline.scoring import read_importance, score
from prunecp_cli.report import report

__all__ = ["load_model", "save_model", "score", "prune", "prune_confident", "report", "read_importance",
           "calibrate", "certify", "predict", "load_certificate", "ConformalClassifier"]
