"""Figures as PNG files: reliability diagrams (paper Fig. 4 and Fig. 7) and loss curves.

matplotlib is imported inside the functions (Agg backend, no display needed), so ``import mismatch``
stays fast and works without matplotlib until a figure is asked for.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

#: history keys that are not loss terms (see ``mismatch.train``: {"step", "loss", **terms, "lr"})
_NOT_LOSSES = {"step", "lr", "alpha", "elapsed", "eta", "epoch", "time"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike, dpi: int, rect: tuple[float, float, float, float] | None = None) -> Path:
    """Lay out (within ``rect`` of the figure, when given), write ``fig`` as a PNG at ``path`` (parents
    created), close it; returns the path."""
    plt = _pyplot()
    fig.tight_layout(rect=rect)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    plt.close(fig)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def reliability_diagram(curves: dict[str, dict], path: str | os.PathLike, title: str | None = None,
                        dpi: int = 120) -> Path:
    """Reliability diagrams side by side, one column per curve (paper Fig. 4: U-Net, positive decoder,
    negative decoder, mean of the decoders), written as a PNG.

    ``curves``: ``{name: histogram}`` with each histogram a
    :meth:`~mismatch.calibration.CalibrationHistogram.to_dict` (``n_bins``, ``count``, ``ece``, ``mce``,
    ``bins`` of ``{lower, upper, count, confidence, accuracy}``). Top panel of a column: per-bin accuracy as
    bars over the confidence bins, each bin's mean confidence (marker), the gap between them shaded red, the
    diagonal (perfect calibration), and the ECE / MCE / voxel count in the title. Bottom panel: voxels per
    bin on a log scale. Empty bins are left blank. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    plt = _pyplot()
    from matplotlib.ticker import LogLocator, NullFormatter

    n = max(1, len(curves))
    fig, axes = plt.subplots(2, n, figsize=(3.3 * n, 4.8), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]}, sharex="col")
    if not curves:
        axes[0, 0].text(0.5, 0.5, "no curves", ha="center", va="center")
    for col, (name, hist) in enumerate(curves.items()):
        ax, ax_n = axes[0, col], axes[1, col]
        bins = hist["bins"]
        filled = [b for b in bins if b["count"] and b["accuracy"] is not None]
        width = [b["upper"] - b["lower"] for b in filled]
        centres = [(b["lower"] + b["upper"]) / 2 for b in filled]
        acc = [b["accuracy"] for b in filled]
        conf = [b["confidence"] for b in filled]
        if filled:
            ax.bar(centres, acc, width=width, color="#3b75af", edgecolor="white", linewidth=0.5, label="accuracy")
            ax.bar(centres, [c - a for c, a in zip(conf, acc)], bottom=acc, width=width, color="#d62728",
                   alpha=0.3, edgecolor="#d62728", linewidth=0.8, hatch="//", label="gap to confidence")
            ax.plot(centres, conf, "o", color="#d62728", markersize=2.5, label="mean confidence")
        ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration")
        ece, mce = hist.get("ece"), hist.get("mce")
        stats = (f"ECE {ece:.4f}  MCE {mce:.3f}" if _is_number(ece) and _is_number(mce) else "ECE n/a (no voxels)")
        ax.set_title(f"{name}\n{stats}\n{hist.get('count', 0):,} voxels", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("auto")
        if col == 0:
            ax.set_ylabel("accuracy")
            ax.legend(loc="upper left", fontsize=6, frameon=False)
        if filled:
            counts = [b["count"] for b in filled]
            ax_n.bar(centres, [c - 0.5 for c in counts], width=width, bottom=0.5, color="#7f7f7f")  # tops at the counts
            ax_n.set_yscale("log")
            ax_n.set_ylim(0.5, max(counts) * 3)  # a bin of one voxel stays visible
            ax_n.yaxis.set_major_locator(LogLocator(base=10, numticks=4))
            ax_n.yaxis.set_minor_formatter(NullFormatter())
        else:
            ax_n.set_yticks([])
        ax_n.set_xlim(0, 1)
        ax_n.set_xlabel("confidence")
        if col == 0:
            ax_n.set_ylabel("voxels (log)")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path, dpi)


