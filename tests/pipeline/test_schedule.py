"""Iterative pruning schedules and fine-tuning (CE and ConfTr) on the digits CNN."""

from __future__ import annotations

import copy

import pytest
import torch
from testsupport import assert_one_line_error, load_npz

from prunecp_cli import load_model
from prunecp_cli.errors import UsageError
from prunecp_cli.finetune import FinetuneConfig, finetune
from prunecp_cli.io.checkpoint import open_model
from prunecp_cli.io.data import open_dataset
from prunecp_cli.pipeline.schedule import step_target
from prunecp_cli.training import accuracy


def test_step_targets_reach_the_budget_in_equal_steps():
    kept = 1.0
    reached = []
    for step in range(1, 4):
        relative = step_target(0.4, step, 3, kept_before=kept)
        kept *= relative
        reached.append(kept)
    assert reached == pytest.approx([0.8, 0.6, 0.4])
    assert step_target(0.4, 1, 3, kept_before=0.7) == 1.0  # already below this step's goal: nothing to do


def test_iterative_pruning_logs_each_step_and_hits_the_target(tmp_path, cli, trained_digits, digits_files):
    out = tmp_path / "iter.safetensors"
    result = cli("prune", trained_digits["safetensors"], "--method", "taylor", "--data", digits_files["score"],
                 "--target-flops", "0.4", "--steps", "3", "--finetune-data", digits_files["train"], "--epochs", "2",
                 "-o", out)
    assert result.code == 0, result
    extra = open_model(out).meta.extra
    log = extra["schedule"]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert log[0]["flops_kept"] > log[1]["flops_kept"] > log[2]["flops_kept"]
    assert log[2]["flops_kept"] == pytest.approx(0.4, abs=0.03)
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["mean_set_size"] > 0 and "ce" in r["finetune"] for r in log)
    assert {d["role"] for d in extra["data_sha256"]} == {"score", "bn-recalibration", "fine-tune"}
    assert extra["finetune"]["loss"] == "ce" and extra["target"]["steps"] == 3
    x, y = load_npz(digits_files["test"])
    assert accuracy(load_model(out), x, y) > 0.8


def test_calibrating_on_fine_tuning_data_is_refused(tmp_path, cli, trained_digits, digits_files):
    out = tmp_path / "ft.safetensors"
    assert cli("prune", trained_digits["safetensors"], "--method", "l1", "--ratio", "0.2", "--finetune-data",
               digits_files["calib"], "--epochs", "1", "-o", out).code == 0
    result = cli("calibrate", out, "--data", digits_files["calib"], "-o", tmp_path / "cert.json")
    assert_one_line_error(result, 3, contains="fine-tune")
    assert not (tmp_path / "cert.json").exists()


def test_schedule_option_errors(tmp_path, cli, trained_digits, digits_files):
    scores = tmp_path / "importance.json"
    assert cli("score", trained_digits["safetensors"], "--method", "l1", "-o", scores).code == 0
    out = tmp_path / "x.safetensors"
    result = cli("prune", trained_digits["safetensors"], "--scores", scores, "--ratio", "0.3", "--steps", "2",
                 "-o", out)
    assert_one_line_error(result, 2, contains="--steps")
    result = cli("prune", trained_digits["safetensors"], "--method", "l1", "--ratio", "0.3", "--finetune-data",
                 digits_files["train"], "--loss", "conftr", "--finetune-batch-size", "64", "-o", out)
    assert_one_line_error(result, 2, contains="at least 198")
    result = cli("prune", trained_digits["safetensors"], "--method", "l1", "--ratio", "0.3", "--finetune-data",
                 digits_files["train"], "--loss", "focal", "-o", out)
    assert_one_line_error(result, 2, contains="--loss")
    assert not out.exists()
    with pytest.raises(UsageError):
        FinetuneConfig(epochs=-1)


@pytest.mark.parametrize("loss", ["ce", "conftr", "kd+ce"])
def test_finetuning_repairs_a_pruned_model(tmp_path, cli, trained_digits, digits_files, loss):
    pruned = tmp_path / "p.safetensors"
    assert cli("prune", trained_digits["safetensors"], "--method", "l1", "--target-flops", "0.4", "--data",
               digits_files["score"], "-o", pruned).code == 0
    model = load_model(pruned)
    x, y = load_npz(digits_files["test"])
    before = accuracy(model, x, y)
    tuned = copy.deepcopy(model)
    torch.manual_seed(0)
    teacher = copy.deepcopy(trained_digits["model"]) if loss == "kd+ce" else None  # the dense model, distilled
    log = finetune(tuned, open_dataset(digits_files["train"]), FinetuneConfig(epochs=6, loss=loss), teacher=teacher)
    after = accuracy(tuned, x, y)
    assert len(log) == 6 and {"ce": "ce", "conftr": "soft_size", "kd+ce": "kd"}[loss] in log[-1]
    assert after > before + 0.03 and after > 0.85, (before, after)
