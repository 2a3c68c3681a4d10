"""Memory of big volumes (issue 10, item 7): only the outputs asked for are whole volumes, the others are
streamed; the per-slice scores, the evaluation and the painted slices' connectivity pass are the same
either way; ``mismatch segment`` holds at most a few bytes a voxel beyond the network's working memory."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from mismatch.api import segment_files
from mismatch.events import Reporter
from mismatch.inference import CPU_BATCH_PIXELS, OUTPUTS, segment_volume
from mismatch.io import Geometry, read_volume, write_volume
from mismatch.modelfile import save_model
from mismatch.models import ArchitectureConfig, SegmentationNetwork
from mismatch.prior import PriorSettings, SlicePrior

ROOT = Path(__file__).resolve().parents[2]


def _net(num_classes=2, seed=0):
    torch.manual_seed(seed)
    return SegmentationNetwork(ArchitectureConfig(name="mismatch", in_channels=1, num_classes=num_classes,
                                                  width=4)).eval()


def _volume(shape=(10, 24, 24)):
    return np.random.default_rng(0).normal(size=(1,) + shape).astype(np.float32)


def _prior(shape=(10, 24, 24), axis=0, num_classes=2):
    sparse = np.zeros(shape, np.uint8)
    index = [slice(None)] * 3
    for s, value in ((2, 1), (6, num_classes - 1)):
        index[axis] = s
        plane = np.zeros([n for a, n in enumerate(shape) if a != axis], np.uint8)
        plane[6:14, 6:14] = value
        sparse[tuple(index)] = plane
    return SlicePrior(sparse, [2, 6], axis=axis, spacing=(1.0, 1.0, 1.0), num_classes=num_classes)


class _Streamed:
    """Collects streamed blocks into a volume (slice axis first)."""

    def __init__(self):
        self.blocks, self.next = [], 0

    def __call__(self, start, block):
        assert start == self.next
        self.blocks.append(np.array(block))
        self.next += len(block)

    def volume(self, axis):
        return np.moveaxis(np.concatenate(self.blocks), 0, axis)


def test_only_the_outputs_asked_for_are_volumes_and_the_rest_can_be_streamed():
    net, volume = _net(), _volume()
    truth = (np.random.default_rng(1).random((10, 24, 24)) > 0.5).astype(np.uint8)
    full = segment_volume([net], volume, truth=truth, eval_slices=[1, 3, 5])
    streams = {name: _Streamed() for name in OUTPUTS}
    lean = segment_volume([net], volume, truth=truth, eval_slices=[1, 3, 5], outputs=(), stream=streams)
    assert lean.labels is None and lean.confidence is None and lean.disagreement is None
    assert lean.slice_scores == full.slice_scores and lean.evaluation == full.evaluation
    for name in OUTPUTS:
        assert np.array_equal(streams[name].volume(0), getattr(full, name)), name
    only_labels = segment_volume([net], volume, outputs=("labels",))
    assert np.array_equal(only_labels.labels, full.labels) and only_labels.confidence is None
    with pytest.raises(ValueError, match="unknown output"):
        segment_volume([net], volume, outputs=("probabilities",))
    # without a report nothing of the per-slice scores is computed; the volumes and the evaluation are the same
    unscored = segment_volume([net], volume, truth=truth, eval_slices=[1, 3, 5], scores=False)
    assert unscored.slice_scores == [] and unscored.evaluation == full.evaluation
    for name in OUTPUTS:
        assert np.array_equal(getattr(unscored, name), getattr(full, name)), name


@pytest.mark.parametrize("axis,num_classes,with_truth", [(0, 2, False), (0, 2, True), (1, 3, False),
                                                        (2, 2, True)])
def test_the_painted_slices_path_gives_the_same_result_with_streamed_outputs(axis, num_classes, with_truth):
    """The connectivity pass needs the label map; the streamed confidence, made unsure where a part was
    removed, is the confidence kept in memory; the scores after the pass are the same without it."""
    shape = (10, 24, 24)
    net, volume = _net(num_classes), _volume(shape)
    name = "kji"[axis]
    truth = (np.random.default_rng(2).random(shape) > 0.5).astype(np.uint8) if with_truth else None
    full = segment_volume([net], volume, axis=name, prior=_prior(shape, axis, num_classes), truth=truth)
    assert full.removed is not None and full.removed.any(), "the case must remove a part"
    assert any("removed_fraction" in row for row in full.slice_scores)
    streams = {n: _Streamed() for n in ("confidence", "disagreement")}
    lean = segment_volume([net], volume, axis=name, prior=_prior(shape, axis, num_classes), truth=truth,
                          outputs=("labels",), stream=streams)
    assert lean.confidence is None and lean.disagreement is None
    assert np.array_equal(lean.labels, full.labels)
    assert np.array_equal(lean.removed, full.removed)
    assert lean.slice_scores == full.slice_scores
    assert lean.evaluation == full.evaluation
    assert np.array_equal(lean.unsure_where_removed(streams["confidence"].volume(axis)), full.confidence)
    assert np.array_equal(streams["disagreement"].volume(axis), full.disagreement)
    unscored = segment_volume([net], volume, axis=name, prior=_prior(shape, axis, num_classes), truth=truth,
                              scores=False)
    assert unscored.slice_scores == [] and np.array_equal(unscored.labels, full.labels)
    assert np.array_equal(unscored.confidence, full.confidence) and unscored.evaluation == full.evaluation


def test_a_cpu_batch_holds_at_most_so_many_pixels_with_the_same_result():
    class Count(Reporter):
        def __init__(self):
            super().__init__(progress_bar=False)
            self.steps = []

        def progress(self, phase, step, total, **kw):
            self.steps.append(step)

    net, volume = _net(), _volume((6, 20, 30))
    few, many = Count(), Count()
    small = segment_volume([net], volume, batch_size=8, max_batch_pixels=2 * 20 * 30, reporter=few)
    whole = segment_volume([net], volume, batch_size=8, max_batch_pixels=10**9, reporter=many)
    assert few.steps == [2, 4, 6] and many.steps == [6]
    for name in OUTPUTS:
        assert np.array_equal(getattr(small, name), getattr(whole, name))
    assert CPU_BATCH_PIXELS // (512 * 512) == 1


# -- mismatch segment: files in, files out ----------------------------------------------------------------

@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("memory")
    k, j, i = 48, 96, 96
    rng = np.random.default_rng(0)
    image = rng.normal(0, 30, (k, j, i)).astype(np.int16)
    yy, xx = np.mgrid[:j, :i]
    disc = (yy - 48) ** 2 + (xx - 40) ** 2 < 20 ** 2
    image[:, disc] += 300
    geometry = Geometry(size=(i, j, k), spacing=(0.8, 0.8, 2.0), origin=(0.0, 0.0, 0.0),
                        direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    write_volume(image, geometry, folder / "ct.nrrd")
    labels = np.zeros((k, j, i), np.uint8)
    labels[[10, 24, 38]] = disc
    write_volume(labels, geometry, folder / "labels.nrrd")
    net = _net()
    save_model(folder / "model", [net.state_dict()], {
        "architecture": net.config.to_dict(), "classes": [{"value": 1, "name": "disc", "color": [1, 0, 0]}],
        "channels": [{"name": "ct.nrrd"}], "normalisation": {"method": "zscore", "hu_window": None},
        "slice_axis": "k", "prior": PriorSettings().to_dict()})
    return {"dir": folder, "image": str(folder / "ct.nrrd"), "labels": str(folder / "labels.nrrd"),
            "model": str(folder / "model"), "voxels": k * j * i}


def _segment(case, name, labels):
    d = case["dir"]
    return segment_files([case["image"]], case["model"], str(d / f"{name}-seg.nrrd"),
                         confidence=str(d / f"{name}-conf.nrrd"), disagreement=str(d / f"{name}-dis.nrrd"),
                         report=str(d / f"{name}-report.json"), device="cpu",
                         labels=case["labels"] if labels else None)


@pytest.mark.parametrize("labels", [False, True])
def test_segment_files_writes_what_segment_volume_computes(case, labels):
    """The files written from streamed outputs are those of the in-memory inference."""
    from mismatch.api import painted_prior
    from mismatch.data import Normalisation
    from mismatch.io import read_image, read_labels
    from mismatch.modelfile import load_model

    name = f"same-{labels}"
    _segment(case, name, labels)
    card, nets = load_model(case["model"])
    image, geometry = read_image([case["image"]])
    volume = Normalisation.from_dict(card["normalisation"]).apply(image)
    prior = painted_prior(card, read_labels(case["labels"], geometry),
                          geometry.spacing[::-1], volume=volume) if labels else None
    seg = segment_volume(nets, volume, prior=prior)
    d = case["dir"]
    assert np.array_equal(read_volume(d / f"{name}-seg.nrrd")[0], seg.labels)
    assert np.array_equal(read_volume(d / f"{name}-conf.nrrd")[0], seg.confidence)
    assert np.array_equal(read_volume(d / f"{name}-dis.nrrd")[0], seg.disagreement)
    report = json.loads((d / f"{name}-report.json").read_text())
    assert len(report["uncertain_slices"]) > 0
    assert not [p for p in d.iterdir() if p.name.startswith(".mismatch")], "a temporary file was left"
    if labels:
        assert seg.removed is not None   # the case exercises the connectivity pass


@pytest.mark.parametrize("labels,limit", [(False, 12.0), (True, 18.0)])
def test_segment_files_holds_a_few_bytes_a_voxel(case, labels, limit):
    """Peak of the numpy memory of one ``segment_files`` with every output (tracemalloc sees numpy's
    arrays, not torch's feature maps nor SimpleITK's buffers). Before issue 10 the image, its normalised
    copy, the label map, the confidence and the disagreement were all held during the inference; now one
    float32 volume and the label map, and after the image is freed the connectivity pass's temporaries
    (10 bytes a voxel, mismatch.prior). Measured here: 18.1 and 29.8 bytes a voxel before, 9.2 and 13.9
    after.

    With the painted labels, the prior also grows them through the image (mismatch.grow) before the
    inference: its graph takes about 330 bytes a voxel of the grown box, and the box is at most
    ``MAX_VOXELS`` (a bigger one is grown on a coarser grid), a fixed budget beside the per-voxel one."""
    from mismatch.api import painted_prior
    from mismatch.data import Normalisation
    from mismatch.grow import MAX_VOXELS
    from mismatch.io import read_image, read_labels
    from mismatch.modelfile import load_model

    _segment(case, "warm", labels)   # imports and caches first
    gc.collect()
    tracemalloc.start()
    try:
        _segment(case, "traced", labels)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    grow_budget = 0
    if labels:
        card, _ = load_model(case["model"])          # the box the command grew, from the same prior
        image, geometry = read_image([case["image"]])
        volume = Normalisation.from_dict(card["normalisation"]).apply(image)
        box, _ = painted_prior(card, read_labels(case["labels"], geometry), geometry.spacing[::-1],
                               volume=volume).edges
        grow_budget = 400 * min(int(np.prod([b.stop - b.start for b in box])), MAX_VOXELS)
    per_voxel = (peak - grow_budget) / case["voxels"]
    assert per_voxel < limit, f"{per_voxel:.1f} bytes a voxel beyond the growing's {grow_budget / 1e6:.0f} MB"


def test_bench_memory_measures_a_child(tmp_path):
    """A smoke run of measurements/bench_memory.py on a tiny volume."""
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(ROOT / "measurements" / "bench_memory.py"), "--size", "24", "20",
                           "6", "--labels", "--width", "4", "--threads", "1", "--dir", str(tmp_path),
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "peak RSS of mismatch segment" in done.stdout and "-m mismatch segment" in done.stdout
    result = json.loads(out.read_text())
    assert result["voxels"] == 24 * 20 * 6 and result["peak_rss_bytes"] > 50e6
    assert "--confidence" in result["command"] and "--labels" in result["command"]
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]   # the work folder is removed
