"""``prunecp calibrate``: compute the conformal threshold on the calibration split and write certificate.json."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from prunecp_cli.commands import _common as c

_CP = "Conformal"


class Score(str, Enum):
    """Nonconformity scores."""

    lac = "lac"
    aps = "aps"
    raps = "raps"
    topk = "topk"
    saps = "saps"
    margin = "margin"


@c.cli_command
@c.shared(batch_size=256)
def calibrate(
    model: Annotated[Path, typer.Argument(help="Model to certify: a prunecp .safetensors file (or a dense "
                                          "checkpoint with --arch).")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Calibration split (labelled), disjoint from every "
                                       "split the model has seen.", rich_help_panel="Data")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Certificate to write (JSON).")] = Path("certificate.json"),
    alpha: Annotated[float, typer.Option("--alpha", help="Target miscoverage in (0, 1): sets contain the true label "
                                         "with probability at least 1 - alpha.", rich_help_panel=_CP)] = 0.1,
    delta: Annotated[float | None, typer.Option("--delta", help="Training-conditional (PAC) guarantee: coverage >= "
                                                "1 - alpha with probability >= 1 - delta over the calibration draw. "
                                                "Without it the guarantee is marginal.", rich_help_panel=_CP)] = None,
    nonconformity: Annotated[Score, typer.Option("--nonconformity", "-s", help="lac: 1 - softmax of the label; aps: "
                                                 "cumulative softmax up to the label; raps: aps plus a rank penalty; "
                                                 "topk: the label's rank; saps: top softmax plus --lambda-reg per "
                                                 "further rank (Huang et al. 2023); margin: best other softmax minus "
                                                 "the label's.",
                                                 rich_help_panel=_CP)] = Score.lac,
    randomized: Annotated[bool, typer.Option("--randomized", help="aps/raps/topk/saps: randomised scores (U ~ "
                                             "Unif(0,1) drawn from --seed, recorded in the certificate).",
                                             rich_help_panel=_CP)] = False,
    k_reg: Annotated[int | None, typer.Option("--k-reg", min=0, help="raps: ranks left unpenalised (default: the "
                                              "(1 - alpha)-quantile of the true label's rank on a held-out 20% of "
                                              "--data, left out of the quantile).", rich_help_panel=_CP)] = None,
    lambda_reg: Annotated[float | None, typer.Option("--lambda-reg", min=0.0, help="raps: penalty per rank beyond "
                                                     "--k-reg (default 0.01); saps: the ranking weight lambda, per rank "
                                                     "below the top one (default 0.2).", rich_help_panel=_CP)] = None,
    class_conditional: Annotated[bool, typer.Option("--class-conditional", help="One threshold per class (Mondrian): "
                                                    "the guarantee holds within every class; needs enough points per "
                                                    "class.", rich_help_panel=_CP)] = False,
    groups: Annotated[Path | None, typer.Option("--groups", help="One group label per calibration example (.npy "
                                                "array or .txt, one per line, in the data's order): one threshold "
                                                "per group (Mondrian by user group), the guarantee holding within "
                                                "every group; certify then needs --groups for the test data, and "
                                                "predict/export refuse the certificate.", rich_help_panel=_CP)] = None,
    *,
    o: c.Shared,
) -> None:
    """Calibrate the model's conformal prediction sets on held-out data and write a certificate."""
    from prunecp_cli import api

    run = o.run()
    rep = run.rep
    cert = api.calibrate(
        o.model(model),
        o.data(data), alpha=alpha, delta=delta,
        nonconformity=nonconformity.value, randomized=randomized, k_reg=k_reg, lambda_reg=lambda_reg,
        class_conditional=class_conditional, groups=groups, output=out, run=run,
    )
    q = cert["quantile"]
    if cert.get("groups"):
        shown = f"{len(cert['groups']['labels'])} per-group thresholds"
    else:
        shown = f"{len(q)} per-class thresholds" if isinstance(q, list) else f"q̂ = {q:.6g}"
    calib = cert["calibration"]
    rep.info(
        f"wrote {out}: {cert['nonconformity']['name']}, {shown}, n = {cert['data']['n']}, "
        f"{cert['guarantee']['type']} coverage >= {cert['guarantee']['coverage_at_least']:g}; on the calibration "
        f"data: coverage {calib['coverage']:.4f}, mean set size {calib['mean_set_size']:.3f}"
    )
