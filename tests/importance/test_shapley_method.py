"""The ``shapley`` importance: its games on real models and data, exactness, convergence, CLI output."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from testsupport import assert_flops_kept, assert_pruned_digits_model
from torch import nn

from prunecp_cli import load_model
from prunecp_cli.conformal.smooth import smooth_set_size_loss
from prunecp_cli.importance.base import ImportanceContext
from prunecp_cli.importance.shapley import (
    draw_estimates,
    estimate_group,
    game_value,
    group_generator,
    loss_value,
    make_value_fn,
)
from prunecp_cli.importance.shapley_estimator import exact_shapley, permutation_shapley
from prunecp_cli.io.data import open_dataset
from prunecp_cli.surgery.gates import ChannelGates
from prunecp_cli.surgery.groups import ModelGraph
from prunecp_cli.surgery.masked import MaskedEvaluator
from prunecp_cli.surgery.plan import apply_removal

ARCH = "prunecp_cli.models:digits_cnn"


def _toy_layer(channels: int = 5) -> nn.Module:
    """conv → BN → ReLU → mean → linear: the logits are additive in the conv's (gated) channels."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)).eval()
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    model[1].bias.data.normal_()
    return model


def test_additive_layer_gets_its_exact_per_channel_contributions(digits_arrays):
    x, y = (torch.as_tensor(a[:24]) for a in digits_arrays)
    model = _toy_layer()
    graph = ModelGraph(model, x[:1])
    (group,) = graph.groups
    true_logit = lambda logits, labels: logits.gather(2, labels.expand(len(logits), -1).unsqueeze(2)).squeeze(2)  # noqa: E731
    with torch.no_grad():
        pooled = model[:5](x)  # [N, C]: each channel's contribution enters the logits linearly
    expected = (model[5].weight[y] * pooled).double()  # [N, C]
    with MaskedEvaluator(model, graph.groups) as ev:
        ev.prepare(x)
        game = make_value_fn(ev, group.name, y, true_logit)
        result = estimate_group(game, group.channels, samples=4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(result.per_example, expected, atol=1e-5)
    assert result.draws == 2 and float(result.std_error.max()) < 1e-5  # every permutation agrees


@pytest.fixture(scope="module")
def six_channel_model(trained_digits):
    """The trained digits CNN with its middle layer cut to its 6 largest-L1 filters."""
    model = copy.deepcopy(trained_digits["model"]).eval()
    graph = ModelGraph(model, torch.zeros(1, 1, 8, 8))
    name = "features.1.0"
    l1 = dict(model.named_modules())[name].weight.detach().abs().flatten(1).sum(1)
    apply_removal(graph, {name: sorted(torch.argsort(l1)[:-6].tolist())})
    graph = ModelGraph(model, torch.zeros(1, 1, 8, 8))
    assert graph.by_name[name].channels == 6
    return model, graph, name


def test_permutation_estimate_converges_to_exact_shapley_on_a_real_6_channel_layer(six_channel_model, digits_files):
    model, graph, name = six_channel_model
    data = open_dataset(digits_files["score"]).subset(range(48))
    batch = next(data.batches(48))
    with MaskedEvaluator(model, graph.groups) as ev:
        ev.prepare(batch.x)
        game = make_value_fn(ev, name, batch.y, loss_value)
        exact = exact_shapley(game, 6)
        few = estimate_group(game, 6, samples=4, generator=group_generator(0, 1))
        many = estimate_group(game, 6, samples=400, generator=group_generator(0, 1))
        full, none = game(torch.tensor([[True] * 6, [False] * 6]))
        leave_one_out = (full - game(~torch.eye(6, dtype=torch.bool))).mean(1)
    assert float(exact.mean.sum()) == pytest.approx(float((full - none).mean()), abs=1e-6)
    # a game with interactions: the exact values are far from the leave-one-out marginals
    assert float((leave_one_out - exact.mean).abs().max()) > 0.1 * float(exact.mean.abs().max())
    error_many = (many.per_example.mean(0) - exact.mean).abs()
    error_few = (few.per_example.mean(0) - exact.mean).abs()
    assert bool((error_many <= 4 * many.std_error + 1e-9).all()), (error_many, many.std_error)
    assert float(error_many.max()) < 0.1 * float(exact.mean.abs().max())
    assert float(error_many.max()) < float(error_few.max())
    assert float(many.std_error.max()) < float(few.std_error.max())


def test_draws_equal_one_permutation_shapley_call(six_channel_model, digits_files):
    model, graph, name = six_channel_model
    batch = next(open_dataset(digits_files["score"]).batches(16))
    with MaskedEvaluator(model, graph.groups) as ev:
        ev.prepare(batch.x)
        game = make_value_fn(ev, name, batch.y, loss_value)
        split = list(draw_estimates(game, 6, samples=6, generator=torch.Generator().manual_seed(5), max_masks=7))
        whole = permutation_shapley(game, 6, samples=6, generator=torch.Generator().manual_seed(5))
        combined = estimate_group(game, 6, samples=6, generator=torch.Generator().manual_seed(5))
    assert len(split) == 3 and torch.allclose(combined.per_example, whole.per_example, atol=1e-9)
    assert torch.allclose(combined.std_error, whole.std_error, atol=1e-9)


def test_cp_size_game_is_the_negated_smooth_set_size(trained_digits, digits_files):
    batch = next(open_dataset(digits_files["score"]).batches(64))
    with torch.no_grad():
        logits = trained_digits["model"](batch.x)
    value = game_value("cp-size", examples=64, seed=3, alpha=0.1, temperature=1.0, dispersion=0.1)
    per_example = value(logits.unsqueeze(0), batch.y)
    loss = smooth_set_size_loss(logits, batch.y, alpha=0.1, generator=torch.Generator().manual_seed(3))
    assert per_example.shape == (1, 32)
    assert float(per_example.mean()) == pytest.approx(-float(loss), rel=1e-6)


def test_score_writes_efficient_values_and_standard_errors(tmp_path, cli, trained_digits, digits_files):
    """Σ_c φ_c = mean CE(all off) − mean CE(all on) per group, checked against plain gated passes."""
    out = tmp_path / "importance.json"
    result = cli("score", trained_digits["safetensors"], "--method", "shapley", "--data", digits_files["score"],
                 "--max-samples", "64", "--opt", "samples=4", "--opt", "depth=1", "--opt", "aggregate=mean",
                 "-o", out)
    assert result.code == 0, result
    table = json.loads(out.read_text())
    model = load_model(trained_digits["safetensors"]).eval()
    data = open_dataset(digits_files["score"])
    graph = ModelGraph(model, data.first_batch(1).x)
    chosen = ImportanceContext(model=model, graph=graph, data=data, max_samples=64, seed=0).dataset()
    batch = next(chosen.batches(64))
    for entry in table["groups"]:
        assert len(entry["std_error"]) == entry["channels"] and all(e >= 0 for e in entry["std_error"])
        assert any(e > 0 for e in entry["std_error"])
        with ChannelGates(model, graph.groups) as gates, torch.no_grad():
            gates.set(entry["name"], torch.zeros(entry["channels"]))
            ce_none = F.cross_entropy(model(batch.x), batch.y)
            gates.set(entry["name"], None)
            ce_all = F.cross_entropy(model(batch.x), batch.y)
        assert sum(entry["importance"]) == pytest.approx(float(ce_none - ce_all), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("schedule", ["one-shot", "greedy"])
def test_prune_with_shapley_end_to_end(tmp_path, cli, trained_digits, digits_files, schedule):
    pruned = tmp_path / "pruned.safetensors"
    result = cli("prune", trained_digits["pt"], "--arch", ARCH, "--method", "shapley", "--data",
                 digits_files["score"], "--target-flops", "0.5", "--max-samples", "48", "--opt", "samples=2",
                 "--opt", f"schedule={schedule}", "-o", pruned)
    assert result.code == 0, result
    assert_pruned_digits_model(pruned)
    assert_flops_kept(pruned, trained_digits["safetensors"], 0.5)


def test_greedy_schedule_records_each_channels_round(tmp_path, cli, trained_digits, digits_files):
    out = tmp_path / "importance.json"
    result = cli("score", trained_digits["safetensors"], "--method", "shapley", "--data", digits_files["score"],
                 "--max-samples", "32", "--opt", "schedule=greedy", "--opt", "chunk=4", "-o", out)  # samples 5: 3 draws
    assert result.code == 0, result
    for entry in json.loads(out.read_text())["groups"]:
        assert "std_error" not in entry  # the scores are removal rounds, not estimates with errors
        rounds = entry["round"]
        assert sum(r >= 0 for r in rounds) == entry["channels"] // 2  # remove=0.5 of each layer
        removed = sorted(range(entry["channels"]), key=lambda c: entry["importance"][c])[: entry["channels"] // 2]
        assert all(rounds[c] >= 0 for c in removed)  # the lowest scores are the greedy removals


def test_an_unknown_schedule_is_a_usage_error(tmp_path, cli, trained_digits, digits_files):
    result = cli("score", trained_digits["safetensors"], "--method", "shapley", "--data", digits_files["score"],
                 "--opt", "schedule=sometimes", "-o", tmp_path / "i.json")
    assert result.code == 2 and "one-shot, greedy" in result.stderr, result


def _redundant_game(masks: torch.Tensor) -> torch.Tensor:
    """v(S) = 10·[0 ∈ S or 1 ∈ S] + 6·|S ∩ {2, 3}| on one example: players 0 and 1 copy each other."""
    masks = masks.double()
    return (10 * torch.maximum(masks[:, 0], masks[:, 1]) + 6 * (masks[:, 2] + masks[:, 3]))[:, None]


def test_greedy_schedule_keeps_one_of_two_redundant_channels():
    """One-shot, the copies split 10 (5 each, below 6) and go first; greedy re-plays after the first."""
    from prunecp_cli.importance.cp_greedy import Greedy
    from prunecp_cli.importance.shapley import greedy_shapley

    def play(game, players, *, generator):
        return draw_estimates(game, players, samples=8, generator=generator)

    one_shot = estimate_group(_redundant_game, 4, samples=8, generator=torch.Generator().manual_seed(0))
    # an antithetic pair credits player 0 with 10 in one order and 0 in the reverse: exact values
    assert torch.allclose(one_shot.per_example[0], torch.tensor([5.0, 5.0, 6.0, 6.0], dtype=torch.float64))
    assert set(torch.argsort(one_shot.per_example[0], stable=True)[:2].tolist()) == {0, 1}
    scores, rounds = greedy_shapley({"g": _redundant_game}, {"g": 4}, play, Greedy(remove=0.5, chunk=1), "mean",
                                    generator=lambda name, r: torch.Generator().manual_seed(r))
    assert rounds["g"] == [0.0, -1.0, 1.0, -1.0]
    assert torch.argsort(scores["g"])[:2].tolist() == [0, 2]


def test_default_game_prunes_better_than_random_and_the_plain_shapley_value(tmp_path, trained_digits, digits_files):
    """The benchmark's protocol on the digits CNN: pruned to 0.5 of the FLOPs (global scope, equal shares),
    BatchNorm re-estimated on the score split, mean LAC set size over re-splits of calib ∪ test (which no
    method saw). shapley at its defaults (depth 0.5, mean+2std) beats the mean of 4 random seeds and the
    plain Shapley value (depth 1, mean)."""
    from prunecp_cli import api
    from prunecp_cli.importance.cp_resplit import resplit_efficiency, split_masks
    from prunecp_cli.pipeline.inference import collect_logits

    def set_size(method: str, options: dict, seed: int = 0) -> float:
        out = tmp_path / f"{method}-{len(options)}-{seed}.safetensors"
        api.prune(trained_digits["safetensors"], out, method=method, options=options, data=digits_files["score"],
                  pruning=api.PruneOptions(target_flops=0.5, scope="global"), run=api.RunOptions(seed=seed))
        model = load_model(out).eval()
        parts = [collect_logits(model, open_dataset(digits_files[name]), device=torch.device("cpu"), batch_size=256,
                                num_classes=10) for name in ("calib", "test")]
        logits, labels = (torch.cat(part) for part in zip(*parts, strict=True))
        splits = split_masks(np.arange(len(labels)), 0.5, 200, seed=123)
        return float(resplit_efficiency(logits[None], labels, splits, alpha=0.1, measure="size")[0])

    default = set_size("shapley", {})
    plain = set_size("shapley", {"depth": 1.0, "aggregate": "mean"})
    chance = sum(set_size("random", {}, seed) for seed in range(4)) / 4
    assert default < min(chance, plain), (default, chance, plain)
