"""The ``cluster`` importance: features, the DE objective against real pruning, determinism, --verbose."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from testsupport import assert_flops_kept, assert_pruned_digits_model

from prunecp_cli.importance.base import ImportanceContext
from prunecp_cli.importance.cluster import (
    ClusterImportance,
    ClusterSearch,
    break_ties,
    gated_accuracy,
    mean_activation_maps,
    weight_features,
)
from prunecp_cli.importance.clustering import channel_features
from prunecp_cli.importance.magnitude import group_magnitude
from prunecp_cli.io.data import open_dataset
from prunecp_cli.measure import count_flops, flops_by_module
from prunecp_cli.surgery.batchnorm import recalibrate_batchnorm
from prunecp_cli.surgery.groups import ModelGraph
from prunecp_cli.surgery.plan import apply_removal
from prunecp_cli.surgery.select import FlopsModel

ARCH = "prunecp_cli.models:digits_cnn"
SMALL = {"population": 6, "generations": 3}


def _context(trained_digits, digits_files, **options):
    model = copy.deepcopy(trained_digits["model"]).eval()
    data = open_dataset(digits_files["score"])
    graph = ModelGraph(model, data.first_batch(1).x)
    return ImportanceContext(model=model, graph=graph, data=data, seed=7, options={**SMALL, **options})


def test_features_match_the_weights_and_the_mean_activation_maps(trained_digits, digits_files):
    model = trained_digits["model"].eval()
    data = open_dataset(digits_files["score"]).subset(range(50))
    graph = ModelGraph(model, data.first_batch(1).x)
    group = graph.by_name["features.0.0"]
    assert torch.allclose(weight_features(model, group), channel_features(model.features[0][0].weight), atol=1e-12)
    maps = mean_activation_maps(model, [group], data.batches(16))[group.name]
    x = next(data.batches(50)).x
    with torch.no_grad():
        expected = model.features[0][1](model.features[0][0](x)).mean(0).flatten(1)  # after BN, before ReLU
    assert maps.shape == (16, 64) and torch.allclose(maps, expected.double(), atol=1e-5)


def test_crowding_importance_through_the_search_matches_a_hand_computation():
    # two far-apart clusters; inside the first, points on a line at 0, 1, 3, 6, 10 (second feature constant)
    line = [0.0, 1.0, 3.0, 6.0, 10.0]
    features = torch.tensor([[v, 0.0, 0.0] for v in line] + [[100.0, 5.0, 0.0], [101.0, 7.0, 0.0], [102.0, 6.0, 0.0]],
                            dtype=torch.float64)
    group = type("G", (), {"name": "g", "channels": 8})()
    search = ClusterSearch([group], {"g": features}, flops_model=None, accuracy=None, keep=0.5, penalty=1.0, seed=0)
    labels, importance = search.partition(0, 2)
    assert labels.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    # cluster 0, crowding over dim 0 (span 10): ends inf; 1: (3-0)/10, 3: (6-1)/10, 6: (10-3)/10.
    # cluster 1: dim 0 (span 2) and dim 1 (span 2): 100 and 102 are ends in dim 0, 101 is the dim-1 max → all inf.
    # so cluster 0 ranks the points at 0, 10 (inf, lower index first), 6, 3, 1 → importance (5 - rank) / 5
    assert importance.tolist() == pytest.approx([1.0, 0.2, 0.4, 0.6, 0.8, 1.0, 2 / 3, 1 / 3])
    # keep half of each cluster: ceil(2.5) = 3 of cluster 0 (the points at 0, 10, 6), ceil(1.5) = 2 of cluster 1
    assert search.removal([2], 0.5) == {"g": [1, 2, 7]}


def test_de_objective_is_the_accuracy_and_flops_of_the_really_pruned_model(trained_digits, digits_files):
    ctx = _context(trained_digits, digits_files)
    model, groups = ctx.model, ctx.groups
    features = ClusterImportance.features(ctx, ctx.dataset().subset(range(100)), "activation")
    recal = [b.x for b in ctx.dataset().subset(range(100)).batches(64)]
    batches = list(ctx.dataset().subset(range(100, 300)).batches(64))
    example = ctx.graph.example
    before = copy.deepcopy(model.state_dict())
    search = ClusterSearch(groups, features, keep=0.5, penalty=10.0, seed=0,
                           flops_model=FlopsModel(model, groups, flops_by_module(model, example)),
                           accuracy=gated_accuracy(model, groups, batches, recalibrate_on=recal))
    candidate = search.evaluate([5, 3, 4])
    plain = gated_accuracy(model, groups, batches)(search.removal(candidate.genes, candidate.keep_fraction))
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())  # BN restored
    removal = search.removal(candidate.genes, candidate.keep_fraction)
    pruned = copy.deepcopy(model)
    apply_removal(ModelGraph(pruned, example), removal)
    with torch.no_grad():
        correct_plain = sum(int((pruned(b.x).argmax(1) == b.y).sum()) for b in batches)
        recalibrate_batchnorm(pruned, recal)
        correct = sum(int((pruned(b.x).argmax(1) == b.y).sum()) for b in batches)
    assert candidate.accuracy == pytest.approx(correct / 200) and plain == pytest.approx(correct_plain / 200)
    assert correct != correct_plain  # re-estimation matters
    assert candidate.flops == pytest.approx(count_flops(pruned, example) / count_flops(model, example), abs=1e-3)
    assert candidate.flops <= 0.5 and candidate.objective == candidate.accuracy
    # a larger keep fraction would break the FLOPs budget (f is the largest that fits)
    assert search.flops_model(search.removal(candidate.genes, candidate.keep_fraction + 1e-3)) > 0.5 * search.flops_model.total
    # one channel per cluster of 30 clusters cannot fit: the penalty applies
    crowded = search.evaluate([30, 30, 15])
    assert crowded.flops > 0.5 and crowded.objective == pytest.approx(crowded.accuracy - 10.0 * (crowded.flops - 0.5))


def test_deterministic_for_a_fixed_seed(trained_digits, digits_files):
    first_ctx = _context(trained_digits, digits_files)
    first = ClusterImportance()(first_ctx)
    second_ctx = _context(trained_digits, digits_files)
    second = ClusterImportance()(second_ctx)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert first_ctx.extras == second_ctx.extras
    for group in first_ctx.groups:
        labels = np.array(first_ctx.extras[group.name]["cluster"])
        assert len(labels) == group.channels and 2 <= len(set(labels)) <= group.channels - 1
        assert bool(((first[group.name] > 0) & (first[group.name] < 1 + 0.5 / group.channels**2)).all())


def test_tiebreak_orders_equal_crowding_levels_by_l1_and_keeps_the_crowding_order(trained_digits, digits_files):
    bare_ctx = _context(trained_digits, digits_files, tiebreak="index")
    bare = ClusterImportance()(bare_ctx)
    broken_ctx = _context(trained_digits, digits_files)  # tiebreak=l1, the default
    broken = ClusterImportance()(broken_ctx)
    assert bare_ctx.extras == broken_ctx.extras  # same clusters
    modules = dict(broken_ctx.model.named_modules())
    reordered = 0
    for group in broken_ctx.groups:
        levels, keys = bare[group.name].double(), broken[group.name]
        l1 = group_magnitude(modules, group, p=1)
        expected = sorted(range(group.channels), key=lambda c: (float(levels[c]), float(l1[c]), c))
        assert torch.sort(keys, stable=True).indices.tolist() == expected
        reordered += int(torch.sort(levels, stable=True).indices.tolist() != expected)
    assert reordered > 0  # the digits CNN's crowding levels do tie


def test_break_ties_by_hand():
    levels = torch.tensor([1.0, 0.5, 1.0, 0.5, 2 / 3, 1 / 3])
    keys = break_ties(levels, torch.tensor([3.0, 2.0, 1.0, 4.0, 0.0, 9.0]))
    assert torch.sort(keys).indices.tolist() == [5, 1, 3, 4, 2, 0]
    assert float((keys - levels).max()) < 0.5 / 36


def test_verbose_prints_cluster_counts_and_objectives_per_generation(tmp_path, cli, trained_digits, digits_files):
    out = tmp_path / "importance.json"
    result = cli("score", trained_digits["safetensors"], "--method", "cluster", "--data", digits_files["score"],
                 "--opt", "population=5", "--opt", "generations=2", "--opt", "cosine-source=weight", "--verbose",
                 "-o", out)
    assert result.code == 0, result
    lines = re.findall(r"cluster DE generation (\d)/2: clusters \[([\d, ]+)\] objective ([\d.-]+)", result.stderr)
    assert [int(g) for g, _, _ in lines] == [0, 1, 2], result.stderr
    objectives = [float(o) for _, _, o in lines]
    assert objectives == sorted(objectives)  # greedy selection never loses the best
    for _, counts, _ in lines:
        assert all(2 <= int(k) <= 31 for k in counts.split(","))
    quiet = cli("score", trained_digits["safetensors"], "--method", "cluster", "--data", digits_files["score"],
                "--opt", "population=5", "--opt", "generations=2", "--opt", "cosine-source=weight", "-o", out)
    assert quiet.code == 0 and "cluster DE generation" not in quiet.stderr


def test_prune_with_cluster_end_to_end(tmp_path, cli, trained_digits, digits_files):
    pruned = tmp_path / "pruned.safetensors"
    result = cli("prune", trained_digits["pt"], "--arch", ARCH, "--method", "cluster", "--data",
                 digits_files["score"], "--target-flops", "0.5", "--opt", "population=5", "--opt", "generations=2",
                 "-o", pruned)
    assert result.code == 0, result
    assert_pruned_digits_model(pruned)
    assert_flops_kept(pruned, trained_digits["safetensors"], 0.5)


def test_bad_option_is_a_usage_error(cli, trained_digits, digits_files):
    result = cli("score", trained_digits["safetensors"], "--method", "cluster", "--data", digits_files["score"],
                 "--opt", "cosine-source=kernel")
    assert result.code == 2 and "cosine-source" in result.stderr
