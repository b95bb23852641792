"""Channel gates equal physical removal; the masked evaluator equals full gated passes."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from testmodels import chunk_net, residual_depthwise

from prunecp_cli.models import mobilenet_small, resnet_small, vgg_small
from prunecp_cli.surgery.gates import ChannelGates
from prunecp_cli.surgery.groups import ModelGraph
from prunecp_cli.surgery.masked import MaskedEvaluator
from prunecp_cli.surgery.plan import apply_removal

MAKERS = {
    "resnet_small": (resnet_small, (1, 16, 16)),
    "mobilenet_small": (mobilenet_small, (1, 16, 16)),
    "vgg_small": (vgg_small, (1, 16, 16)),
    "residual_depthwise": (residual_depthwise, (1, 8, 8)),
    "torchvision_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
}


def _randomised(make):
    torch.manual_seed(0)
    model = make().eval()
    for module in model.modules():  # non-trivial BatchNorm statistics, so a wrong gate shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
            module.bias.data.normal_()
    return model


@pytest.mark.parametrize("name", list(MAKERS))
def test_zero_gates_equal_physical_removal(name):
    make, shape = MAKERS[name]
    model = _randomised(make)
    x = torch.randn(4, *shape)
    graph = ModelGraph(model, x[:1])
    removal = {g.name: list(range(0, g.channels, 3)) for g in graph.groups}
    with ChannelGates(model, graph.groups) as gates, torch.no_grad():
        for group in graph.groups:
            mask = torch.ones(group.channels)
            mask[removal[group.name]] = 0
            gates.set(group.name, mask)
        gated = model(x)
    pruned = copy.deepcopy(model)
    apply_removal(ModelGraph(pruned, x[:1]), removal)
    with torch.no_grad():
        assert torch.allclose(pruned(x), gated, atol=1e-4, rtol=1e-4)


def test_gate_gradient_is_taylor_term():
    """d(sum of logits)/d(gate of ones) == sum_hw a * dL/da at the gate point, per example."""
    model = _randomised(resnet_small)
    x = torch.randn(3, 1, 16, 16)
    graph = ModelGraph(model, x[:1])
    group = next(g for g in graph.groups if len(g.gate_points) == 1)
    with ChannelGates(model, [group]) as gates:
        gate = gates.ones(group.name, batch=3, requires_grad=True)
        (grad_gate,) = torch.autograd.grad(model(x).sum(), gate)
    activations = {}

    def keep(module, inputs, output):
        output.retain_grad()
        activations["a"] = output

    bn = dict(model.named_modules())[group.gate_points[0].module]
    handle = bn.register_forward_hook(keep)
    model(x).sum().backward()
    handle.remove()
    act = activations["a"]
    assert torch.allclose(grad_gate, (act * act.grad).sum(dim=(2, 3)), atol=1e-5)


@pytest.mark.parametrize("name", list(MAKERS))
def test_masked_evaluator_equals_full_gated_passes(name):
    make, shape = MAKERS[name]
    model = _randomised(make)
    x = torch.randn(5, *shape)
    graph = ModelGraph(model, x[:1])
    generator = torch.Generator().manual_seed(1)
    with MaskedEvaluator(model, graph.groups, max_rows=12) as ev:
        clean = ev.prepare(x)
        assert ev.traced
        for group in graph.groups:
            masks = (torch.rand(4, group.channels, generator=generator) > 0.4).float()
            fast = ev.evaluate(group.name, masks)
            with ChannelGates(model, graph.groups) as gates, torch.no_grad():
                for i in range(len(masks)):
                    gates.set(group.name, masks[i])
                    assert torch.allclose(fast[i], model(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(fast[0], clean)  # the masks really act



@pytest.mark.parametrize("name", list(MAKERS))
def test_batch_statistics_equal_a_training_mode_pass_per_mask_and_leave_buffers_alone(name):
    """``batch_statistics=True``: each mask's output is the gated model whose BatchNorms use that batch's statistics."""
    make, shape = MAKERS[name]
    model = _randomised(make)
    x = torch.randn(6, *shape)
    graph = ModelGraph(model, x[:1])
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    reference = copy.deepcopy(model).train()  # training-mode BatchNorm: batch mean and biased variance
    generator = torch.Generator().manual_seed(2)
    with MaskedEvaluator(model, graph.groups, max_rows=12, batch_statistics=True) as ev:
        clean = ev.prepare(x)
        with torch.no_grad():
            assert torch.allclose(clean, reference(x), atol=1e-5, rtol=1e-5)
        for group in graph.groups:
            masks = (torch.rand(3, group.channels, generator=generator) > 0.4).float()
            fast = ev.evaluate(group.name, masks)
            with ChannelGates(reference, graph.groups) as gates, torch.no_grad():
                for i in range(len(masks)):
                    gates.set(group.name, masks[i])
                    assert torch.allclose(fast[i], reference(x), atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the running statistics are used again, untouched
        assert not torch.allclose(clean, model(x), atol=1e-3)
        assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
        assert not model.training and "forward" not in vars(next(m for m in model.modules()
                                                                if isinstance(m, torch.nn.BatchNorm2d)))

def test_masked_evaluator_reuses_prefix_and_falls_back_without_trace():
    model = _randomised(resnet_small)
    x = torch.randn(2, 1, 16, 16)
    graph = ModelGraph(model, x[:1])
    with MaskedEvaluator(model, graph.groups) as ev:
        ev.prepare(x)
        fractions = {g.name: ev.suffix_fraction(g.name) for g in graph.groups}
    assert min(fractions.values()) < 0.4 and max(fractions.values()) > 0.8
    with MaskedEvaluator(model, graph.groups, use_fx=False) as slow, MaskedEvaluator(model, graph.groups) as fast:
        slow.prepare(x)
        fast.prepare(x)
        name = graph.groups[0].name
        masks = 1 - torch.eye(graph.by_name[name].channels)[:5]
        assert torch.allclose(slow.evaluate(name, masks), fast.evaluate(name, masks), atol=1e-5)


def test_untraceable_model_still_exact():
    model = _randomised(chunk_net)
    x = torch.randn(3, 1, 8, 8)
    graph = ModelGraph(model, x[:1])
    with MaskedEvaluator(model, graph.groups) as ev:
        ev.prepare(x)
        for group in graph.groups:
            masks = 1 - torch.eye(group.channels)[:3]
            fast = ev.evaluate(group.name, masks)
            with ChannelGates(model, graph.groups) as gates, torch.no_grad():
                gates.set(group.name, masks[1])
                assert torch.allclose(fast[1], model(x), atol=1e-5)


class _AliasedNet(torch.nn.Module):
    """conv-BN, then an identity and an in-place ReLU that overwrite the BN output's storage."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(6)
        self.alias = torch.nn.Identity()
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv2 = torch.nn.Conv2d(6, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv2(self.relu(self.alias(self.bn1(self.conv1(x)))))
        return self.fc(h.mean(dim=(2, 3)))


@pytest.mark.parametrize("name", ["resnet_small", "mobilenet_small", "vgg_small", "aliased"])
def test_masked_values_and_linear_terms_are_used_and_exact(name):
    """The shortcut survives its check on real architectures (so it is what runs) and matches full passes."""
    make, shape = {**MAKERS, "aliased": (_AliasedNet, (1, 8, 8))}[name]
    model = _randomised(make)
    x = torch.randn(6, *shape)
    graph = ModelGraph(model, x[:1])
    with MaskedEvaluator(model, graph.groups, max_rows=18) as ev:
        ev.prepare(x)
        for group in graph.groups:
            masks = 1 - torch.eye(group.channels)  # one channel off: the indexed linear path
            fast = ev.evaluate(group.name, masks)
            assert ev.shortcut_nodes(group.name) > 0, group.name  # the plan passed its own check
            with ChannelGates(model, graph.groups) as gates, torch.no_grad():
                for i in (0, group.channels - 1):
                    gates.set(group.name, masks[i])
                    assert torch.allclose(fast[i], model(x), atol=1e-5, rtol=1e-5)
    if name in ("resnet_small", "vgg_small", "aliased"):  # a dense 3x3 conv follows a gate
        assert any(ev._plans[g.name].linear for g in graph.groups)


def test_fractional_masks_skip_the_shortcut_and_stay_exact():
    model = _randomised(resnet_small)
    x = torch.randn(3, 1, 16, 16)
    graph = ModelGraph(model, x[:1])
    group = graph.groups[0]
    masks = torch.full((2, group.channels), 0.5)
    masks[1, ::2] = 0.0
    with MaskedEvaluator(model, graph.groups) as ev:
        ev.prepare(x)
        fast = ev.evaluate(group.name, masks)
    with ChannelGates(model, graph.groups) as gates, torch.no_grad():
        for i in range(2):
            gates.set(group.name, masks[i])
            assert torch.allclose(fast[i], model(x), atol=1e-5, rtol=1e-5)
