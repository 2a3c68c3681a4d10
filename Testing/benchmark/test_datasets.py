"""Named data sets (shapes, labels, geometry) and the labelled / unlabelled / test slice draw."""

import importlib.util
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from mismatch.benchmark import datasets
from mismatch.benchmark.datasets import (DATA_DIR_ENV, DATASETS, PYRADIOMICS_DOWNLOAD, draw_split, even_slices, extent,
                                         load_dataset)
from mismatch.errors import UserError

REPO_SDIST = Path(__file__).resolve().parents[2] / ".data" / "pyradiomics-3.0.1.tar.gz"

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


@pytest.mark.skipif(not has("slicerio"), reason="slicerio is not installed")
def test_ctchest_lungs_lr_is_its_own_two_class_data_set():
    (case,) = load_dataset("ctchest-lungs-lr")
    _check_case(case, n_classes=2)
    assert case.name == "ctchest-lungs-lr" and case.classes == {1: "right lung", 2: "left lung"}
    assert (case.label == 1).sum() > 1000 and (case.label == 2).sum() > 1000
    (binary,) = load_dataset("ctchest-lungs")
    assert np.array_equal(case.label > 0, binary.label > 0) and binary.classes == {1: "lungs"}



@pytest.mark.skipif(not has("slicerio"), reason="slicerio is not installed")
def test_ctchest_spine_and_ribs_are_bone_on_the_same_grid_as_the_lungs():
    (lungs,) = load_dataset("ctchest-lungs")
    for name, class_name in (("ctchest-spine", "vertebral column"), ("ctchest-ribs", "ribs")):
        (case,) = load_dataset(name)
        _check_case(case)
        assert case.name == name and case.classes == {1: class_name}
        assert case.label.shape == lungs.label.shape and case.window == lungs.window
        assert case.image[0][case.label > 0].mean() > 100          # bone, in HU
        assert not (case.label.astype(bool) & lungs.label.astype(bool)).any()
    (spine,) = load_dataset("ctchest-spine")
    assert (spine.label.sum(axis=(1, 2)) > 0).all()                 # the column runs through every slice


@pytest.mark.skipif(not has("nilearn"), reason="nilearn is not installed")
def test_mni152_white_matter_is_brighter_than_grey_and_apart_from_it():
    (wm,) = load_dataset("mni152-wm", downsample=4)
    (gm,) = load_dataset("mni152-gm", downsample=4)
    _check_case(wm)
    assert wm.name == "mni152-wm" and wm.classes == {1: "white matter"}
    assert wm.label.shape == gm.label.shape and np.array_equal(wm.image, gm.image)
    assert wm.image[0][wm.label > 0].mean() > gm.image[0][gm.label > 0].mean()   # T1: white brighter than grey
    assert (wm.label.astype(bool) & gm.label.astype(bool)).mean() < 0.01
    with pytest.raises(ValueError, match="tissue"):
        datasets.load_mni152_gm(tissue="bone")


@pytest.mark.skipif(not has("nilearn"), reason="nilearn is not installed")
def test_mni152_csf_is_dark_apart_from_grey_and_white_matter_and_in_many_pieces():
    (csf,) = load_dataset("mni152-csf", downsample=2)
    (gm,) = load_dataset("mni152-gm", downsample=2)
    (wm,) = load_dataset("mni152-wm", downsample=2)
    _check_case(csf)
    assert csf.name == "mni152-csf" and csf.classes == {1: "cerebrospinal fluid (derived)"}
    assert np.array_equal(csf.image, gm.image)
    fluid = csf.label > 0
    assert csf.image[0][fluid].mean() < gm.image[0][gm.label > 0].mean()   # T1: fluid darker than grey matter
    assert (fluid & ((gm.label > 0) | (wm.label > 0))).sum() < 0.05 * fluid.sum()   # apart but for 2 mm blocks
    assert 4000 < fluid.sum() < 10000 and (fluid.sum((1, 2)) > 0).sum() > 60   # on most of the 78 slices


@pytest.mark.skipif(not has("nilearn"), reason="nilearn is not installed")
def test_mni152_tissue_is_grey_and_white_matter_as_two_classes():
    (both,) = load_dataset("mni152-tissue", downsample=4)
    (wm,) = load_dataset("mni152-wm", downsample=4)
    (gm,) = load_dataset("mni152-gm", downsample=4)
    _check_case(both, n_classes=2)
    assert both.name == "mni152-tissue" and both.classes == {1: "grey matter", 2: "white matter"}
    assert np.array_equal(both.image, gm.image)
    assert np.array_equal(both.label == 2, wm.label > 0)
    assert np.array_equal(both.label == 1, (gm.label > 0) & (wm.label == 0))


