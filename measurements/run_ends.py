"""Where the training runs of a benchmark row differ: the slices without the structure that each run marks.

    python measurements/run_ends.py --runs docs/benchmark/views-average-j/runs.json [--views views] \
        [--method mismatch] [--out FILE.json]

Reads a ``mismatch benchmark`` folder's ``runs.json`` and the data sets' full labels (no training). For each
row (data set, labelled-slice count) and each run of ``--method``: how many of the run's test slices hold no
true foreground but some of the run's (a test slice's IoU is 1 when both are empty, 0 when the run marks
voxels where there are none): slices past the structure's ends, or in a gap between its parts. And the
Pearson correlation of that count with the runs' IoU over the row: strongly negative where the row's spread
comes from how far past the structure the runs go. Data sets given as files (``file-NAME-axis-A``, from
``measurements/export_dataset.py --out VIEWS``) are read from ``--views``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Trainer"))

from mismatch.benchmark.datasets import FILES_PREFIX, load_dataset, load_files  # noqa: E402


def file_name_parts(dataset: str) -> tuple[str, str]:
    """``(file stem, axis)`` of a data set given as files, named as
    :func:`~mismatch.benchmark.datasets.files_datasets` names it: ``file-STEM`` (axis k) or
    ``file-STEM-axis-A``."""
    stem, sep, axis = dataset[len(FILES_PREFIX):].rpartition("-axis-")
    return (stem, axis) if sep else (dataset[len(FILES_PREFIX):], "k")


def foreground_per_slice(dataset: str, views: Path, data_dir: str | None = None) -> np.ndarray:
    """The number of true foreground voxels on each slice of ``dataset`` along its benchmark axis."""
    if dataset.startswith(FILES_PREFIX):
        base, axis = file_name_parts(dataset)
        case = load_files(str(views / f"{base}.nrrd"), str(views / f"{base}-label.nrrd"), axis=axis)[0]
    else:
        case = load_dataset(dataset, data_dir=data_dir)[0]
    return np.moveaxis(case.label > 0, case.axis, 0).reshape(case.label.shape[case.axis], -1).sum(1)


def row_ends(runs: list[dict], foreground: dict[str, np.ndarray]) -> list[dict]:
    """One entry per row: each run's seed, IoU and count of test slices without the structure that it marks,
    and the correlation of the counts with the IoUs (None when the counts or the IoUs do not vary)."""
    rows = defaultdict(list)
    for r in runs:
        fg = foreground[r["dataset"]]
        marked = sum(1 for s, v in zip(r["test_slices"], r["per_slice_iou"]) if fg[s] == 0 and v == 0)
        rows[(r["dataset"], r["n_labelled"])].append({"seed": r["seed"], "iou": r["iou"], "marked_empty": marked})
    out = []
    for (dataset, n), entries in sorted(rows.items()):
        entries.sort(key=lambda e: e["seed"])
        counts = np.array([e["marked_empty"] for e in entries], float)
        ious = np.array([e["iou"] for e in entries], float)
        corr = float(np.corrcoef(counts, ious)[0, 1]) if counts.std() > 0 and ious.std() > 0 else None
        out.append({"dataset": dataset, "n_labelled": n, "runs": entries, "correlation": corr})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True, help="a benchmark folder's runs.json")
    ap.add_argument("--method", default="mismatch")
    ap.add_argument("--views", default="views", help="where the data sets given as files are (export_dataset.py)")
    ap.add_argument("--data-dir", default=".data", help="where scripts/setup-benchmark.sh put the pyradiomics archive")
    ap.add_argument("--out", help="write every run's count as JSON")
    args = ap.parse_args(argv)

    runs = [r for r in json.loads(Path(args.runs).read_text())["runs"]
            if r["method"] == args.method and r.get("group", "main") == "main"]
    datasets = sorted({r["dataset"] for r in runs})
    foreground = {d: foreground_per_slice(d, Path(args.views), args.data_dir) for d in datasets}
    rows = row_ends(runs, foreground)
    print("| data set | labelled | runs | IoU % (mean ± sd) | slices without the structure marked, per seed | "
          "correlation with IoU |\n|---|---:|---:|---:|---|---:|")
    for row in rows:
        ious = [100 * e["iou"] for e in row["runs"]]
        corr = "–" if row["correlation"] is None else f"{row['correlation']:+.2f}"
        print(f"| {row['dataset']} | {row['n_labelled']} | {len(ious)} | {np.mean(ious):.1f} ± "
              f"{np.std(ious, ddof=1) if len(ious) > 1 else 0:.1f} | "
              f"{', '.join(str(e['marked_empty']) for e in row['runs'])} | {corr} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"runs_file": args.runs, "method": args.method, "rows": rows},
                                             indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
