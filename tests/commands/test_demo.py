"""`prunecp demo` runs the pipeline on the digits shipped with scikit-learn."""

from __future__ import annotations

from pathlib import Path


def test_demo_runs_end_to_end(tmp_path, cli):
    result = cli("demo", "--workdir", tmp_path / "demo")
    assert result.code == 0, result
    folder = tmp_path / "demo"
    for name in ("train.npz", "score.npz", "calib.npz", "test.npz", "dense.safetensors", "importance.json",
                 "pruned.safetensors", "pruned.onnx"):
        assert (folder / name).is_file(), name
    assert "done in" in result.stdout and str(folder) in result.stdout
    from prunecp_cli.io.checkpoint import open_model

    extra = open_model(folder / "pruned.safetensors").meta.extra
    assert 0.4 <= extra["flops_after"] / extra["flops_before"] <= 0.6


def test_demo_figures(tmp_path):
    from rich.console import Console

    from prunecp_cli.demo import run_demo

    figures = run_demo(tmp_path, console=Console(file=open(Path(tmp_path) / "log.txt", "w")))  # noqa: SIM115
    assert figures["dense_accuracy"] > 0.95
    # auto's choice and three epochs of distillation keep the pruned model within 2 points of the dense one.
    assert figures["pruned_accuracy"] >= figures["dense_accuracy"] - 0.02, figures
    assert 0.4 <= figures["flops_ratio"] <= 0.6
    auto = figures["auto"]
    assert [c["method"] for c in auto["candidates"]] == ["l1", "taylor", "cp-taylor"]
    assert auto["chosen"] == min(auto["candidates"], key=lambda c: c["holdout_set_size"])["method"]
    # the demo ends by exporting to ONNX and certifying the export: the same verdict as the .safetensors file
    assert figures["export_certified"] is figures["certified"]
    assert 0 <= figures["export_max_abs_logit_diff"] < 1e-4