@pytest.mark.skipif(not has("slicerio"), reason="slicerio is not installed")
def test_ctchest_tissue_is_the_soft_tissue_segment():
    (case,) = load_dataset("ctchest-tissue")
    _check_case(case)
    assert case.name == "ctchest-tissue" and case.classes == {1: "soft tissue"}
    hu = np.median(case.image[0][case.label > 0])
    assert -150 < hu < 150 and (case.label.sum((1, 2)) > 0).all()   # soft tissue, on every slice


@pytest.mark.skipif(not has("slicerio"), reason="slicerio is not installed")
def test_ctchest_lungs_spine_ribs_is_three_classes_of_the_single_class_sets():
    (case,) = load_dataset("ctchest-lungs-spine-ribs")
    _check_case(case, n_classes=3)
    assert case.classes == {1: "lungs", 2: "vertebral column", 3: "ribs"}
    for c, name in ((1, "ctchest-lungs"), (2, "ctchest-spine"), (3, "ctchest-ribs")):
        (single,) = load_dataset(name)
        assert np.array_equal(case.image, single.image) and case.window == single.window
        assert np.array_equal(case.label == c, single.label > 0)


@pytest.mark.skipif(not has("slicerio"), reason="slicerio is not installed")
def test_synthetic_lesion_in_the_lungs_of_the_vessels_volume():
    (case,) = load_dataset("synthetic-lesion-lung")
    _check_case(case)
    (vessels,) = load_dataset("synthetic-vessels-lung")
    assert case.synthetic and "SYNTHETIC" in case.source and case.classes == {1: "lesion (synthetic)"}
    assert case.image.shape == vessels.image.shape and case.geometry == vessels.geometry   # the same CT grid
    present = np.flatnonzero(case.label.any(axis=(1, 2)))
    assert 6 <= len(present) <= 16 and present[0] > 5 and present[-1] < case.label.shape[0] - 6
    assert np.array_equal(present, np.arange(present[0], present[-1] + 1))   # one stretch of slices
    (again,) = load_dataset("synthetic-lesion-lung")
    assert np.array_equal(case.image, again.image) and np.array_equal(case.label, again.label)
    (fine,) = load_dataset("synthetic-lesion-lung-fine")   # the same lesion on a clinical CT's pixel
    _check_case(fine)
    assert fine.name == "synthetic-lesion-lung-fine" and fine.geometry.spacing == (0.75, 0.75, 2.5)
    assert fine.label.shape[0] == case.label.shape[0] and fine.label.shape[1] > 1.9 * case.label.shape[1]
    on = np.flatnonzero(fine.label.any(axis=(1, 2)))   # drawn anew on the finer grid: about the same slices
    assert abs(len(on) - len(present)) <= 1 and abs(int(on[0]) - int(present[0])) <= 2


def test_pyradiomics_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(datasets, "REPO_DATA_DIR", tmp_path / "no-such-folder")
    with pytest.raises(UserError, match="pip download --no-deps --no-binary pyradiomics"):
        load_dataset("pyradiomics-brain1")
    with pytest.raises(UserError, match="scripts/setup-benchmark.sh"):
        load_dataset("pyradiomics-breast1")
    with pytest.raises(UserError, match=DATA_DIR_ENV):
        load_dataset("pyradiomics-brain1", data_dir=tmp_path)
    assert "--no-build-isolation pyradiomics==3.0.1" in PYRADIOMICS_DOWNLOAD


def test_only_brain1_and_breast1_of_the_pyradiomics_cases():
    assert sorted(n for n in DATASETS if n.startswith("pyradiomics-")) == ["pyradiomics-brain1",
                                                                           "pyradiomics-breast1"]
    with pytest.raises(UserError, match="reserved"):
        datasets._find_pyradiomics_case("lung1", None)


def test_repo_data_dir_is_the_repository_root():
    assert datasets.REPO_DATA_DIR == Path(__file__).resolve().parents[2] / ".data"
    assert (datasets.REPO_DATA_DIR.parent / "pyproject.toml").exists()


