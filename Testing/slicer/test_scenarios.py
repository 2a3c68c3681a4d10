"""The logic scenarios of the module's in-Slicer self-test (MisMatchSegmentationTesting/scenarios.py), run here
with slicer-core: the same code the factory runs, so that it is known to work before it reaches Slicer."""

from __future__ import annotations

import os

import pytest

from MisMatchSegmentationTesting import scenarios


@pytest.fixture
def phantom(scene, monkeypatch):
    monkeypatch.setenv("STANDIN_LOG", os.environ.get("STANDIN_LOG", ""))  # scenarios set it; restore after
    return scenarios.make_phantom()


def test_train_then_segment(phantom):
    volume, labels, segment_id = phantom
    results = scenarios.train_then_segment(scenarios.make_logic("ok"), volume, labels, segment_id)
    assert results["segmentation"].GetName() == "Phantom MisMatch segmentation"


@pytest.mark.skipif(os.name == "nt", reason="signals are POSIX here")
def test_cancel_keeps_the_checkpoint(phantom):
    scenarios.cancel_keeps_the_checkpoint(*phantom)


def test_outputs_refuse_the_inputs(phantom):
    scenarios.outputs_refuse_the_inputs(*phantom)
