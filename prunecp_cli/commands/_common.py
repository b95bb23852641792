"""Options shared by every command, and the wrapper that turns errors into exit codes.

Nothing here imports torch: ``prunecp --help`` must stay fast.
"""

from __future__ import annotations

import functools
import inspect
import sys
from enum import Enum
from typing import Annotated

import typer

from prunecp_cli import checks
from prunecp_cli.errors import PrunecpError, brief

Arch = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="Architecture of a dense checkpoint: torchvision:NAME (e.g. torchvision:resnet18), timm:NAME "
        "(e.g. timm:resnet50d; needs prunecp[timm]) or package.module:factory importable from the current "
        "folder or PYTHONPATH. Not needed for prunecp .safetensors files, which carry their architecture, nor "
        "for a timm hub folder (config.json beside model.safetensors).",
        rich_help_panel="Model",
    ),
]
TrustArch = Annotated[
    bool,
    typer.Option(
        "--trust-arch",
        help="Build the architecture a prunecp .safetensors file names even when it is not from torchvision: "
        "or prunecp_cli.models:. Building it imports and runs that module's code, so use this only for files "
        "you trust; --arch with the file's own spec allows that one architecture alone.",
        rich_help_panel="Model",
    ),
]
ArchKwargs = Annotated[
    str | None,
    typer.Option("--arch-kwargs", help='JSON keyword arguments of the architecture, e.g. \'{"num_classes": 10}\'.',
                 rich_help_panel="Model"),
]
InputShape = Annotated[
    str | None,
    typer.Option("--input-shape", help="C,H,W of one input when no --data is given (e.g. 3,32,32).",
                 rich_help_panel="Model"),
]
Device = Annotated[
    str, typer.Option("--device", help="auto (CUDA when available), cpu, cuda or cuda:N.", rich_help_panel="Run")
]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Examples per forward pass.", rich_help_panel="Run")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for every random choice (reproducible runs).",
                                   rich_help_panel="Run")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars and no result lines (errors and "
                                     "warnings still go to stderr).", rich_help_panel="Run")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.", rich_help_panel="Run")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Print method diagnostics (e.g. search progress) "
                                       "to stderr.", rich_help_panel="Run")]
ImageSize = Annotated[
    int | None,
    typer.Option("--image-size", min=1, help="Image folders: resize and centre-crop to this size.", rich_help_panel="Data"),
]
Mean = Annotated[
    str | None,
    typer.Option("--mean", help="Per-channel mean to subtract after scaling to [0,1], e.g. 0.485,0.456,0.406.",
                 rich_help_panel="Data"),
]
Std = Annotated[
    str | None,
    typer.Option("--std", help="Per-channel standard deviation to divide by, e.g. 0.229,0.224,0.225.",
                 rich_help_panel="Data"),
]


class ChannelCount(str, Enum):
    """Values of ``--channels``."""

    gray = "1"
    rgb = "3"


Channels = Annotated[
    ChannelCount | None,
    typer.Option("--channels", help="Convert inputs to 1 (grayscale) or 3 (RGB) channels: images as PIL does, "
                 "arrays by repeating the channel or by luma weights. Default: images get the model's input "
                 "channels; arrays are used as stored.", rich_help_panel="Data"),
]
Ignore = Annotated[
    list[str] | None,
    typer.Option("--ignore", help="Layer to keep whole (repeatable). The final classifier is always kept.",
                 rich_help_panel="Pruning"),
]
MaxSamples = Annotated[
    int | None,
    typer.Option("--max-samples", min=1, help="Score with at most this many examples of --data (a seeded random subset); auto's "
                 "comparison, --allocation measured and BatchNorm re-estimation still use all of it.",
                 rich_help_panel="Data"),
]
Opt = Annotated[
    list[str] | None,
    typer.Option("--opt", help="Method option KEY=VALUE (repeatable); see the method list above.",
                 rich_help_panel="Importance"),
]


_FLAGS = {"output": "-o", "checkpoint": "CHECKPOINT", "model": "MODEL"}


def flag(argument: str) -> str:
    """The command-line name of an API argument: ``target_flops`` → ``--target-flops``, ``output`` → ``-o``."""
    return _FLAGS.get(argument, "--" + argument.replace("_", "-"))


def fail(message: str, code: int) -> typer.Exit:
    """Print a one-line error to stderr and return the Exit to raise."""
    print(f"prunecp: error: {message}", file=sys.stderr)
    return typer.Exit(code)


