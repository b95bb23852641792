"""The ``prunecp`` command: a Typer app whose commands live in :mod:`prunecp_cli.commands`.

Importing this module must not import torch (``prunecp --help`` stays fast; a test checks it).
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from prunecp_cli import __version__
from prunecp_cli.commands.calibrate import calibrate
from prunecp_cli.commands.certify import certify
from prunecp_cli.commands.demo import demo
from prunecp_cli.commands.predict import predict
from prunecp_cli.commands.prune import prune
from prunecp_cli.commands.report import report
from prunecp_cli.commands.score import score

app = typer.Typer(
    name="prunecp",
    help="Prune trained CNNs structurally and certify the pruned model with conformal prediction.\n\n"
    "Pipeline: score → prune → calibrate → certify → report. Exit codes: 0 success, 1 internal error (a bug), "
    "2 usage error, 3 bad input, 4 certificate does not hold.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"prunecp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Prune trained CNNs structurally and certify them with conformal prediction."""


app.command("score")(score)
app.command("prune")(prune)
app.command("calibrate")(calibrate)
app.command("certify")(certify)
app.command("predict")(predict)
app.command("report")(report)
app.command("demo")(demo)


def main() -> None:
    """Console-script entry point.

    OpenMP threads wait passively unless the user set ``OMP_WAIT_POLICY``: busy-waiting threads
    make small convolutions many times slower on a machine whose cores are shared (CI runners,
    batch nodes). This must be set before torch is imported, which commands do lazily.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app()


if __name__ == "__main__":
    main()
