"""Physical pruning: FLOPs targets, pickle-free round trips in a new process, broken-forward safety."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from testmodels import residual_depthwise

from prunecp_cli.importance import create
from prunecp_cli.importance.base import ImportanceContext
from prunecp_cli.io.checkpoint import ModelMeta, save_model
from prunecp_cli.measure import count_flops, flops_by_module
from prunecp_cli.surgery.groups import ModelGraph
from prunecp_cli.surgery.plan import apply_removal
from prunecp_cli.surgery.select import FlopsModel, Policy, select

RELOAD = """
import sys, torch
torch.set_num_threads(int(sys.argv[4]))  # same summation order as the parent: bitwise comparison
from prunecp_cli import load_model
model = load_model(sys.argv[1], trust_arch=True)  # our own test file
x = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(model(x), sys.argv[3])
"""


def _prune_and_check_reload(tmp_path, model, arch, arch_kwargs, example, *, scope, target_flops=None, ratio=None):
    graph = ModelGraph(model, example[:1])
    scores = create("l2")(ImportanceContext(model=model, graph=graph))
    flops_model = FlopsModel(model, graph.groups, flops_by_module(model, example[:1]))
    dense_flops = count_flops(model, example[:1])
    removal = select(graph.groups, scores, policy=Policy(scope=scope), ratio=ratio, target_flops=target_flops,
                     flops_model=flops_model)
    plan = apply_removal(graph, removal)
    path = tmp_path / f"pruned_{scope}.safetensors"
    save_model(model, path, ModelMeta(arch=arch, arch_kwargs=arch_kwargs, input_shape=list(example.shape[1:]),
                                      plan=plan))
    torch.save(example, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model(example)
    subprocess.run([sys.executable, "-c", RELOAD, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt"),
                    str(torch.get_num_threads())], check=True, timeout=120, cwd=tmp_path, env=_env())
    reloaded = torch.load(tmp_path / "y.pt", weights_only=True)
    assert torch.equal(reloaded, expected)  # max abs difference 0
    return count_flops(model, example[:1]) / dense_flops


def _env():
    import os

    from testsupport import FIXTURES

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(FIXTURES), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.parametrize("scope", ["local", "global"])
def test_torchvision_resnet18_half_flops_and_new_process_reload(tmp_path, scope):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    example = torch.randn(2, 3, 32, 32)
    kept = _prune_and_check_reload(tmp_path, model, "torchvision:resnet18", {"num_classes": 10}, example,
                                   scope=scope, target_flops=0.5)
    assert 0.45 <= kept <= 0.55


@pytest.mark.parametrize("scope", ["local", "global"])
def test_custom_residual_depthwise_round_trip(tmp_path, scope):
    torch.manual_seed(1)
    model = residual_depthwise().eval()
    example = torch.randn(3, 1, 8, 8)
    kept = _prune_and_check_reload(tmp_path, model, "testmodels:residual_depthwise", {}, example, scope=scope,
                                   ratio=0.5)
    assert kept < 0.7
    widths = {name: m.out_channels for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert widths["depthwise.0"] == widths["expand.0"] and widths["project.0"] == widths["stem.0"]


def test_repeated_pruning_replays_the_whole_history(tmp_path):
    torch.manual_seed(2)
    model = residual_depthwise().eval()
    example = torch.randn(2, 1, 8, 8)
    graph = ModelGraph(model, example[:1])
    scores = create("l1")(ImportanceContext(model=model, graph=graph))
    plan = apply_removal(graph, select(graph.groups, scores, policy=Policy(), ratio=0.25))
    graph = ModelGraph(model, example[:1])
    scores = create("l1")(ImportanceContext(model=model, graph=graph))
    plan = apply_removal(graph, select(graph.groups, scores, policy=Policy(), ratio=0.25), previous=plan)
    assert len(plan["steps"]) == 2
    path = tmp_path / "twice.safetensors"
    save_model(model, path, ModelMeta(arch="testmodels:residual_depthwise", arch_kwargs={}, input_shape=[1, 8, 8],
                                      plan=plan))
    from prunecp_cli import load_model

    with torch.no_grad():
        assert torch.equal(load_model(path, trust_arch=True)(example), model(example))


def _gated_reference(make, state, removed, x):
    """Dense model with the removed channels gated to zero (what a correct prune must compute)."""
    from prunecp_cli.surgery.gates import ChannelGates

    dense = make().eval()
    dense.load_state_dict(state)
    graph = ModelGraph(dense, x[:1])
    with ChannelGates(dense, graph.groups) as gates, torch.no_grad():
        for name, info in removed.items():
            mask = torch.ones(info["channels"])
            mask[info["removed"]] = 0
            gates.set(name, mask)
        return dense(x)


@pytest.mark.parametrize("arch,culprit", [("testmodels:chunk_net", "conv.0"), ("testmodels:slice_net", "mid.0")])
@pytest.mark.parametrize("method", ["l1", "random"])
def test_channel_split_models_prune_correctly_or_fail_cleanly(tmp_path, cli, arch, culprit, method, digits_files):
    """The pruned model computes what the dense one does with those channels silenced; a group whose removal
    would break it is kept whole by itself and named in one warning, and --strict makes that exit 3."""
    import testmodels
    from testsupport import assert_one_line_error

    from prunecp_cli.io.checkpoint import open_model

    make = getattr(testmodels, arch.split(":")[1])
    torch.manual_seed(0)
    state = make().state_dict()
    ckpt = tmp_path / "dense.pt"
    torch.save(state, ckpt)
    out = tmp_path / "pruned.safetensors"
    args = ["prune", ckpt, "--arch", arch, "--method", method, "--ratio", "0.5", "--data", digits_files["score"],
            "--no-bn-recalibrate", "-o", out]
    result = cli(*args)
    assert result.code == 0, result
    x = torch.from_numpy(np.load(digits_files["test"])["x"][:16])
    loaded = open_model(out, arch=arch)
    with torch.no_grad():
        pruned = loaded.model(x)
    assert torch.allclose(pruned, _gated_reference(make, state, loaded.meta.plan["groups"], x), atol=1e-5)
    note = [line for line in result.stderr.splitlines() if "kept whole: " in line]
    assert len(note) <= 1, result.stderr  # one line for all groups kept whole
    kept_whole = bool(note) and culprit in note[0]
    assert kept_whole == (culprit in loaded.meta.extra["groups_left_whole"])
    if kept_whole:
        assert culprit not in loaded.meta.plan["groups"] or not loaded.meta.plan["groups"][culprit]["removed"]
    strict = tmp_path / "strict.safetensors"
    result = cli(*args[:-1], strict, "--strict")
    if kept_whole:
        assert_one_line_error(result, 3, contains=f"--ignore {culprit}")
        assert not strict.exists()
    else:
        assert result.code == 0, result


@pytest.mark.parametrize("make,culprit", [("chunk_net", "conv.0"), ("slice_net", "mid.0")])
def test_breaking_removal_names_the_culprit_and_leaves_no_model(make, culprit):
    import testmodels

    from prunecp_cli.errors import PlanError

    model = getattr(testmodels, make)().eval()
    graph = ModelGraph(model, torch.randn(1, 1, 8, 8))
    removal = {g.name: list(range(g.channels // 2)) for g in graph.groups}
    with pytest.raises(PlanError, match=f"culprit group\\(s\\): {culprit}"):
        apply_removal(graph, removal)


@pytest.mark.parametrize("removal", [{"left": [0, 1, 2]}, {"right": [1, 4]}, {"left": [0, 5], "right": [0, 3, 4]}])
def test_a_stored_split_follows_uneven_removals_in_either_part(removal):
    """torch.split by stored sizes (timm's MixedConv2d): each part's conv loses the channels of its own part,
    also when both parts are pruned in one step (Torch-Pruning mapped parts in trace order, with stale offsets)."""
    import testmodels

    from prunecp_cli.surgery.groups import replay_history

    torch.manual_seed(0)
    model, x = testmodels.mixed_net().eval(), torch.randn(4, 1, 8, 8)
    graph = ModelGraph(model, x[:1])
    assert {g.name: g.channels for g in graph.groups}.items() >= {"left": 6, "right": 6}.items()
    plan = apply_removal(graph, removal)  # raises unless it computes the silenced dense model
    widths = [6 - len(removal.get(name, [])) for name in ("left", "right")]
    assert model.mixed.splits == widths == [conv.in_channels for conv in model.mixed.parts]
    fresh = testmodels.mixed_net().eval()
    fresh.load_state_dict(testmodels.mixed_net().state_dict())
    replay_history(fresh, plan["history"], x[:1])
    fresh.load_state_dict(model.state_dict())
    assert fresh.mixed.splits == widths
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
