"""Mann-Whitney p-values and the Table 1 formatting against hand-computed inputs."""

import math

import pytest

from mismatch.benchmark.stats import mann_whitney_p, mean_std
from mismatch.benchmark.tables import (MISSING, baseline_rows, baseline_table, results_table,
                                       validate_runs)


def test_mann_whitney_p_is_the_engines_test_on_the_values_that_are_there():
    """The test itself (exact p-values, ties, scipy or not) is checked in Testing/engine/test_metrics.py;
    here what the tables' wrapper adds: missing values dropped, no sample -> NaN, all equal -> 1."""
    from mismatch.metrics import mann_whitney_u

    assert mann_whitney_p([1, 2, 4], [3, 5, 6]) == mann_whitney_u([1, 2, 4], [3, 5, 6])[1]
    assert mann_whitney_p([1, 2, float("nan"), None, 3], [4, 5, 6]) == mann_whitney_p([1, 2, 3], [4, 5, 6])
    assert mann_whitney_p([0.5, 0.5], [0.5, 0.5]) == 1.0
    assert math.isnan(mann_whitney_p([], [1.0]))


def test_mean_std_sample():
    m, s, n = mean_std([0.5, 0.6, 0.7])
    assert (m, n) == (pytest.approx(0.6), 3) and s == pytest.approx(0.1)
    assert mean_std([0.4]) == (0.4, 0.0, 1)
    assert math.isnan(mean_std([])[0])


def _runs():
    runs = []
    for seed, (u, mm) in enumerate([(0.50, 0.60), (0.52, 0.62), (0.54, 0.64)]):
        runs.append({"method": "unet", "dataset": "ctchest-lungs", "n_labelled": 3, "seed": seed, "iou": u,
                     "ece_all": 0.02, "ece_band": 0.10, "params": 1.8e6, "ms_per_slice": 4.0,
                     "per_slice_iou": [u - 0.005, u + 0.005]})
        runs.append({"method": "mismatch", "dataset": "ctchest-lungs", "n_labelled": 3, "seed": seed, "iou": mm,
                     "ece_all": 0.01, "ece_band": 0.08, "params": 2.7e6, "ms_per_slice": 12.0,
                     "per_slice_iou": [mm - 0.005, mm + 0.005]})
    # n = 5 only for MisMatch and the Slicer effect (which has no probabilities, no parameters)
    for seed in range(2):
        runs.append({"method": "mismatch", "dataset": "ctchest-lungs", "n_labelled": 5, "seed": seed,
                     "iou": 0.70 + 0.02 * seed, "params": 2.7e6})
        runs.append({"method": "slicer-fill-between", "dataset": "ctchest-lungs", "n_labelled": 5, "seed": seed,
                     "iou": 0.66 + 0.01 * seed, "ece_all": None, "params": 0, "ms_per_slice": 1.5})
    return runs


def _row(table, name):
    return [c.strip() for c in next(line for line in table.splitlines() if line.startswith(f"| {name}")).split("|")[1:-1]]


def test_table_cells_hand_computed():
    table = results_table(_runs())
    header = _row(table, "Method")
    assert header == ["Method", "IoU % (3 sl.)", "IoU % (5 sl.)", "p (3 sl.)", "p (5 sl.)", "Params (M)",
                      "ms / slice", "ECE all %", "ECE band %"]
    unet, mm, fill = _row(table, "Sup1 (U-Net)"), _row(table, "MisMatch"), _row(table, "Slicer: Fill between")
    assert unet[1:5] == ["52.0 ± 2.0", MISSING, "0.100", MISSING]
    assert unet[5:] == ["1.80", "4.0", "2.00 ± 0.00", "10.00 ± 0.00"]
    assert mm[1:5] == ["**62.0 ± 2.0**", "**71.0 ± 1.4**", "ref.", "ref."]
    assert mm[5:7] == ["2.70", "12.0"]  # ms averaged over the runs that report it (12, 12, 12; not the others)
    assert fill[1:5] == [MISSING, "66.5 ± 0.7", MISSING, "0.333"]  # 2 vs 2 separated: 2 / C(4, 2)
    assert fill[5:] == [MISSING, "1.5", MISSING, MISSING]
    # row order: Slicer effects, then the baselines, MisMatch last
    names = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]
    assert names == ["Slicer: Fill between slices", "Sup1 (U-Net)", "MisMatch"]
    assert "Mann-Whitney" in table and "per-run IoUs" in table


def test_table_per_data_set_and_validation():
    runs = _runs() + [{"method": "unet", "dataset": "synthetic-vessels", "n_labelled": 3, "seed": 0, "iou": 0.3}]
    table = results_table(runs)
    assert "**synthetic-vessels** (SYNTHETIC data)" in table and "**ctchest-lungs**" in table
    vessels = table[table.index("**synthetic-vessels**"):]
    assert "ctchest" not in vessels and "30.0 ± 0.0" in vessels
    with pytest.raises(ValueError, match="iou"):
        validate_runs([{"method": "unet", "dataset": "x", "n_labelled": 3, "seed": 0}])
    assert results_table([]) == "_No runs._"


