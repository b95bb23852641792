"""Warnings a user needs: too few images for statistics, and classes that a marginal certificate leaves behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunecp_cli.conformal.nonconformity import LAC
from prunecp_cli.pipeline.calibration import certificate_from_logits
from prunecp_cli.pipeline.certification import verdict_from_logits

MODEL = {"file": "m.safetensors", "sha256": "a" * 64, "arch": "prunecp_cli.models:digits_cnn", "num_classes": 10,
         "params": 1000, "flops": 5000, "flops_unit": "multiply-adds"}
DATA = {"file": "calib.npz", "sha256": "b" * 64}


@pytest.fixture
def tiny_split(tmp_path, digits_files):
    with np.load(digits_files["score"]) as f:
        x, y = f["x"][:8], f["y"][:8]
    path = tmp_path / "tiny.npz"
    np.savez(path, x=x, y=y)
    return path


def test_batchnorm_recalibration_on_few_images_warns(tmp_path, cli, trained_digits, tiny_split):
    result = cli("prune", trained_digits["safetensors"], "--method", "l1", "--ratio", "0.2", "--data", tiny_split,
                 "--device", "cpu", "-o", tmp_path / "p.safetensors")
    assert result.code == 0, result
    assert "prunecp: warning: BatchNorm recalibration uses only 8 example(s)" in result.stderr


def test_data_driven_scoring_on_few_images_warns(tmp_path, cli, trained_digits, tiny_split):
    result = cli("score", trained_digits["safetensors"], "--method", "taylor", "--data", tiny_split,
                 "--device", "cpu", "-o", tmp_path / "s.json")
    assert result.code == 0, result
    assert "--method taylor uses only 8 example(s)" in result.stderr
    quiet = cli("score", trained_digits["safetensors"], "--method", "l1", "--data", tiny_split, "--device", "cpu",
                "-o", tmp_path / "s.json")
    assert "uses only" not in quiet.stderr  # l1 reads no data


def test_enough_images_give_no_warning(tmp_path, cli, trained_digits, digits_files):
    result = cli("prune", trained_digits["safetensors"], "--method", "taylor", "--ratio", "0.2", "--data",
                 digits_files["score"], "--device", "cpu", "-o", tmp_path / "p.safetensors")
    assert result.code == 0 and "uses only" not in result.stderr


def _logits_missing_class_zero(n_per_class: int, k: int = 10, seed: int = 0):
    """Logits of a classifier that is right for every class but 0, whose points it calls class 1."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(k).repeat_interleave(n_per_class)
    logits = torch.randn(len(labels), k, generator=g)
    predicted = torch.where(labels == 0, torch.ones_like(labels), labels)
    logits[torch.arange(len(labels)), predicted] += 6.0
    return logits.double(), labels


def test_certify_warns_about_a_class_far_below_target():
    cal_logits, cal_labels = _logits_missing_class_zero(50, seed=1)
    cert = certificate_from_logits(cal_logits, cal_labels, alpha=0.1, nonconformity=LAC(),
                                   model=MODEL, data=DATA)
    logits, labels = _logits_missing_class_zero(40, seed=2)
    verdict = verdict_from_logits(logits, labels, certificate=cert)
    assert [r["class"] for r in verdict["low_coverage_classes"]] == [0]
    assert verdict["per_class_coverage"][0] < 0.5
    (message,) = verdict["warnings"]
    assert "class 0" in message and "--class-conditional" in message


def test_no_class_warning_when_classes_are_covered_or_the_certificate_is_per_class():
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(10).repeat_interleave(60)
    logits = torch.randn(len(labels), 10, generator=g).double()
    logits[torch.arange(len(labels)), labels] += 3.0
    cert = certificate_from_logits(logits[::2], labels[::2], alpha=0.1, nonconformity=LAC(),
                                   model=MODEL, data=DATA)
    assert verdict_from_logits(logits[1::2], labels[1::2], certificate=cert)["warnings"] == []
    cal_logits, cal_labels = _logits_missing_class_zero(50, seed=1)
    per_class = certificate_from_logits(cal_logits, cal_labels, alpha=0.1, nonconformity=LAC(), class_conditional=True,
                                        model=MODEL, data=DATA)
    test_logits, test_labels = _logits_missing_class_zero(40, seed=2)
    assert verdict_from_logits(test_logits, test_labels, certificate=per_class)["warnings"] == []
