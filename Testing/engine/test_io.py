"""mismatch.io: geometry round trips through every format, dtypes on writing, and every input error."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from mismatch.errors import UserError
from mismatch.io import (SUPPORTED_EXTENSIONS, Geometry, check_outputs_not_inputs, read_image, read_labels,
                         read_volume, write_volume)

# Every format keeps the grid to within TOL. NRRD, MHA and MHD store doubles as text and come back exactly;
# NIfTI stores the affine as float32: direction and spacing come back within ~3e-8, and the origin is
# rounded to float32 (6e-6 mm for the 410 mm used here; it grows with the distance from zero, ~3e-5 mm at
# 1000 mm), which TOL covers for origins below ~500 mm.
TOL = 1e-5
ROUND_TRIP_EXTS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_sitk(array: np.ndarray, path, geometry: Geometry | None = None, vector: bool = False) -> Path:
    """Write a test file with SimpleITK directly (not through the code under test)."""
    image = sitk.GetImageFromArray(array, isVector=vector)
    if geometry is not None:
        geometry.apply_to(image)
    sitk.WriteImage(image, str(path))
    return Path(path)


def assert_geometry_close(a: Geometry, b: Geometry, tol: float = TOL) -> None:
    assert a.size == b.size
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=0, atol=tol)
    np.testing.assert_allclose(a.origin, b.origin, rtol=0, atol=tol)
    np.testing.assert_allclose(a.direction, b.direction, rtol=0, atol=tol)


# -- geometry ------------------------------------------------------------------------------------------

def test_geometry_dict_json_round_trip(oblique_geometry):
    g = oblique_geometry
    back = Geometry.from_dict(json.loads(json.dumps(g.to_dict())))
    assert back == g
    assert back.shape == (5, 6, 7)


def test_geometry_same_grid_tolerances(oblique_geometry):
    g = oblique_geometry
    assert g.same_grid(g)
    shifted = Geometry(g.size, g.spacing, (g.origin[0] + 1e-6, g.origin[1], g.origin[2]), g.direction)
    assert g.same_grid(shifted)
    moved = Geometry(g.size, g.spacing, (g.origin[0] + 0.5, g.origin[1], g.origin[2]), g.direction)
    assert not g.same_grid(moved) and g.differences(moved) == ["origin"]
    bigger = Geometry((7, 6, 6), g.spacing, g.origin, g.direction)
    assert g.differences(bigger) == ["size"]
    finer = Geometry(g.size, (0.7, 0.9, 2.4), g.origin, g.direction)
    assert g.differences(finer) == ["spacing"]
    axis_aligned = Geometry(g.size, g.spacing, g.origin, tuple(np.eye(3).ravel()))
    assert g.differences(axis_aligned) == ["direction"]


def test_geometry_describe(oblique_geometry):
    text = oblique_geometry.describe()
    assert text.startswith("7x6x5 voxels, spacing 0.7x0.9x2.5 mm")
    assert "direction" in text
    plain = Geometry((128, 128, 34), (3.046875, 3.046875, 10.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    assert plain.describe() == "128x128x34 voxels, spacing 3.047x3.047x10 mm, origin (0, 0, 0)"


@pytest.mark.parametrize("ext", ROUND_TRIP_EXTS)
def test_round_trip_oblique_anisotropic(tmp_path, ext, oblique_geometry):
    g = oblique_geometry
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=g.shape).astype(np.int64)
    image = rng.normal(40, 300, size=g.shape).astype(np.float32)

    write_volume(labels, g, tmp_path / f"labels{ext}")
    write_volume(image, g, tmp_path / f"image{ext}", compress=True)

    lab_back, g_lab = read_volume(tmp_path / f"labels{ext}")
    assert lab_back.dtype == np.uint8
    np.testing.assert_array_equal(lab_back, labels)
    assert_geometry_close(g_lab, g)

    img_back, g_img = read_image([tmp_path / f"image{ext}"])
    assert img_back.dtype == np.float32 and img_back.shape == (1,) + g.shape
    np.testing.assert_array_equal(img_back[0], image)
    assert_geometry_close(g_img, g)
    assert g_img.same_grid(g) and g_lab.same_grid(g)

    # read_labels accepts the label map on the image grid as read back (NIfTI: float32-rounded grid)
    np.testing.assert_array_equal(read_labels(tmp_path / f"labels{ext}", g_img), labels)
    # no temporary file is left behind
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_nifti_left_handed_direction(tmp_path, oblique_geometry):
    """A left-handed grid (det = -1, e.g. K running inferior) survives NIfTI's qform/sform too."""
    g = oblique_geometry
    d = (np.asarray(g.direction).reshape(3, 3) @ np.diag([1.0, 1.0, -1.0])).ravel()
    flipped = Geometry(g.size, g.spacing, g.origin, tuple(float(v) for v in d))
    write_volume(np.zeros(g.shape, np.uint8), flipped, tmp_path / "flip.nii.gz")
    assert_geometry_close(read_volume(tmp_path / "flip.nii.gz")[1], flipped)


