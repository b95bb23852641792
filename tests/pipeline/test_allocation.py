"""``--allocation measured``: the groups' shares of a FLOPs target chosen by measured output damage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from testsupport import assert_one_line_error

from prunecp_cli import api
from prunecp_cli.errors import UsageError
from prunecp_cli.io.checkpoint import ModelMeta, open_model, save_model
from prunecp_cli.io.data import open_dataset
from prunecp_cli.measure import flops_by_module
from prunecp_cli.models import resnet_small
from prunecp_cli.pipeline import allocation as allocation_module
from prunecp_cli.pipeline.allocation import Allocation, allocate, measured_keys
from prunecp_cli.pipeline.auto import resplit_set_size
from prunecp_cli.pipeline.inference import collect_logits
from prunecp_cli.surgery.groups import ModelGraph
from prunecp_cli.surgery.select import FlopsModel, Policy, select
from prunecp_cli.training import train_classifier


@pytest.fixture(scope="module")
def digits_resnet(tmp_path_factory, digits_files):
    """A small residual CNN trained on the digits' train split (9 groups, two of them residual)."""
    with np.load(digits_files["train"]) as f:
        x, y = torch.from_numpy(f["x"]), torch.from_numpy(f["y"])
    torch.manual_seed(0)
    model = train_classifier(resnet_small(widths=(16, 32, 32)), x, y, epochs=12, seed=0)
    path = tmp_path_factory.mktemp("alloc") / "resnet.safetensors"
    save_model(model, path, ModelMeta(arch="prunecp_cli.models:resnet_small", arch_kwargs={"widths": [16, 32, 32]},
                                      input_shape=[1, 8, 8]))
    return path


def _prune(path, out, data, allocation, target=0.35):
    options = api.PruneOptions(target_flops=target, scope="global", allocation=allocation)
    return api.prune(path, out, method="l1", data=data, pruning=options, run=api.RunOptions(device="cpu"))


def _held_out_set_size(path, files) -> float:
    model = open_model(path).model.eval()
    logits, labels = [], []
    for part in ("calib", "test"):
        lg, lb = collect_logits(model, open_dataset(files[part]), device=torch.device("cpu"), batch_size=256,
                                num_classes=10)
        logits.append(lg)
        labels.append(lb)
    return resplit_set_size(torch.cat(logits), torch.cat(labels), alpha=0.1, resplits=300, seed=1)["set_size"]


def test_measured_shares_beat_equal_shares_on_held_out_set_size(digits_resnet, digits_files, tmp_path):
    rank = _prune(digits_resnet, tmp_path / "rank.safetensors", digits_files["score"], "rank")
    measured = _prune(digits_resnet, tmp_path / "measured.safetensors", digits_files["score"], "measured")
    for result in (rank, measured):
        assert abs(result.flops_after / result.flops_before - 0.35) <= 0.01
    share = lambda r: [after / before for before, after in r.channels.values()]  # noqa: E731
    assert np.ptp(share(measured)) > np.ptp(share(rank)) + 0.2  # the shares differ between groups
    sizes = {name: _held_out_set_size(tmp_path / f"{name}.safetensors", digits_files) for name in ("rank", "measured")}
    print(sizes)
    assert sizes["measured"] < sizes["rank"]
    meta = open_model(tmp_path / "measured.safetensors").meta
    assert meta.extra["target"]["allocation"] == "measured"
    assert any(u["role"] == "allocation" for u in meta.extra["data_sha256"])


def _resnet_with_random_scores(path):
    """The digits ResNet in eval mode, its graph, its FlopsModel and seeded random scores per group."""
    model = open_model(path).model.eval()
    example = torch.zeros(1, 1, 8, 8)
    graph = ModelGraph(model, example)
    flops_model = FlopsModel(model, graph.groups, flops_by_module(model, example))
    scores = {g.name: torch.rand(g.channels, generator=torch.Generator().manual_seed(i))
              for i, g in enumerate(graph.groups)}
    return model, graph, flops_model, scores


