"""The engine on a CUDA GPU: training with mixed precision, segmenting there, and the same model on the CPU.

Skipped where torch sees no CUDA device (CI has none); run on a machine with an NVIDIA GPU, as a user with
one runs the product: ``python -m pytest Testing/engine/test_cuda.py``.
"""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from discs import disc_volume
from mismatch.cli import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _write(array, path):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((0.8, 0.8, 2.0))
    sitk.WriteImage(img, str(path))
    return str(path)


@pytest.fixture
def case(tmp_path):
    """16 slices of 64 x 64 with a bright, slowly growing disc; labels on slices 3, 8 and 12."""
    image, labels, disc = disc_volume((16, 64, 64), (30, 34), 9, [3, 8, 12], growth=0.4, inside=60.0,
                                      outside=-700.0, noise=25.0)
    return {"image": _write(image, tmp_path / "image.nrrd"),
            "labels": _write(labels, tmp_path / "labels.nrrd"), "truth": disc, "dir": tmp_path}


def _seg(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.parametrize("method", ["mismatch", "unet"])
def test_train_on_cuda_then_segment_on_cuda_and_on_cpu(case, method):
    d = case["dir"]
    model = d / f"model-{method}"
    assert main(["train", case["image"], "--labels", case["labels"], "--out", str(model), "--method", method,
                 "--steps", "40", "--width", "8", "--device", "cuda"]) == 0
    card = json.loads((model / "model.json").read_text())
    assert card["summary"]["steps"] == 40
    outs = {}
    for device in ("cuda", "cpu"):
        out = d / f"seg-{method}-{device}.nrrd"
        conf = d / f"conf-{method}-{device}.nrrd"
        assert main(["segment", case["image"], "--model", str(model), "--labels", case["labels"], "--out", str(out),
                     "--confidence", str(conf), "--device", device]) == 0
        outs[device] = (_seg(out), _seg(conf))
    (seg_gpu, conf_gpu), (seg_cpu, conf_cpu) = outs["cuda"], outs["cpu"]
    # float16 autocast on the GPU against float32 on the CPU: the same label map but for a few boundary voxels
    assert (seg_gpu == seg_cpu).mean() > 0.995
    assert np.abs(conf_gpu.astype(np.float32) - conf_cpu.astype(np.float32)).max() < 0.05
    truth = case["truth"]
    iou = (((seg_gpu > 0) & truth).sum() / ((seg_gpu > 0) | truth).sum())
    assert iou > 0.8, f"{method} trained on the GPU segments the disc at IoU {iou:.3f}"


def test_segment_on_cuda_in_batches_matches_one_slice_at_a_time(case):
    d = case["dir"]
    model = d / "model"
    assert main(["train", case["image"], "--labels", case["labels"], "--out", str(model), "--steps", "5",
                 "--width", "8", "--device", "cuda"]) == 0
    segs = []
    for batch in ("1", "16"):
        out = d / f"seg-b{batch}.nrrd"
        assert main(["segment", case["image"], "--model", str(model), "--out", str(out), "--batch-size", batch,
                     "--device", "cuda"]) == 0
        segs.append(_seg(out))
    assert (segs[0] == segs[1]).mean() > 0.999
