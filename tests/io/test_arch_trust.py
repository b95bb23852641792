"""A model file runs no code: the architecture a file names is built only from trusted sources or with consent.

A prunecp ``.safetensors`` file records ``prunecp.arch`` (``module:factory``); building it imports
that module and calls the factory. Files naming ``subprocess:run``, ``os:system`` or a module in the
current folder must be refused by every command and by ``load_model`` (exit 3, one line naming the
module) before anything is imported, and a legitimate custom architecture must still load with
``--arch`` (the same spec) or ``--trust-arch``.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import uuid

import pytest
import torch
from safetensors.torch import save_file
from testsupport import assert_one_line_error

from prunecp_cli.errors import CheckpointError, UsageError
from prunecp_cli.io.arch import TRUSTED_SOURCES, check_file_arch, is_trusted
from prunecp_cli.io.checkpoint import ModelMeta, load_model, open_model, save_model

DIGITS_ARCH = "prunecp_cli.models:digits_cnn"

EVIL_MODULE = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")


def make(**kwargs):
    pathlib.Path({marker!r}).write_text("called")
    raise SystemExit("the factory ran")
"""

GOOD_MODULE = """
from torch import nn


def small_cnn(num_classes=10, width=8):
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
    )
"""


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Run in ``tmp_path``; restore ``sys.path`` and drop the test's modules from ``sys.modules`` afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    names: list[str] = []

    def module_name(stem: str) -> str:
        name = f"{stem}_{uuid.uuid4().hex[:10]}"
        names.append(name)
        return name

    yield module_name
    for name in names:
        sys.modules.pop(name, None)
    importlib.invalidate_caches()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, trained_digits, digits_files):
    """A valid certificate for the digits model (so certify/predict get as far as opening the model)."""
    from prunecp_cli import api

    folder = tmp_path_factory.mktemp("trust")
    cert = folder / "cert.json"
    api.calibrate(trained_digits["safetensors"], digits_files["calib"], alpha=0.1, output=cert,
                  run=api.RunOptions(device="cpu"))
    return {"cert": cert, **digits_files}


def _crafted(path, arch: str, kwargs: dict) -> None:
    """A prunecp file naming ``arch`` with ``kwargs``, as an attacker would write it."""
    metadata = {
        "prunecp.schema_version": "1",
        "prunecp.arch": arch,
        "prunecp.arch_kwargs": json.dumps(kwargs),
        "prunecp.input_shape": "[1, 8, 8]",
        "prunecp.plan": "{}",
    }
    save_file({"weight": torch.zeros(4)}, str(path), metadata=metadata)


@pytest.fixture(params=["subprocess", "os", "cwd-module"])
def attack(request, tmp_path, isolated):
    """(model file, module name it asks for, marker file that must stay absent)."""
    marker = tmp_path / "MARKER"
    model = tmp_path / "model.safetensors"
    if request.param == "subprocess":
        module, arch, kwargs = "subprocess", "subprocess:run", {"args": f"touch {marker}", "shell": True}
    elif request.param == "os":
        module, arch, kwargs = "os", "os:system", {"command": f"touch {marker}"}
    else:
        module = isolated("evil_mod")
        (tmp_path / f"{module}.py").write_text(EVIL_MODULE.format(marker=str(marker)))
        importlib.invalidate_caches()
        arch, kwargs = f"{module}:make", {}
    _crafted(model, arch, kwargs)
    return model, module, marker


def _commands(model, inputs, out):
    return {
        "report": ["report", model, "--no-latency"],
        "calibrate": ["calibrate", model, "--data", inputs["calib"], "-o", out / "c.json", "--device", "cpu"],
        "certify": ["certify", model, "--cert", inputs["cert"], "--data", inputs["test"], "--device", "cpu"],
        "predict": ["predict", model, "--cert", inputs["cert"], "--data", inputs["test"], "--device", "cpu"],
        "prune": ["prune", model, "--method", "l1", "--ratio", "0.5", "--data", inputs["score"], "-o",
                  out / "p.safetensors", "--device", "cpu"],
        "score": ["score", model, "--method", "l1", "-o", out / "s.json", "--device", "cpu"],
    }


@pytest.mark.parametrize("command", ["report", "calibrate", "certify", "predict", "prune", "score"])
def test_crafted_architecture_runs_nothing(cli, attack, inputs, tmp_path, command):
    model, module, marker = attack
    out = tmp_path / "out"
    out.mkdir()
    result = cli(*_commands(model, inputs, out)[command])
    assert_one_line_error(result, 3, contains=f"import module '{module}'")
    assert "--trust-arch" in result.stderr and "--arch " in result.stderr
    assert not marker.exists()
    if module not in ("os", "subprocess"):
        assert module not in sys.modules
    assert list(out.iterdir()) == []


def test_crafted_architecture_load_model(attack):
    model, module, marker = attack
    with pytest.raises(CheckpointError, match=f"import module '{module}'") as info:
        load_model(model)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match=f"import module '{module}'"):
        open_model(model, input_shape=[1, 8, 8])
    assert not marker.exists()


