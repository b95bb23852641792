"""Fine-tuning by knowledge distillation from the dense model: --loss kd (no labels) and kd+ce."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from testsupport import assert_one_line_error, load_npz

from prunecp_cli import load_model
from prunecp_cli.errors import UsageError
from prunecp_cli.finetune import FinetuneConfig, distillation_loss, finetune
from prunecp_cli.io.checkpoint import open_model
from prunecp_cli.io.data import open_dataset
from prunecp_cli.training import predict_logits


def test_distillation_loss_is_t_squared_kl_of_softened_outputs():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    for t in (1.0, 4.0):
        p = F.softmax(teacher / t, 1)
        expected = (p * (p.log() - F.log_softmax(student / t, 1))).sum(1).mean() * t * t
        assert torch.allclose(distillation_loss(student, teacher, t), expected)
    assert float(distillation_loss(teacher, teacher, 4.0)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(UsageError):
        FinetuneConfig(loss="kd", kd_temperature=0.0)


def _unlabelled(path, out):
    with np.load(path) as f:
        np.savez(out, x=f["x"])
    return out


def test_kd_fine_tunes_on_unlabelled_data_towards_the_teacher(tmp_path, cli, trained_digits, digits_files):
    """prune --loss kd with an unlabelled --finetune-data: the pruned model agrees more with the dense model."""
    unlabelled = _unlabelled(digits_files["train"], tmp_path / "train-x.npz")
    one_shot, tuned = tmp_path / "one-shot.safetensors", tmp_path / "kd.safetensors"
    common = ["--method", "l1", "--target-flops", "0.4", "--data", digits_files["score"]]
    assert cli("prune", trained_digits["safetensors"], *common, "-o", one_shot).code == 0
    result = cli("prune", trained_digits["safetensors"], *common, "--finetune-data", unlabelled, "--loss", "kd",
                 "--epochs", "3", "--kd-temperature", "2", "-o", tuned)
    assert result.code == 0, result
    extra = open_model(tuned).meta.extra
    assert extra["finetune"]["loss"] == "kd" and extra["finetune"]["kd_temperature"] == 2.0
    assert "fine-tune" in {d["role"] for d in extra["data_sha256"]}
    x, y = load_npz(digits_files["test"])
    dense = predict_logits(trained_digits["model"], x).argmax(1)
    agree = {name: float((predict_logits(load_model(p), x).argmax(1) == dense).float().mean())
             for name, p in (("one-shot", one_shot), ("kd", tuned))}
    assert agree["kd"] > agree["one-shot"] + 0.03 and agree["kd"] > 0.9, agree
    # Cross-entropy needs the labels the file lacks: one line, exit 3.
    result = cli("prune", trained_digits["safetensors"], *common, "--finetune-data", unlabelled, "--loss", "kd+ce",
                 "-o", tmp_path / "x.safetensors")
    assert_one_line_error(result, 3, contains="label")


def test_a_kd_loss_needs_the_teacher(trained_digits, digits_files):
    with pytest.raises(UsageError, match="teacher"):
        finetune(copy.deepcopy(trained_digits["model"]), open_dataset(digits_files["train"]),
                 FinetuneConfig(epochs=1, loss="kd"))
