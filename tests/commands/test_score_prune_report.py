"""The score → prune → report pipeline through the CLI, on the digits CNN."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from testsupport import load_npz

from prunecp_cli import load_model
from prunecp_cli.io.checkpoint import open_model

ARCH = "prunecp_cli.models:digits_cnn"


def test_score_writes_importance_json(tmp_path, cli, trained_digits, digits_files):
    out = tmp_path / "importance.json"
    result = cli("score", trained_digits["pt"], "--arch", ARCH, "--method", "taylor", "--data",
                 digits_files["score"], "-o", out)
    assert result.code == 0, result
    table = json.loads(out.read_text())
    assert table["schema_version"] == 1 and table["method"] == "taylor"
    assert table["model_sha256"] == open_model(trained_digits["pt"], arch=ARCH).sha256
    assert len(table["data_sha256"]) == 64
    assert [g["channels"] for g in table["groups"]] and all(
        len(g["importance"]) == g["channels"] and g["modules"] for g in table["groups"])
    assert "classifier" not in {m for g in table["groups"] for m in g["modules"] if m == g["name"]}


def test_prune_with_scores_records_used_data_and_reports(tmp_path, cli, trained_digits, digits_files):
    scores = tmp_path / "importance.json"
    assert cli("score", trained_digits["safetensors"], "--method", "l2", "-o", scores).code == 0
    pruned = tmp_path / "pruned.safetensors"
    result = cli("prune", trained_digits["safetensors"], "--scores", scores, "--data", digits_files["score"],
                 "--target-flops", "0.6", "--scope", "global", "-o", pruned)
    assert result.code == 0, result
    loaded = open_model(pruned)
    extra = loaded.meta.extra
    assert 0.55 <= extra["flops_after"] / extra["flops_before"] <= 0.65
    assert {d["role"] for d in extra["data_sha256"]} == {"bn-recalibration"}  # l2 used no data to score
    assert extra["source_sha256"] == open_model(trained_digits["safetensors"]).sha256
    assert extra["source_file"] == Path(trained_digits["safetensors"]).name
    x, y = load_npz(digits_files["test"])
    with torch.no_grad():
        acc = float((load_model(pruned)(x).argmax(1) == y).float().mean())
    assert acc > 0.5
    for fmt in ("json", "markdown"):
        out = tmp_path / f"report.{fmt}"
        result = cli("report", pruned, "--format", fmt, "--repeats", "3", "--device", "cpu", "-o", out)
        assert result.code == 0, result
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["flops"]["after"] == extra["flops_after"] and report["flops"]["before"] == extra["flops_before"]
    assert report["latency"]["after"]["median_ms"] > 0 and report["latency"]["before"]["median_ms"] > 0
    assert 0.35 <= report["reduction"]["flops"] <= 0.45
    markdown = (tmp_path / "report.markdown").read_text()
    assert "1 multiply-add = 1 FLOP" in markdown and "| `features.0.0` | Conv2d |" in markdown
    assert "| importance method | l2 |" in markdown
    assert "| target | keep 0.6 of dense FLOPs (global) |" in markdown
    assert "score.npz (bn-recalibration)" in markdown


def test_prune_with_method_and_data_records_score_data(tmp_path, cli, trained_digits, digits_files):
    pruned = tmp_path / "pruned.safetensors"
    result = cli("prune", trained_digits["pt"], "--arch", ARCH, "--method", "taylor", "--data",
                 digits_files["score"], "--ratio", "0.25", "--round-to", "4", "-o", pruned)
    assert result.code == 0, result
    loaded = open_model(pruned)
    assert {d["role"] for d in loaded.meta.extra["data_sha256"]} == {"score", "bn-recalibration"}
    widths = [m.out_channels for m in loaded.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w % 4 == 0 for w in widths) and widths != [16, 32, 32]
    # pruning a pruned model again appends to its plan; the file still rebuilds itself
    again = tmp_path / "again.safetensors"
    assert cli("prune", pruned, "--method", "l1", "--ratio", "0.25", "-o", again).code == 0
    twice = open_model(again)
    assert len(twice.meta.plan["steps"]) == 2
    assert {d["role"] for d in twice.meta.extra["data_sha256"]} == {"score", "bn-recalibration"}


def test_report_table_on_terminal_free_stdout(tmp_path, cli, trained_digits):
    result = cli("report", trained_digits["safetensors"], "--no-latency")
    assert result.code == 0, result
    assert "parameters" in result.stdout and "FLOPs" in result.stdout
