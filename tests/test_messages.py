"""Error messages: one plain line even under CI colour forcing, library text never cut mid-sentence,
and no citation of files that an installed prunecp does not have."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prunecp_cli.errors import brief

PACKAGE = Path(__file__).resolve().parents[1] / "prunecp_cli"


@pytest.mark.parametrize("args", [
    ["calibrate", "m.safetensors", "--bogus"],
    ["calibrate", "m.safetensors", "--data", "d.npz", "--alpha", "x"],
    ["calibrate"],
    ["no-such-command"],
    ["calibrate", "m.safetensors", "--data", "missing.npz"],
])
def test_errors_are_one_plain_line_when_ci_forces_colour(tmp_path, args):
    env = {**os.environ, "GITHUB_ACTIONS": "true", "FORCE_COLOR": "1", "PY_COLORS": "1"}
    run = subprocess.run([sys.executable, "-m", "prunecp_cli", *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode in (2, 3), run.stderr
    assert "\x1b" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunecp: error:"), run.stderr


def test_parser_errors_name_the_help_to_read(tmp_path):
    run = subprocess.run([sys.executable, "-m", "prunecp_cli", "prune", "m.pt", "--ratio", "half"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "'--ratio'" in run.stderr and "prune --help'" in run.stderr


def test_brief_keeps_short_messages_and_first_lines():
    assert brief(ValueError("short.\nsecond line")) == "short."
    assert brief(RuntimeError("")) == "RuntimeError"


def test_brief_cuts_between_sentences_never_inside_one():
    first = "INDICES element is out of DATA bounds, id=16 axis_dim=16 " + "x" * 150 + "."
    second = "Another sentence that does not fit."
    text = brief(RuntimeError(f"{first} {second}"), limit=200)
    assert text == first  # the long first sentence is kept whole, the next one is dropped
    many = " ".join(f"Sentence {i} is here." for i in range(40))
    cut = brief(RuntimeError(many), limit=100)
    assert cut.endswith("is here.") and len(cut) <= 100 and many.startswith(cut)
    huge = brief(RuntimeError("word " * 500), limit=100)
    assert huge.endswith("…") and len(huge) <= 1001 and "wor…" not in huge


def _non_docstring_strings(tree: ast.AST):
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docstrings.add(id(node.value))  # attribute docstrings
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def test_no_user_facing_text_cites_project_documents():
    """Messages and help may not send a user to design.md or algorithms.md: pip installs neither."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in _non_docstring_strings(tree):
            if any(name in node.value for name in ("design.md", "algorithms.md", "anchors.md", "style.md")):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.value[:60]!r}")
    assert offenders == []
