"""The model card's PNG figures (matplotlib, Agg backend; imported only when a card is written).

* ``<card>_channels.png``: output channels of every conv/linear layer, before and after pruning.
* ``<card>_sets.png``: prediction-set sizes (test audit when given, else calibration) and per-class
  coverage against ``1 - alpha``.
* ``<card>_ltt.png``: with a Learn-then-Test record, the risk and p-value of every tested level, with
  ``max_risk``, ``delta`` and the certified level marked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunecp_cli.io.files import atomic_write_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    fig.clf()
    return path


def channels_figure(plt, data, path: Path) -> Path:
    """Channels per layer, before (grey) and after (blue) pruning."""
    rows = data.rows
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(rows) + 2), 3.6))
    xs = range(len(rows))
    before = [r.channels_before if r.channels_before is not None else r.channels_after for r in rows]
    ax.bar(xs, before, color="#c8c8c8", label="before")
    ax.bar(xs, [r.channels_after for r in rows], width=0.55, color="#2a6fb0", label="after")
    ax.set_xticks(list(xs), [r.name for r in rows], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title("Channels per layer before and after pruning")
    ax.legend()
    return _save(fig, path)


def sets_figure(plt, record: dict[str, Any], *, alpha: float, source: str, path: Path) -> Path:
    """Set-size histogram and per-class coverage of a verdict or calibration record."""
    hist = record["set_size_histogram"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    left.bar(range(len(hist)), hist, color="#2a6fb0")
    left.set_xticks(range(len(hist)))
    left.set_xlabel("prediction-set size")
    left.set_ylabel("inputs")
    left.set_title(f"Set sizes ({source}, n = {sum(hist)})")
    coverage = record.get("per_class_coverage") or []
    classes = [i for i, v in enumerate(coverage) if v is not None]
    right.bar(classes, [coverage[i] for i in classes], color="#4c9a5b")
    right.set_xticks(classes)
    right.axhline(1 - alpha, color="#b03a2e", linestyle="--", label=f"1 - alpha = {1 - alpha:g}")
    right.set_ylim(0, 1.05)
    right.set_xlabel("true class")
    right.set_ylabel("coverage")
    right.set_title(f"Per-class coverage ({source})")
    right.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def ltt_figure(plt, control: dict[str, Any], path: Path) -> Path:
    """Risk and p-value of every tested Learn-then-Test level; the certified one marked."""
    levels = control.get("levels") or []
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    xs = [r["level"] for r in levels]
    left.plot(xs, [r["risk_hat"] for r in levels], marker="o", color="#2a6fb0")
    left.axhline(control["max_risk"], color="#b03a2e", linestyle="--", label=f"max risk {control['max_risk']:g}")
    left.set_xlabel(f"pruning level ({control.get('grid_kind', 'ratio')})")
    left.set_ylabel(f"risk ({control.get('risk', '')})")
    left.set_title("Empirical risk per tested level")
    right.semilogy(xs, [max(r["p_value"], 1e-300) for r in levels], marker="o", color="#4c9a5b")
    right.axhline(control["delta"], color="#b03a2e", linestyle="--", label=f"delta {control['delta']:g}")
    right.set_xlabel(left.get_xlabel())
    right.set_ylabel("p-value")
    right.set_title("p-value per tested level")
    if control.get("level") is not None:
        for ax in (left, right):
            ax.axvline(control["level"], color="#555555", linestyle=":", label=f"certified {control['level']:g}")
    for ax in (left, right):
        ax.legend(fontsize=8)
    return _save(fig, path)


def write_figures(data, card: Path, *, certificate: dict[str, Any] | None,
                  verdict: dict[str, Any] | None) -> dict[str, Path]:
    """Write the figures beside ``card``; ``{name: path}`` of those written."""
    plt = _pyplot()
    stem = card.with_suffix("")
    out = {}
    try:
        if data.rows:
            out["channels"] = channels_figure(plt, data, Path(f"{stem}_channels.png"))
        record, source = ((verdict, "test") if verdict and verdict.get("set_size_histogram") else
                          (certificate["calibration"], "calibration") if certificate else (None, ""))
        if record is not None and record.get("set_size_histogram"):
            out["sets"] = sets_figure(plt, record, alpha=certificate["alpha"] if certificate else verdict["alpha"],
                                      source=source, path=Path(f"{stem}_sets.png"))
        control = data.metadata.get("risk_control")
        if control and control.get("levels"):
            out["ltt"] = ltt_figure(plt, control, Path(f"{stem}_ltt.png"))
    finally:
        plt.close("all")
    return out
