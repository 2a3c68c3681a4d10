"""Markdown tables shaped like the paper's Table 1, from the benchmark's list of runs.

Run schema
----------
The benchmark writes one dict per trained (or classical) run, and the tables are rebuilt from those alone:

================  =========  ===========================================================================
key               type       meaning
================  =========  ===========================================================================
``method``        str        method name (``mismatch``, ``unet``, ``unet-strong``, ``sup2``, ``mt``,
                             ``fixmatch``, ``cct``, ``mta``, ``morph``, ``mm-a``/``b``/``c``,
                             ``nearest-slice``, ``shape-interpolation``, ``slicer-fill-between``,
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
``per_slice_iou`` list       IoU of each test slice, 0..1 (optional; kept in runs.json, not tabled).
``seconds``       float      train + inference (or filter) wall time of the run, s (optional; for runs without
                             it, ``train_seconds + ms_per_slice * n_slices / 1000`` when ``n_slices`` is there).
================  =========  ===========================================================================

Other keys (settings, timings, alpha, ...) are allowed and ignored here.

Table: rows = methods, columns = labelled-slice counts with "IoU mean ± std" in %, the two-sided
Mann-Whitney U p-value of each method against the reference (MisMatch) per count, then parameters
(millions), inference ms per slice and ECE (all voxels / foreground band, in %). The best mean IoU of each
count is in bold. A missing value is shown as "–".

:func:`baseline_table`: per data set and labelled-slice count, the best of the things a user could do
instead of the default model (:data:`BASELINES`: the free, non-learned baselines, Slicer's effects and the
supervised U-Nets) and every other method's mean IoU difference to it, with the Mann-Whitney U p-value over
the per-run IoUs, the std over runs, seconds per run and ECE (band).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from .stats import mann_whitney_p, mean_std

__all__ = ["results_table", "validate_runs", "baseline_rows", "baseline_table", "class_table", "run_seconds",
           "REQUIRED_KEYS", "DISPLAY_NAMES", "METHOD_ORDER", "MISSING", "BASELINES"]

REQUIRED_KEYS = ("method", "dataset", "n_labelled", "seed", "iou")
MISSING = "–"

DISPLAY_NAMES = {
    "nearest-slice": "Nearest labelled slice (copy)",
    "shape-interpolation": "Shape-based interpolation",
    "threshold-islands": "Threshold + Islands",
    "slicer-fill-between": "Slicer: Fill between slices",
    "slicer-grow-from-seeds": "Slicer: Grow from seeds",
    "unet": "Sup1 (U-Net)",
    "unet-strong": "Strong U-Net (supervised)",
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
#: row order (the free baselines and Slicer's effects first, then the paper's); unknown methods follow in order
#: of appearance.
METHOD_ORDER = list(DISPLAY_NAMES)
#: what a user can have instead of the default model: the best of these (mean IoU) is the bar in baseline_table
BASELINES = ["nearest-slice", "shape-interpolation", "threshold-islands", "slicer-fill-between",
             "slicer-grow-from-seeds", "unet", "unet-strong"]


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


def _one_table(runs: list[dict[str, Any]], dataset: str, reference: str, digits: int = 1) -> str:
    counts = sorted({int(r["n_labelled"]) for r in runs})
    methods = _ordered_methods(runs)
    by = {(m, n): [r for r in runs if r["method"] == m and int(r["n_labelled"]) == n] for m in methods for n in counts}

    iou_cells: dict[tuple[str, int], str] = {}
    means: dict[tuple[str, int], float] = {}
    for key, rs in by.items():
        iou_cells[key], means[key] = _fmt_mean_std(_values(rs, "iou"), 100.0, digits)
    best = {n: max((means[(m, n)] for m in methods if not math.isnan(means[(m, n)])), default=math.nan)
            for n in counts}

    header = (["Method"] + [f"IoU % ({n} sl.)" for n in counts] + [f"p ({n} sl.)" for n in counts]
              + ["Params (M)", "ms / slice", "ECE all %", "ECE band %"])
    lines = [_heading(dataset), "",
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
                cells.append(_fmt_p(mann_whitney_p(_values(by[(m, n)], "iou"),
                                                   _values(by.get((reference, n), []), "iou"))))
        mine = [r for r in runs if r["method"] == m]
        params = [v for v in _values(mine, "params") if v > 0]
        cells.append(_fmt_mean(params, 1e-6, 2))
        cells.append(_fmt_mean(_values(mine, "ms_per_slice"), 1.0, 1))
        cells.append(_fmt_mean_std(_values(mine, "ece_all"), 100.0, 2)[0])
        cells.append(_fmt_mean_std(_values(mine, "ece_band"), 100.0, 2)[0])
        lines.append("| " + " | ".join(cells) + " |")

    n_runs = sorted({len(rs) for rs in by.values() if rs})
    n_text = "/".join(str(n) for n in n_runs) or "0"
    lines += ["", f"IoU: foreground IoU on the test slices, mean ± sample standard deviation over {n_text} runs "
                  f"(seeds × cases) per cell; best mean per column in bold. p: two-sided Mann-Whitney U test of "
                  f"the per-run IoUs (one value per seed and case) of each method against "
                  f"{DISPLAY_NAMES.get(reference, reference)} at the same number of "
                  f"labelled slices (with 3 runs against 3 the smallest possible p is 0.1). Params, ms / slice and "
                  f"ECE (all voxels / foreground band, mean ± std) over all runs of the method; {MISSING}: not "
                  f"measured or not applicable."]
    return "\n".join(lines)


def results_table(runs: Iterable[dict[str, Any]], reference: str = "mismatch") -> str:
    """Markdown table(s) of the runs, one per data set (in order of appearance), shaped like the paper's
    Table 1; every p-value compares a method's per-run IoUs with ``reference``'s.

    Returns:
        Markdown text: a bold data set line, the table and a footnote per data set, separated by blank lines.
    """
    runs = validate_runs(runs)
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    if not datasets:
        return "_No runs._"
    return "\n\n".join(_one_table([r for r in runs if r["dataset"] == d], d, reference) for d in datasets)


def run_seconds(run: dict[str, Any]) -> float | None:
    """Train + inference (or filter) seconds of one run: ``seconds``, else ``train_seconds`` plus
    ``ms_per_slice * n_slices / 1000`` when all three are there, else None."""
    if run.get("seconds") is not None and not _isnan(run["seconds"]):
        return float(run["seconds"])
    parts = [run.get(k) for k in ("train_seconds", "ms_per_slice", "n_slices")]
    if any(v is None or _isnan(v) for v in parts):
        return None
    return float(parts[0]) + float(parts[1]) * float(parts[2]) / 1000.0


def _heading(dataset: str) -> str:
    return f"**{dataset}**" + (" (SYNTHETIC data)" if dataset.startswith("synthetic") else "")


def _ordered_methods(runs: list[dict[str, Any]]) -> list[str]:
    seen = list(dict.fromkeys(r["method"] for r in runs))
    return [m for m in METHOD_ORDER if m in seen] + [m for m in seen if m not in METHOD_ORDER]


def baseline_rows(runs: Iterable[dict[str, Any]], baselines: Sequence[str] = tuple(BASELINES)) -> list[dict[str, Any]]:
    """Per (data set, labelled count): the best baseline (highest mean IoU among ``baselines`` that ran; the
    first in ``baselines`` order on a tie) and every other method against it, as data.

    One dict per row, in table order: ``dataset``, ``n_labelled``, ``method``, ``role`` (``"baseline"`` for
    the best baseline's row, ``"method"`` otherwise), ``baseline`` (its name, or None when no baseline ran),
    ``iou_mean``, ``iou_std``, ``n_runs`` (0..1 IoU over the runs, one per seed and case), ``diff`` (mean IoU
    minus the baseline's; NaN on the baseline row or without a baseline), ``p`` (two-sided Mann-Whitney U of
    the per-run IoUs against the baseline's), ``seconds`` (mean train + inference seconds per run, NaN if
    unknown), ``ece_band`` and ``ece_band_std`` (NaN for methods without probabilities). Baselines other than
    the best are not listed.
    """
    runs = validate_runs(runs)
    out: list[dict[str, Any]] = []
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        ds = [r for r in runs if r["dataset"] == dataset]
        for n in sorted({int(r["n_labelled"]) for r in ds}):
            rs = [r for r in ds if int(r["n_labelled"]) == n]
            by = {m: [r for r in rs if r["method"] == m] for m in _ordered_methods(rs)}
            means = {m: mean_std(_values(v, "iou"))[0] for m, v in by.items()}
            ran = [b for b in baselines if b in by and not math.isnan(means[b])]
            best = max(ran, key=lambda b: (means[b], -ran.index(b))) if ran else None
            ref = _values(by[best], "iou") if best else []
            others = [m for m in by if m not in baselines]
            for m in ([best] if best else []) + others:
                ious = _values(by[m], "iou")
                mean, std, count = mean_std(ious)
                secs = [t for t in (run_seconds(r) for r in by[m]) if t is not None]
                ece_mean, ece_std, _ = mean_std(_values(by[m], "ece_band"))
                is_ref = m == best
                out.append({
                    "dataset": dataset, "n_labelled": n, "method": m, "role": "baseline" if is_ref else "method",
                    "baseline": best, "iou_mean": mean, "iou_std": std, "n_runs": count,
                    "diff": math.nan if is_ref or best is None else mean - means[best],
                    "p": math.nan if is_ref or best is None else mann_whitney_p(ious, ref),
                    "seconds": mean_std(secs)[0], "ece_band": ece_mean, "ece_band_std": ece_std})
    return out


def baseline_table(runs: Iterable[dict[str, Any]], baselines: Sequence[str] = tuple(BASELINES),
                   digits: int = 1) -> str:
    """Markdown: per data set, for each labelled-slice count a row naming the best baseline (see
    :func:`baseline_rows`), then one row per other method with its mean IoU difference to that baseline."""
    rows = baseline_rows(runs, baselines)
    if not rows:
        return "_No runs._"
    blocks = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        header = ["Labelled slices", "Method", "IoU %", "Δ IoU vs best baseline (points)", "p", "s / run",
                  "ECE band %"]
        lines = [_heading(dataset), "",
                 "| " + " | ".join(header) + " |", "|" + "|".join(["---:", "---"] + ["---:"] * 5) + "|"]
        ds_rows = [r for r in rows if r["dataset"] == dataset]
        for n in dict.fromkeys(r["n_labelled"] for r in ds_rows):
            group = [r for r in ds_rows if r["n_labelled"] == n]
            if group[0]["baseline"] is None:
                lines.append(f"| {n} | no baseline in these runs | {MISSING} | {MISSING} | {MISSING} | {MISSING} | "
                             f"{MISSING} |")
            for r in group:
                iou = MISSING if r["n_runs"] == 0 else (f"{r['iou_mean'] * 100:.{digits}f} ± "
                                                        f"{r['iou_std'] * 100:.{digits}f}")
                secs = (MISSING if math.isnan(r["seconds"])
                        else f"{r['seconds']:.1f}" if r["seconds"] >= 1 else f"{r['seconds']:.2f}")
                ece = (MISSING if math.isnan(r["ece_band"])
                       else f"{r['ece_band'] * 100:.2f} ± {r['ece_band_std'] * 100:.2f}")
                if r["role"] == "baseline":
                    name, diff, p = f"best baseline: {DISPLAY_NAMES.get(r['method'], r['method'])}", "ref.", "ref."
                else:
                    name = DISPLAY_NAMES.get(r["method"], r["method"])
                    diff = MISSING if math.isnan(r["diff"]) else f"{r['diff'] * 100:+.{digits}f}"
                    p = _fmt_p(r["p"])
                lines.append(f"| {n} | {name} | {iou} | {diff} | {p} | {secs} | {ece} |")
        names = ", ".join(DISPLAY_NAMES.get(b, b) for b in baselines)
        lines += ["", f"Best baseline: the highest mean IoU, at that number of labelled slices, among what a user "
                      f"can have instead ({names}; those that ran). Δ: the method's mean IoU minus the best "
                      f"baseline's, in percentage points. p: two-sided Mann-Whitney U test of the per-run IoUs "
                      f"(one per seed and case) against the best baseline's. IoU: mean ± std over runs; s / run: "
                      f"mean train + inference seconds per run; ECE band: mean ± std, {MISSING} for methods "
                      f"without probabilities."]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def prior_table(runs: Iterable[dict[str, Any]], digits: int = 1) -> str:
    """Markdown: what the painted slices add. For every learned method and data set, the mean IoU (and ECE in
    the foreground band) of the network alone and of the same networks segmented with the painted slices'
    prior and connectivity (``segment --labels``), from each run's headline result and its ``other`` variant;
    p is a two-sided Mann-Whitney U over the runs."""
    runs = [r for r in validate_runs(runs) if isinstance(r.get("other"), dict) and r.get("iou") is not None]
    if not runs:
        return "_No runs with both variants._"
    header = ["Data set", "Labelled", "Method", "network alone: IoU %", "with the painted slices: IoU %",
              "Δ (points)", "p", "ECE band % alone / with"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---:", "---"] + ["---:"] * 5) + "|"]
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        for n in sorted({int(r["n_labelled"]) for r in runs if r["dataset"] == dataset}):
            for method in _ordered_methods([r for r in runs if r["dataset"] == dataset]):
                rs = [r for r in runs if r["dataset"] == dataset and int(r["n_labelled"]) == n
                      and r["method"] == method]
                if not rs:
                    continue
                alone = [r["other"]["iou"] if r.get("prior") else r["iou"] for r in rs]
                guided = [r["iou"] if r.get("prior") else r["other"]["iou"] for r in rs]
                e_alone = [r["other"].get("ece_band") if r.get("prior") else r.get("ece_band") for r in rs]
                e_guided = [r.get("ece_band") if r.get("prior") else r["other"].get("ece_band") for r in rs]
                a, g = mean_std([x for x in alone if x is not None]), mean_std([x for x in guided if x is not None])
                ea = mean_std([x for x in e_alone if x is not None])[0]
                eg = mean_std([x for x in e_guided if x is not None])[0]
                lines.append(
                    f"| {dataset} | {n} | {method} | {a[0] * 100:.{digits}f} ± {a[1] * 100:.{digits}f} | "
                    f"{g[0] * 100:.{digits}f} ± {g[1] * 100:.{digits}f} | {(g[0] - a[0]) * 100:+.{digits}f} | "
                    f"{_fmt_p(mann_whitney_p(guided, alone))} | {ea * 100:.{digits}f} / {eg * 100:.{digits}f} |")
    return "\n".join(lines)


def class_table(runs: Iterable[dict[str, Any]], digits: int = 1) -> str:
    """Markdown: each class's IoU (``class_iou`` of the runs), mean ± std over runs, per data set, labelled
    count and method; data sets whose runs record no ``class_iou`` (one class) are left out."""
    runs = [r for r in validate_runs(runs) if r.get("class_iou")]
    if not runs:
        return "_No runs with several classes._"
    lines = ["| data set | labelled | method | class | IoU % |", "|---|---:|---|---|---:|"]
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        rs = [r for r in runs if r["dataset"] == dataset]
        classes = list(dict.fromkeys(c for r in rs for c in r["class_iou"]))
        for n in sorted({int(r["n_labelled"]) for r in rs}):
            for method in _ordered_methods([r for r in rs if int(r["n_labelled"]) == n]):
                same = [r for r in rs if int(r["n_labelled"]) == n and r["method"] == method]
                for c in classes:
                    values = [float(r["class_iou"][c]) for r in same
                              if r["class_iou"].get(c) is not None and not _isnan(r["class_iou"][c])]
                    text, _ = _fmt_mean_std(values, 100, digits)
                    lines.append(f"| {dataset} | {n} | {DISPLAY_NAMES.get(method, method)} | {c} | {text} |")
    return "\n".join(lines)
