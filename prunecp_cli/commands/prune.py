"""``prunecp prune``: remove channels physically and write a prunecp .safetensors model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prunecp_cli import importance as registry
from prunecp_cli.commands import _common as c


@c.cli_command
def prune(
    checkpoint: Annotated[Path, typer.Argument(help="Dense checkpoint (.safetensors/.pt/.pth/.bin) or prunecp model.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Pruned model to write (.safetensors).")] = Path(
        "pruned.safetensors"),
    scores: Annotated[Path | None, typer.Option("--scores", help="importance.json from prunecp score.",
                                                   rich_help_panel="Importance")] = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help="Score now with this method instead of "
                                                  f"--scores ({', '.join(registry.METHODS)}).",
                                                  rich_help_panel="Importance")] = None,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Score split: used by --method and for "
                                                 "BatchNorm recalibration.", rich_help_panel="Data")] = None,
    ratio: Annotated[float | None, typer.Option("--ratio", help="Fraction of channels to remove, in (0, 1).",
                                                   rich_help_panel="Pruning")] = None,
    target_flops: Annotated[float | None, typer.Option("--target-flops", help="Fraction of dense FLOPs to keep, "
                                                          "in (0, 1).", rich_help_panel="Pruning")] = None,
    scope: Annotated[str, typer.Option("--scope", help="local: the ratio applies to every group; global: channels "
                                       "of all groups ranked together.", rich_help_panel="Pruning")] = "local",
    max_layer_ratio: Annotated[float, typer.Option("--max-layer-ratio", help="Most any group may lose; a layer is "
                                                   "never removed whole.", rich_help_panel="Pruning")] = 0.9,
    round_to: Annotated[int, typer.Option("--round-to", min=1, help="Keep channel counts multiples of N.",
                                          rich_help_panel="Pruning")] = 1,
    protect: Annotated[float | None, typer.Option("--protect", help="Fraction of each group's top channels never "
                                                     "removed (default 0.1 with --scope global, else 0).",
                                                     rich_help_panel="Pruning")] = None,
    ignore: c.Ignore = None,
    bn_recalibrate: Annotated[bool | None, typer.Option("--bn-recalibrate/--no-bn-recalibrate",
                                                           help="Re-estimate BatchNorm statistics on --data after "
                                                           "pruning (default: on when --data is given).",
                                                           rich_help_panel="Pruning")] = None,
    opt: c.Opt = None,
    max_samples: c.MaxSamples = None,
    arch: c.Arch = None,
    arch_kwargs: c.ArchKwargs = None,
    input_shape: c.InputShape = None,
    image_size: c.ImageSize = None,
    mean: c.Mean = None,
    std: c.Std = None,
    device: c.Device = "auto",
    batch_size: c.BatchSize = 128,
    seed: c.Seed = 0,
    quiet: c.Quiet = False,
    debug: c.Debug = False,
) -> None:
    """Remove the least important channels physically, check the model, and save it as .safetensors."""
    options = registry.parse_options(method, opt) if method else None
    from prunecp_cli import api
    from prunecp_cli.pipeline.session import parse_shape

    rep = c.reporter(quiet)
    result = api.prune(
        checkpoint, out, scores=scores, method=method, data=data, ratio=ratio, target_flops=target_flops,
        scope=scope, max_layer_ratio=max_layer_ratio, round_to=round_to, protect=protect,
        ignore=tuple(ignore or ()), bn_recalibrate=bn_recalibrate, arch=arch, arch_kwargs=c.arch_kwargs(arch_kwargs),
        input_shape=parse_shape(input_shape), options=options, device=device, batch_size=batch_size, seed=seed,
        max_samples=max_samples, preprocess=c.preprocess(image_size, mean, std), reporter=rep,
    )
    rep.info(
        f"wrote {result.output}: params {result.params_before:,} → {result.params_after:,} "
        f"({result.params_ratio:.1%}), FLOPs {result.flops_before:,} → {result.flops_after:,} "
        f"({result.flops_ratio:.1%} of the input; 1 multiply-add = 1 FLOP)"
    )