def _fake_sdist(folder: Path, case: str, shape_kji=(4, 6, 5), value=1) -> tuple[np.ndarray, np.ndarray]:
    """A tarball named like the pyradiomics 3.0.1 sdist holding only data/{case}_image/label.nrrd."""
    rng = np.random.default_rng(value)
    image = rng.normal(100, 10, shape_kji).astype(np.int16)
    label = np.zeros(shape_kji, np.uint8)
    label[1:3, 2:4, 1:4] = value  # the lesion: any value > 0 is foreground
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / "staging"
    staging.mkdir()
    for kind, arr in (("image", image), ("label", label)):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((0.66, 0.66, 2.1))
        sitk.WriteImage(img, str(staging / f"{case}_{kind}.nrrd"))
    with tarfile.open(folder / "pyradiomics-3.0.1.tar.gz", "w:gz") as tar:
        tar.add(staging, arcname="pyradiomics-3.0.1/data", recursive=False)  # the folder entry, as in the sdist
        for kind in ("image", "label"):
            tar.add(staging / f"{case}_{kind}.nrrd", arcname=f"pyradiomics-3.0.1/data/{case}_{kind}.nrrd")
    for f in staging.iterdir():
        f.unlink()
    staging.rmdir()
    return image, label


def test_breast1_from_a_tarball_in_the_search_order(tmp_path, monkeypatch):
    image, label = _fake_sdist(tmp_path / "arg", "breast1", value=1)
    other, _ = _fake_sdist(tmp_path / "env", "breast1", value=2)
    repo_image, _ = _fake_sdist(tmp_path / "repo" / ".data", "breast1", value=3)
    monkeypatch.setattr(datasets, "REPO_DATA_DIR", tmp_path / "repo" / ".data")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))

    (case,) = load_dataset("pyradiomics-breast1", data_dir=tmp_path / "arg")   # 1. the argument
    _check_case(case)
    assert case.name == "pyradiomics-breast1" and case.axis == 2 and case.window is None
    assert np.array_equal(case.image[0], image.astype(np.float32)) and np.array_equal(case.label, label > 0)
    assert case.spacing == pytest.approx((2.1, 0.66, 0.66))
    assert not list(tmp_path.glob("arg/pyradiomics-3.0.1"))  # read from the tarball, not untarred beside it

    (case,) = load_dataset("pyradiomics-breast1")                            # 2. $MISMATCH_DATA_DIR
    assert np.array_equal(case.image[0], other.astype(np.float32))
    monkeypatch.delenv(DATA_DIR_ENV)
    (case,) = load_dataset("pyradiomics-breast1")                            # 3. <repository>/.data
    assert np.array_equal(case.image[0], repo_image.astype(np.float32))
    # a data folder without the archive falls through to the next one
    (case,) = load_dataset("pyradiomics-breast1", data_dir=tmp_path / "empty")
    assert np.array_equal(case.image[0], repo_image.astype(np.float32))


def test_tarball_without_the_case_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(datasets, "REPO_DATA_DIR", tmp_path / "no-such-folder")
    _fake_sdist(tmp_path, "brain1")
    with pytest.raises(UserError, match="has no pyradiomics-3.0.1/data/breast1_image.nrrd"):
        load_dataset("pyradiomics-breast1", data_dir=tmp_path)
    (brain,) = load_dataset("pyradiomics-brain1", data_dir=tmp_path)
    assert brain.axis == 0 and brain.name == "pyradiomics-brain1"


def _pyradiomics_dir():
    folder = os.environ.get(DATA_DIR_ENV)
    if folder and (os.path.exists(os.path.join(folder, "pyradiomics-3.0.1.tar.gz"))
                   or os.path.exists(os.path.join(folder, "pyradiomics-3.0.1", "data", "brain1_image.nrrd"))):
        return folder
    return str(REPO_SDIST.parent) if REPO_SDIST.exists() else None


@pytest.mark.skipif(_pyradiomics_dir() is None, reason=f"pyradiomics sdist not in ${DATA_DIR_ENV} or .data/")
def test_pyradiomics_brain1():
    (case,) = load_dataset("pyradiomics-brain1", data_dir=_pyradiomics_dir())
    _check_case(case)
    assert case.label.shape == (25, 256, 256)
    assert ((case.label > 0).sum(axis=(1, 2)) > 0).sum() == 7


