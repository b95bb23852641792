"""Run-time plumbing shared by every command: device choice, seeding, progress bars, messages.

Progress bars and informational messages go to stderr, so stdout stays clean for the
machine-readable outputs (``--json``, ``predict``'s JSON Lines). Both are silent when stderr is
not a terminal, when ``--quiet`` is given, or on any distributed rank but 0.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from prunecp_cli.errors import UsageError


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N`` into a :class:`torch.device`.

    Args:
        spec: ``auto`` picks CUDA when available (the local rank's GPU under torchrun), else CPU.

    Raises:
        UsageError: the spec is malformed or names a CUDA device that is not there.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine; use --device cpu or auto")
        try:
            device = torch.device(spec)
        except RuntimeError as exc:
            raise UsageError(f"--device {spec}: not a device ({exc}); use auto, cpu, cuda or cuda:N") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here; use cuda:0..."
                f"{torch.cuda.device_count() - 1}"
            )
        return device
    raise UsageError(f"--device {spec!r} is not understood; use auto, cpu, cuda or cuda:N")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch, and return a CPU generator seeded the same way."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a torchrun launch."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class Reporter:
    """Progress bars and short status lines on stderr, silenced by ``quiet``.

    Attributes:
        quiet: print nothing (``--quiet``, non-terminal stderr, or a non-zero rank).
    """

    quiet: bool = False
    verbose: bool = False

    @classmethod
    def for_cli(cls, quiet: bool, *, verbose: bool = False) -> Reporter:
        """A reporter that is quiet when asked, when stdout or stderr is not a terminal, or off rank 0.

        ``verbose`` details (``--verbose``) are printed on rank 0 whenever asked, terminal or not.
        """
        on_terminal = sys.stdout.isatty() and sys.stderr.isatty()
        return cls(quiet=quiet or not on_terminal or not is_main_process(),
                   verbose=verbose and is_main_process())

    def detail(self, message: str) -> None:
        """Print a diagnostic line to stderr when ``--verbose`` was given."""
        if self.verbose:
            print(message, file=sys.stderr, flush=True)

    def info(self, message: str) -> None:
        """Print a status line (suppressed when quiet)."""
        if not self.quiet:
            from rich.console import Console

            Console(stderr=True, highlight=False).print(message)

    def warn(self, message: str) -> None:
        """Print a warning to stderr on rank 0, even when quiet.

        The reporter keeps no record (the shared :data:`SILENT` instance would collect every call's
        warnings): results carry their own ``warnings`` lists.
        """
        if is_main_process():
            print(f"prunecp: warning: {message}", file=sys.stderr)

    def track(self, iterable: Iterable, *, total: int | None = None, description: str = "") -> Iterator:
        """Iterate with a rich progress bar (with ETA) unless quiet."""
        if self.quiet:
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
        """A spinner for work with no natural count (unless quiet)."""
        if self.quiet:
            yield
            return
        from rich.console import Console

        with Console(stderr=True).status(message):
            yield


SILENT = Reporter(quiet=True)
