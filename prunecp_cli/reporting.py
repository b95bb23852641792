"""What a run prints: result lines, warnings, progress bars and spinners; and which process prints.

Result lines (what was written, FLOPs kept, q̂, ...) go to stdout whether or not it is a terminal,
so a CI log or ``| tee`` keeps them; a command whose stdout carries machine-readable output
(``--json``, ``predict``'s JSON Lines, a report on stdout) sends them to stderr instead. Progress
bars and spinners go to stderr and only appear when stderr is a terminal. ``--quiet`` silences
both; any distributed rank but 0 prints neither. Warnings always go to stderr (rank 0).

Nothing here imports torch (rich only inside the methods that draw), so the command layer can
build a :class:`Reporter` before anything heavy loads. :func:`process_rank` is the one place the
torchrun rank is read.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


def process_rank() -> int:
    """This process's rank under torchrun (its ``RANK``), 0 when not launched by torchrun."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a torchrun launch."""
    return process_rank() == 0


@dataclass
class Reporter:
    """Result lines, warnings, progress bars and spinners of one run.

    Attributes:
        quiet: print no result lines and no progress (``--quiet``, or a non-zero rank).
        verbose: print method diagnostics (``--verbose``) to stderr.
        progress: show progress bars and spinners; None means "when stderr is a terminal".
        results_to_stderr: send result lines to stderr (stdout carries machine-readable output).
    """

    quiet: bool = False
    verbose: bool = False
    progress: bool | None = None
    results_to_stderr: bool = False

    @classmethod
    def for_cli(cls, quiet: bool, *, verbose: bool = False, results_to_stderr: bool = False) -> Reporter:
        """The reporter of a command: results on stdout (or stderr), progress bars on a terminal only.

        Everything but warnings is silent with ``quiet`` and off rank 0; ``verbose`` details are
        printed on rank 0 whenever asked, terminal or not.
        """
        main = is_main_process()
        return cls(quiet=quiet or not main, verbose=verbose and main, progress=None,
                   results_to_stderr=results_to_stderr)

    @property
    def shows_progress(self) -> bool:
        """Whether progress bars and spinners are drawn."""
        if self.quiet:
            return False
        return sys.stderr.isatty() if self.progress is None else self.progress

    def detail(self, message: str) -> None:
        """Print a diagnostic line to stderr when ``--verbose`` was given."""
        if self.verbose:
            print(message, file=sys.stderr, flush=True)

    def info(self, message: str) -> None:
        """Print a result line (plain text, no markup) unless quiet."""
        if not self.quiet:
            print(message, file=sys.stderr if self.results_to_stderr else sys.stdout, flush=True)

    def warn(self, message: str) -> None:
        """Print a warning to stderr on rank 0, even when quiet.

        The reporter keeps no record (the shared :data:`SILENT` instance would collect every call's
        warnings): results carry their own ``warnings`` lists.
        """
        if is_main_process():
            print(f"prunecp: warning: {message}", file=sys.stderr, flush=True)

    def track(self, iterable: Iterable, *, total: int | None = None, description: str = "") -> Iterator:
        """Iterate with a rich progress bar (with ETA) when progress is shown."""
        if not self.shows_progress:
            yield from iterable
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        from rich.console import Console

        with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task(description, total=total)
            for item in iterable:
                yield item
                progress.advance(task)

    @contextlib.contextmanager
    def status(self, message: str) -> Iterator[None]:
        """A spinner for work with no natural count, when progress is shown."""
        if not self.shows_progress:
            yield
            return
        from rich.console import Console

        with Console(stderr=True).status(message):
            yield


SILENT = Reporter(quiet=True)
