"""BatchNorm recalibration: exact population statistics, and it repairs one-shot pruning on real data."""

from __future__ import annotations

import copy

import pytest
import torch
from testsupport import load_npz
from torch import nn

from prunecp_cli.importance import create
from prunecp_cli.importance.base import ImportanceContext
from prunecp_cli.surgery.batchnorm import recalibrate_batchnorm
from prunecp_cli.surgery.groups import ModelGraph
from prunecp_cli.surgery.plan import apply_removal
from prunecp_cli.surgery.select import Policy, select
from prunecp_cli.training import accuracy


def test_statistics_are_exact_population_moments():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)).eval()
    data = [torch.randn(5, 2, 6, 6) * 3 + 1, torch.randn(7, 2, 6, 6), torch.randn(2, 2, 6, 6) - 2]
    seen = recalibrate_batchnorm(model, iter(data))
    assert seen == 14 and not model.training
    with torch.no_grad():
        activations = torch.cat([model[0](x) for x in data])
    flat = activations.transpose(0, 1).reshape(3, -1).double()
    assert torch.allclose(model[1].running_mean.double(), flat.mean(1), atol=1e-5)
    assert torch.allclose(model[1].running_var.double(), flat.var(1, unbiased=True), atol=1e-4)


def test_statistics_stay_accurate_for_a_large_mean_and_small_spread_over_uneven_batches():
    torch.manual_seed(0)
    for shape in ((4,), (4, 5)):  # BatchNorm1d on [N, C] and on [N, C, L]
        norm = nn.BatchNorm1d(4).eval()
        data = [1000.0 + 0.01 * torch.randn(n, *shape) for n in (2, 130, 7, 63)]
        assert recalibrate_batchnorm(norm, data) == 202
        flat = torch.cat(data).double().transpose(0, 1).reshape(4, -1)
        torch.testing.assert_close(norm.running_mean.double(), flat.mean(1), rtol=1e-6, atol=0)  # float32 storage
        torch.testing.assert_close(norm.running_var.double(), flat.var(1), rtol=1e-3, atol=0)


def test_a_failed_pass_leaves_statistics_and_momentum_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3, momentum=None), nn.ReLU(),
                          nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).eval()
    for norm in (model[1], model[4]):
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [torch.randn(4, 2, 5, 5), torch.randn(4, 3, 5, 5)]  # the second batch has the wrong channel count
    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(model, iter(data))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model[1].momentum is None and model[4].momentum == 0.1 and not model.training


def test_recalibration_restores_accuracy_after_one_shot_pruning(trained_digits, digits_files):
    model = copy.deepcopy(trained_digits["model"]).eval()
    x_score, _ = load_npz(digits_files["score"])
    x_test, y_test = load_npz(digits_files["test"])
    graph = ModelGraph(model, x_score[:1])
    scores = create("l1")(ImportanceContext(model=model, graph=graph))
    apply_removal(graph, select(graph.groups, scores, policy=Policy(), ratio=0.3))
    before = accuracy(model, x_test, y_test)
    recalibrate_batchnorm(model, (x_score[i : i + 64] for i in range(0, len(x_score), 64)))
    after = accuracy(model, x_test, y_test)
    assert after > before + 0.1, (before, after)  # measured: 0.64 -> 0.89
    assert after > 0.75
