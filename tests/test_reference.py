"""cli/reference.md is generated from the Typer app and must not go stale."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "typer prunecp_cli.app utils docs --name prunecp --output cli/reference.md"


def test_reference_is_current(tmp_path):
    fresh = tmp_path / "reference.md"
    subprocess.run([sys.executable, "-m", "typer", "prunecp_cli.app", "utils", "docs", "--name", "prunecp",
                    "--output", str(fresh)], check=True, capture_output=True, timeout=120, cwd=ROOT)
    committed = (ROOT / "cli" / "reference.md").read_text(encoding="utf-8")
    assert fresh.read_text(encoding="utf-8") == committed, f"cli/reference.md is stale; regenerate it: {COMMAND}"


def test_exit_code_table_matches_the_error_classes():
    from prunecp_cli import errors

    table = (ROOT / "cli" / "exit-codes.md").read_text(encoding="utf-8")
    for cls in (errors.UsageError, errors.InputError, errors.CertificationFailed):
        assert f"| {cls.exit_code} |" in table and cls.__name__ in table
