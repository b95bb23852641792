"""Every bad input gives exit 2 or 3, one stderr line, no traceback, and no output file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from testsupport import assert_one_line_error

ARCH = "prunecp_cli.models:digits_cnn"


@pytest.fixture
def work(tmp_path, trained_digits, digits_files):
    """A folder with a good checkpoint and good data, plus the output path nobody may create."""
    return {"dir": tmp_path, "pt": trained_digits["pt"], "st": trained_digits["safetensors"],
            "data": digits_files["score"], "out": tmp_path / "out" / "pruned.safetensors"}


def _prune(cli, work, *args, checkpoint=None, data=None):
    return cli("prune", checkpoint or work["pt"], "--arch", ARCH, "--data", data or work["data"], "-o", work["out"],
               *args)


def _npz(work, name, x, y):
    path = work["dir"] / name
    np.savez(path, x=x, y=y)
    return path


def _check(result, work, code, contains):
    assert_one_line_error(result, code, contains=contains)
    assert not work["out"].exists()
    assert not list(work["dir"].rglob("*.tmp"))


def test_missing_checkpoint(cli, work):
    _check(_prune(cli, work, "--method", "l1", "--ratio", "0.3", checkpoint=work["dir"] / "nope.pt"), work, 3,
           "does not exist")


def test_missing_data(cli, work):
    _check(_prune(cli, work, "--method", "l1", "--ratio", "0.3", data=work["dir"] / "nope.npz"), work, 3,
           "does not exist")


def test_corrupt_safetensors(cli, work):
    bad = work["dir"] / "bad.safetensors"
    bad.write_bytes(work["st"].read_bytes()[:200])
    _check(_prune(cli, work, "--method", "l1", "--ratio", "0.3", checkpoint=bad), work, 3, "not a readable")


def test_checkpoint_arch_mismatch(cli, work):
    result = cli("prune", work["pt"], "--arch", "prunecp_cli.models:digits_cnn", "--arch-kwargs", '{"width": 8}',
                 "--method", "l1", "--ratio", "0.3", "--data", work["data"], "-o", work["out"])
    _check(result, work, 3, "mis-shaped (first: features.0.0.weight")


def test_unknown_arch(cli, work):
    result = cli("prune", work["pt"], "--arch", "torchvision:resnet_nine_thousand", "--method", "l1", "--ratio",
                 "0.3", "--data", work["data"], "-o", work["out"])
    _check(result, work, 2, "no classification model")


def test_data_with_wrong_rank(cli, work):
    path = _npz(work, "rank.npz", np.zeros((10, 64), np.float32), np.zeros(10, np.int64))
    _check(_prune(cli, work, "--method", "l1", "--ratio", "0.3", data=path), work, 3, "N×C×H×W")


def test_data_with_wrong_channel_count(cli, work):
    path = _npz(work, "rgb.npz", np.zeros((10, 3, 8, 8), np.float32), np.zeros(10, np.int64))
    _check(_prune(cli, work, "--method", "l1", "--ratio", "0.3", data=path), work, 3, "channel")
    _check(cli("prune", work["st"], "--data", path, "--method", "l1", "--ratio", "0.3", "-o", work["out"]), work,
           3, "built for [1, 8, 8]")


def test_labels_outside_the_model_classes(cli, work):
    y = np.arange(10, dtype=np.int64) + 5  # labels 5..14 for a 10-class model
    path = _npz(work, "labels.npz", np.zeros((10, 1, 8, 8), np.float32), y)
    _check(_prune(cli, work, "--method", "taylor", "--ratio", "0.3", data=path), work, 3, "labels range over 5..14")


def test_nan_in_data(cli, work):
    x = np.random.default_rng(0).random((40, 1, 8, 8)).astype(np.float32)
    x[33, 0, 1, 1] = np.nan
    path = _npz(work, "nan.npz", x, np.zeros(40, np.int64))
    _check(_prune(cli, work, "--method", "taylor", "--ratio", "0.3", data=path), work, 3, "example 33 holds NaN")


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.1"])
def test_ratio_outside_open_unit_interval(cli, work, ratio):
    _check(_prune(cli, work, "--method", "l1", "--ratio", ratio), work, 2, "--ratio")


def test_unreachable_target_flops(cli, work):
    _check(_prune(cli, work, "--method", "l1", "--target-flops", "0.001"), work, 3, "unreachable")


def test_unknown_method(cli, work):
    _check(_prune(cli, work, "--method", "telepathy", "--ratio", "0.3"), work, 2, "not an importance method")
    result = cli("score", work["pt"], "--arch", ARCH, "--method", "telepathy", "-o", work["out"])
    _check(result, work, 2, "not an importance method")


def test_scores_for_another_model(cli, work, tmp_path):
    scores = tmp_path / "importance.json"
    assert cli("score", work["st"], "--method", "l1", "-o", scores).code == 0
    torch.manual_seed(5)
    from prunecp_cli.models import digits_cnn

    other = tmp_path / "other.pt"
    torch.save(digits_cnn().state_dict(), other)
    result = cli("prune", other, "--arch", ARCH, "--scores", scores, "--ratio", "0.3", "-o", work["out"])
    _check(result, work, 3, "scores another model")


def test_debug_shows_a_traceback(cli, work):
    result = _prune(cli, work, "--method", "l1", "--ratio", "0.3", "--debug", checkpoint=work["dir"] / "nope.pt")
    assert result.code == 3 and "Traceback" in result.stderr