@pytest.mark.parametrize("values, dtype", [
    ((0, 200), np.uint8), ((0, 300), np.uint16), ((0, 70000), np.int32), ((-3, 5), np.int16)])
def test_write_integer_smallest_type(tmp_path, values, dtype, oblique_geometry):
    a = np.zeros(oblique_geometry.shape, np.int64)
    a.flat[:2] = values
    write_volume(a, oblique_geometry, tmp_path / "x.nrrd")
    back, _ = read_volume(tmp_path / "x.nrrd")
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, a)


def test_write_float_and_bool(tmp_path, oblique_geometry):
    g = oblique_geometry
    write_volume(np.full(g.shape, 0.25, np.float64), g, tmp_path / "f.mha")
    assert read_volume(tmp_path / "f.mha")[0].dtype == np.float32
    write_volume(np.ones(g.shape, bool), g, tmp_path / "b.nrrd")
    assert read_volume(tmp_path / "b.nrrd")[0].dtype == np.uint8


def test_write_creates_folder_replaces_file_normal_permissions(tmp_path, oblique_geometry):
    g = oblique_geometry
    target = tmp_path / "new" / "deeper" / "seg.nii.gz"
    write_volume(np.zeros(g.shape, np.uint8), g, target)
    write_volume(np.ones(g.shape, np.uint8), g, target)          # replaces the existing file
    assert read_volume(target)[0].min() == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["seg.nii.gz"]
    reference = tmp_path / "plain.txt"
    reference.write_text("x")
    assert (target.stat().st_mode & 0o777) == (reference.stat().st_mode & 0o777)


def test_write_rejects_wrong_shape(tmp_path, oblique_geometry):
    with pytest.raises(ValueError):
        write_volume(np.zeros((5, 6, 8), np.uint8), oblique_geometry, tmp_path / "x.nrrd")
    with pytest.raises(UserError, match="unsupported"):
        write_volume(np.zeros(oblique_geometry.shape, np.uint8), oblique_geometry, tmp_path / "x.png")


def test_single_slice_volume_is_3d(tmp_path):
    path = write_sitk(np.arange(42, dtype=np.int16).reshape(1, 6, 7), tmp_path / "one.nrrd")
    image, g = read_image([path])
    assert image.shape == (1, 1, 6, 7) and g.size == (7, 6, 1)


def test_multichannel_read(tmp_path, oblique_geometry):
    g = oblique_geometry
    a = np.arange(np.prod(g.shape), dtype=np.int16).reshape(g.shape)
    p0 = write_sitk(a, tmp_path / "t1.nrrd", g)
    p1 = write_sitk((a * 2).astype(np.float64), tmp_path / "t2.nii.gz", g)
    image, g_read = read_image([p0, str(p1)])
    assert image.shape == (2,) + g.shape and image.dtype == np.float32
    np.testing.assert_array_equal(image[0], a)
    np.testing.assert_array_equal(image[1], a * 2)
    assert g_read.same_grid(g)


def test_read_labels_converts_float_whole_numbers(tmp_path, oblique_geometry):
    g = oblique_geometry
    path = write_sitk(np.full(g.shape, 2.0, np.float32), tmp_path / "lab.nrrd", g)
    lab = read_labels(path, g)
    assert lab.dtype == np.uint8 and int(lab.max()) == 2


# -- errors: a UserError with a useful line, and the input file untouched ------------------------------

