"""Image folders, flat folders and single images, --mean/--std/--channels, and Lightning checkpoints, from the CLI."""

from __future__ import annotations

import argparse
import decimal
import json

import numpy as np
import pytest
import torch
from testsupport import assert_one_line_error, load_npz

ARCH = "prunecp_cli.models:digits_cnn"


def _write_pngs(root, pixels, labels=None):
    """uint8 [N,8,8] images as root/<label>/<i>.png (root/<i>.png without labels), in the order a folder lists them."""
    from PIL import Image

    files = []
    for i, image in enumerate(pixels):
        folder = root / str(labels[i]) if labels is not None else root
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
        files.append(folder / f"{i:04d}.png")
    return files


@pytest.fixture(scope="module")
def images(tmp_path_factory, trained_digits, digits_files):
    """200 score-split digits as an ImageFolder and as an .npz holding the same uint8 pixels in the same order."""
    from prunecp_cli.options import RunOptions
    from prunecp_cli.pipeline.calibration import calibrate

    folder = tmp_path_factory.mktemp("images")
    x, y = load_npz(digits_files["score"])
    pixels = np.round(x[:200, 0].numpy() * 255).astype(np.uint8)
    labels = y[:200].numpy()
    order = np.lexsort((np.arange(200), labels))  # class folders 0..9, then file names
    files = _write_pngs(folder / "tree", pixels[order], labels[order])
    np.savez(folder / "same.npz", x=pixels[order][:, None], y=labels[order])
    flat = _write_pngs(folder / "flat", pixels[:7])
    cert = folder / "cert.json"
    calibrate(trained_digits["safetensors"], data=digits_files["calib"], alpha=0.1, output=cert, run=RunOptions(device="cpu"))
    return {"dir": folder, "tree": folder / "tree", "files": files, "npz": folder / "same.npz",
            "flat": folder / "flat", "flat_files": flat, "cert": cert, "model": trained_digits["safetensors"],
            "pt": trained_digits["pt"], "calib": digits_files["calib"]}


def _importance(path):
    return np.concatenate([g["importance"] for g in json.loads(path.read_text())["groups"]])


