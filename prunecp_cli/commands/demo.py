"""``prunecp demo``: the pipeline end to end on real data shipped with scikit-learn."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prunecp_cli.commands import _common as c


@c.cli_command
@c.shared(model=False, data=False)
def demo(
    workdir: Annotated[Path | None, typer.Option("--workdir", help="Folder for the demo's files "
                                                    "(default: a new temporary folder).")] = None,
    target_flops: Annotated[float, typer.Option("--target-flops", help="Fraction of dense FLOPs to keep.")] = 0.5,
    *,
    o: c.Shared,
) -> None:
    """Train a small CNN on scikit-learn's digits, then score (--method auto), prune with distillation, calibrate,
    certify and report it (under a minute on CPU)."""
    from prunecp_cli import api, present

    api.run_demo(workdir, seed=o.seed, target_flops=target_flops, reporter=c.reporter(o.quiet),
                 console=present.console())