def _expect_error(paths, call, *keywords):
    before = {p: sha(p) for p in paths if Path(p).is_file()}
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for word in keywords:
        assert word.lower() in message.lower(), (word, message)
    for p, digest in before.items():
        assert sha(p) == digest, f"{p} was modified"
    return message


def test_error_missing_file(tmp_path):
    _expect_error([], lambda: read_image([tmp_path / "nope.nrrd"]), "not found", "nope.nrrd")
    _expect_error([], lambda: read_volume(tmp_path / "nope.nii.gz"), "not found")


def test_error_unreadable(tmp_path):
    bad = tmp_path / "broken.nrrd"
    bad.write_bytes(b"this is not an image\x00\x01")
    _expect_error([bad], lambda: read_image([bad]), "cannot be read", str(bad))


def test_error_unsupported_extension(tmp_path):
    bad = tmp_path / "slice.png"
    bad.write_bytes(b"\x89PNG")
    message = _expect_error([bad], lambda: read_image([bad]), "unsupported")
    for ext in SUPPORTED_EXTENSIONS:
        assert ext in message


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz", ".mha"])
def test_error_2d(tmp_path, ext):
    path = write_sitk(np.zeros((6, 7), np.uint8), tmp_path / f"flat{ext}")
    _expect_error([path], lambda: read_image([path]), "2D", "3D volume")


def test_error_4d(tmp_path):
    image = sitk.Image([4, 5, 6, 2], sitk.sitkFloat32)
    path = tmp_path / "time.nrrd"
    sitk.WriteImage(image, str(path))
    _expect_error([path], lambda: read_image([path]), "4D", "one 3D file each", "several IMAGEs")


@pytest.mark.parametrize("ext", [".nrrd", ".mha", ".nii.gz"])
def test_error_vector_rgb(tmp_path, ext):
    path = write_sitk(np.zeros((5, 6, 7, 3), np.uint8), tmp_path / f"rgb{ext}", vector=True)
    _expect_error([path], lambda: read_image([path]), "components", "one 3D file each", "several IMAGEs")
    _expect_error([path], lambda: read_volume(path), "components")


