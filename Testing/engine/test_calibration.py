"""Calibration histograms, ECE / MCE, top-label confidence and the foreground band (mismatch.calibration)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mismatch import calibration
from mismatch.calibration import CalibrationHistogram, CalibrationReport, foreground_band, top_label


def _hand_example() -> CalibrationHistogram:
    # 4 bins: [0, .25) [.25, .5) [.5, .75) [.75, 1]
    h = CalibrationHistogram(n_bins=4)
    conf = np.array([0.1, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0], dtype=np.float32)
    correct = np.array([0, 1, 0, 1, 1, 1, 0, 1], dtype=bool)
    return h.update(conf, correct)


def test_ece_mce_hand_computed():
    h = _hand_example()
    # bin 0: {0.1 F}          acc 0    conf 0.1   gap 0.1     weight 1/8 -> 0.0125
    # bin 1: {0.3 T, 0.4 F}   acc 0.5  conf 0.35  gap 0.15    weight 2/8 -> 0.0375
    # bin 2: {0.6 T, 0.7 T}   acc 1    conf 0.65  gap 0.35    weight 2/8 -> 0.0875
    # bin 3: {0.8 T, 0.9 F, 1.0 T}  acc 2/3  conf 0.9  gap 7/30  weight 3/8 -> 0.0875
    # ECE = 0.0125 + 0.0375 + 0.0875 + 0.0875 = 0.225 ; MCE = 0.35
    assert h.count.tolist() == [1, 2, 2, 3] and h.correct.tolist() == [0, 1, 2, 2]
    assert h.ece() == pytest.approx(0.225, abs=1e-6)
    assert h.mce() == pytest.approx(0.35, abs=1e-6)
    b = h.bins()
    assert [x["lower"] for x in b] == [0, 0.25, 0.5, 0.75] and b[-1]["upper"] == 1.0
    assert b[3]["accuracy"] == pytest.approx(2 / 3) and b[3]["confidence"] == pytest.approx(0.9, abs=1e-6)


def test_bin_edges():
    h = CalibrationHistogram(n_bins=4)
    # 0 -> first bin, exact inner edges -> the bin above, 1.0 -> last bin
    assert h.bin_index(np.array([0.0, 0.25, 0.5, 0.75, 1.0])).tolist() == [0, 1, 2, 3, 3]
    h15 = CalibrationHistogram()
    edges = np.array([k / 15 for k in range(1, 15)])
    assert h15.bin_index(edges).tolist() == list(range(1, 15))
    assert h15.bin_index(np.nextafter(edges, 0)).tolist() == list(range(0, 14))
    h15.update(np.array([0.0, 1.0, 1.0]), np.array([False, True, True]))
    assert h15.count[0] == 1 and h15.count[-1] == 2 and h15.total == 3
    # confidence 0, always wrong; confidence 1, always right: perfectly calibrated
    assert h15.ece() == 0.0 and h15.mce() == 0.0


def test_invalid_confidence_rejected_and_rounding_clipped():
    h = CalibrationHistogram()
    with pytest.raises(ValueError, match="logits"):
        h.update(np.array([0.5, 3.2]), np.array([True, False]))
    with pytest.raises(ValueError):
        h.update(np.array([np.nan]), np.array([True]))
    h.update(np.array([1.0004], dtype=np.float32), np.array([True]))  # float16-style rounding above 1
    assert h.count[-1] == 1 and h.conf_sum[-1] == 1.0


def test_masked_update_equals_subset():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1, size=(4, 9, 9)).astype(np.float32)
    correct = rng.uniform(size=conf.shape) < conf
    mask = rng.uniform(size=conf.shape) < 0.3
    a = CalibrationHistogram().update(conf, correct, mask)
    b = CalibrationHistogram().update(conf[mask], correct[mask])
    assert a.total == int(mask.sum())
    np.testing.assert_array_equal(a.count, b.count)
    np.testing.assert_array_equal(a.correct, b.correct)
    np.testing.assert_allclose(a.conf_sum, b.conf_sum)


def test_merge_equals_concatenation_and_chunking(monkeypatch):
    rng = np.random.default_rng(1)
    c1, c2 = rng.uniform(size=500).astype(np.float32), rng.uniform(size=300).astype(np.float32)
    k1, k2 = rng.uniform(size=500) < 0.6, rng.uniform(size=300) < 0.4
    whole = CalibrationHistogram().update(np.concatenate([c1, c2]), np.concatenate([k1, k2]))
    h1, h2 = CalibrationHistogram().update(c1, k1), CalibrationHistogram().update(c2, k2)
    added = h1 + h2
    assert h1.total == 500  # + makes a new histogram
    h1.merge(h2)
    for h in (added, h1):
        np.testing.assert_array_equal(h.count, whole.count)
        np.testing.assert_array_equal(h.correct, whole.correct)
        assert h.ece() == pytest.approx(whole.ece(), abs=1e-12)
    with pytest.raises(ValueError):
        h1 + CalibrationHistogram(10)
    # the internal chunking gives the same sums as one pass
    monkeypatch.setattr(calibration, "_CHUNK", 7)
    chunked = CalibrationHistogram().update(np.concatenate([c1, c2]), np.concatenate([k1, k2]))
    np.testing.assert_array_equal(chunked.count, whole.count)
    assert chunked.ece() == pytest.approx(whole.ece(), abs=1e-12)


def test_torch_and_numpy_agree():
    rng = np.random.default_rng(2)
    conf = rng.uniform(size=(3, 16, 16)).astype(np.float32)
    correct = rng.uniform(size=conf.shape) < 0.5
    mask = rng.uniform(size=conf.shape) < 0.5
    a = CalibrationHistogram().update(conf, correct, mask)
    b = CalibrationHistogram().update(torch.from_numpy(conf), torch.from_numpy(correct), torch.from_numpy(mask))
    assert a.to_dict() == b.to_dict()


def test_json_round_trip_and_empty():
    h = _hand_example()
    d = json.loads(json.dumps(h.to_dict()))
    assert d["n_bins"] == 4 and d["count"] == 8 and len(d["bins"]) == 4
    back = CalibrationHistogram.from_dict(d)
    np.testing.assert_array_equal(back.count, h.count)
    np.testing.assert_array_equal(back.correct, h.correct)
    assert back.ece() == pytest.approx(h.ece()) and back.mce() == pytest.approx(h.mce())

    empty = CalibrationHistogram()
    assert math.isnan(empty.ece()) and math.isnan(empty.mce())
    e = json.loads(json.dumps(empty.to_dict(), allow_nan=False))
    assert e["ece"] is None and e["mce"] is None and e["count"] == 0
    assert all(b["confidence"] is None and b["accuracy"] is None for b in e["bins"])
    assert CalibrationHistogram.from_dict(e).total == 0
    # an empty update changes nothing
    empty.update(np.zeros(0, np.float32), np.zeros(0, bool))
    empty.update(np.ones(5, np.float32), np.ones(5, bool), mask=np.zeros(5, bool))
    assert empty.total == 0


def test_top_label_binary():
    pred, conf = top_label(np.array([0.2, 0.5, 0.9, 0.0], dtype=np.float32), binary=True)
    assert pred.tolist() == [0, 1, 1, 0]
    np.testing.assert_allclose(conf, [0.8, 0.5, 0.9, 1.0])
    assert conf.dtype == np.float32
    tp, tc = top_label(torch.tensor([[0.2, 0.7]]), binary=True)
    assert torch.is_tensor(tp) and tp.tolist() == [[0, 1]] and tc[0].tolist() == pytest.approx([0.8, 0.7])


def test_top_label_multiclass():
    probs = np.array([[0.7, 0.1, 0.2],    # class 0
                      [0.2, 0.3, 0.2],    # class 1
                      [0.1, 0.6, 0.6]],   # class 2
                     dtype=np.float32)    # [C=3, N=3]
    pred, conf = top_label(probs, binary=False)
    assert pred.tolist() == [0, 2, 2]
    np.testing.assert_allclose(conf, [0.7, 0.6, 0.6])
    tie, _ = top_label(np.array([[0.5], [0.5]]), binary=False)
    assert tie.tolist() == [0]  # ties go to the first class


def test_foreground_band_in_plane_only():
    pred = np.zeros((3, 6, 7), bool)
    pred[1, 3, 3] = True
    band = foreground_band(pred, np.zeros_like(pred), radius=1)
    expected = np.zeros_like(pred)
    expected[1, 2:5, 2:5] = True  # 3x3 square around the voxel, in its own slice only
    np.testing.assert_array_equal(band, expected)
    assert not band[0].any() and not band[2].any()
    # union with a truth voxel at the corner of slice 2: clipped at the border
    truth = np.zeros_like(pred)
    truth[2, 0, 0] = True
    band = foreground_band(pred, truth, radius=1)
    expected[2, 0:2, 0:2] = True
    np.testing.assert_array_equal(band, expected)
    # radius 0 is the union; other slice axes; 2D input; torch in, torch out
    np.testing.assert_array_equal(foreground_band(pred, truth, radius=0), pred | truth)
    moved = foreground_band(np.moveaxis(pred, 0, 2), np.moveaxis(truth, 0, 2), radius=1, axis=2)
    np.testing.assert_array_equal(moved, np.moveaxis(expected, 0, 2))
    np.testing.assert_array_equal(foreground_band(pred[1], truth[1], radius=1), expected[1])
    t = foreground_band(torch.from_numpy(pred), torch.from_numpy(truth), radius=1)
    assert torch.is_tensor(t) and t.dtype == torch.bool
    np.testing.assert_array_equal(t.numpy(), expected)
    # radius 2: 5x5 square
    assert foreground_band(pred, np.zeros_like(pred), radius=2)[1].sum() == 25


def test_report_binary_and_multiclass():
    rng = np.random.default_rng(3)
    p = rng.uniform(size=(2, 12, 12)).astype(np.float32) * 0.1  # confident background
    p[0, 5, 5] = 0.9
    truth = np.zeros((2, 12, 12), np.uint8)
    truth[0, 5, 6] = 1
    r = CalibrationReport(band_radius=1).update(p, truth, binary=True)
    d = r.to_dict()
    assert d["all"]["count"] == 288
    band = foreground_band(p >= 0.5, truth > 0, radius=1)
    assert d["band"]["count"] == int(band.sum()) == 12  # 3x3 around (5,5) united with 3x3 around (5,6)
    # binary: (5, 5) predicted wrongly, (5, 6) missed: 2 wrong voxels, both in the band
    assert r.band.total - int(r.band.correct.sum()) == 2 == r.all.total - int(r.all.correct.sum())
    assert d["band"]["ece"] > d["all"]["ece"]

    # multi-class with slices first [S, C, H, W]; the same as class-first with class_axis=0
    probs = rng.dirichlet([1, 1, 1], size=(2, 8, 8)).astype(np.float32)  # [S, H, W, C]
    probs_sc = np.moveaxis(probs, -1, 1)
    truth3 = rng.integers(0, 3, size=(2, 8, 8))
    a = CalibrationReport().update(probs_sc, truth3, binary=False).to_dict()
    b = CalibrationReport().update(np.moveaxis(probs, -1, 0), truth3, binary=False, class_axis=0).to_dict()
    assert a == b
    pred = probs.argmax(-1)
    assert a["all"]["count"] == 128
    assert sum(x["count"] * x["accuracy"] for x in a["all"]["bins"] if x["count"]) == pytest.approx((pred == truth3).sum())