def loss_curve(history: list[dict], path: str | os.PathLike, title: str | None = None, dpi: int = 110) -> Path:
    """Loss terms against the training step, log-scale y, written as a PNG.

    ``history``: one dict per step as ``mismatch.train`` records it, ``{"step": int, "loss": float,
    <term>: float, ..., "lr": float}`` (terms may also sit in a nested ``"terms"`` dict, as in the progress
    events). Every numeric key except ``step``, ``lr``, ``alpha`` (a weight, not a loss) and timing keys is
    drawn; non-positive values are left out (log scale). Returns ``path`` as a :class:`~pathlib.Path`.
    """
    plt = _pyplot()
    rows = []
    for h in history:
        flat = {k: v for k, v in h.items() if k != "terms"}
        flat.update(h.get("terms") or {})
        rows.append(flat)
    keys: list[str] = []
    for r in rows:
        keys += [k for k, v in r.items() if k not in _NOT_LOSSES and k not in keys and _is_number(v)]
    keys.sort(key=lambda k: (k != "loss", k))
    steps = [r.get("step", i + 1) for i, r in enumerate(rows)]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    drawn = False
    for key in keys:
        values = [r.get(key) for r in rows]
        ys = [v if _is_number(v) and v > 0 else float("nan") for v in values]
        if any(not math.isnan(y) for y in ys):
            ax.plot(steps, ys, label=key, linewidth=1.2 if key == "loss" else 0.9)
            drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no loss values", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path, dpi)


def ece_vs_iou(points: dict[str, list[tuple[float, float, int]]], path: str | os.PathLike,
               title: str | None = None, dpi: int = 120) -> Path:
    """The paper's Fig. 5: ECE against IoU, one marker per run, one colour per method.

    ``points``: ``{method: [(iou, ece, n_labelled), ...]}`` with IoU and ECE in 0..1 (drawn in %); the
    marker shape tells the number of labelled slices, a larger outlined marker the method's mean. Better
    models sit at the bottom right. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    markers = "os^Dvx*"
    counts = sorted({n for pts in points.values() for _, _, n in pts})
    colours = plt.get_cmap("tab20").colors
    for i, (method, pts) in enumerate(points.items()):
        colour = colours[i % len(colours)]
        for j, n in enumerate(counts):
            sel = [(100 * a, 100 * e) for a, e, k in pts if k == n and _is_number(a) and _is_number(e)]
            if sel:
                ax.scatter(*zip(*sel), color=colour, marker=markers[j % len(markers)], s=18, alpha=0.7,
                           label=method if j == 0 else None)
        good = [(100 * a, 100 * e) for a, e, _ in pts if _is_number(a) and _is_number(e)]
        if good:
            mean = [sum(v) / len(v) for v in zip(*good)]
            ax.scatter(*mean, color=colour, marker="o", s=90, edgecolor="black", linewidth=1.0)
    ax.set_xlabel("IoU (%)")
    ax.set_ylabel("ECE in the foreground band (%)")
    if len(counts) > 1:
        shapes = ", ".join(f"{markers[j % len(markers)]} = {n}" for j, n in enumerate(counts))
        ax.text(0.01, 0.99, f"labelled slices: {shapes}; large outlined = mean", transform=ax.transAxes,
                fontsize=7, va="top")
    if points:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path, dpi)


def iou_vs_labelled(panels: dict[str, dict[str, dict[int, list[float]]]], path: str | os.PathLike,
                    names: dict[str, str] | None = None, title: str | None = None, dpi: int = 120) -> Path:
    """IoU against the number of labelled slices: one panel per data set, one line per method (drawn side by
    side around each count).

    ``panels``: ``{data set: {method: {n_labelled: [iou of each run, 0..1]}}}``. Each point is the mean over
    the runs (drawn in %), its bar the sample standard deviation (none for a single run); a count with no
    run is left out of that method's line. ``names`` maps a method to the name in the legend. Returns ``path``.
    """
    plt = _pyplot()
    names = names or {}
    n = max(len(panels), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    methods = list(dict.fromkeys(m for series in panels.values() for m in series))
    colours = plt.get_cmap("tab10").colors
    for ax, (dataset, series) in zip(axes.flat, panels.items()):
        for method, by_n in series.items():
            pts = sorted((k, [v for v in vals if _is_number(v)]) for k, vals in by_n.items())
            pts = [(k, vals) for k, vals in pts if vals]
            if not pts:
                continue
            xs = [k for k, _ in pts]
            means = [100 * sum(v) / len(v) for _, v in pts]
            stds = [100 * (sum((x - sum(v) / len(v)) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0
                    for _, v in pts]
            i = methods.index(method)
            shift = 0.06 * (i - (len(methods) - 1) / 2)  # side by side, so the bars do not hide each other
            ax.errorbar([x + shift for x in xs], means, yerr=stds, color=colours[i % len(colours)], marker="o", markersize=4,
                        capsize=3, linewidth=1.2, label=names.get(method, method))
        counts = sorted({k for by_n in series.values() for k in by_n})
        ax.set_xticks(counts)
        if counts:
            ax.set_xlim(counts[0] - 1, counts[-1] + 1)
        ax.set_title(dataset, fontsize=9)
        ax.set_xlabel("labelled slices")
        ax.set_ylabel("IoU on the unlabelled slices (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), fontsize=7, loc="lower center",
                   ncol=min(len(handles), 4), frameon=False, bbox_to_anchor=(0.5, 0.0))
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi, rect=(0, 0.06 + 0.02 * math.ceil(len(handles) / 4), 1, 1))
