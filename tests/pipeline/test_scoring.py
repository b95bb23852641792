"""``pipeline/scoring.py``: reading ``importance.json``, the scoring warnings, and ``score`` on the digits model."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

from prunecp_cli import api
from prunecp_cli.errors import ScoresError, UsageError
from prunecp_cli.pipeline.scoring import (
    MIN_RELIABLE_EXAMPLES,
    degenerate_warnings,
    few_examples_warnings,
    read_importance,
    scores_for_graph,
)
from prunecp_cli.surgery.groups import ModelGraph

CPU = api.RunOptions(device="cpu")
GROUPS = {"features.0.0": 16, "features.1.0": 32, "features.3.0": 32}  # DigitsCNN: three conv → BN blocks (a pool at 2)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def l1_table(trained_digits):
    return api.score(trained_digits["safetensors"], method="l1", run=CPU)


def _member_l1(module, direction: str) -> torch.Tensor:
    """Σ|w| per channel of one member: a producer's filter rows, a consumer's input columns, a BN scale."""
    w = module.weight.detach().double().abs()
    if w.dim() == 1:
        return w
    return w.flatten(1).sum(1) if direction == "out" else w.transpose(0, 1).flatten(1).sum(1)


def test_l1_table_is_the_mean_of_each_members_channel_norms(l1_table, trained_digits):
    """Every group: the mean of its conv's filter norms, its BN's scales and the next layer's input columns."""
    assert {g.name: g.channels for g in l1_table.groups} == GROUPS
    modules = dict(trained_digits["model"].named_modules())
    for group in l1_table.groups:
        producer, norm, consumer = group.modules
        assert producer == group.name and norm.endswith(".1")
        parts = [_member_l1(modules[producer], "out"), _member_l1(modules[norm], "out"),
                 _member_l1(modules[consumer], "in")]
        expected = torch.stack(parts).mean(0)
        assert torch.allclose(torch.tensor(group.importance, dtype=torch.float64), expected, rtol=1e-6)
    assert l1_table.method == "l1" and l1_table.input_shape == [1, 8, 8]
    assert l1_table.model_sha256 == _sha256(trained_digits["safetensors"])
    assert l1_table.data_sha256 is None and l1_table.warnings == []


def test_data_driven_table_records_the_data_and_its_settings(trained_digits, digits_files):
    data = api.DataSource(digits_files["score"], max_samples=64)
    table = api.score(trained_digits["safetensors"], data, method="taylor", run=api.RunOptions(device="cpu", seed=3))
    assert {g.name: len(g.importance) for g in table.groups} == GROUPS
    assert table.data_sha256 == _sha256(digits_files["score"])
    assert table.model_sha256 == _sha256(trained_digits["safetensors"])
    assert table.params["seed"] == 3 and table.params["max_samples"] == 64 and table.params["batch_size"] == 128
    assert all(torch.isfinite(torch.tensor(g.importance)).all() for g in table.groups)
    assert table.warnings == []  # 64 examples are enough


def test_a_data_driven_method_on_few_examples_warns_in_the_table(trained_digits, digits_files):
    data = api.DataSource(digits_files["score"], max_samples=12)
    table = api.score(trained_digits["safetensors"], data, method="taylor", run=CPU)
    assert table.warnings == few_examples_warnings(12, "--method taylor")


def test_a_data_driven_method_without_data_is_a_usage_error(trained_digits):
    with pytest.raises(UsageError, match="method taylor needs data"):
        api.score(trained_digits["safetensors"], method="taylor", run=CPU)


def test_written_table_reads_back_equal(l1_table, tmp_path):
    path = tmp_path / "importance.json"
    path.write_text(json.dumps(l1_table.to_json()))
    assert read_importance(path) == l1_table


def test_scores_match_only_their_own_model_and_groups(l1_table, trained_digits):
    model = trained_digits["model"]
    graph = ModelGraph(model, torch.zeros(1, 1, 8, 8))
    scores = scores_for_graph(l1_table, graph, model_sha256=l1_table.model_sha256, path="i.json")
    assert {k: v.shape[0] for k, v in scores.items()} == GROUPS
    assert all(v.dtype == torch.float64 for v in scores.values())
    with pytest.raises(ScoresError, match=r"i\.json scores another model .* re-run prunecp score on this checkpoint"):
        scores_for_graph(l1_table, graph, model_sha256="0" * 64, path="i.json")
    missing = dataclasses.replace(l1_table, groups=[g for g in l1_table.groups if g.name != "features.0.0"])
    with pytest.raises(ScoresError, match="has no scores for group features.0.0; re-run score with the same --ignore"):
        scores_for_graph(missing, graph, model_sha256=l1_table.model_sha256, path="i.json")
    narrow = ModelGraph(type(model)(width=8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ScoresError, match=r"group features\.(0\.0 has 16|[13]\.0 has 32) channels there, (8|16) here"):
        scores_for_graph(l1_table, narrow, model_sha256=l1_table.model_sha256, path="i.json")


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist or is not a file; run prunecp score first"),
    ("folder", "does not exist or is not a file"),
    ('{"schema_version": 1,\n "method": ', r"is not valid JSON \(Expecting value at line 2\)"),
    (b"\xff\xfe{not text", r"is not a JSON file prunecp can read \(UnicodeDecodeError\)"),
    ("[" * 100_000 + "]" * 100_000, r"is not a JSON file prunecp can read \(RecursionError\)"),
    ("[1, 2]", "is not a JSON object; pass a file written by prunecp score"),
])
def test_unreadable_scores_files_are_one_line_scores_errors(tmp_path, content, message):
    path = tmp_path / "importance.json"
    if content == "folder":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ScoresError, match=message) as caught:
        read_importance(path)
    assert caught.value.exit_code == 3 and "\n" not in str(caught.value)


def test_few_examples_warning_below_the_threshold_only():
    assert few_examples_warnings(MIN_RELIABLE_EXAMPLES, "BatchNorm recalibration") == []
    (warning,) = few_examples_warnings(MIN_RELIABLE_EXAMPLES - 1, "BatchNorm recalibration")
    assert warning.startswith(f"BatchNorm recalibration uses only {MIN_RELIABLE_EXAMPLES - 1} example(s)")
    assert "pass more --data" in warning


def test_degenerate_warnings_name_the_constant_groups():
    scores = {"a": torch.ones(4), "b": torch.arange(4.0), "c": torch.full((3,), -2.0), "d": torch.ones(1)}
    (warning,) = degenerate_warnings(scores)  # "d" has one channel: nothing to rank, nothing to warn
    assert warning.startswith("importance is constant in 2 group(s) (a, c): they carry no ranking")
    assert degenerate_warnings({"b": torch.arange(4.0)}) == []


def test_degenerate_warnings_shorten_long_lists():
    scores = {f"g{i}": torch.zeros(2) for i in range(8)}
    (warning,) = degenerate_warnings(scores)
    assert "in 8 group(s) (g0, g1, g2, g3, g4 and 3 more)" in warning
