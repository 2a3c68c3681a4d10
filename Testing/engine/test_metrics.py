"""Overlap metrics, whole-volume evaluation and the Mann-Whitney U test (mismatch.metrics)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mismatch.calibration import CalibrationReport, top_label
from mismatch.errors import UserError
from mismatch.metrics import OverlapCounter, evaluate_arrays, evaluate_confidence, mann_whitney_u, overlap


def test_overlap_hand_computed():
    pred = np.array([[1, 1, 0],
                     [0, 2, 0]])
    truth = np.array([[1, 0, 0],
                      [0, 2, 2]])
    r = overlap(pred, truth, classes=[1, 2, 3])
    # class 1: TP 1, FP 1, FN 0 -> IoU 1/2, Dice 2/3
    # class 2: TP 1, FP 0, FN 1 -> IoU 1/2, Dice 2/3
    # class 3: absent from both -> None, left out of the mean
    assert r[1]["iou"] == pytest.approx(0.5) and r[1]["dice"] == pytest.approx(2 / 3)
    assert r[1]["pred_voxels"] == 2 and r[1]["true_voxels"] == 1
    assert r[2]["iou"] == pytest.approx(0.5) and r[2]["dice"] == pytest.approx(2 / 3)
    assert r[2]["pred_voxels"] == 1 and r[2]["true_voxels"] == 2
    assert r[3] == {"iou": None, "dice": None, "pred_voxels": 0, "true_voxels": 0, "tp": 0, "fp": 0, "fn": 0}
    assert r["mean"]["iou"] == pytest.approx(0.5) and r["mean"]["dice"] == pytest.approx(2 / 3)
    # default classes: the values present
    assert sorted(k for k in overlap(pred, truth) if k != "mean") == [1, 2]


def test_overlap_empty_cases():
    z = np.zeros((4, 4), np.uint8)
    assert overlap(z, z) == {"mean": {"iou": None, "dice": None}}
    r = overlap(z, z, classes=[1])
    assert r[1]["iou"] is None and r["mean"]["iou"] is None
    one = z.copy()
    one[0, 0] = 1
    # predicted but absent from the truth (and the other way round): 0, not None
    assert overlap(one, z)[1]["iou"] == 0.0 and overlap(z, one)[1]["dice"] == 0.0
    assert overlap(one, one)[1]["iou"] == 1.0


def test_overlap_counter_accumulates_slices():
    rng = np.random.default_rng(0)
    pred, truth = rng.integers(0, 3, (5, 6, 6)), rng.integers(0, 3, (5, 6, 6))
    c = OverlapCounter([1, 2])
    for k in range(5):
        c.update(pred[k], truth[k])
    whole = overlap(pred, truth, [1, 2])
    d = json.loads(json.dumps(c.to_dict()))
    assert d["classes"]["1"]["iou"] == pytest.approx(whole[1]["iou"])
    assert d["iou"] == pytest.approx(whole["mean"]["iou"]) and d["dice"] == pytest.approx(whole["mean"]["dice"])
    half = OverlapCounter([1, 2]).update(pred[:2], truth[:2]).merge(OverlapCounter([1, 2]).update(pred[2:], truth[2:]))
    assert half.to_dict() == c.to_dict()


def _binary_case():
    rng = np.random.default_rng(1)
    truth = np.zeros((6, 10, 12), np.uint8)
    truth[:, 3:7, 4:9] = 1
    logits = (truth * 2.0 - 1.0) * 2 + rng.normal(0, 1.5, truth.shape)
    probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
    pred = (probs >= 0.5).astype(np.uint8)
    return pred, truth, probs


def test_evaluate_arrays_restricted_to_slices():
    pred, truth, _ = _binary_case()
    r = evaluate_arrays(pred, truth, slices=[4, 1, 1])
    assert r["slices"] == [1, 4] and "calibration" not in r
    ref = overlap(pred[[1, 4]], truth[[1, 4]])
    assert r["iou"] == pytest.approx(ref["mean"]["iou"]) and r["dice"] == pytest.approx(ref["mean"]["dice"])
    assert r["classes"]["1"]["true_voxels"] == 40
    json.dumps(r, allow_nan=False)
    # the same slices along another axis
    moved = evaluate_arrays(np.moveaxis(pred, 0, 1), np.moveaxis(truth, 0, 1), slices=[1, 4], axis=1)
    assert moved["classes"] == r["classes"]
    whole = evaluate_arrays(pred, truth)
    assert whole["slices"] == "all"
    assert whole["iou"] == pytest.approx(overlap(pred, truth)["mean"]["iou"])
    with pytest.raises(UserError, match="outside"):
        evaluate_arrays(pred, truth, slices=[6])


def _same_calibration(got: dict, want: dict) -> None:
    for region in ("all", "band"):
        for x, y in zip(got[region]["bins"], want[region]["bins"]):
            assert x["count"] == y["count"] and x["accuracy"] == y["accuracy"]
            assert x["confidence"] == pytest.approx(y["confidence"], abs=1e-9) if x["count"] else y["confidence"] is None
        assert got[region]["ece"] == pytest.approx(want[region]["ece"], abs=1e-9)


def test_evaluate_confidence_is_the_calibration_of_the_probabilities_binary():
    pred, truth, probs = _binary_case()
    _, conf = top_label(probs, binary=True)
    r = evaluate_confidence(pred, truth, conf, slices=[5, 0, 2], band_radius=2)
    assert r["classes"] == evaluate_arrays(pred, truth, slices=[0, 2, 5])["classes"]
    want = CalibrationReport(15, 2).update(probs[[0, 2, 5]], truth[[0, 2, 5]], binary=True).to_dict()
    assert r["calibration"]["all"]["count"] == want["all"]["count"] == 360
    _same_calibration(r["calibration"], want)
    json.dumps(r, allow_nan=False)


def test_evaluate_confidence_is_the_calibration_of_the_probabilities_multiclass():
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 3, (4, 9, 9)).astype(np.uint8)
    logits = np.eye(3)[truth].transpose(3, 0, 1, 2) * 2 + rng.normal(0, 1, (3, 4, 9, 9))
    probs = (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float32)  # [C, K, J, I]
    pred, conf = top_label(probs, binary=False)
    for axis in (0, 2):
        r = evaluate_confidence(pred, truth, conf, slices=[1, 2], axis=axis)
        assert r["classes"] == evaluate_arrays(pred, truth, slices=[1, 2], axis=axis)["classes"]
        assert set(r["classes"]) == {"1", "2"}
        probs_v, truth_v = np.moveaxis(probs, axis + 1, 0)[[1, 2]], np.moveaxis(truth, axis, 0)[[1, 2]]
        _same_calibration(r["calibration"], CalibrationReport().update(probs_v, truth_v, False, class_axis=1).to_dict())


def test_mann_whitney_known_values():
    # scipy.stats.mannwhitneyu documentation example (Conover's ages of males and females)
    males, females = [19, 22, 16, 29, 24], [20, 11, 17, 12]
    u, p = mann_whitney_u(males, females)
    assert u == 17 and p == pytest.approx(0.1111111111111111)  # exact p for small samples without ties
    assert mann_whitney_u([1, 2, 4], [3, 5, 6])[1] == pytest.approx(0.2) == mann_whitney_u([3, 5, 6], [1, 2, 4])[1]
    # hand-computed: a entirely below b -> U = 0; ties count 1/2: a=[1,2], b=[2,3] -> U = 0 + 0.5 = 0.5
    assert mann_whitney_u([1, 2], [3, 4])[0] == 0
    assert mann_whitney_u([1, 2], [2, 3])[0] == 0.5
    assert mann_whitney_u([5, 5, 5], [5, 5])[1] == 1.0
    with pytest.raises(ValueError):
        mann_whitney_u([], [1.0])