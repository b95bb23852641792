"""A FLOPs target is met on the pruned model even where the analytic FLOPs estimate is wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_pruning  # noqa: F401  (the graph below needs it)
from testmodels import residual_depthwise

from prunecp_cli import api
from prunecp_cli.measure import count_flops, flops_by_module
from prunecp_cli.pipeline import flops_target
from prunecp_cli.surgery import select as select_module
from prunecp_cli.surgery.groups import ModelGraph
from prunecp_cli.surgery.select import Policy
from prunecp_cli.surgery.trial import Trial


def test_trial_pruning_restores_the_model_exactly():
    torch.manual_seed(0)
    model = residual_depthwise().eval()
    x = torch.randn(4, 1, 8, 8)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    graph = ModelGraph(model, x[:1])
    trial = Trial(graph)
    for group in graph.groups:
        graph.prune_group(group.name, list(range(group.channels // 2)))
    assert count_flops(model, x) < count_flops(residual_depthwise(), x)
    trial.restore()
    assert torch.equal(model(x), before)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert graph.history() == []
    graph.prune_group(graph.groups[0].name, [0, 1])  # the graph still works after the trials
    model(x)


@pytest.mark.parametrize("bias", [0.6, 1.6])
def test_measured_removal_meets_the_target_when_the_estimate_is_biased(monkeypatch, bias):
    torch.manual_seed(0)
    model = residual_depthwise(width=24).eval()
    x = torch.randn(1, 1, 8, 8)
    graph = ModelGraph(model, x)
    by_module = flops_by_module(model, x)
    scores = {g.name: torch.rand(g.channels) for g in graph.groups}
    honest = select_module.FlopsModel.__call__
    monkeypatch.setattr(select_module.FlopsModel, "__call__", lambda self, removal: bias * honest(self, removal))
    removal = flops_target.flops_removal(graph, scores, policy=Policy(), relative=0.5, by_module=by_module)
    for name, idxs in removal.items():
        graph.prune_group(name, idxs)
    assert abs(count_flops(model, x) / by_module[""] - 0.5) <= 0.03


def test_prune_to_flops_corrects_a_wrong_estimate(monkeypatch, tmp_path):
    torch.manual_seed(0)
    dense = tmp_path / "m.pt"
    torch.save(residual_depthwise(width=24).state_dict(), dense)
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.standard_normal((64, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 10, 64))
    honest = select_module.FlopsModel.__call__
    monkeypatch.setattr(select_module.FlopsModel, "__call__", lambda self, removal: 1.5 * honest(self, removal))
    result = api.prune(api.ModelSource(dense, arch="testmodels:residual_depthwise", arch_kwargs={"width": 24},
                                       trust_arch=True), tmp_path / "p.safetensors", method="l1", data=data,
                       pruning=api.PruneOptions(target_flops=0.5), run=api.RunOptions(device="cpu"))
    assert 0.47 <= result.flops_ratio <= 0.53