def test_crafted_architecture_in_a_real_process(attack, tmp_path):
    model, module, marker = attack
    result = subprocess.run([sys.executable, "-m", "prunecp_cli", "report", str(model), "--no-latency"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunecp: error:"), result.stderr
    assert f"asks to import module '{module}'" in lines[0]
    assert not marker.exists()


def test_the_message_says_how_to_allow_it(tmp_path, isolated):
    model = tmp_path / "model.safetensors"
    _crafted(model, "subprocess:run", {"args": "true"})
    with pytest.raises(CheckpointError) as info:
        load_model(model)
    assert str(info.value) == (
        f"{model} asks to import module 'subprocess' (arch subprocess:run) to build its architecture; prunecp "
        "imports only torchvision:, timm: and prunecp_cli.models: by itself. If you trust this file, pass --arch "
        "subprocess:run or --trust-arch"
    )


def test_a_different_arch_is_a_usage_error_and_imports_nothing(cli, tmp_path, isolated):
    marker = tmp_path / "MARKER"
    module = isolated("evil_mod")
    (tmp_path / f"{module}.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    model = tmp_path / "model.safetensors"
    _crafted(model, f"{module}:make", {})
    with pytest.raises(UsageError, match="drop --arch"):
        load_model(model, arch=DIGITS_ARCH)
    result = cli("report", model, "--arch", f"{module}:other", "--no-latency")
    assert_one_line_error(result, 2, contains="drop --arch")
    assert not marker.exists() and module not in sys.modules


@pytest.mark.parametrize("spec, trusted", [
    ("torchvision:resnet18", True),
    ("prunecp_cli.models:digits_cnn", True),
    ("prunecp_cli.models:nn.Module", False),  # an attribute path reaching outside the module
    ("prunecp_cli.models:_conv_bn", False),
    ("prunecp_cli.models_evil:digits_cnn", False),
    ("prunecp_cli:models", False),
    ("subprocess:run", False),
    ("builtins:eval", False),
])
def test_trusted_sources(spec, trusted):
    assert is_trusted(spec) is trusted
    assert not trusted or spec.partition(":")[0] in TRUSTED_SOURCES
    if not trusted:
        with pytest.raises(CheckpointError, match="asks to import module"):
            check_file_arch(spec, path="m.safetensors")
        check_file_arch(spec, path="m.safetensors", arch=spec)
        check_file_arch(spec, path="m.safetensors", trust_arch=True)


def test_trusted_module_attribute_paths_need_consent(tmp_path):
    model = tmp_path / "model.safetensors"
    _crafted(model, "prunecp_cli.models:nn.Module", {})
    with pytest.raises(CheckpointError, match="import module 'prunecp_cli.models'"):
        load_model(model)


def _save_custom(tmp_path, module: str, *, width: int = 8):
    """A prunecp file of the custom ``small_cnn`` architecture, and the model it holds."""
    (tmp_path / f"{module}.py").write_text(GOOD_MODULE)
    importlib.invalidate_caches()
    sys.path.insert(0, str(tmp_path))
    make = importlib.import_module(module).small_cnn
    sys.modules.pop(module, None)  # load_model must import it by itself
    torch.manual_seed(0)
    net = make(width=width).eval()
    path = tmp_path / "custom.safetensors"
    save_model(net, path, ModelMeta(arch=f"{module}:small_cnn", arch_kwargs={"width": width}, input_shape=[1, 8, 8]))
    return path, net


def test_custom_architecture_round_trip_api(tmp_path, isolated):
    module = isolated("goodnet")
    path, net = _save_custom(tmp_path, module)
    spec = f"{module}:small_cnn"
    with pytest.raises(CheckpointError, match=f"import module '{module}'"):
        load_model(path)
    assert module not in sys.modules
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_model(path, trust_arch=True)(x), net(x))
        assert torch.equal(load_model(path, arch=spec)(x), net(x))
    loaded = open_model(path, trust_arch=True)
    assert loaded.is_prunecp_file and loaded.meta.arch == spec


def test_custom_architecture_round_trip_cli(cli, tmp_path, isolated, digits_files):
    """Dense custom checkpoint → prune (--arch) → a prunecp file that report builds only with consent."""
    module = isolated("goodnet")
    _, net = _save_custom(tmp_path, module)
    spec = f"{module}:small_cnn"
    dense = tmp_path / "dense.pt"
    torch.save(net.state_dict(), dense)
    pruned = tmp_path / "pruned.safetensors"
    result = cli("prune", dense, "--arch", spec, "--arch-kwargs", '{"width": 8}', "--method", "l1", "--ratio", "0.5",
                 "--data", digits_files["score"], "-o", pruned, "--device", "cpu")
    assert result.code == 0, result
    refused = cli("report", pruned, "--no-latency", "--format", "json")
    assert_one_line_error(refused, 3, contains=f"import module '{module}'")
    for consent in (["--arch", spec], ["--trust-arch"]):
        result = cli("report", pruned, "--no-latency", "--format", "json", *consent)
        assert result.code == 0, result
        report = json.loads(result.stdout)
        assert report["params"]["after"] < report["params"]["before"]
    with torch.no_grad():
        out = load_model(pruned, trust_arch=True)(torch.zeros(2, 1, 8, 8))
    assert out.shape == (2, 10)


def test_trusted_files_need_no_flag(cli, trained_digits):
    result = cli("report", trained_digits["safetensors"], "--no-latency", "--format", "json")
    assert result.code == 0, result
    result = cli("report", trained_digits["safetensors"], "--no-latency", "--format", "json", "--arch", DIGITS_ARCH)
    assert result.code == 0, result
