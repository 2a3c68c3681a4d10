"""Markdown tables shaped like the paper's Table 1, from the benchmark's list of runs.

Run schema
----------
The benchmark writes one dict per trained (or classical) run, and the tables are rebuilt from those alone:

================  =========  ===========================================================================
key               type       meaning
================  =========  ===========================================================================
``method``        str        method name (``mismatch``, ``unet``, ``sup2``, ``mt``, ``fixmatch``,
                             ``cct``, ``mta``, ``morph``, ``mm-a``/``b``/``c``, ``slicer-fill-between``,
                             ``slicer-grow-from-seeds``, ...). Required.
``dataset``       str        data set name (``synthetic-...`` for synthetic data). Required.
``n_labelled``    int        number of labelled slices. Required.
``seed``          int        seed of the slice draw and of training. Required.
``iou``           float      foreground IoU on the test slices, 0..1 (mean over classes if several). Required.
``case``          str        case name within the data set (optional; runs of several cases are pooled).
``dice``          float      foreground Dice, 0..1 (optional).
``ece_all``       float      expected calibration error over all voxels of the test slices, 0..1 (optional;
                             None for methods without probabilities, e.g. the Slicer effects).
``ece_band``      float      ECE inside the foreground band, 0..1 (optional, as ``ece_all``).
``params``        int/float  trainable parameters (optional; 0 or None for the Slicer effects).
``ms_per_slice``  float      inference (or filter) time per slice, milliseconds (optional).
``per_slice_iou`` list       IoU of each test slice, 0..1 (optional; used by ``p_over="slices"``).
================  =========  ===========================================================================

Other keys (settings, timings, alpha, ...) are allowed and ignored here.

Table: rows = methods, columns = labelled-slice counts with "IoU mean ± std" in %, the two-sided
Mann-Whitney U p-value of each method against the reference (MisMatch) per count, then parameters
(millions), inference ms per slice and ECE (all voxels / foreground band, in %). The best mean IoU of each
count is in bold. A missing value is shown as "–".
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from .stats import mann_whitney_p, mean_std

__all__ = ["results_table", "summary_rows", "validate_runs", "REQUIRED_KEYS", "DISPLAY_NAMES", "METHOD_ORDER", "MISSING"]

REQUIRED_KEYS = ("method", "dataset", "n_labelled", "seed", "iou")
MISSING = "–"

DISPLAY_NAMES = {
    "slicer-fill-between": "Slicer: Fill between slices",
    "slicer-grow-from-seeds": "Slicer: Grow from seeds",
    "unet": "Sup1 (U-Net)",
    "sup2": "Sup2 (MisMatch network, supervised)",
    "mt": "Mean Teacher",
    "fixmatch": "FixMatch",
    "cct": "CCT",
    "mta": "MTA",
    "morph": "Morph",
    "mm-a": "MM-a (plain + plain)",
    "mm-b": "MM-b (plain + negative)",
    "mm-c": "MM-c (plain + positive)",
    "mismatch": "MisMatch",
}
#: row order (the paper's, Slicer's effects first); unknown methods follow in order of appearance.
METHOD_ORDER = list(DISPLAY_NAMES)


def validate_runs(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs as a list, after checking that each has the required keys (``ValueError`` otherwise)."""
    runs = list(runs)
    for n, run in enumerate(runs):
        missing = [k for k in REQUIRED_KEYS if k not in run]
        if missing:
            raise ValueError(f"run {n} ({run.get('method', '?')}) lacks {', '.join(missing)}")
    return runs


def _fmt_p(p: float) -> str:
    if p is None or math.isnan(p):
        return MISSING
    if p < 0.001:
        return "<0.001"
    return f"{p:.3f}"


def _fmt_mean_std(values: Sequence[float], scale: float, digits: int) -> tuple[str, float]:
    m, s, n = mean_std(values)
    if n == 0:
        return MISSING, math.nan
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}", m


def _fmt_mean(values: Sequence[float], scale: float, digits: int) -> str:
    m, _, n = mean_std(values)
    return MISSING if n == 0 else f"{m * scale:.{digits}f}"


def _values(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in runs if r.get(key) is not None and not _isnan(r[key])]


def _isnan(x: Any) -> bool:
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return True


def _sample(runs: list[dict[str, Any]], p_over: str) -> list[float]:
    if p_over == "runs":
        return _values(runs, "iou")
    out: list[float] = []
    for r in runs:
        out.extend(float(v) for v in (r.get("per_slice_iou") or []) if not _isnan(v))
    return out


