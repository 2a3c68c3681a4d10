"""Reliability diagrams and loss curves are written as PNG files (mismatch.plots)."""

from __future__ import annotations

import numpy as np

from mismatch.calibration import CalibrationHistogram
from mismatch.plots import loss_curve, reliability_diagram

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _histogram(seed: int, n: int = 2000, lo: float = 0.5) -> dict:
    rng = np.random.default_rng(seed)
    conf = rng.uniform(lo, 1, n).astype(np.float32)  # top-label: bins under 0.5 stay empty
    correct = rng.uniform(size=n) < conf ** 2
    return CalibrationHistogram().update(conf, correct).to_dict()


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_SIGNATURE


def test_reliability_diagram_one_curve(tmp_path):
    out = reliability_diagram({"mean": _histogram(0)}, tmp_path / "one.png", title="one curve")
    assert out == tmp_path / "one.png" and _is_png(out)


def test_reliability_diagram_four_curves_with_empty_bins(tmp_path):
    curves = {"positive decoder": _histogram(1), "negative decoder": _histogram(2, lo=0.9),
              "mean": _histogram(3, n=5), "U-Net": CalibrationHistogram().to_dict()}  # last one has no voxels
    assert sum(b["count"] == 0 for b in curves["mean"]["bins"]) >= 10
    out = reliability_diagram(curves, tmp_path / "sub" / "four.png")
    assert _is_png(out)


def test_loss_curve(tmp_path):
    history = [{"step": s, "loss": 1.0 / s, "dice": 0.9 / s, "consistency": 0.0 if s < 3 else 0.01,
                "alpha": 0.002, "lr": 2e-4} for s in range(1, 30)]
    history.append({"step": 30, "loss": 0.03, "terms": {"dice": 0.02, "consistency": 0.01}})
    assert _is_png(loss_curve(history, tmp_path / "loss.png"))
    assert _is_png(loss_curve([], tmp_path / "empty.png"))


def test_iou_vs_labelled_panels_with_gaps(tmp_path):
    from mismatch.plots import iou_vs_labelled

    panels = {"lungs": {"mismatch": {3: [0.8, 0.85, 0.9], 5: [0.9]}, "nearest-slice": {3: [0.5], 5: [float("nan")]}},
              "brain": {"mismatch": {3: [0.6, 0.7]}}, "empty": {}}
    out = iou_vs_labelled(panels, tmp_path / "iou.png", names={"mismatch": "MisMatch"}, title="t")
    assert out == tmp_path / "iou.png" and _is_png(out)


def test_benchmark_report_draws_iou_against_labelled_count(tmp_path):
    from mismatch.benchmark.runner import write_report

    runs = [{"dataset": "d", "method": m, "n_labelled": n, "seed": s, "iou": 0.5 + 0.1 * s, "group": "main"}
            for m in ("mismatch", "nearest-slice") for n in (3, 5) for s in range(2)]
    text = write_report({"runs": runs}, tmp_path).read_text()
    assert "![fig-iou-vs-labelled.png](fig-iou-vs-labelled.png)" in text
    assert _is_png(tmp_path / "fig-iou-vs-labelled.png")
