"""cp-bruteforce equals a plain loop that re-runs the whole model once per channel.

``plain_loop_cp_bruteforce`` is the simplest possible reference (gates + full forward passes +
the library's conformal functions); examples/benchmarks/scoring_speed.py times the method against
its own copy of such a loop (a benchmark does not import from the tests).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunecp_cli import importance as registry
from prunecp_cli.conformal.nonconformity import LAC, prediction_sets
from prunecp_cli.conformal.quantile import conformal_quantile
from prunecp_cli.conformal.stats import mean_set_size, observed_fuzziness
from prunecp_cli.errors import UsageError
from prunecp_cli.importance.base import ImportanceContext
from prunecp_cli.io.data import open_dataset
from prunecp_cli.surgery.gates import ChannelGates
from prunecp_cli.surgery.groups import ModelGraph


def plain_loop_cp_bruteforce(model, groups, data, *, alpha=0.1, seed=0, batch_size=128, cal_fraction=0.5):
    """Reference: per channel, zero it with a gate and re-run the whole model on all of ``data``.

    The data are split as cp-bruteforce documents: a ``seed`` random ``cal_fraction`` of the rows
    calibrates LAC, the rest measures E = (mean set size + observed fuzziness) / 2.

    Returns:
        ``{group: {"size-of": [C], "size": [C], "of": [C]}}``: E(channel off) − E(clean).
    """
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
    reference = plain_loop_cp_bruteforce(model, ctx.groups, data, seed=3)
    for measure in ("size-of", "size", "of"):
        ctx.options = {"measure": measure}
        scores = registry.create("cp-bruteforce")(ctx)
        for group in ctx.groups:
            assert torch.allclose(scores[group.name], reference[group.name][measure], atol=1e-5, rtol=0), (
                measure, group.name)
    # a trained CNN: silencing a first-layer channel almost always costs efficiency, some cost a lot
    first = reference[ctx.groups[-1].name]["size-of"]
    assert ctx.groups[-1].name == "features.0.0"
    assert (first > 0).double().mean() >= 0.75 and first.mean() > 0.02 and first.max() > 0.1

def test_equals_plain_loop_on_coupled_groups_with_chunking_and_a_short_last_batch(residual_model, digits_files):
    data = open_dataset(digits_files["score"])
    ctx = _context(residual_model, data, batch_size=100, seed=0, max_samples=250,
                   options={"max-rows": 64, "cal-fraction": 0.4})
    scores = registry.create("cp-bruteforce")(ctx)
    used = ctx.dataset()
    assert len(used) == 250
    reference = plain_loop_cp_bruteforce(residual_model, ctx.groups, used, seed=0, batch_size=100, cal_fraction=0.4)
    assert any(len(g.gate_points) > 1 for g in ctx.groups)  # residual and concatenation couplings
    for group in ctx.groups:
        assert torch.allclose(scores[group.name], reference[group.name]["size-of"], atol=1e-5, rtol=0), group.name


def test_seeded_split_is_deterministic_and_seed_dependent(trained_digits, digits_files):
    model = trained_digits["model"]
    data = open_dataset(digits_files["score"])
    run = lambda seed: registry.create("cp-bruteforce")(_context(model, data, seed=seed))  # noqa: E731
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
