"""MisMatch against the strong U-Net segmented with the same painted slices, paired by training seed.

    python measurements/pair_unet_prior.py docs/benchmark/heldout-5 docs/benchmark/multiclass-2 \\
        docs/benchmark/lesion

Reads each ``mismatch benchmark`` folder's ``runs.json``: every ``unet-strong`` run there is also segmented with
the painted slices (its ``other`` entry, what results.md's "What the painted slices add" reports), which is how
the panel's *U-Net* choice segments. Pairs it, per data set, labelled-slice count and seed, with the ``mismatch``
run (the product's default, segmented with the painted slices) and prints a Markdown table: mean IoU ± standard
deviation of each, the mean difference, the pairs MisMatch is ahead in, a two-sided Wilcoxon signed-rank p, the
band ECE of each and the seconds a run; then the same over every pair. Nothing is trained: it reads files.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from scipy.stats import wilcoxon


def _p(a: list[float], b: list[float]) -> float:
    return float(wilcoxon(a, b).pvalue) if any(x != y for x, y in zip(a, b)) else 1.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", help="mismatch benchmark output folders")
    args = ap.parse_args(argv)
    print("| data set | labelled | MisMatch IoU % | strong U-Net + painted slices % | Δ points | MisMatch ahead | "
          "p (Wilcoxon, paired) | ECE band % MisMatch / U-Net + painted | s per run |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    every: list[float] = []
    for folder in args.folders:
        data = json.loads((Path(folder) / "runs.json").read_text())
        runs = data["runs"] if isinstance(data, dict) else data
        cells: dict[tuple, dict[str, dict]] = defaultdict(lambda: defaultdict(dict))
        for r in runs:
            if r["method"] in ("mismatch", "unet-strong") and r.get("iou") is not None:
                cells[(r["dataset"], r["n_labelled"])][r["method"]][r["seed"]] = r
        for (dataset, n), by in sorted(cells.items()):
            mm, un = by.get("mismatch", {}), by.get("unet-strong", {})
            seeds = sorted(s for s in set(mm) & set(un) if (un[s].get("other") or {}).get("iou") is not None)
            if not seeds:
                continue
            a = [100 * mm[s]["iou"] for s in seeds]
            b = [100 * un[s]["other"]["iou"] for s in seeds]
            diff = [x - y for x, y in zip(a, b)]
            every += diff
            sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
            ece_a = statistics.mean(100 * mm[s]["ece_band"] for s in seeds)
            ece_b = statistics.mean(100 * un[s]["other"]["ece_band"] for s in seeds)
            sec_a = statistics.mean(mm[s]["seconds"] for s in seeds)
            sec_b = statistics.mean(un[s]["seconds"] for s in seeds)
            print(f"| {dataset} | {n} | {statistics.mean(a):.1f} ± {sd(a):.1f} | {statistics.mean(b):.1f} ± "
                  f"{sd(b):.1f} | {statistics.mean(diff):+.1f} | {sum(d > 0 for d in diff)} of {len(seeds)} | "
                  f"{_p(a, b):.3f} | {ece_a:.2f} / {ece_b:.2f} | {sec_a:.0f} / {sec_b:.0f} |")
    if every:
        p = float(wilcoxon(every).pvalue) if any(every) else 1.0
        print(f"\nover {len(every)} pairs: MisMatch {statistics.mean(every):+.2f} points, ahead in "
              f"{sum(d > 0 for d in every)}, Wilcoxon p = {p:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
