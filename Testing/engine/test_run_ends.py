"""measurements/run_ends.py: the slices without the structure that each run marks, per benchmark row."""

from __future__ import annotations

import numpy as np
from measurement_scripts import load_script


def test_counts_the_empty_slices_a_run_marks_and_correlates_them_with_the_iou():
    run_ends = load_script("run_ends")
    foreground = {"d": np.array([0, 0, 5, 7, 0, 3, 0])}   # slices 0, 1, 4 and 6 hold no structure
    runs = [
        {"dataset": "d", "n_labelled": 2, "seed": 1, "iou": 0.6, "test_slices": [0, 1, 3, 4, 6],
         "per_slice_iou": [0.0, 0.0, 0.8, 0.0, 1.0]},          # marks slices 0, 1 and 4
        {"dataset": "d", "n_labelled": 2, "seed": 0, "iou": 0.9, "test_slices": [0, 1, 3, 4, 6],
         "per_slice_iou": [1.0, 1.0, 0.0, 1.0, 1.0]},          # a structure slice missed is not counted
        {"dataset": "d", "n_labelled": 3, "seed": 0, "iou": 0.7, "test_slices": [0, 6],
         "per_slice_iou": [1.0, 1.0]},
    ]
    rows = run_ends.row_ends(runs, foreground)
    assert [(r["dataset"], r["n_labelled"]) for r in rows] == [("d", 2), ("d", 3)]
    assert [(e["seed"], e["marked_empty"]) for e in rows[0]["runs"]] == [(0, 0), (1, 3)]
    assert rows[0]["correlation"] < -0.99
    assert rows[1]["correlation"] is None   # one run: nothing to correlate


def test_reads_the_names_of_data_sets_given_as_files_along_any_axis():
    run_ends = load_script("run_ends")
    assert run_ends.file_name_parts("file-pyradiomics-brain1-axis-j") == ("pyradiomics-brain1", "j")
    assert run_ends.file_name_parts("file-ctchest-lungs") == ("ctchest-lungs", "k")   # axis k: no suffix
