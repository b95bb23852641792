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


def test_l1_and_l2_sum_filter_norms_over_the_coupled_group():
    model, graph = _resnet()
    modules = dict(model.named_modules())
    residual = next(g for g in graph.groups if len(g.producers()) > 1)  # a residual group
    l1 = registry.create("l1")(ImportanceContext(model=model, graph=graph))[residual.name]
    l2 = registry.create("l2")(ImportanceContext(model=model, graph=graph))[residual.name]
    expected_l1 = torch.zeros(residual.channels, dtype=torch.float64)
    expected_l2 = torch.zeros(residual.channels, dtype=torch.float64)
    for member in residual.producers():
        weight = modules[member.module].weight.detach().double()
        for own, root in zip(member.member_idxs, member.root_idxs, strict=True):
            expected_l1[root] += weight[own].abs().sum()
            expected_l2[root] += weight[own].pow(2).sum().sqrt()
    assert len(residual.producers()) >= 3
    assert torch.allclose(l1, expected_l1) and torch.allclose(l2, expected_l2)


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
