"""Named data sets (shapes, labels, geometry) and the labelled / unlabelled / test slice draw."""

import importlib.util
import os
import tarfile

import numpy as np
import pytest

from mismatch.benchmark.datasets import DATA_DIR_ENV, PYRADIOMICS_DOWNLOAD, draw_split, load_dataset
from mismatch.errors import UserError

has = lambda name: importlib.util.find_spec(name) is not None  # noqa: E731


def _check_case(case, n_classes=1):
    assert case.image.dtype == np.float32 and case.image.ndim == 4 and case.image.shape[0] == 1
    assert case.label.dtype == np.uint8 and case.label.shape == case.image.shape[1:]
    assert set(np.unique(case.label)) == set(range(n_classes + 1))
    assert tuple(case.geometry.size) == case.label.shape[::-1]
    assert case.spacing == tuple(case.geometry.spacing[::-1])
    assert case.axis in (0, 1, 2)


@pytest.mark.skipif(not has("slicerio"), reason="slicerio is not installed")
def test_ctchest_lungs_binary_and_multiclass():
    (case,) = load_dataset("ctchest-lungs")
    _check_case(case)
    assert case.label.shape == (34, 128, 128) and case.window is not None
    assert case.spacing == pytest.approx((10.0, 3.046875, 3.046875), rel=1e-4)
    lungs = case.label.astype(bool)
    assert case.image[0][lungs].mean() < -500  # air-filled lungs in HU
    assert 0.05 < lungs.mean() < 0.3
    (multi,) = load_dataset("ctchest-lungs", multiclass=True)
    _check_case(multi, n_classes=2)
    assert np.array_equal(multi.label > 0, lungs)
    # right lung is on the patient's right = smaller L (LPS x) = larger i here (direction x = -1)
    i = np.arange(128)
    assert i[None, None, :].repeat(34, 0).repeat(128, 1)[multi.label == 1].mean() > 64


@pytest.mark.skipif(not has("nilearn"), reason="nilearn is not installed")
def test_mni152_grey_matter():
    (case,) = load_dataset("mni152-gm", downsample=4)
    _check_case(case)
    assert case.spacing == (4.0, 4.0, 4.0)
    assert 0.1 < case.label.mean() < 0.5
    assert case.image[0][case.label > 0].mean() > 0


def test_pyradiomics_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(UserError, match="pip download --no-deps --no-binary pyradiomics"):
        load_dataset("pyradiomics-brain1")
    with pytest.raises(UserError, match=DATA_DIR_ENV):
        load_dataset("pyradiomics-brain1", data_dir=tmp_path)
    assert "--no-build-isolation pyradiomics==3.0.1" in PYRADIOMICS_DOWNLOAD


def _pyradiomics_dir():
    folder = os.environ.get(DATA_DIR_ENV)
    if folder and (os.path.exists(os.path.join(folder, "pyradiomics-3.0.1.tar.gz"))
                   or os.path.exists(os.path.join(folder, "pyradiomics-3.0.1", "data", "brain1_image.nrrd"))):
        return folder
    return None


@pytest.mark.skipif(_pyradiomics_dir() is None, reason=f"pyradiomics sdist not in ${DATA_DIR_ENV}")
def test_pyradiomics_brain1():
    (case,) = load_dataset("pyradiomics-brain1", data_dir=_pyradiomics_dir())
    _check_case(case)
    assert case.label.shape == (25, 256, 256)
    assert ((case.label > 0).sum(axis=(1, 2)) > 0).sum() == 7


def test_synthetic_vessels_named_synthetic():
    (case,) = load_dataset("synthetic-vessels", seed=1, shape=(32, 48, 48), spacing=(1.0, 1.0, 1.0),
                           max_depth=3, root_radius_mm=2.0)
    _check_case(case)
    assert case.synthetic and case.name.startswith("synthetic") and "SYNTHETIC" in case.source
    (again,) = load_dataset("synthetic-vessels", seed=1, shape=(32, 48, 48), spacing=(1.0, 1.0, 1.0),
                            max_depth=3, root_radius_mm=2.0)
    assert np.array_equal(case.image, again.image)


def test_unknown_dataset():
    with pytest.raises(UserError, match="unknown data set"):
        load_dataset("carve")


def _label():
    label = np.zeros((30, 8, 8), np.uint8)
    label[3:25, 2:6, 2:6] = 1
    label[3] = 0
    label[3, 0, 0] = 1  # a slice with too little foreground to be labelled, but a test slice
    return label


def test_draw_split_disjoint_deterministic():
    label = _label()
    lab, unl, test = draw_split(label, axis=0, n_labelled=5, seed=7)
    assert len(lab) == 5 and set(lab) <= set(range(4, 25))
    assert np.all(np.diff(lab) >= 2)  # one slice at least between labelled slices
    assert not set(lab) & set(test) and not set(lab) & set(unl)
    assert set(lab) | set(unl) == set(range(30))
    assert set(test) == set(range(3, 25)) - set(lab) and set(test) <= set(unl)
    again = draw_split(label, axis=0, n_labelled=5, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip((lab, unl, test), again))
    assert any(not np.array_equal(lab, draw_split(label, 0, 5, seed=s)[0]) for s in range(8, 12))
    lab4, _, test4 = draw_split(label, axis=0, n_labelled=5, seed=7, n_test=4)
    assert len(test4) == 4 and np.array_equal(lab4, lab) and not set(lab4) & set(test4)


def test_draw_split_other_axis_gap_relaxed_and_errors():
    label = _label().transpose(1, 0, 2)  # slices along axis 1
    lab, _, _ = draw_split(label, axis=1, n_labelled=15, seed=0)  # 21 candidates: the gap must be relaxed
    assert len(set(lab)) == 15
    with pytest.raises(UserError):
        draw_split(label, axis=1, n_labelled=40, seed=0)
    with pytest.raises(UserError):
        draw_split(np.zeros((4, 4, 4)), axis=0, n_labelled=1, seed=0)