def _baseline_runs():
    """3 labelled: shape interpolation is the best baseline (52 %), ahead of nearest slice, Fill between and
    the U-Net; MisMatch is 10 points above it, Mean Teacher 2 points below. 5 labelled: only the U-Net and
    MisMatch ran. 10 labelled: no baseline ran."""
    runs = []
    table3 = {"nearest-slice": [0.40, 0.42, 0.44], "shape-interpolation": [0.50, 0.52, 0.54],
              "slicer-fill-between": [0.45, 0.47, 0.49], "unet": [0.30, 0.35, 0.40],
              "mismatch": [0.60, 0.62, 0.64], "mt": [0.49, 0.50, 0.51]}
    for method, ious in table3.items():
        for seed, iou in enumerate(ious):
            learned = method in ("unet", "mismatch", "mt")
            runs.append({"method": method, "dataset": "ctchest-lungs", "n_labelled": 3, "seed": seed, "iou": iou,
                         "ece_band": (0.10 + 0.02 * seed) if learned else None,
                         "seconds": (40.0 + seed) if learned else 0.5})
    for seed in range(2):
        runs.append({"method": "unet", "dataset": "ctchest-lungs", "n_labelled": 5, "seed": seed,
                     "iou": 0.55 + 0.01 * seed, "seconds": 30.0})
        # no "seconds": train + ms / slice x slices instead (10 + 100 ms x 20 = 12 s)
        runs.append({"method": "mismatch", "dataset": "ctchest-lungs", "n_labelled": 5, "seed": seed,
                     "iou": 0.70, "train_seconds": 10.0, "ms_per_slice": 100.0, "n_slices": 20})
    runs.append({"method": "mismatch", "dataset": "ctchest-lungs", "n_labelled": 10, "seed": 0, "iou": 0.8})
    return runs


def test_baseline_rows_pick_the_best_free_baseline():
    rows = {(r["n_labelled"], r["method"]): r for r in baseline_rows(_baseline_runs())}
    assert set(rows) == {(3, "shape-interpolation"), (3, "mt"), (3, "mismatch"), (5, "unet"), (5, "mismatch"),
                         (10, "mismatch")}  # the other baselines are not listed
    best = rows[(3, "shape-interpolation")]
    assert best["role"] == "baseline" and best["baseline"] == "shape-interpolation"
    assert best["iou_mean"] == pytest.approx(0.52) and math.isnan(best["diff"]) and math.isnan(best["ece_band"])
    mm = rows[(3, "mismatch")]
    assert mm["baseline"] == "shape-interpolation" and mm["diff"] == pytest.approx(0.10)
    assert mm["p"] == pytest.approx(0.1)  # 3 against 3, separated
    assert mm["iou_std"] == pytest.approx(0.02) and mm["seconds"] == pytest.approx(41.0)
    assert mm["ece_band"] == pytest.approx(0.12) and mm["ece_band_std"] == pytest.approx(0.02)
    mt = rows[(3, "mt")]
    assert mt["diff"] == pytest.approx(-0.02) and mt["p"] == pytest.approx(mann_whitney_p([0.49, 0.50, 0.51],
                                                                                           [0.50, 0.52, 0.54]))
    assert rows[(5, "mismatch")]["baseline"] == "unet" and rows[(5, "mismatch")]["diff"] == pytest.approx(0.145)
    assert rows[(5, "mismatch")]["seconds"] == pytest.approx(12.0)
    assert rows[(10, "mismatch")]["baseline"] is None and math.isnan(rows[(10, "mismatch")]["diff"])
    # a tie goes to the first in BASELINES order (the cheaper, free one)
    tie = [{"method": m, "dataset": "d", "n_labelled": 3, "seed": 0, "iou": 0.5} for m in ("unet", "nearest-slice")]
    assert baseline_rows(tie)[0]["method"] == "nearest-slice" and len(baseline_rows(tie)) == 1


def test_baseline_table_lines():
    table = baseline_table(_baseline_runs())
    assert "| 3 | best baseline: Shape-based interpolation | 52.0 ± 2.0 | ref. | ref. | 0.50 | – |" in table
    assert "| 3 | MisMatch | 62.0 ± 2.0 | +10.0 | 0.100 | 41.0 | 12.00 ± 2.00 |" in table
    assert "| 3 | Mean Teacher | 50.0 ± 1.0 | -2.0 |" in table
    assert "| 5 | best baseline: Sup1 (U-Net) | 55.5 ± 0.7 | ref. | ref. | 30.0 | – |" in table
    assert "| 5 | MisMatch | 70.0 ± 0.0 | +14.5 | 0.221 | 12.0 | – |" in table  # 2 vs 2, one side tied
    assert "| 10 | no baseline in these runs |" in table
    assert "| 10 | MisMatch | 80.0 ± 0.0 | – | – | – | – |" in table
    assert "Nearest labelled slice (copy), Shape-based interpolation, Threshold + Islands, Slicer: Fill between slices" \
        in table
    assert baseline_table([]) == "_No runs._"
    # the existing Table 1 shows the free baselines first
    names = [line.split("|")[1].strip() for line in results_table(_baseline_runs()).splitlines()
             if line.startswith("| ")][1:]
    assert names[:3] == ["Nearest labelled slice (copy)", "Shape-based interpolation", "Slicer: Fill between slices"]
