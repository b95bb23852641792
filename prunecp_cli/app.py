"""The ``prunecp`` command: a Typer app whose commands live in :mod:`prunecp_cli.commands`.

Importing this module must not import torch (``prunecp --help`` stays fast; a test checks it).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from prunecp_cli import __version__
from prunecp_cli.commands.calibrate import calibrate
from prunecp_cli.commands.certify import certify
from prunecp_cli.commands.compress import compress
from prunecp_cli.commands.demo import demo
from prunecp_cli.commands.export import export
from prunecp_cli.commands.predict import predict
from prunecp_cli.commands.prune import prune
from prunecp_cli.commands.report import report
from prunecp_cli.commands.score import score


class _PlainErrors(TyperGroup):
    """The root group: argument errors are one plain line on stderr, like every other prunecp error.

    Typer draws parser errors (unknown option, a value that is not a number, ...) as a rich box of
    several lines, with ANSI colours forced under GitHub Actions even when stderr is a log file.
    prunecp prints ``prunecp: error: MESSAGE; see 'prunecp CMD --help'`` instead and exits 2.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Run the app; with ``standalone_mode`` exit with its code, printing parser errors on one line."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        from typer import Abort
        from typer._click.exceptions import ClickException

        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ClickException as exc:
            if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
                ctx = getattr(exc, "ctx", None)
                where = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
                message = " ".join(exc.format_message().split()).rstrip(".")
                print(f"prunecp: error: {message}{where}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except Abort:
            print("prunecp: error: aborted", file=sys.stderr)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="prunecp",
    cls=_PlainErrors,
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
app.command("export")(export)
app.command("compress")(compress)
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
