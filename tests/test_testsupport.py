"""The shared test helpers fail when they should, and the ``cli`` fixture reports errors as the real ``prunecp`` does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from testsupport import CliResult, assert_one_line_error

TYPER_BOX = "╭─ Error ─────────╮\n│ No such option: --bogus │\n╰─────────────────╯\n"


@pytest.mark.parametrize(("result", "contains"), [
    (CliResult(2, "", TYPER_BOX), ""),  # a parser's own box is not a prunecp error line
    (CliResult(2, "", "prunecp: error: No such option: --bogus\nUsage: prunecp score [OPTIONS]\n"), ""),
    (CliResult(2, "", "prunecp: error: --ratio 2 must lie in (0, 1)\n"), "--target-flops"),
    (CliResult(3, "", "prunecp: error: x.npz holds no examples\n"), ""),  # another exit code
    (CliResult(2, "", ""), ""),
    (CliResult(1, "", "Traceback (most recent call last):\nprunecp: error: boom\n"), ""),
])
def test_assert_one_line_error_rejects(result, contains):
    with pytest.raises(AssertionError):
        assert_one_line_error(result, 2 if result.code != 1 else 1, contains=contains)


def test_assert_one_line_error_accepts_one_prunecp_line_holding_the_text():
    assert_one_line_error(CliResult(2, "", "prunecp: error: --ratio 2 must lie in (0, 1)\n"), (2, 3),
                          contains="MUST LIE")


@pytest.mark.parametrize(("args", "contains"), [
    (["score", "m.safetensors", "--bogus"], "No such option: --bogus"),
    (["score", "m.safetensors", "--batch-size", "many"], "Invalid value for '--batch-size'"),
    (["prune"], "Missing argument"),
    (["no-such-command"], "No such command 'no-such-command'"),
])
def test_parser_rejections_are_one_line_in_process_and_from_the_console_script(cli, args, contains):
    in_process = cli(*args)
    assert_one_line_error(in_process, 2, contains=contains)
    script = Path(sys.executable).with_name("prunecp")  # the console script installed beside this interpreter
    real = subprocess.run([script, *args], capture_output=True, text=True, timeout=60)
    assert real.returncode == 2 and real.stderr == in_process.stderr  # the fixture takes the real path
