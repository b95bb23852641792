"""l1, l2, taylor and random importance against hand-computed references."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from testsupport import load_npz

from prunecp_cli import importance as registry
from prunecp_cli.importance.base import ImportanceContext
from prunecp_cli.io.data import open_dataset
from prunecp_cli.models import resnet_small
from prunecp_cli.surgery.groups import ModelGraph


def _resnet():
    torch.manual_seed(0)
    model = resnet_small().eval()
    return model, ModelGraph(model, torch.randn(1, 1, 16, 16))


def _magnitude(name, model, graph, **options):
    return registry.create(name)(ImportanceContext(model=model, graph=graph, options=options))


def test_l1_and_l2_filters_option_sums_the_producers_filter_norms():
    """members=filters, normalise=none: the earlier l1/l2, the sum of the producers' filter norms."""
    model, graph = _resnet()
    modules = dict(model.named_modules())
    residual = next(g for g in graph.groups if len(g.producers()) > 1)  # a residual group
    l1 = _magnitude("l1", model, graph, members="filters", normalise="none")[residual.name]
    l2 = _magnitude("l2", model, graph, members="filters", normalise="none")[residual.name]
    expected_l1 = torch.zeros(residual.channels, dtype=torch.float64)
    expected_l2 = torch.zeros(residual.channels, dtype=torch.float64)
    for member in residual.producers():
        weight = modules[member.module].weight.detach().double()
        for own, root in zip(member.member_idxs, member.root_idxs, strict=True):
            expected_l1[root] += weight[own].abs().sum()
            expected_l2[root] += weight[own].pow(2).sum().sqrt()
    assert len(residual.producers()) >= 3
    # The mean over producers: the sum divided by their number (the same ranking).
    assert torch.allclose(l1 * len(residual.producers()), expected_l1)
    assert torch.allclose(l2 * len(residual.producers()), expected_l2)


def _member_weights(module, member):
    """Weights of each of the member's channels, by explicit indexing (the reference)."""
    weight = module.weight.detach().double()
    rows = []
    for own in member.member_idxs:
        if member.direction == "out":
            rows.append(weight[own].flatten())
        elif isinstance(module, torch.nn.Linear):
            rows.append(weight[:, own].flatten())
        else:
            rows.append(weight[:, own].flatten())
    return rows


def test_l1_normalise_mean_averages_every_members_normalised_norms():
    """Producers' filters, consumers' input slices and BatchNorm scales, each member divided by its mean."""
    model, graph = _resnet()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)  # scales that rank something
    modules = dict(model.named_modules())
    residual = next(g for g in graph.groups if len(g.producers()) > 1)
    kinds = {m.kind for m in residual.members}
    assert {"conv", "norm"} <= kinds and any(m.direction == "in" for m in residual.members)
    got = _magnitude("l1", model, graph, normalise="mean")[residual.name]
    parts = []
    for member in residual.members:
        norm = torch.zeros(residual.channels, dtype=torch.float64)
        for root, row in zip(member.root_idxs, _member_weights(modules[member.module], member), strict=True):
            norm[root] += row.abs().sum()
        parts.append(norm / norm.mean())
    assert torch.allclose(got, torch.stack(parts).mean(0))
    assert abs(float(got.mean()) - 1.0) < 1e-9


def test_l1_default_equals_torch_pruning_group_l1():
    """The default (normalise=none) is Torch-Pruning's MagnitudeImportance(p=1, group_reduction='mean') on conv,
    linear and BN members (residual groups included); Torch-Pruning leaves depthwise filters out, prunecp counts them."""
    import torch_pruning as tp
    from testmodels import residual_depthwise

    reference = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer=None)
    for factory in (resnet_small, residual_depthwise):
        torch.manual_seed(0)
        model = factory().eval()
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.data.uniform_(0.5, 1.5)
        graph = ModelGraph(model, torch.randn(1, 1, 16, 16))
        modules = dict(model.named_modules())
        ours = _magnitude("l1", model, graph)
        assert all(torch.equal(ours[g], s) for g, s in _magnitude("l1", model, graph, normalise="none").items())
        compared = 0
        for group in graph.groups:
            depthwise = any(isinstance(modules[m.module], torch.nn.Conv2d) and modules[m.module].groups > 1
                            for m in group.members)
            if depthwise:
                continue
            tp_group = graph.dg.get_pruning_group(modules[group.name], tp.prune_conv_out_channels,
                                                  list(range(group.channels)))
            assert torch.allclose(ours[group.name], reference(tp_group).double(), rtol=1e-5)
            compared += 1
        assert compared >= 3


def test_l1_normalise_mean_weighs_a_depthwise_filter_like_a_dense_one():
    """normalise=mean: in a depthwise group, the 9-weight depthwise filters weigh as much as a dense member."""
    from testmodels import residual_depthwise

    torch.manual_seed(0)
    model = residual_depthwise().eval()
    graph = ModelGraph(model, torch.randn(1, 1, 16, 16))
    modules = dict(model.named_modules())
    group = next(g for g in graph.groups if "depthwise.0" in g.modules)
    got = _magnitude("l1", model, graph, normalise="mean")[group.name]
    parts = {}
    for member in group.members:
        norm = torch.zeros(group.channels, dtype=torch.float64)
        for root, row in zip(member.root_idxs, _member_weights(modules[member.module], member), strict=True):
            norm[root] += row.abs().sum()
        parts[member.module] = norm / norm.mean()
    assert modules["depthwise.0"].weight.shape[1:] == (1, 3, 3)
    assert torch.allclose(got, torch.stack(list(parts.values())).mean(0))
    with torch.no_grad():
        model.depthwise[0].weight[3] *= 50.0  # one depthwise filter grows: only its member's share moves
    moved = _magnitude("l1", model, graph, normalise="mean")[group.name]
    assert int(moved.argmax()) == 3


def test_taylor_equals_explicit_activation_gradient_products(trained_digits, digits_files):
    model = trained_digits["model"]
    data = open_dataset(digits_files["score"]).subset(range(40))
    graph = ModelGraph(model, data.first_batch(1).x)
    scores = registry.create("taylor")(ImportanceContext(model=model, graph=graph, data=data, batch_size=16))
    x, y = load_npz(digits_files["score"])
    x, y = x[:40], y[:40]
    modules = dict(model.named_modules())
    for group in graph.groups:
        (point,) = group.gate_points
        store = {}

        def keep(module, inputs, output, store=store):
            output.retain_grad()
            store["a"] = output

        handle = modules[point.module].register_forward_hook(keep)
        F.cross_entropy(model(x), y, reduction="sum").backward()
        handle.remove()
        model.zero_grad()
        a = store["a"]
        expected = (a * a.grad).sum(dim=(2, 3)).abs().mean(0).double()
        assert torch.allclose(scores[group.name], expected, rtol=1e-4, atol=1e-8), group.name


def test_random_is_reproducible_and_seed_dependent():
    model, graph = _resnet()
    make = registry.create("random")
    a = make(ImportanceContext(model=model, graph=graph, seed=3))
    b = make(ImportanceContext(model=model, graph=graph, seed=3))
    c = make(ImportanceContext(model=model, graph=graph, seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_registry_lists_and_validates_options():
    assert {"l1", "l2", "taylor", "random"} <= set(registry.available())
    import pytest

    from prunecp_cli.errors import UsageError

    with pytest.raises(UsageError, match="not an importance method"):
        registry.info("magnitude-of-doom")
    with pytest.raises(UsageError, match="no such option"):
        registry.parse_options("l1", ["p=3"])
