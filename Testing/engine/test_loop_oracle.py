"""measurements/loop_oracle.py: the summary of every fourth slice tried against evenly spaced slices."""

from __future__ import annotations

import pytest
from measurement_scripts import load_script


def _run(seed, first, tried, even4, even5, suggested, gap):
    order = sorted(tried, key=lambda s: -tried[s])
    best = order[0]
    return {"seed": seed, "first_iou_volume": first, "default_ranking": "gap",
            "candidates": {str(s): {"iou_volume": v} for s, v in tried.items()},
            "oracle": {"slice": best, "iou_volume": tried[best]},
            "suggested": {"gap": {"slice": suggested, "iou_volume": tried[suggested],
                                  "rank": order.index(suggested) + 1}},
            "largest_gap": {"slice": gap, "iou_volume": tried[gap], "rank": order.index(gap) + 1},
            "even": {"4": {"iou_volume": even4}, "5": {"iou_volume": even5}}}


def test_summary_counts_the_seeds_where_the_best_fourth_slice_reaches_five_evenly_spaced():
    oracle = load_script("loop_oracle")
    runs = [_run(0, 0.80, {1: 0.84, 2: 0.92, 3: 0.85}, 0.90, 0.91, 3, 1),    # the best beats even 5
            _run(1, 0.78, {1: 0.83, 2: 0.86, 3: 0.88}, 0.87, 0.90, 2, 3)]    # it beats even 4 only
    s = oracle.summary(runs, start=3)
    assert s["oracle"]["mean"] == pytest.approx(90.0)
    assert s["oracle_at_least_even_next"] == 1 and s["oracle_at_least_even"] == 2
    assert s["even_4"]["mean"] == pytest.approx(88.5) and s["even_5"]["mean"] == pytest.approx(90.5)
    assert s["suggested"]["mean"] == pytest.approx(85.5) and s["suggested_rank"] == [2, 2]
    assert s["largest_gap_rank"] == [3, 1] and s["candidates"] == 3
    assert s["rankings"] == {"gap": {"mean": pytest.approx(85.5), "std": pytest.approx(0.71, abs=0.01),
                                     "rank": [2, 2]}}
