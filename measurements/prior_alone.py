"""What the painted slices say before any network is trained: the default's prior on its own, against the
trained default and the free tools, on the draws of a benchmark folder.

    python measurements/prior_alone.py --runs docs/benchmark/even-norm/runs.json --out FILE.json

For every (data set, labelled-slice count, seed) that the folder's ``runs.json`` has a MisMatch run for, the
same labelled slices are taken from the full labels, the prior of the default settings
(:class:`mismatch.prior.PriorSettings`: the painted shapes interpolated, the image's edges grown from them,
the painted intensities) is computed on the image as the benchmark normalises it, and each unpainted slice
is labelled by the prior's log-odds alone (painted slices as painted; the parts not connected to a painted
voxel removed, as ``segment`` does). IoU on the run's own test slices, beside that run's MisMatch IoU (the
network fused with the same prior) and the best free tool's (Slicer's Fill between slices and Grow from seeds,
copying the nearest slice, shape-based interpolation) on the same draw. Prints a Markdown table; no
training, seconds per draw.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Trainer"))

from mismatch.benchmark.classical import labelled_slices_only  # noqa: E402
from mismatch.benchmark.datasets import load_dataset  # noqa: E402
from mismatch.benchmark.runner import AXIS_NAMES, FREE, CLASSICAL  # noqa: E402
from mismatch.data import Normalisation  # noqa: E402
from mismatch.metrics import evaluate_arrays  # noqa: E402
from mismatch.pipeline import painted_slice_prior  # noqa: E402
from mismatch.prior import PriorSettings  # noqa: E402

FREE_TOOLS = tuple(FREE) + tuple(CLASSICAL)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True, help="a benchmark folder's runs.json")
    p.add_argument("--data-dir", default=".data", help="where scripts/setup-benchmark.sh put the pyradiomics archive")
    p.add_argument("--out", help="write every draw's figures here as JSON")
    args = p.parse_args(argv)

    runs = json.loads(Path(args.runs).read_text())["runs"]
    draws = sorted({(r["dataset"], r["n_labelled"], r["seed"]) for r in runs if r["method"] == "mismatch"})
    cases = {}
    rows = []
    for dataset, n, seed in draws:
        mine = [r for r in runs if (r["dataset"], r["n_labelled"], r["seed"]) == (dataset, n, seed)]
        mismatch = [r for r in mine if r["method"] == "mismatch" and r.get("alpha") in (None, 0.002)] or \
            [r for r in mine if r["method"] == "mismatch"]
        run = mismatch[0]
        if dataset not in cases:
            cases[dataset] = {c.name: c for c in load_dataset(dataset, data_dir=args.data_dir)}
        case = cases[dataset][run["case"]]
        labelled, test = np.asarray(run["labelled_slices"]), run["test_slices"]
        sparse = labelled_slices_only(case.label, labelled, case.axis)
        t0 = time.monotonic()
        volume = Normalisation(hu_window=case.window).apply(case.image)
        prior = painted_slice_prior(sparse, labelled, AXIS_NAMES[case.axis], case.spacing, len(case.classes) + 1,
                                    PriorSettings().to_dict(), volume)
        labels = prior.label_map(case.label.shape)
        seconds = time.monotonic() - t0
        iou = evaluate_arrays(labels, case.label, slices=test, axis=case.axis, classes=list(case.classes))["iou"]
        free = {r["method"]: r["iou"] for r in mine if r["method"] in FREE_TOOLS
                and r["labelled_slices"] == run["labelled_slices"]}
        best = max(free, key=free.get) if free else None
        rows.append({"dataset": dataset, "n_labelled": n, "seed": seed, "labelled_slices": run["labelled_slices"],
                     "prior_alone": iou, "prior_seconds": round(seconds, 2), "mismatch": run["iou"],
                     "mismatch_seconds": run.get("seconds"), "best_free": best,
                     "best_free_iou": free.get(best) if best else None})
        print(f"{dataset} {n} seed {seed} {run['labelled_slices']}: prior alone {100 * iou:.1f} % in {seconds:.1f} s, "
              f"MisMatch {100 * run['iou']:.1f} %" + (f", {best} {100 * free[best]:.1f} %" if best else ""),
              file=sys.stderr, flush=True)

    print("| data set | labelled | draws | prior alone IoU % | its seconds | MisMatch default IoU % | network's gain, "
          "points (ahead on) | best free tool IoU % |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    groups = sorted({(r["dataset"], r["n_labelled"]) for r in rows}, key=lambda g: (draws.index(
        next(d for d in draws if d[:2] == g)), g))
    for dataset, n in groups:
        g = [r for r in rows if (r["dataset"], r["n_labelled"]) == (dataset, n)]

        def mean_sd(key):
            values = [100 * r[key] for r in g if r[key] is not None]
            if not values:
                return "–"
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.1f} ± {sd:.1f}"

        gain = [100 * (r["mismatch"] - r["prior_alone"]) for r in g]
        ahead = sum(d > 0 for d in gain)
        print(f"| {dataset} | {n} | {len(g)} | {mean_sd('prior_alone')} | "
              f"{statistics.mean(r['prior_seconds'] for r in g):.1f} | {mean_sd('mismatch')} | "
              f"{statistics.mean(gain):+.1f} ({ahead} of {len(g)}) | {mean_sd('best_free_iou')} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": str(args.runs), "draws": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