def test_folder_scores_follow_mean_std_and_equal_the_npz_scores(cli, images, tmp_path):
    runs = {
        "folder": [images["tree"]],
        "folder_norm": [images["tree"], "--mean", "0.5", "--std", "0.25"],
        "npz": [images["npz"]],
        "npz_norm": [images["npz"], "--mean", "0.5", "--std", "0.25"],
    }
    scores = {}
    for name, (data, *options) in runs.items():
        out = tmp_path / f"{name}.json"
        result = cli("score", images["model"], "--data", data, "--method", "taylor", "-o", out, "--device", "cpu",
                     "--quiet", *options)
        assert result.code == 0, result
        scores[name] = _importance(out)
    assert not np.allclose(scores["folder"], scores["folder_norm"], rtol=1e-3)
    np.testing.assert_allclose(scores["folder_norm"], scores["npz_norm"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(scores["folder"], scores["npz"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["npz", "tree"])
def test_wrong_number_of_mean_std_values_is_a_usage_error(cli, images, tmp_path, kind):
    out = tmp_path / "s.json"
    result = cli("score", images["model"], "--data", images[kind], "--method", "taylor", "-o", out, "--device", "cpu",
                 "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225")
    assert_one_line_error(result, 2, contains="--mean gives 3 values")
    assert not out.exists()


@pytest.mark.parametrize("command", ["score", "prune", "calibrate", "certify", "predict"])
def test_images_of_different_sizes_are_a_data_error_naming_image_size(cli, images, tmp_path, command):
    from PIL import Image

    odd = tmp_path / "odd"
    pixels = np.stack([np.asarray(Image.open(f)) for f in images["files"][:40]])
    files = _write_pngs(odd, pixels, [f.parent.name for f in images["files"][:40]])
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(files[21])  # in the middle: not the first nor the last
    model, data = images["model"], ["--data", odd, "--batch-size", "8", "--device", "cpu"]
    args = {
        "score": ["score", model, "--method", "taylor", "-o", tmp_path / "s.json"],
        "prune": ["prune", model, "--method", "l1", "--ratio", "0.3", "-o", tmp_path / "p.safetensors"],
        "calibrate": ["calibrate", model, "-o", tmp_path / "c.json"],
        "certify": ["certify", model, "--cert", images["cert"]],
        "predict": ["predict", model, "--cert", images["cert"]],
    }[command]
    result = cli(*args, *data)
    assert_one_line_error(result, 3, contains="--image-size")
    assert "0021.png" in result.stderr


def test_channels_follow_the_model_or_the_option(cli, images, tmp_path):
    from prunecp_cli.io.checkpoint import ModelMeta, save_model
    from prunecp_cli.models import digits_cnn
    from prunecp_cli.pipeline.session import open_session

    torch.manual_seed(0)
    rgb_model = digits_cnn(in_channels=3).eval()
    dense = tmp_path / "rgb.pt"
    torch.save(rgb_model.state_dict(), dense)
    prunecp_file = tmp_path / "rgb.safetensors"
    save_model(rgb_model, prunecp_file, ModelMeta(arch=ARCH, arch_kwargs={"in_channels": 3}, input_shape=[3, 8, 8]))
    assert open_session(prunecp_file, data=images["tree"], device="cpu").example.shape == (1, 3, 8, 8)
    session = open_session(dense, data=images["flat"], arch=ARCH, arch_kwargs={"in_channels": 3}, device="cpu")
    assert session.example.shape == (1, 3, 8, 8)
    assert torch.equal(session.example[0, 0], session.example[0, 2])  # gray repeated

    base = ["score", dense, "--arch", ARCH, "--arch-kwargs", '{"in_channels": 3}', "--data", images["tree"],
            "--method", "taylor", "--device", "cpu", "--quiet"]
    assert cli(*base, "-o", tmp_path / "a.json").code == 0  # default: the model's 3 channels
    assert cli(*base, "--channels", "3", "-o", tmp_path / "b.json").code == 0
    np.testing.assert_allclose(_importance(tmp_path / "a.json"), _importance(tmp_path / "b.json"))
    assert_one_line_error(cli(*base, "--channels", "1", "-o", tmp_path / "c.json"), 3, contains="cannot run")
    one = cli("score", images["model"], "--data", images["tree"], "--method", "taylor", "--channels", "3",
              "-o", tmp_path / "d.json", "--device", "cpu")
    assert_one_line_error(one, 3, contains="[3, 8, 8]")
    assert cli("score", images["model"], "--data", images["tree"], "--method", "l1", "--channels", "2",
               "-o", tmp_path / "e.json").code == 2


@pytest.mark.parametrize("model", ["prunecp", "dense"])
def test_channels_last_npz_gets_a_transpose_hint(cli, images, tmp_path, model):
    x, y = load_npz(images["npz"])
    path = tmp_path / "last.npz"
    np.savez(path, x=x.numpy().transpose(0, 2, 3, 1), y=y.numpy())  # N×H×W×C
    args = ["score", images["model"]] if model == "prunecp" else ["score", images["pt"], "--arch", ARCH]
    result = cli(*args, "--data", path, "--method", "taylor", "-o", tmp_path / "s.json", "--device", "cpu")
    assert_one_line_error(result, 3, contains="x.transpose(0, 3, 1, 2)")


def _records(result):
    assert result.code == 0, result
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_predict_on_a_folder_records_each_file(cli, images):
    base = ["predict", images["model"], "--cert", images["cert"], "--device", "cpu", "--batch-size", "64"]
    records = _records(cli(*base, "--data", images["tree"]))
    assert [r["path"] for r in records] == [str(f) for f in images["files"]]
    assert [r["label"] for r in records] == [int(f.parent.name) for f in images["files"]]
    from_npz = _records(cli(*base, "--data", images["npz"]))
    assert "path" not in from_npz[0]
    assert [r["top1"] for r in records] == [r["top1"] for r in from_npz]
    assert list(records[0]) == ["index", "path", "top1", "set", "scores", "label"]


def test_predict_on_a_flat_folder_and_a_single_image(cli, images):
    base = ["predict", images["model"], "--cert", images["cert"], "--device", "cpu"]
    flat = _records(cli(*base, "--data", images["flat"]))
    assert [r["path"] for r in flat] == [str(f) for f in images["flat_files"]]
    assert all("label" not in r for r in flat)
    single = _records(cli(*base, "--data", images["flat_files"][3]))
    assert len(single) == 1 and single[0]["path"] == str(images["flat_files"][3])
    assert single[0]["top1"] == flat[3]["top1"] and single[0]["scores"] == pytest.approx(flat[3]["scores"], abs=1e-5)  # batch 1 vs batch 4: float rounding


@pytest.mark.parametrize("command", ["calibrate", "certify"])
def test_commands_that_need_labels_refuse_unlabelled_images(cli, images, tmp_path, command):
    args = ["-o", tmp_path / "c.json"] if command == "calibrate" else ["--cert", images["cert"]]
    result = cli(command, images["model"], "--data", images["flat"], "--device", "cpu", *args)
    assert_one_line_error(result, 3, contains="has no labels")


def _lightning(path, state, hyper_parameters):
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "hyper_parameters": hyper_parameters,
                "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0"}, path)


def test_lightning_checkpoint_with_a_namespace_loads(cli, trained_digits, tmp_path):
    from prunecp_cli.io.checkpoint import open_model

    path = tmp_path / "epoch=3.ckpt"
    state = trained_digits["model"].state_dict()
    _lightning(path, state, argparse.Namespace(lr=0.1, batch_size=64))
    loaded = open_model(path, arch=ARCH)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())
    result = cli("report", path, "--arch", ARCH, "--input-shape", "1,8,8", "--no-latency", "--format", "json",
                 "--device", "cpu")
    assert result.code == 0, result
    assert json.loads(result.stdout)


def test_checkpoint_holding_another_class_is_still_refused(cli, trained_digits, tmp_path):
    path = tmp_path / "other.ckpt"
    _lightning(path, trained_digits["model"].state_dict(), decimal.Decimal("0.1"))
    result = cli("report", path, "--arch", ARCH, "--input-shape", "1,8,8", "--no-latency", "--format", "json")
    assert_one_line_error(result, 3, contains="holds a pickled decimal.Decimal")
    assert "\x1b" not in result.stderr and "weights_only` set to `False" not in result.stderr