@pytest.mark.parametrize("ext", [".nrrd", ".mha", ".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_error_nan_inf(tmp_path, ext, dtype):
    """NIfTI included: SimpleITK's NIfTI reader returns 0 for NaN, so the raw data is checked too."""
    a = np.zeros((5, 6, 7), dtype)
    a[1, 2, 3] = np.nan
    a[4, 0, 0] = -np.inf
    a[0, 5, 6] = np.inf
    path = write_sitk(a, tmp_path / f"holes{ext}")
    _expect_error([path], lambda: read_image([path]), "3 voxel", "NaN or infinite", f"holes{ext}")


def test_finite_float_nifti_is_fine(tmp_path):
    path = write_sitk(np.linspace(-1, 1, 210, dtype=np.float32).reshape(5, 6, 7), tmp_path / "ok.nii.gz")
    assert np.isfinite(read_image([path])[0]).all()


def test_error_channels_on_different_grids(tmp_path, oblique_geometry):
    g = oblique_geometry
    p0 = write_sitk(np.zeros(g.shape, np.int16), tmp_path / "a.nrrd", g)
    other = Geometry(g.size, (0.7, 0.9, 3.0), g.origin, g.direction)
    p1 = write_sitk(np.zeros(g.shape, np.int16), tmp_path / "b.nrrd", other)
    message = _expect_error([p0, p1], lambda: read_image([p0, p1]), "different grids", "spacing", "resample")
    assert "0.7x0.9x2.5" in message and "0.7x0.9x3" in message


def test_error_labels_on_different_grid(tmp_path, oblique_geometry):
    g = oblique_geometry
    img = write_sitk(np.zeros(g.shape, np.int16), tmp_path / "img.nrrd", g)
    small = Geometry((7, 6, 4), (0.7, 0.9, 3.0), g.origin, g.direction)   # another slice spacing
    lab = write_sitk(np.zeros(small.shape, np.uint8), tmp_path / "lab.nrrd", small)
    _, g_img = read_image([img])
    message = _expect_error([img, lab], lambda: read_labels(lab, g_img), "different grid", "resample", "reference")
    assert "7x6x4" in message and "7x6x5" in message


def _block(g: Geometry, start_ijk, size) -> Geometry:
    """The block of grid ``g`` whose first voxel is ``start_ijk``: a file cropped to its content."""
    axes = np.asarray(g.direction).reshape(3, 3) * np.asarray(g.spacing)
    origin = np.asarray(g.origin) + axes @ np.asarray(start_ijk, float)
    return Geometry(tuple(size), g.spacing, tuple(origin.tolist()), g.direction)


def test_labels_on_a_block_of_the_oblique_grid_are_placed_as_they_lie(tmp_path, oblique_geometry):
    g = oblique_geometry
    block = _block(g, (2, 1, 3), (4, 3, 2))
    painted = np.arange(1, 25, dtype=np.uint8).reshape(block.shape)
    lab = write_sitk(painted, tmp_path / "cropped.nrrd", block)
    told = []
    placed = read_labels(lab, g, log=told.append)
    expected = np.zeros(g.shape, np.uint8)
    expected[3:5, 1:4, 2:6] = painted
    np.testing.assert_array_equal(placed, expected)
    assert "4x3x2-voxel block" in told[0] and "2, 1, 3" in told[0]
    # a block reaching past the image: the part outside must be background, or it is refused (never dropped)
    past = _block(g, (5, -1, 4), (4, 3, 2))
    beyond = np.zeros(past.shape, np.uint8)
    beyond[0, 1, 0] = 1                       # voxel (5, 0, 4): inside
    lab = write_sitk(beyond, tmp_path / "past.nrrd", past)
    assert np.argwhere(read_labels(lab, g)).tolist() == [[4, 0, 5]]
    beyond[1, 2, 3] = 1                       # voxel (8, 1, 5): i and k outside
    lab = write_sitk(beyond, tmp_path / "past.nrrd", past)
    _expect_error([lab], lambda: read_labels(lab, g), "1 labelled voxel", "outside the image")


def test_error_labels_non_integer(tmp_path, oblique_geometry):
    g = oblique_geometry
    a = np.zeros(g.shape, np.float32)
    a[0, 0, 0] = 0.5
    path = write_sitk(a, tmp_path / "prob.nrrd", g)
    _expect_error([path], lambda: read_labels(path, g), "non-integer", "label map")


def test_error_labels_negative(tmp_path, oblique_geometry):
    g = oblique_geometry
    a = np.zeros(g.shape, np.int16)
    a[0, 0, 0] = -1
    path = write_sitk(a, tmp_path / "neg.nrrd", g)
    _expect_error([path], lambda: read_labels(path, g), "negative", "0 for background")


def test_error_no_image():
    _expect_error([], lambda: read_image([]), "no image")


# -- outputs never overwrite inputs -------------------------------------------------------------------

def test_check_outputs_not_inputs(tmp_path):
    inp = tmp_path / "image.nrrd"
    inp.write_bytes(b"x")
    check_outputs_not_inputs([tmp_path / "out.nrrd", None], [inp, None])
    with pytest.raises(UserError, match="also an input"):
        check_outputs_not_inputs([tmp_path / "sub" / ".." / "image.nrrd"], [inp])
    link = tmp_path / "link.nrrd"
    link.symlink_to(inp)
    with pytest.raises(UserError, match="also an input"):
        check_outputs_not_inputs([link], [str(inp)])
    hard = tmp_path / "hard.nrrd"
    os.link(inp, hard)
    with pytest.raises(UserError, match="also an input"):
        check_outputs_not_inputs([hard], [inp])
    with pytest.raises(UserError, match="two outputs"):
        check_outputs_not_inputs([tmp_path / "seg.nrrd", None, tmp_path / "seg.nrrd"], [inp])


def test_a_segmentation_of_overlapping_segments_is_one_clear_error(tmp_path):
    slicerio = pytest.importorskip("slicerio")
    overlapping = Path(slicerio.__file__).parent / "data" / "SegmentationOverlapping.seg.nrrd"
    image = sitk.ReadImage(str(overlapping))
    assert image.GetNumberOfComponentsPerPixel() == 2
    _expect_error([overlapping], lambda: read_labels(overlapping, Geometry.from_sitk(image)),
                  "2 layers", "overlap", "label map")
