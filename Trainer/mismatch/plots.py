"""Figures: reliability diagrams (paper Fig. 4) and loss curves, as PNG files (matplotlib, Agg)."""

from __future__ import annotations

import math
import os
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def reliability_diagram(curves: dict[str, dict], path: str | os.PathLike, title: str | None = None) -> Path:
    """One column per curve (e.g. positive decoder, negative decoder, mean, U-Net), each a histogram's
    ``to_dict()``: per-bin accuracy (bars) against the diagonal, the gap to each bin's mean confidence
    (red), the ECE, and below it the bin counts on a log scale."""
    plt = _pyplot()
    n = max(1, len(curves))
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 4.6), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    for col, (name, hist) in enumerate(curves.items()):
        ax, ax_n = axes[0, col], axes[1, col]
        bins = hist["bins"]
        width = 1.0 / hist["n_bins"]
        centres = [b["lower"] + width / 2 for b in bins]
        acc = [b["accuracy"] if b["accuracy"] is not None else 0.0 for b in bins]
        conf = [b["confidence"] for b in bins]
        ax.bar(centres, acc, width=width, color="#3b75af", edgecolor="white", label="accuracy")
        gap_label = "gap to confidence"
        for c, a, m in zip(centres, acc, conf):
            if m is not None:
                ax.bar(c, m - a, bottom=a, width=width, color="#d62728", alpha=0.35, edgecolor="#d62728",
                       label=gap_label)
                gap_label = None
        ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration")
        ece = hist.get("ece")
        ax.set_title(f"{name}\nECE {ece:.4f}" if ece is not None and not math.isnan(ece) else f"{name}\nECE n/a",
                     fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        if col == 0:
            ax.set_ylabel("accuracy")
            ax.legend(loc="upper left", fontsize=7)
        counts = [max(b["count"], 0) for b in bins]
        ax_n.bar(centres, [c if c > 0 else float("nan") for c in counts], width=width, color="#7f7f7f")
        if any(counts):
            ax_n.set_yscale("log")
        ax_n.set_xlabel("confidence")
        if col == 0:
            ax_n.set_ylabel("voxels")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def loss_curve(history: list[dict], path: str | os.PathLike, title: str | None = None) -> Path:
    """Loss terms against the step, log-scale y."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    steps = [h["step"] for h in history]
    for key in ("loss", "dice", "consistency"):
        values = [h.get(key) for h in history]
        if any(v is not None and v > 0 for v in values):
            ax.plot(steps, [v if v is not None and v > 0 else float("nan") for v in values], label=key,
                    linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
