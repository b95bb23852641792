"""cp-bruteforce equals a plain loop that re-runs the whole model once per channel.

``plain_loop_cp_bruteforce`` is the simplest possible reference (gates + full forward passes +
the library's conformal functions); examples/benchmarks/scoring_speed.py times the method against
its own copy of such a loop (a benchmark does not import from the tests).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from testsupport import heldout_set_size

from prunecp_cli import importance as registry
from prunecp_cli.conformal.nonconformity import LAC, prediction_sets
from prunecp_cli.conformal.quantile import conformal_quantile
from prunecp_cli.conformal.stats import mean_set_size, observed_fuzziness
from prunecp_cli.errors import UsageError
from prunecp_cli.importance.base import ImportanceContext
from prunecp_cli.io.data import open_dataset
from prunecp_cli.surgery.gates import ChannelGates
from prunecp_cli.surgery.groups import ModelGraph


def plain_loop_cp_bruteforce(model, groups, data, *, alpha=0.1, seed=0, batch_size=128, cal_fraction=0.5,
                             bn="running"):
    """Reference: per channel, zero it with a gate and re-run the whole model on all of ``data``.

    The data are split as cp-bruteforce documents: a ``seed`` random ``cal_fraction`` of the rows
    calibrates LAC, the rest measures E = (mean set size + observed fuzziness) / 2. With ``bn="batch"``
    the model runs in training mode (BatchNorm normalises with each batch's statistics; the models
    have no dropout), on a copy so that the running statistics stay.

    Returns:
        ``{group: {"size-of": [C], "size": [C], "of": [C]}}``: E(channel off) − E(clean).
    """
    model = copy.deepcopy(model).train() if bn == "batch" else model
    rows = data.rows
    cal_rows = torch.from_numpy(rows[np.random.default_rng(seed).permutation(len(rows))[: round(cal_fraction * len(rows))]])
    lac = LAC()

    def efficiency():
        logits, labels, index = [], [], []
        with torch.no_grad():
            for batch in data.batches(batch_size):
                logits.append(model(batch.x))
                labels.append(batch.y)
                index.append(batch.index)
        logits, labels, index = torch.cat(logits), torch.cat(labels), torch.cat(index)
        cal = torch.isin(index, cal_rows)
        cal_scores = lac.label_scores(logits[cal], labels[cal])
        qhat = conformal_quantile(cal_scores, alpha).qhat
        test_scores = lac.all_scores(logits[~cal])
        size = mean_set_size(prediction_sets(test_scores, qhat))
        fuzziness = observed_fuzziness(cal_scores, test_scores, labels[~cal])
        return {"size-of": (size + fuzziness) / 2, "size": size, "of": fuzziness}

    out = {}
    with ChannelGates(model, groups) as gates:
        clean = efficiency()
        for group in groups:
            values = {key: torch.zeros(group.channels, dtype=torch.float64) for key in clean}
            for channel in range(group.channels):
                mask = torch.ones(group.channels)
                mask[channel] = 0.0
                gates.set(group.name, mask)
                for key, value in efficiency().items():
                    values[key][channel] = value - clean[key]
            gates.set(group.name, None)
            out[group.name] = values
    return out


ONE_SPLIT = {"schedule": "one-shot", "resplits": 1}  # the single seeded split, every channel alone


def _context(model, data, **kwargs):
    graph = ModelGraph(model, data.first_batch(1).x)
    return ImportanceContext(model=model, graph=graph, data=data, **kwargs)


@pytest.fixture(scope="module")
def residual_model(digits_files):
    """A residual net with depthwise convolutions, a concatenation and a projection, trained briefly."""
    from testmodels import residual_depthwise
    from testsupport import load_npz

    from prunecp_cli.training import train_classifier

    torch.manual_seed(0)
    x, y = load_npz(digits_files["train"])
    return train_classifier(residual_depthwise(width=8), x, y, epochs=6, seed=0)


def test_equals_plain_loop_on_trained_cnn_for_every_measure(trained_digits, digits_files):
    model = trained_digits["model"]
    data = open_dataset(digits_files["score"])
    ctx = _context(model, data, batch_size=128, seed=3)
    reference = plain_loop_cp_bruteforce(model, ctx.groups, data, seed=3, bn="running")
    for measure in ("size-of", "size", "of"):
        ctx.options = {"measure": measure, "bn": "running", **ONE_SPLIT}
        scores = registry.create("cp-bruteforce")(ctx)
        for group in ctx.groups:
            assert torch.allclose(scores[group.name], reference[group.name][measure], atol=1e-5, rtol=0), (
                measure, group.name)
    # a trained CNN: silencing a first-layer channel almost always costs efficiency, some cost a lot
    first = reference[ctx.groups[-1].name]["size-of"]
    assert ctx.groups[-1].name == "features.0.0"
    assert (first > 0).double().mean() >= 0.75 and first.mean() > 0.02 and first.max() > 0.1

@pytest.mark.parametrize("bn", ["batch", "running"])
def test_equals_plain_loop_on_coupled_groups_with_chunking_and_a_short_last_batch(residual_model, digits_files, bn):
    data = open_dataset(digits_files["score"])
    ctx = _context(residual_model, data, batch_size=100, seed=0, max_samples=250,
                   options={"max-rows": 64, "cal-fraction": 0.4, "measure": "size-of", "bn": bn, **ONE_SPLIT})
    scores = registry.create("cp-bruteforce")(ctx)
    used = ctx.dataset()
    assert len(used) == 250
    reference = plain_loop_cp_bruteforce(residual_model, ctx.groups, used, seed=0, batch_size=100, cal_fraction=0.4,
                                         bn=bn)
    assert any(len(g.gate_points) > 1 for g in ctx.groups)  # residual and concatenation couplings
    for group in ctx.groups:
        assert torch.allclose(scores[group.name], reference[group.name]["size-of"], atol=1e-5, rtol=0), group.name


def test_seeded_split_is_deterministic_and_seed_dependent(trained_digits, digits_files):
    model = trained_digits["model"]
    data = open_dataset(digits_files["score"])
    options = {"schedule": "one-shot", "resplits": 5}
    run = lambda seed: registry.create("cp-bruteforce")(_context(model, data, seed=seed, options=options))  # noqa: E731
    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_refuses_too_few_examples_and_too_much_memory_with_a_fix(trained_digits, digits_files):
    model = trained_digits["model"]
    data = open_dataset(digits_files["score"])
    method = registry.create("cp-bruteforce")
    with pytest.raises(UsageError, match="calibration points"):
        method(_context(model, data, max_samples=12))
    with pytest.raises(UsageError, match=r"--max-samples \d+"):
        method(_context(model, data, options={"max-memory-gb": 0.0001}))
    with pytest.raises(UsageError, match="measure"):
        method(_context(model, data, options={"measure": "coverage"}))


@pytest.mark.parametrize("layer", ["features.0.0", "features.1.0"])
def test_removing_a_layers_lowest_quarter_beats_taylor_and_l1_on_held_out_data(trained_digits, digits_files, layer):
    """The issue's criterion: greedy, re-split-averaged cp-bruteforce picks a better quarter than taylor or l1.

    One layer scored at a time (the others are ignored); its lowest quarter is zeroed after BatchNorm
    (no recalibration) and the set size is measured on data none of the methods saw. The former
    estimator (one seeded split, every channel alone, size-of) failed this on both layers.
    """
    model = trained_digits["model"]
    data = open_dataset(digits_files["score"])
    others = [name for name in ("features.0.0", "features.1.0", "features.3.0") if name != layer]
    graph = ModelGraph(model, data.first_batch(1).x, ignore=others)
    (group,) = graph.groups
    assert group.name == layer
    quarter = group.channels // 4
    sizes = {}
    for method, options in (("cp-bruteforce", {"remove": 0.25}), ("taylor", {}), ("l1", {})):
        ctx = ImportanceContext(model=model, graph=graph, data=data, options=registry.parse_options(
            method, [f"{k}={v}" for k, v in options.items()]))
        lowest = torch.sort(registry.create(method)(ctx)[layer].double(), stable=True).indices[:quarter]
        sizes[method] = heldout_set_size(model, group, lowest.tolist(), digits_files)
    assert sizes["cp-bruteforce"] < min(sizes["taylor"], sizes["l1"]), sizes


def test_greedy_scores_rank_in_greedy_removal_order_and_see_redundancy():
    """Channels 0 and 1 duplicate each other: each can go alone, not both. One-shot would drop both."""
    from prunecp_cli.importance.cp_greedy import Greedy, greedy_scores

    def measure(alive, active):
        a = alive["g"]
        redundant = 0.0 if a[0] or a[1] else 1.0  # the pair's information survives while one of them does
        costs = torch.tensor([1.0 - float(a[1]), 1.0 - float(a[0]), 0.5, 0.6]) * (1 - redundant)
        calls.append(a.clone())
        return {"g": costs}

    calls = []
    scores, extras = greedy_scores({"g": 4}, measure, Greedy(scope="local", remove=0.5, chunk=1))
    assert torch.sort(scores["g"]).indices.tolist() == [0, 2, 3, 1]
    assert extras["g"]["round"] == [0.0, -1.0, 1.0, -1.0]
    assert len(calls) == 2 and calls[1].tolist() == [False, True, True, True]  # round 2 sees channel 0 silenced


def test_local_greedy_stops_measuring_a_group_that_reached_its_target():
    from prunecp_cli.importance.cp_greedy import Greedy, greedy_scores

    seen = []

    def measure(alive, active):
        seen.append(sorted(active))
        return {g: torch.arange(len(a), dtype=torch.float64) for g, a in alive.items()}

    scores, extras = greedy_scores({"a": 4, "b": 16}, measure, Greedy(scope="local", remove=0.5, chunk=2))
    assert seen == [["a", "b"], ["b"], ["b"], ["b"]]  # a: 2 channels in 1 round; b: 8 in 4 rounds
    assert extras["a"]["round"] == [0.0, 0.0, -1.0, -1.0]
    assert torch.sort(scores["b"]).indices.tolist() == list(range(16))  # cheapest (lowest index) first


def test_global_greedy_uses_one_scale_and_keeps_a_channel_per_group():
    from prunecp_cli.importance.cp_greedy import Greedy, greedy_scores

    costs = {"a": torch.tensor([0.1, 0.2]), "b": torch.tensor([0.3, 5.0, 0.05, 0.4])}
    scores, _ = greedy_scores({"a": 2, "b": 4}, lambda alive, active: costs, Greedy(scope="global", remove=0.5, chunk=2))
    flat = sorted((float(v), g, i) for g, s in scores.items() for i, v in enumerate(s))
    # 3 of 6 go. Round 0: b2 (0.05), a0 (0.1); round 1: a1 (0.2) would empty group a, so b0 (0.3);
    # then the survivors by cost (a1 first: selection's caps keep it)
    assert [(g, i) for _, g, i in flat] == [("b", 2), ("a", 0), ("b", 0), ("a", 1), ("b", 3), ("b", 1)]
    assert max(scores["a"][0], scores["b"][2]) < scores["b"][0] < min(scores["a"][1], scores["b"][3])
    defaults = registry.parse_options("cp-bruteforce", [])  # scope=local: ranked within groups under any --scope
    assert not registry.comparable_across_groups("cp-bruteforce", registry.bind_scope("cp-bruteforce", defaults, "global"))
    assert registry.comparable_across_groups("cp-bruteforce", registry.bind_scope(
        "cp-bruteforce", registry.parse_options("cp-bruteforce", ["scope=auto"]), "global"))
    assert registry.comparable_across_groups("cp-bruteforce", registry.parse_options("cp-bruteforce", ["scope=global"]))


def test_global_greedy_per_flop_removes_the_channels_cheapest_per_flop_saved():
    from prunecp_cli.importance.cp_greedy import Greedy, greedy_scores

    # a's channels save 4 FLOPs each, b's 1: at equal cost a goes first; a cost twice b's but 4 times the
    # saving still goes first; a negative cost (removal helps) goes before any positive one, the larger
    # saving first
    costs = {"a": torch.tensor([0.2, 0.1, 0.9, 0.9]), "b": torch.tensor([0.1, -0.1, 0.5, 0.5])}
    saved = lambda alive: {"a": 4.0, "b": 1.0}  # noqa: E731
    settings = Greedy(scope="global", remove=0.5, chunk=1)
    scores, _ = greedy_scores({"a": 4, "b": 4}, lambda alive, active: costs, settings, saved)
    order = [(g, i) for _, g, i in sorted((float(v), g, i) for g, s in scores.items() for i, v in enumerate(s))]
    # per FLOP, relative to the mean saving 2.5: a -> cost / 1.6, b -> cost / 0.4 (negative: times 0.4)
    assert order[:4] == [("b", 1), ("a", 1), ("a", 0), ("b", 0)]
    plain, _ = greedy_scores({"a": 4, "b": 4}, lambda alive, active: costs, settings)
    assert [(g, i) for _, g, i in sorted((float(v), g, i) for g, s in plain.items() for i, v in enumerate(s))][:3] == [
        ("b", 1), ("a", 1), ("b", 0)]


@pytest.mark.parametrize("scope", ["local", "global"])
def test_lazy_rounds_pick_what_full_rounds_pick_when_costs_do_not_change(scope):
    from prunecp_cli.importance.cp_greedy import Greedy, greedy_scores

    generator = torch.Generator().manual_seed(3)
    costs = {"a": torch.rand(12, generator=generator), "b": torch.rand(20, generator=generator) - 0.2}
    calls = []

    def measure(alive, active, only=None):
        calls.append(only)
        return {g: costs[g].clone() for g in alive}

    full, full_extras = greedy_scores({"a": 12, "b": 20}, measure, Greedy(scope=scope, remove=0.5, chunk=1, max_rounds=16))
    full_calls, calls = len(calls), []
    lazy, lazy_extras = greedy_scores({"a": 12, "b": 20}, measure, Greedy(scope=scope, remove=0.5, chunk=1, max_rounds=16,
                                                                         refresh=4, candidates=2))
    assert {g: s.tolist() for g, s in lazy.items()} == {g: s.tolist() for g, s in full.items()}
    assert lazy_extras == full_extras
    assert len(calls) == full_calls
    # rounds 0, 4, 8, ... and a group's last round measure all its channels; the others 2 chunks per group
    # (local) or in all (global). Local: a loses 6 channels in rounds 0-5, b 10 in rounds 0-9.
    full_rounds = [i for i, only in enumerate(calls) if only is None]
    if scope == "global":  # 16 channels in 16 rounds
        assert len(calls) == 16 and full_rounds == [0, 4, 8, 12, 15]
        assert all(sum(int(m.sum()) for m in only.values()) == 2 for only in calls if only is not None)
    else:
        assert len(calls) == 10 and full_rounds == [0, 4, 8, 9]
        assert all(int(only["a"].sum()) == 12 - 5 for only in calls[5:6])  # a's last round: all 7 alive
        assert [int(only["b"].sum()) for only in calls[1:4]] == [2, 2, 2]


def test_lazy_rounds_pick_only_among_channels_measured_fresh():
    """Between refreshes the stale costs choose the candidates; the pick uses their fresh costs."""
    from prunecp_cli.importance.cp_greedy import Greedy, greedy_scores

    def measure(alive, active, only=None):
        costs = torch.arange(8, dtype=torch.float64)  # full rounds: cheapest = lowest index
        if only is not None:  # fresh costs of the candidates reverse their order; the others would be cheaper
            costs = torch.where(only["g"], 10.0 - costs, -1.0)
        return {"g": costs}

    scores, extras = greedy_scores({"g": 8}, measure, Greedy(scope="local", remove=0.5, chunk=1, refresh=4, candidates=2))
    # round 0 (full) removes 0; round 1 measures 1 and 2 (stale 1, 2), removes 2 (fresh 8 < 9); round 2
    # measures 3 and 4 (1's fresh 9 is now the dearest), removes 4; round 3 is the last: all alive measured
    # (1, 3, 5, 6, 7 at their full costs 1, 3, 5, 6, 7), removes 1
    assert extras["g"]["round"] == [0.0, 3.0, 1.0, -1.0, 2.0, -1.0, -1.0, -1.0]
    assert torch.sort(scores["g"]).indices.tolist() == [0, 2, 4, 1, 3, 5, 6, 7]


def test_flops_saved_is_the_measured_saving_of_one_more_channel(residual_model, digits_files):
    import copy

    from prunecp_cli.importance.cp_bruteforce import _flops_saved
    from prunecp_cli.measure import count_flops
    from prunecp_cli.surgery.plan import apply_removal

    data = open_dataset(digits_files["score"])
    ctx = _context(residual_model, data)
    example = data.first_batch(1).x
    alive = {g.name: torch.ones(g.channels, dtype=torch.bool) for g in ctx.groups}
    first = ctx.groups[0].name
    alive[first][:2] = False  # two channels of the first group already gone
    saved = _flops_saved(ctx)(alive)
    before = copy.deepcopy(residual_model)
    apply_removal(ModelGraph(before, example), {first: [0, 1]})
    base = count_flops(before, example)
    for group in ctx.groups:  # depthwise, residual and concatenated groups alike
        pruned = copy.deepcopy(residual_model)
        live = alive[group.name].nonzero().squeeze(1).tolist()
        removal = {first: [0, 1]}
        removal[group.name] = [*removal.get(group.name, []), live[0]]
        apply_removal(ModelGraph(pruned, example), removal)
        assert saved[group.name] == pytest.approx(base - count_flops(pruned, example), rel=1e-6), group.name


def test_resplit_average_over_one_split_is_the_single_split_efficiency(trained_digits, digits_files):
    """resplits=1 is the seeded split; more re-splits average over other splits (and differ from it)."""
    model = trained_digits["model"]
    data = open_dataset(digits_files["score"])
    one = registry.create("cp-bruteforce")(_context(model, data, seed=3, options={**ONE_SPLIT, "measure": "size"}))
    many = registry.create("cp-bruteforce")(_context(model, data, seed=3, options={"schedule": "one-shot",
                                                                                   "resplits": 20, "measure": "size"}))
    reference = plain_loop_cp_bruteforce(model, [g for g in _context(model, data).groups if g.name == "features.0.0"],
                                         data, seed=3)["features.0.0"]["size"]
    assert torch.allclose(one["features.0.0"], reference, atol=1e-9)
    assert not torch.allclose(many["features.0.0"], reference, atol=1e-3)


def test_base_masks_of_other_groups_hold_in_every_masked_pass(trained_digits, digits_files):
    """The global greedy schedule's evaluator: other groups' removed channels stay silenced, exactly."""
    from prunecp_cli.surgery.masked import MaskedEvaluator

    model = trained_digits["model"]
    data = open_dataset(digits_files["score"])
    groups = _context(model, data).groups
    first, second = groups[-1], groups[0]  # features.0.0 feeds the others
    base = {first.name: torch.ones(first.channels).index_fill_(0, torch.tensor([1, 4, 7]), 0.0)}
    masks = 1 - torch.eye(second.channels)[:5]
    x = data.first_batch(64).x
    with MaskedEvaluator(model, groups, max_rows=128) as ev:
        ev.set_base(base)
        clean = ev.prepare(x)
        fast = ev.evaluate(second.name, masks)
    with ChannelGates(model, groups) as gates, torch.no_grad():
        gates.set(first.name, base[first.name])
        assert torch.allclose(clean, model(x), atol=1e-5)
        for row, mask in enumerate(masks):
            gates.set(second.name, mask)
            assert torch.allclose(fast[row], model(x), atol=1e-4), row


def test_global_greedy_through_prune_removes_the_greedy_prefix(trained_digits, digits_files, tmp_path):
    from prunecp_cli import api
    from prunecp_cli.io.checkpoint import open_model

    options = {"scope": "auto", "remove": 0.1, "chunk": 4, "resplits": 20}
    table = api.score(trained_digits["safetensors"], digits_files["score"], method="cp-bruteforce",
                      options={**options, "scope": "global"})
    removed_first = {g.name: sorted(i for i, r in enumerate(g.extras["round"]) if r >= 0) for g in table.groups}
    assert sum(map(len, removed_first.values())) == 8  # 10 % of 80 channels, in two rounds of 4
    out = tmp_path / "pruned.safetensors"
    api.prune(trained_digits["safetensors"], out, method="cp-bruteforce", options=options, data=digits_files["score"],
              pruning=api.PruneOptions(ratio=0.1, scope="global", protect=0.0))
    meta = open_model(out).meta.extra
    assert meta["method_params"]["scope"] == "global"  # auto took prune's --scope
    widths = {g.name: g.channels - len(removed_first[g.name]) for g in table.groups}
    model = open_model(out).model
    assert {name: dict(model.named_modules())[name].out_channels for name in widths} == widths
