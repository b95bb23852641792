"""``prunecp prune``: remove channels physically and write a prunecp .safetensors model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prunecp_cli import importance as registry
from prunecp_cli.commands import _common as c
from prunecp_cli.errors import UsageError

_RISK = "Risk control (Learn-then-Test)"
_TUNE = "Fine-tuning and iterative pruning"


@c.cli_command
@c.shared(input_shape=True, batch_size=128, verbose=True)
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
    ratio: Annotated[float | None, typer.Option("--ratio", help="Fraction of channels (with --granularity weight: "
                                                   "of weights) to remove, in (0, 1).",
                                                   rich_help_panel="Pruning")] = None,
    target_flops: Annotated[float | None, typer.Option("--target-flops", help="Fraction of dense FLOPs to keep, "
                                                          "in (0, 1).", rich_help_panel="Pruning")] = None,
    scope: Annotated[str, typer.Option("--scope", help="local: the ratio applies to every group; global: channels "
                                       "of all groups ranked together.", rich_help_panel="Pruning")] = "local",
    allocation: Annotated[str, typer.Option("--allocation", help="How groups share --target-flops with --scope "
                                            "global. rank: every group loses about the same share. measured: each "
                                            "round removes the next 5% of the group whose removal costs least output "
                                            "change (KL to the unpruned model, BatchNorm re-estimated) per FLOP, "
                                            "measured on 256 --data examples; slower, better at small budgets.",
                                            rich_help_panel="Pruning")] = "rank",
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
    granularity: Annotated[str, typer.Option("--granularity", help="channel: remove whole filters physically "
                                             "(a smaller, faster model). weight: zero the smallest-magnitude weights "
                                             "of the whole network, unstructured (Alvarez 2024); shapes, parameter "
                                             "count and FLOPs stay the same, so there is NO speed-up.",
                                             rich_help_panel="Pruning")] = "channel",
    strict: Annotated[bool, typer.Option("--strict", help="Exit 3 when some channel groups must be kept whole "
                                         "(their channels pass through a reshape, split or grouping prunecp cannot "
                                         "follow) instead of pruning the others and saying so in one line.",
                                         rich_help_panel="Pruning")] = False,
    risk_data: Annotated[Path | None, typer.Option("--risk-data", help="Prune as far as Learn-then-Test certifies "
                                                      "on these data (disjoint from --data and from any calibration "
                                                      "data; only the test reads them).", rich_help_panel=_RISK)] = None,
    max_risk: Annotated[float | None, typer.Option("--max-risk", help="Largest tolerated risk epsilon, in (0, 1): "
                                                      "P(risk <= epsilon) >= 1 - delta.", rich_help_panel=_RISK)] = None,
    delta: Annotated[float | None, typer.Option("--delta", help="Failure probability of the guarantee, in (0, 1) "
                                                   "(default 0.05).", rich_help_panel=_RISK)] = None,
    risk: Annotated[str | None, typer.Option("--risk", help="disagreement (pruned top-1 != dense top-1; needs no "
                                                "labels; the default), error (pruned top-1 error), excess-error (pruned "
                                                "minus dense error) or set-size (mean conformal set size; needs "
                                                "--max-set-size and --cert).", rich_help_panel=_RISK)] = None,
    grid: Annotated[str | None, typer.Option("--grid", help="Increasing levels tested from the smallest up: "
                                                "0.05,0.1,0.2 or START:STOP:STEP (default 0.05:0.95:0.05).",
                                                rich_help_panel=_RISK)] = None,
    grid_kind: Annotated[str | None, typer.Option("--grid-kind", help="ratio: a level is the fraction of channels "
                                                     "(or, with --granularity weight, of weights) removed (default); "
                                                     "flops: the fraction of the dense FLOPs removed.",
                                                     rich_help_panel=_RISK)] = None,
    pvalue: Annotated[str | None, typer.Option("--pvalue", help="binomial (exact, default for 0/1 losses), wsr "
                                                  "(Waudby-Smith-Ramdas betting, variance-adaptive, default for bounded "
                                                  "losses), hb (Hoeffding-Bentkus), hoeffding or bentkus.",
                                                  rich_help_panel=_RISK)] = None,
    max_set_size: Annotated[float | None, typer.Option("--max-set-size", help="--risk set-size: bound B on the mean "
                                                          "prediction-set size, in (1, K).", rich_help_panel=_RISK)] = None,
    cert: Annotated[Path | None, typer.Option("--cert", help="--risk set-size: certificate whose nonconformity, alpha "
                                                 "and delta make the sets (q-hat is recalibrated on half of the risk "
                                                 "data at each level).", rich_help_panel=_RISK)] = None,
    finetune_data: Annotated[Path | None, typer.Option("--finetune-data", help="Data to fine-tune on after pruning "
                                                       "(e.g. the score split; never calibration data); labelled "
                                                       "unless --loss kd.",
                                                       rich_help_panel=_TUNE)] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=0, help="Fine-tuning epochs per step.",
                                        rich_help_panel=_TUNE)] = 2,
    loss: Annotated[str, typer.Option("--loss", help="ce: cross-entropy; conftr: conformal training (Stutz et al. "
                                      "2022) plus cross-entropy, for small prediction sets; kd: distil the dense "
                                      "model's softened outputs (needs no labels); kd+ce: kd plus --ce-weight x "
                                      "cross-entropy.", rich_help_panel=_TUNE)] = "ce",
    lr: Annotated[float, typer.Option("--lr", help="Peak SGD learning rate (Nesterov momentum 0.9, cosine "
                                      "schedule).", rich_help_panel=_TUNE)] = 0.01,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="SGD weight decay.",
                                                rich_help_panel=_TUNE)] = 5e-4,
    finetune_batch_size: Annotated[int, typer.Option("--finetune-batch-size", min=2, help="Examples per step "
                                                     "(ConfTr needs >= 198 at its training alpha 0.01).",
                                                     rich_help_panel=_TUNE)] = 256,
    conftr_alpha: Annotated[float, typer.Option("--conftr-alpha", help="ConfTr training miscoverage.",
                                                rich_help_panel=_TUNE)] = 0.01,
    conftr_temperature: Annotated[float, typer.Option("--conftr-temperature", help="ConfTr soft-set temperature.",
                                                      rich_help_panel=_TUNE)] = 0.5,
    conftr_size_weight: Annotated[float, typer.Option("--conftr-size-weight", help="ConfTr weight of the set-size "
                                                      "loss.", rich_help_panel=_TUNE)] = 0.5,
    ce_weight: Annotated[float, typer.Option("--ce-weight", help="Cross-entropy weight added to the ConfTr or "
                                             "kd+ce loss.", rich_help_panel=_TUNE)] = 1.0,
    kd_temperature: Annotated[float, typer.Option("--kd-temperature", help="Distillation temperature T of --loss kd "
                                                  "and kd+ce (the loss is scaled by T^2).",
                                                  rich_help_panel=_TUNE)] = 4.0,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Reach the target in S equal steps, re-scoring "
                                       "(--method), recalibrating BatchNorm and fine-tuning between them.",
                                       rich_help_panel=_TUNE)] = 1,
    opt: c.Opt = None,
    max_samples: c.MaxSamples = None,
    *,
    o: c.Shared,
) -> None:
    """Remove the least important channels physically, check the model, and save it as .safetensors.

    With --risk-data, prune as far as Learn-then-Test certifies: P(risk <= --max-risk) >= 1 - --delta.
    """
    from prunecp_cli import api

    options = registry.parse_options(method, opt) if method else None
    risk_flags = {"--max-risk": max_risk, "--delta": delta, "--risk": risk, "--grid": grid, "--grid-kind": grid_kind,
                  "--pvalue": pvalue, "--max-set-size": max_set_size, "--cert": cert}
    given = [name for name, value in risk_flags.items() if value is not None]
    if risk_data is None and given:
        raise UsageError(f"{given[0]} belongs to risk control and needs --risk-data, the data Learn-then-Test "
                         "certifies on")
    control = None if risk_data is None else api.RiskOptions(
        risk_data, max_risk=max_risk, delta=0.05 if delta is None else delta, risk=risk or "disagreement",
        grid=grid, grid_kind=grid_kind or "ratio", pvalue=pvalue, max_set_size=max_set_size, cert=cert)
    finetune = None if finetune_data is None else api.FinetuneConfig(
        epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=finetune_batch_size, loss=loss,
        conftr_alpha=conftr_alpha, conftr_temperature=conftr_temperature, conftr_size_weight=conftr_size_weight,
        ce_weight=ce_weight, seed=o.seed, kd_temperature=kd_temperature)
    pruning = api.PruneOptions(ratio=ratio, target_flops=target_flops, scope=scope, max_layer_ratio=max_layer_ratio,
                               round_to=round_to, protect=protect, ignore=tuple(ignore or ()),
                               bn_recalibrate=bn_recalibrate, granularity=granularity, strict=strict,
                               allocation=allocation)
    run = o.run()
    rep = run.rep
    result = api.prune(o.model(checkpoint), out, scores=scores,
                       method=method, options=options, data=o.data(data, max_samples),
                       pruning=pruning, steps=steps, finetune=finetune,
                       finetune_data=o.data(finetune_data),
                       risk=control, run=run)
    if "auto" in result.extra:
        from prunecp_cli import present

        for line in present.auto_lines(result.extra["auto"]):
            rep.info(line)
    if control is not None:
        record = result.extra["risk_control"]
        rep.info(f"certified: {record['level_text']}. {record['statement']}")
    sparsity = result.extra.get("sparsity")
    if sparsity:
        rep.info(f"zeroed {sparsity['zeroed']:,} of {sparsity['total']:,} weights ({sparsity['zeroed_fraction']:.1%}); "
                 "shapes, parameters and FLOPs are unchanged: no speed-up without a sparse kernel")
    rep.info(
        f"wrote {result.output}: params {result.params_before:,} → {result.params_after:,} "
        f"({result.params_ratio:.1%}), FLOPs {result.flops_before:,} → {result.flops_after:,} "
        f"({result.flops_ratio:.1%} of the input; 1 multiply-add = 1 FLOP)"
    )