def test_measured_keys_respect_the_caps_and_order_within_groups(digits_resnet, digits_files):
    model, graph, flops_model, scores = _resnet_with_random_scores(digits_resnet)
    policy = Policy(scope="global", protect=0.5, max_layer_ratio=0.9)
    keys, used_policy = allocate(graph.groups, scores, policy=policy, allocation=Allocation("measured", examples=64),
                                 target_flops=0.6, flops_model=flops_model, model=model,
                                 data=open_dataset(digits_files["score"]))
    assert used_policy.normalise == "none"
    for group in graph.groups:  # a group's removals follow its own ranking: keys rise with the scores
        order = torch.argsort(scores[group.name])
        assert torch.equal(torch.sort(keys[group.name]).indices, order)
    removal = select(graph.groups, keys, policy=used_policy, target_flops=0.6, flops_model=flops_model)
    assert flops_model(removal) / flops_model.total == pytest.approx(0.6, abs=0.01)
    assert all(len(removal[g.name]) <= g.channels // 2 for g in graph.groups)  # protect 0.5
    allocation_module._PATHS.clear()  # a fresh greedy run, not the cached path
    same = measured_keys(model, graph.groups, scores, open_dataset(digits_files["score"]), policy=policy,
                         flops_model=flops_model, goal=0.58, allocation=Allocation("measured", examples=64))
    assert all(torch.equal(same[n], keys[n]) for n in keys)  # deterministic


def test_a_cached_greedy_path_gives_a_fresh_runs_keys_at_every_goal(digits_resnet, digits_files, monkeypatch):
    model, graph, flops_model, scores = _resnet_with_random_scores(digits_resnet)
    data = open_dataset(digits_files["score"])
    calls = []
    measure = allocation_module._Damage.__call__
    monkeypatch.setattr(allocation_module._Damage, "__call__", lambda self, masks: calls.append(1) or measure(self, masks))

    def keys_at(goal):
        return measured_keys(model, graph.groups, scores, data, policy=Policy(scope="global"), flops_model=flops_model,
                             goal=goal, allocation=Allocation("measured", examples=64))

    goals = (0.7, 0.45, 0.6, 0.3)
    fresh = {}
    for goal in goals:
        allocation_module._PATHS.clear()
        fresh[goal] = keys_at(goal)
    fresh_calls, calls[:] = len(calls), []
    allocation_module._PATHS.clear()
    for goal in goals:  # 0.45 resumes the path to 0.7, 0.6 reads its prefix, 0.3 resumes it again
        cached = keys_at(goal)
        assert all(torch.equal(cached[n], fresh[goal][n]) for n in cached), goal
    assert 0 < len(calls) < fresh_calls / 2
    assert not all(torch.equal(fresh[0.7][n], fresh[0.3][n]) for n in fresh[0.7])  # the goals do differ
    other = {name: value.flip(0) for name, value in scores.items()}  # other scores: another path
    calls[:] = []
    measured_keys(model, graph.groups, other, data, policy=Policy(scope="global"), flops_model=flops_model, goal=0.7,
                  allocation=Allocation("measured", examples=64))
    assert calls


def test_the_channels_last_damage_equals_the_contiguous_one(digits_resnet, digits_files, monkeypatch):
    """The CPU damage runs channels-last; the same masks must give the same damage as the plain layout."""
    model, graph, _, _ = _resnet_with_random_scores(digits_resnet)
    batches = [b.x for b in open_dataset(digits_files["score"]).batches(128, device=torch.device("cpu"))][:2]
    fast = allocation_module._Damage(model, graph.groups, batches)
    monkeypatch.setattr(allocation_module, "adopt_channels_last", lambda *args: False)
    plain = allocation_module._Damage(model, graph.groups, batches)
    def layout(damage):  # of a convolution with several input channels (a 1-channel image is both layouts)
        weight = next(m.weight for m in damage.copy.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
        return weight.is_contiguous(memory_format=torch.channels_last), weight.is_contiguous()

    assert layout(fast) == (True, False) and layout(plain) == (False, True)
    rng = torch.Generator().manual_seed(0)
    for group in graph.groups[:4]:
        masks = {group.name: (torch.rand(group.channels, generator=rng) > 0.4).float()}
        assert fast(masks) == pytest.approx(plain(masks), rel=1e-4, abs=1e-7)
        assert fast(masks) > fast({}) + 1e-6  # the masks do change the output
    assert next(model.parameters()).is_contiguous()  # the caller's model keeps its layout


def test_measured_shares_keep_round_to_widths(digits_resnet, digits_files):
    model = open_model(digits_resnet).model.eval()
    example = torch.zeros(1, 1, 8, 8)
    graph = ModelGraph(model, example)
    flops_model = FlopsModel(model, graph.groups, flops_by_module(model, example))
    scores = {g.name: torch.arange(g.channels, dtype=torch.float64) for g in graph.groups}
    policy = Policy(scope="global", round_to=8)
    keys, used = allocate(graph.groups, scores, policy=policy, allocation=Allocation("measured", examples=64),
                          target_flops=0.4, flops_model=flops_model, model=model, data=open_dataset(digits_files["score"]))
    removal = select(graph.groups, keys, policy=used, target_flops=0.4, flops_model=flops_model)
    assert all((g.channels - len(removal[g.name])) % 8 == 0 for g in graph.groups)
    assert flops_model(removal) / flops_model.total < 0.45  # 8-channel blocks: the target is met to a block


@pytest.mark.parametrize(("flags", "message"), [
    (["--ratio", "0.5", "--scope", "global"], "--allocation measured shares a FLOPs target: use --target-flops"),
    (["--target-flops", "0.5"], "which local scope fixes: use --scope global"),
])
def test_measured_allocation_refuses_what_it_cannot_do(cli, trained_digits, digits_files, tmp_path, flags, message):
    result = cli("prune", str(trained_digits["safetensors"]), "--method", "l1", "--data", str(digits_files["score"]),
                 "--allocation", "measured", *flags, "-o", str(tmp_path / "p.safetensors"))
    assert_one_line_error(result, 2, contains=message)
    assert not (tmp_path / "p.safetensors").exists()


def test_allocation_values_are_checked():
    with pytest.raises(UsageError, match="use rank or measured"):
        Allocation("even")
    with pytest.raises(UsageError, match="pass data"):
        Allocation("measured").check(scope="global", target_flops=0.5, has_data=False)


def test_auto_with_measured_shares_prunes_the_model_it_judged(cli, trained_digits, digits_files, tmp_path):
    out = tmp_path / "auto.safetensors"
    result = cli("prune", str(trained_digits["safetensors"]), "--method", "auto", "--data", str(digits_files["score"]),
                 "--target-flops", "0.5", "--scope", "global", "--allocation", "measured", "-o", str(out))
    assert result.code == 0, result
    meta = open_model(out).meta
    record = meta.extra["auto"]
    chosen = next(c for c in record["candidates"] if c["method"] == record["chosen"])
    assert meta.extra["flops_after"] / meta.extra["flops_before"] == pytest.approx(chosen["flops_kept"], abs=1e-9)
    assert meta.extra["target"]["allocation"] == "measured"
    # the FLOPs search picks the count closest to the target, so it is met to half of one channel's FLOPs
    # (a stem channel of the digits CNN is about 4 % of them; which channels go depends on the training)
    model = trained_digits["model"].eval()
    example = torch.zeros(1, 1, 8, 8)
    graph = ModelGraph(model, example)
    flops_model = FlopsModel(model, graph.groups, flops_by_module(model, example))
    one_channel = max(flops_model.total - flops_model({g.name: [0]}) for g in graph.groups) / flops_model.total
    assert 0.02 < one_channel < 0.05
    assert abs(chosen["flops_kept"] - 0.5) <= one_channel / 2 + 1e-9
