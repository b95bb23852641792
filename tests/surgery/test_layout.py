"""The channels-last layout of the CPU forward passes that scoring repeats (prunecp_cli.surgery.layout)."""

from __future__ import annotations

import copy

import torch
from testsupport import load_npz
from torch import nn

from prunecp_cli.surgery import masked as masked_module
from prunecp_cli.surgery.groups import ModelGraph
from prunecp_cli.surgery.layout import adopt_channels_last, wants_channels_last
from prunecp_cli.surgery.masked import MaskedEvaluator


class _ViewFlatten(nn.Module):
    """A CNN whose head flattens a 4x4 feature map with ``.view``, which channels-last memory refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv(x)))
        return self.fc(x.view(x.size(0), -1))


def _conv_weights_contiguous(model: nn.Module) -> bool:
    return all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, nn.Conv2d))


def test_a_model_that_fails_on_channels_last_keeps_its_layout(digits_files):
    x, _ = load_npz(digits_files["test"])
    torch.manual_seed(0)
    model = _ViewFlatten().eval()
    before = model(x[:64])
    assert wants_channels_last(model, x[:64])
    assert not adopt_channels_last(model, x[:64])
    assert _conv_weights_contiguous(model)
    assert torch.equal(model(x[:64]), before)
    assert not wants_channels_last(model, x[:64].flatten(1))  # not an image batch


def test_masked_evaluator_runs_channels_last_gives_the_same_logits_and_restores_the_model(trained_digits, digits_files,
                                                                                           monkeypatch):
    x, _ = load_npz(digits_files["score"])
    model = copy.deepcopy(trained_digits["model"]).eval()
    groups = ModelGraph(model, torch.zeros(1, 1, 8, 8)).groups
    masks = {g.name: 1 - torch.eye(g.channels) for g in groups}

    def logits(evaluator_model):
        with MaskedEvaluator(evaluator_model, groups) as ev:
            clean = ev.prepare(x[:128])
            fast = not _conv_weights_contiguous(evaluator_model)
            out = {name: ev.evaluate(name, m) for name, m in masks.items()}
        assert _conv_weights_contiguous(evaluator_model)  # restored on exit
        return clean, out, fast

    clean, out, fast = logits(model)
    monkeypatch.setattr(masked_module, "adopt_channels_last", lambda *args: False)
    plain_clean, plain_out, plain_fast = logits(model)
    assert fast and not plain_fast
    torch.testing.assert_close(clean, plain_clean, rtol=1e-4, atol=1e-5)
    for name in masks:
        torch.testing.assert_close(out[name], plain_out[name], rtol=1e-4, atol=1e-5)
        assert (out[name] - clean).abs().amax() > 1e-3  # the masks change the logits