def _one_table(runs: list[dict[str, Any]], dataset: str, reference: str, p_over: str, digits: int) -> str:
    counts = sorted({int(r["n_labelled"]) for r in runs})
    seen = list(dict.fromkeys(r["method"] for r in runs))
    methods = [m for m in METHOD_ORDER if m in seen] + [m for m in seen if m not in METHOD_ORDER]
    by = {(m, n): [r for r in runs if r["method"] == m and int(r["n_labelled"]) == n] for m in methods for n in counts}

    iou_cells: dict[tuple[str, int], str] = {}
    means: dict[tuple[str, int], float] = {}
    for key, rs in by.items():
        iou_cells[key], means[key] = _fmt_mean_std(_values(rs, "iou"), 100.0, digits)
    best = {n: max((means[(m, n)] for m in methods if not math.isnan(means[(m, n)])), default=math.nan)
            for n in counts}

    header = (["Method"] + [f"IoU % ({n} sl.)" for n in counts] + [f"p ({n} sl.)" for n in counts]
              + ["Params (M)", "ms / slice", "ECE all %", "ECE band %"])
    lines = [f"**{dataset}**" + (" (SYNTHETIC data)" if dataset.startswith("synthetic") else ""), "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for m in methods:
        cells = [DISPLAY_NAMES.get(m, m)]
        for n in counts:
            cell = iou_cells[(m, n)]
            if cell != MISSING and not math.isnan(best[n]) and means[(m, n)] == best[n]:
                cell = f"**{cell}**"
            cells.append(cell)
        for n in counts:
            if m == reference:
                cells.append("ref." if by[(m, n)] else MISSING)
            else:
                cells.append(_fmt_p(mann_whitney_p(_sample(by[(m, n)], p_over), _sample(by.get((reference, n), []),
                                                                                         p_over))))
        mine = [r for r in runs if r["method"] == m]
        params = [v for v in _values(mine, "params") if v > 0]
        cells.append(_fmt_mean(params, 1e-6, 2))
        cells.append(_fmt_mean(_values(mine, "ms_per_slice"), 1.0, 1))
        cells.append(_fmt_mean_std(_values(mine, "ece_all"), 100.0, 2)[0])
        cells.append(_fmt_mean_std(_values(mine, "ece_band"), 100.0, 2)[0])
        lines.append("| " + " | ".join(cells) + " |")

    n_runs = sorted({len(rs) for rs in by.values() if rs})
    n_text = "/".join(str(n) for n in n_runs) or "0"
    unit = ("the per-run IoUs (one value per seed and case)" if p_over == "runs"
            else "the per-slice IoUs of all test slices pooled over seeds and cases (not independent samples)")
    lines += ["", f"IoU: foreground IoU on the test slices, mean ± sample standard deviation over {n_text} runs "
                  f"(seeds × cases) per cell; best mean per column in bold. p: two-sided Mann-Whitney U test of "
                  f"{unit} of each method against {DISPLAY_NAMES.get(reference, reference)} at the same number of "
                  f"labelled slices (with 3 runs against 3 the smallest possible p is 0.1). Params, ms / slice and "
                  f"ECE (all voxels / foreground band, mean ± std) over all runs of the method; {MISSING}: not "
                  f"measured or not applicable."]
    return "\n".join(lines)


def results_table(runs: Iterable[dict[str, Any]], reference: str = "mismatch", dataset: str | None = None,
                  p_over: str = "runs", digits: int = 1) -> str:
    """Markdown table(s) of the runs, one per data set (or only ``dataset``), shaped like the paper's Table 1.

    Args:
        runs: dicts in the schema of this module's docstring.
        reference: the method every p-value compares against.
        dataset: only this data set (default: one table per data set, in order of appearance).
        p_over: ``"runs"`` (default: one IoU per run) or ``"slices"`` (pooled ``per_slice_iou``).
        digits: decimals of the IoU cells (in %).

    Returns:
        Markdown text: a bold data set line, the table and a footnote per data set, separated by blank lines.
    """
    if p_over not in ("runs", "slices"):
        raise ValueError("p_over must be 'runs' or 'slices'")
    runs = validate_runs(runs)
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    if dataset is not None:
        datasets = [d for d in datasets if d == dataset]
    if not datasets:
        return "_No runs._"
    return "\n\n".join(_one_table([r for r in runs if r["dataset"] == d], d, reference, p_over, digits)
                       for d in datasets)


def summary_rows(runs: Iterable[dict[str, Any]], reference: str = "mismatch") -> list[dict[str, Any]]:
    """The table's numbers as data: one dict per (dataset, method, n_labelled) with IoU mean / std / n
    (0..1), the p-value against ``reference`` over per-run IoUs, and the mean Dice / ECE values."""
    runs = validate_runs(runs)
    keys = list(dict.fromkeys((r["dataset"], r["method"], int(r["n_labelled"])) for r in runs))
    out = []
    for d, m, n in keys:
        rs = [r for r in runs if (r["dataset"], r["method"], int(r["n_labelled"])) == (d, m, n)]
        ref = [r for r in runs if (r["dataset"], r["method"], int(r["n_labelled"])) == (d, reference, n)]
        mean, std, count = mean_std(_values(rs, "iou"))
        row = {"dataset": d, "method": m, "n_labelled": n, "iou_mean": mean, "iou_std": std, "n_runs": count,
               "p_vs_reference": math.nan if m == reference else mann_whitney_p(_values(rs, "iou"),
                                                                               _values(ref, "iou"))}
        for key in ("dice", "ece_all", "ece_band", "ms_per_slice"):
            row[key] = mean_std(_values(rs, key))[0]
        out.append(row)
    return out