def cli_command(func):
    """Run a command body, mapping errors to exit codes (0 ok, 1 bug, 2 usage, 3 bad input, 4 not certified).

    :class:`PrunecpError` subclasses give their own exit code and a one-line message; anything
    else is a bug (exit 1) with a hint to rerun with ``--debug``. With ``--debug`` tracebacks
    are printed too.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        debug = bool(kwargs.get("debug", False))
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except PrunecpError as exc:
            if debug:
                import traceback

                traceback.print_exc()
            raise fail(exc.render(flag), exc.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except Exception as exc:  # a bug: say so, briefly
            if debug:
                import traceback

                traceback.print_exc()
            first = brief(exc) if str(exc).strip() else ""
            raise fail(
                f"internal error ({type(exc).__name__}: {first}); this is a bug in prunecp, "
                "please report it with the output of --debug",
                1,
            ) from None

    return wrapper


def preprocess(
    image_size: int | None, mean: str | None, std: str | None, channels: ChannelCount | int | None = None
):
    """Build the data preprocessing from the Data options (no torch import: it runs before any loading)."""
    from prunecp_cli.api import Preprocess
    from prunecp_cli.checks import parse_floats

    return Preprocess(image_size=image_size, mean=parse_floats(mean, option="--mean"),
                      std=parse_floats(std, option="--std"),
                      channels=None if channels is None else int(getattr(channels, "value", channels)))


def reporter(quiet: bool, verbose: bool = False, *, results_to_stderr: bool = False):
    """The reporter of a CLI run: result lines on stdout (stderr when stdout carries machine output)."""
    from prunecp_cli.api import Reporter

    return Reporter.for_cli(quiet, verbose=verbose, results_to_stderr=results_to_stderr)


def parse_kwargs(text: str | None) -> dict:
    """Parse --arch-kwargs (no torch import: it runs before any model is loaded)."""
    return checks.parse_json_object(text, option="--arch-kwargs")


class Shared:
    """The shared options of one command run (see :func:`shared`), turned into API objects on request."""

    def __init__(self, **values) -> None:
        self.__dict__.update(values)

    def model(self, checkpoint):
        """The :class:`~prunecp_cli.options.ModelSource` of ``checkpoint`` and the Model options (torch-free)."""
        from prunecp_cli.api import ModelSource

        return ModelSource(checkpoint, arch=self.arch, arch_kwargs=parse_kwargs(self.arch_kwargs),
                           input_shape=checks.parse_shape(getattr(self, "input_shape", None)),
                           trust_arch=self.trust_arch)

    def data(self, path, max_samples: int | None = None):
        """The :class:`~prunecp_cli.options.DataSource` of ``path`` and the Data options, or None (torch-free)."""
        from prunecp_cli.api import DataSource

        if path is None:
            return None
        return DataSource(path, preprocess=preprocess(self.image_size, self.mean, self.std, self.channels),
                          max_samples=max_samples)

    def run(self, *, results_to_stderr: bool = False):
        """The :class:`~prunecp_cli.options.RunOptions` of the Run options, with the command line's reporter."""
        from prunecp_cli.api import RunOptions

        return RunOptions(device=self.device, batch_size=self.batch_size, seed=getattr(self, "seed", 0),
                          reporter=reporter(self.quiet, getattr(self, "verbose", False),
                                            results_to_stderr=results_to_stderr))


_SHARED = {  # every shared option, in the order commands list them
    "arch": (Arch, None), "arch_kwargs": (ArchKwargs, None), "trust_arch": (TrustArch, False),
    "input_shape": (InputShape, None), "image_size": (ImageSize, None), "mean": (Mean, None), "std": (Std, None),
    "channels": (Channels, None), "device": (Device, "auto"), "batch_size": (BatchSize, None), "seed": (Seed, 0),
    "quiet": (Quiet, False), "verbose": (Verbose, False), "debug": (Debug, False),
}


def shared(*, model: bool = True, input_shape: bool = False, data: bool = True, batch_size: int | None = None,
           seed: bool = True, verbose: bool = False):
    """Give a command the shared options, declared once here, after its own; its body receives them as ``o``.

    Args:
        model: ``--arch``, ``--arch-kwargs``, ``--trust-arch``.
        input_shape: ``--input-shape``.
        data: ``--image-size``, ``--mean``, ``--std``, ``--channels``.
        batch_size: the command's default ``--batch-size`` (None: no such option).
        seed: ``--seed``.
        verbose: ``--verbose``.

    ``--device`` (with a batch size), ``--quiet`` and ``--debug`` are always added.
    """
    names = [*(["arch", "arch_kwargs", "trust_arch"] if model else []), *(["input_shape"] if input_shape else []),
             *(["image_size", "mean", "std", "channels"] if data else []),
             *(["device", "batch_size"] if batch_size is not None else []), *(["seed"] if seed else []), "quiet",
             *(["verbose"] if verbose else []), "debug"]

    def decorate(func):
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "o"]
        added = []
        for name in names:
            annotation, default = _SHARED[name]
            added.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation,
                                           default=batch_size if name == "batch_size" else default))

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            values = {p.name: kwargs.pop(p.name, p.default) for p in added}
            return func(*args, o=Shared(**values), **kwargs)

        wrapper.__signature__ = signature.replace(parameters=own + added)
        return wrapper

    return decorate


