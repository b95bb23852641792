"""``io/arch.py``: building ``--arch`` specs, the trust decision for a file's spec, and parse errors.

The file-level trust story (crafted files through every command) is in ``test_arch_trust.py``; these
tests call the three functions directly.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from prunecp_cli.errors import CheckpointError, UsageError
from prunecp_cli.io.arch import build_model, check_file_arch, is_spec, parse_arch_kwargs
from prunecp_cli.models import DigitsCNN

DIGITS = "prunecp_cli.models:digits_cnn"


def test_prunecp_models_spec_builds_with_its_arguments_in_eval_mode():
    model = build_model(DIGITS, {"width": 8, "num_classes": 4})
    assert isinstance(model, DigitsCNN) and not model.training
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)][0] == 8
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 4)


def test_torchvision_spec_builds_untrained_without_downloading():
    first = build_model("torchvision:resnet18", {"num_classes": 3})
    second = build_model("torchvision:resnet18", {"num_classes": 3})
    assert not first.training and first.fc.out_features == 3
    # weights=None: two builds are two random initialisations, not the same downloaded weights
    assert not torch.equal(first.conv1.weight, second.conv1.weight)
    assert first(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("kwargs", [{"weights": "IMAGENET1K_V1"}, {"weights": "DEFAULT"}])
def test_torchvision_pretrained_weights_are_refused(kwargs):
    with pytest.raises(UsageError, match="never downloads pretrained weights"):
        build_model("torchvision:resnet18", kwargs)
    with pytest.raises(CheckpointError, match=r"^m\.safetensors: architecture torchvision:resnet18: .*weights"):
        build_model("torchvision:resnet18", kwargs, origin="m.safetensors")


@pytest.mark.parametrize(("spec", "kwargs", "error", "message"), [
    ("resnet18", None, UsageError, "is not a model spec; use torchvision:NAME"),
    ("torchvision:resnet_nine", None, UsageError, "torchvision has no classification model 'resnet_nine'"),
    ("torchvision:resnt18", None, UsageError, r"did you mean .*resnet18"),
    ("no_such_module_prunecp:f", None, UsageError, "cannot import 'no_such_module_prunecp'"),
    ("json:no_such_factory", None, UsageError, "module 'json' has no attribute 'no_such_factory'"),
    ("math:pi", None, UsageError, "is not callable; name a function or class"),
    ("prunecp_cli.models:nn.Module", None, UsageError, "is not a model factory of prunecp_cli.models"),
    (DIGITS, {"widht": 8}, CheckpointError, r"cannot be built with arguments \{\"widht\": 8\} \(TypeError"),
    (DIGITS, [8], UsageError, "--arch-kwargs must be a JSON object with string keys"),
    ("os:getcwd", None, CheckpointError, "returned str, not a torch.nn.Module"),
    ("torchvision:resnet18", {"num_classes": 2**31}, CheckpointError, "more than prunecp's limit"),
])
def test_unbuildable_specs_say_why(spec, kwargs, error, message):
    with pytest.raises(error, match=message) as caught:
        build_model(spec, kwargs)
    assert "\n" not in str(caught.value)


def test_a_file_spec_that_cannot_be_resolved_is_a_checkpoint_error_naming_the_file():
    for spec in ("json:no_such_factory", "no_such_module_prunecp:f", "torchvision:resnet_nine"):
        with pytest.raises(CheckpointError, match=rf"^m\.safetensors: architecture {spec}: "):
            build_model(spec, origin="m.safetensors")
    with pytest.raises(CheckpointError, match="is not a module:factory spec; the file is damaged"):
        build_model("not a spec", origin="m.safetensors")


@pytest.mark.parametrize("spec", ["a:b", "pkg.mod:Factory", "prunecp_cli.models:digits_cnn", "a.b:C.make"])
def test_well_formed_specs(spec):
    assert is_spec(spec)


@pytest.mark.parametrize("spec", ["", "resnet18", ":f", "m:", "a b:c", "m:f()", "m:f;g", "é:f", 3, None,
                                  "m:" + "f" * 200])
def test_malformed_specs(spec):
    assert not is_spec(spec)


def test_check_file_arch_allows_trusted_matching_or_consented_specs_only():
    check_file_arch(DIGITS, path="m.safetensors")  # trusted source
    check_file_arch("torchvision:resnet18", path="m.safetensors")
    check_file_arch("mylab.nets:wide", path="m.safetensors", arch="mylab.nets:wide")  # the same --arch
    check_file_arch("mylab.nets:wide", path="m.safetensors", trust_arch=True)
    with pytest.raises(CheckpointError) as caught:
        check_file_arch("mylab.nets:wide", path="m.safetensors", arch="mylab.nets:narrow")
    assert str(caught.value) == (
        "m.safetensors asks to import module 'mylab.nets' (arch mylab.nets:wide) to build its architecture; "
        "prunecp imports only torchvision:, timm: and prunecp_cli.models: by itself. If you trust this file, pass "
        "--arch mylab.nets:wide or --trust-arch")
    assert "mylab" not in sys.modules  # deciding imports nothing


@pytest.mark.parametrize("spec", ["subprocess:run; rm", "os:system\n", "", "x" * 300])
def test_check_file_arch_refuses_malformed_specs_even_with_consent(spec):
    with pytest.raises(CheckpointError, match="is not a module:factory spec"):
        check_file_arch(spec, path="m.safetensors", arch=spec, trust_arch=True)


def test_parse_arch_kwargs():
    assert parse_arch_kwargs(None) == {}
    assert parse_arch_kwargs('{"num_classes": 10, "widths": [8, 16]}') == {"num_classes": 10, "widths": [8, 16]}
    for text in ("[1, 2]", "{num_classes: 10}", "10"):
        with pytest.raises(UsageError, match="--arch-kwargs"):
            parse_arch_kwargs(text)
