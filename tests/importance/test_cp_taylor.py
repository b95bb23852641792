"""cp-taylor: one forward and backward per batch, deterministic, and it tracks cp-bruteforce."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from testsupport import load_npz

from prunecp_cli import importance as registry
from prunecp_cli.errors import UsageError
from prunecp_cli.importance.base import ImportanceContext
from prunecp_cli.io.data import open_dataset
from prunecp_cli.surgery.groups import ModelGraph


@pytest.fixture(scope="module")
def held_out(digits_files, tmp_path_factory):
    """Every digit the trained CNN did not train on (score + calib + test: 899 images), as one file."""
    parts = [load_npz(digits_files[name]) for name in ("score", "calib", "test")]
    path = tmp_path_factory.mktemp("held_out") / "held_out.npz"
    np.savez(path, x=torch.cat([p[0] for p in parts]).numpy(), y=torch.cat([p[1] for p in parts]).numpy())
    return open_dataset(path)


def _run(method, model, data, **kwargs):
    graph = ModelGraph(model, data.first_batch(1).x)
    options = kwargs.pop("options", {})
    return registry.create(method)(ImportanceContext(model=model, graph=graph, data=data, options=options, **kwargs))


def _agreement(a, b, channels):
    """Channel-weighted mean over groups of the Spearman correlation of two rankings."""
    rhos = [spearmanr(a[name].numpy(), b[name].numpy())[0] for name in channels]
    return float(np.average(rhos, weights=list(channels.values())))


def test_tracks_the_exact_bruteforce_change_on_the_trained_cnn(trained_digits, held_out):
    """Per-group Spearman with cp-bruteforce, channel-weighted over the CNN's 3 groups (16, 32, 32 channels).

    Independent rankings give 0 ± 0.11 (per-group sd 1/sqrt(C-1), weighted). The data-free l1
    ranking agrees at 0.22 (averaged; its earlier per-member-normalised variant at -0.02 to 0.08).
    The exact reference is itself noisy: its last group's changes are small, so a rerun on other
    internal halves moves it. Measured over the two seeds here, on CNNs trained with 1 or 2 threads,
    cp-taylor agrees at 0.26-0.39 per seed (0.31-0.37 averaged), the written formula (|mean| of
    signed terms, aggregate=batch) at -0.15-0.30 (0.00-0.19 averaged): averaged over both seeds,
    cp-taylor must clear 0.2, l1 by 0.05 and the written formula.
    """
    model = trained_digits["model"]
    example, batch, magnitude = [], [], []
    for seed in (0, 1):
        exact = _run("cp-bruteforce", model, held_out, seed=seed,  # every channel alone, one seeded split
                     options={"schedule": "one-shot", "resplits": 1, "measure": "size-of"})
        channels = {name: value.numel() for name, value in exact.items()}
        taylor = _run("cp-taylor", model, held_out, seed=seed, batch_size=64)
        example.append(_agreement(exact, taylor, channels))
        batch.append(_agreement(exact, _run("cp-taylor", model, held_out, seed=seed, batch_size=64,
                                            options={"aggregate": "batch"}), channels))
        magnitude.append(_agreement(exact, _run("l1", model, held_out), channels))
        for value in taylor.values():
            assert torch.isfinite(value).all() and (value >= 0).all()
            assert torch.isclose(value.norm(), torch.tensor(1.0, dtype=value.dtype))  # per-group L2 normalisation
    example, batch, magnitude = np.mean(example), np.mean(batch), np.mean(magnitude)
    assert example > 0.2, example
    assert example > magnitude + 0.05, (example, magnitude)
    assert example > batch, (example, batch)


def test_deterministic_for_a_seed_and_one_forward_per_batch(trained_digits, digits_files):
    model = trained_digits["model"]
    data = open_dataset(digits_files["score"])
    ctx = ImportanceContext(model=model, graph=ModelGraph(model, data.first_batch(1).x), data=data, seed=4,
                            batch_size=100)
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        a = registry.create("cp-taylor")(ctx)
    finally:
        handle.remove()
    assert calls == [100, 100, 100, 59]  # 359 examples: one forward per batch, nothing else
    b = _run("cp-taylor", model, data, seed=4, batch_size=100)
    c = _run("cp-taylor", model, data, seed=5, batch_size=100)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the seed draws the calibration halves


def test_rejects_batches_too_small_for_a_threshold_and_bad_options(trained_digits, digits_files):
    model = trained_digits["model"]
    data = open_dataset(digits_files["score"])
    with pytest.raises(UsageError, match="batches of at least 18"):
        _run("cp-taylor", model, data, batch_size=10)
    with pytest.raises(UsageError, match="temperature"):
        _run("cp-taylor", model, data, options={"temperature": 0.0})
    with pytest.raises(UsageError, match="aggregate"):
        _run("cp-taylor", model, data, options={"aggregate": "median"})
