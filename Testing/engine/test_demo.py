"""The demo end to end with a tiny budget: every output it promises, and the free baselines beside it."""

import json

import pytest

pytest.importorskip("slicerio")

from mismatch.demo import run_demo  # noqa: E402


def test_demo_writes_every_output_and_compares_with_what_a_user_has_for_free(tmp_path):
    results = run_demo(str(tmp_path), steps=3, width=4, quiet=True)
    for name in ("mismatch.seg.nrrd", "mismatch-segmentation.nrrd", "mismatch-confidence.nrrd",
                 "mismatch-disagreement.nrrd", "unet-strong-segmentation.nrrd", "reliability.png", "report.md",
                 "results.json", "model-mismatch/model.json", "model-unet-strong/model.json"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["free"]) == {"nearest labelled slice", "shape-based interpolation"}
    assert 0.3 < saved["free"]["shape-based interpolation"]["iou"] < 1.0
    assert saved["models"]["mismatch"]["painted_slices_guide"] is True
    assert saved["models"]["unet-strong"]["painted_slices_guide"] is False
    card = json.loads((tmp_path / "model-mismatch" / "model.json").read_text())
    assert card["prior"] and card["geometry"]
    assert "shape-based interpolation" in (tmp_path / "report.md").read_text()
    assert results["steps"] == 3
    from mismatch.io import segment_names

    assert [c["name"] for c in segment_names(tmp_path / "mismatch.seg.nrrd").values()] == ["lungs"]
