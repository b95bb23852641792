"""present.py: torch-free, and the report rendered from hand-made data."""

from __future__ import annotations

import subprocess
import sys

from prunecp_cli.pipeline.report import LayerRow, ReportData
from prunecp_cli.present import render_markdown, render_verdict, table_text


def _data() -> ReportData:
    row = LayerRow(name="conv", kind="Conv2d", channels_before=16, channels_after=8, params_before=1440,
                   params_after=720, flops_before=2_000_000, flops_after=500_000)
    return ReportData(model="m.safetensors", baseline="unpruned architecture", input_shape=[1, 8, 8], rows=[row],
                      params={"before": 1440, "after": 720}, flops={"before": 2_000_000, "after": 500_000},
                      latency={"before": None, "after": None}, metadata={"method": "l1"})


def test_importing_present_loads_neither_torch_nor_rich():
    probe = "import sys, prunecp_cli.present; print(sorted(m for m in ('torch', 'rich') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_markdown_report():
    assert render_markdown(_data()) == (
        "### Layers of `m.safetensors`\n\n"
        "| layer | type | channels | params | FLOPs | FLOPs change |\n|---|---|---:|---:|---:|---:|\n"
        "| `conv` | Conv2d | 16 → 8 | 1.44k → 720 | 2.00M → 500.00k | -75.0% |\n\n"
        "_FLOPs counted by fvcore: 1 multiply-add = 1 FLOP, batch 1_\n\n"
        "| quantity | value | change |\n|---|---:|---:|\n"
        "| parameters | 1.44k → 720 | -50.0% |\n| FLOPs | 2.00M → 500.00k | -75.0% |\n\n"
        "| how this model was made | |\n|---|---|\n| importance method | l1 |\n"
    )


def test_table_text_is_120_columns_of_plain_text():
    text = table_text(_data())
    assert "Layers of m.safetensors" in text and "How this model was made" in text and "-75.0%" in text
    assert "\x1b[" not in text and max(len(line) for line in text.splitlines()) <= 120


def test_verdict_panel():
    from rich.console import Console

    console = Console(width=100, record=True)
    verdict = {"passed": False, "checks": [{"name": "model-sha256", "passed": False, "detail": "[not] markup"}],
               "coverage": None, "warnings": ["careful"]}
    render_verdict(verdict, console)
    text = console.export_text()
    assert "certificate does NOT hold" in text and "✗ FAIL model-sha256" in text
    assert "[not] markup" in text and "! warning" in text and "careful" in text