@pytest.mark.skipif(not REPO_SDIST.exists(), reason="no .data/pyradiomics-3.0.1.tar.gz (scripts/setup-benchmark.sh)")
def test_pyradiomics_breast1_real_archive(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    (case,) = load_dataset("pyradiomics-breast1")  # found in <repository>/.data with no argument
    _check_case(case)
    assert case.label.shape == (21, 120, 45) and case.axis == 2
    per_axis = [int(((case.label > 0).sum(axis=tuple(a for a in range(3) if a != ax)) > 0).sum()) for ax in range(3)]
    assert per_axis[0] == 3 and per_axis[2] == 9
    labelled, _, test = draw_split(case.label, case.axis, 3, seed=0)
    assert len(labelled) == 3 and len(test) == 45 - 3


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
    assert np.array_equal(test, unl)  # every unlabelled slice is a test slice
    again = draw_split(label, axis=0, n_labelled=5, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip((lab, unl, test), again))
    assert any(not np.array_equal(lab, draw_split(label, 0, 5, seed=s)[0]) for s in range(8, 12))
    lab4, _, test4 = draw_split(label, axis=0, n_labelled=5, seed=7, n_test=4)
    assert len(test4) == 4 and np.array_equal(lab4, lab) and not set(lab4) & set(test4)
    assert set(test4) <= set(unl) and np.array_equal(test4, draw_split(label, 0, 5, seed=7, n_test=4)[2])


def test_draw_split_tests_slices_without_foreground():
    label = _label()  # foreground on slices 3..24 of 30: 0-2 and 25-29 are empty
    lab, unl, test = draw_split(label, axis=0, n_labelled=3, seed=0)
    empty = {0, 1, 2, 25, 26, 27, 28, 29}
    assert empty <= set(test) and len(test) == 30 - 3
    assert test.dtype == np.int64 and np.all(np.diff(test) > 0)
    # n_test draws among all unlabelled slices, empty ones included
    drawn = set()
    for seed in range(20):
        lab_s, _, t = draw_split(label, axis=0, n_labelled=3, seed=seed, n_test=10)
        assert len(t) == 10 and not set(t) & set(lab_s)
        drawn |= set(t)
    assert empty <= drawn


def test_draw_split_other_axis_gap_relaxed_and_errors():
    label = _label().transpose(1, 0, 2)  # slices along axis 1
    lab, _, _ = draw_split(label, axis=1, n_labelled=15, seed=0)  # 21 candidates: the gap must be relaxed
    assert len(set(lab)) == 15
    with pytest.raises(UserError):
        draw_split(label, axis=1, n_labelled=40, seed=0)
    with pytest.raises(UserError):
        draw_split(np.zeros((4, 4, 4)), axis=0, n_labelled=1, seed=0)


def test_even_placement_spaces_the_slices_over_the_extent_for_every_seed():
    label = _label()  # foreground on slices 3..24 of 30, 4..24 with enough of it
    lab, unl, test = draw_split(label, axis=0, n_labelled=3, seed=0, placement="even")
    assert lab.tolist() == even_slices(extent(label, 0), 3, 30)
    gaps = np.diff(np.concatenate([[extent(label, 0)[0] - 1], lab, [extent(label, 0)[-1] + 1]]))
    # the centres of equal parts: equal steps between them, half a step to each end of the extent
    assert abs(gaps[1] - gaps[2]) <= 1 and abs(2 * gaps[0] - gaps[1]) <= 2 and abs(2 * gaps[-1] - gaps[1]) <= 2
    for seed in range(1, 5):             # the same slices whatever the seed
        assert draw_split(label, axis=0, n_labelled=3, seed=seed, placement="even")[0].tolist() == lab.tolist()
    assert not set(lab) & set(test) and set(lab) | set(unl) == set(range(30))
    # the random placement is unchanged by the option's existence
    assert np.array_equal(draw_split(label, 0, 3, seed=4)[0], draw_split(label, 0, 3, seed=4, placement="random")[0])
    with pytest.raises(UserError, match="placement"):
        draw_split(label, axis=0, n_labelled=3, seed=0, placement="clustered")


def test_the_extent_of_several_classes_keeps_each_small_class_own_extent():
    """A large class on slices 10-19 and a small one on 0-29: the small one's slices count (the union
    cross-section would drop them, its few voxels under a tenth of the large class's), so evenly spaced
    paintings cover both structures; one class is as before."""
    label = np.zeros((30, 20, 20), dtype=np.uint8)
    label[10:20, 2:18, 2:18] = 1
    label[:, 0, 0] = 2
    assert extent(label == 1, 0).tolist() == list(range(10, 20))
    assert extent(label, 0).tolist() == list(range(30))
    assert even_slices(extent(label, 0), 3, 30) == [4, 14, 24]   # the centres of three parts of 0-29
