"""Reading and writing volumes with SimpleITK, with the input checks a user needs.

In memory an image is ``float32 [C, K, J, I]`` (numpy order of SimpleITK arrays, C channels), a label map
``int [K, J, I]``. :class:`Geometry` is SimpleITK's (LPS): size (I, J, K), spacing, origin and a row-major
3x3 direction. Every error is a :class:`~mismatch.errors.UserError` whose one line says what to do.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import UserError

SUPPORTED_EXTENSIONS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


@dataclass(frozen=True)
class Geometry:
    """The image grid: size (I, J, K), spacing (mm), origin (mm, LPS), direction (9 values, row-major)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(int(s) for s in image.GetSize()), tuple(float(s) for s in image.GetSpacing()),
                   tuple(float(o) for o in image.GetOrigin()), tuple(float(d) for d in image.GetDirection()))

    def apply_to(self, image: sitk.Image) -> None:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    def same_grid(self, other: "Geometry", atol: float = 1e-4) -> bool:
        """Same size, and spacing, origin and direction equal within tolerance (spacing relative)."""
        if tuple(self.size) != tuple(other.size):
            return False
        sp_a, sp_b = np.asarray(self.spacing), np.asarray(other.spacing)
        if not np.allclose(sp_a, sp_b, rtol=1e-4, atol=0):
            return False
        scale = max(1.0, float(np.abs(sp_a).max()))
        return (np.allclose(self.origin, other.origin, rtol=0, atol=atol * scale)
                and np.allclose(self.direction, other.direction, rtol=0, atol=atol))

    def describe(self) -> str:
        size = "x".join(str(s) for s in self.size)
        spacing = "x".join(f"{s:.3g}" for s in self.spacing)
        origin = ", ".join(f"{o:.1f}" for o in self.origin)
        oblique = "" if np.allclose(np.abs(self.direction), np.eye(3).ravel(), atol=1e-6) else ", oblique"
        return f"{size} voxels, spacing {spacing} mm, origin ({origin}){oblique}"

    def to_dict(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(tuple(int(v) for v in d["size"]), tuple(float(v) for v in d["spacing"]),
                   tuple(float(v) for v in d["origin"]), tuple(float(v) for v in d["direction"]))


def _extension(path: str | os.PathLike) -> str:
    name = str(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _check_extension(path: str | os.PathLike) -> None:
    if _extension(path) not in SUPPORTED_EXTENSIONS:
        raise UserError(f"{path}: unsupported file type; use one of {', '.join(SUPPORTED_EXTENSIONS)}")


def _read_sitk(path: str | os.PathLike) -> sitk.Image:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: file not found; check the path")
    if p.is_dir():
        raise UserError(f"{path}: is a folder; give an image file ({', '.join(SUPPORTED_EXTENSIONS)}); "
                        "convert a DICOM series to NRRD or NIfTI first")
    _check_extension(path)
    try:
        return sitk.ReadImage(str(p))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else "unknown reason"
        raise UserError(f"{path}: cannot be read as an image ({first}); check that the file is complete") from None


def _check_3d(image: sitk.Image, path) -> None:
    dim = image.GetDimension()
    if dim == 2:
        raise UserError(f"{path}: is a 2D image; MisMatch needs a 3D volume (a stack of slices)")
    if dim > 3:
        raise UserError(f"{path}: is a {dim}D image; split it into one 3D file per channel or time point "
                        "and pass the channels as several IMAGEs")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (a vector "
                        "or RGB image); save one 3D scalar file per channel and pass them as several IMAGEs")


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """A 3D scalar volume as stored (its own dtype), ``[K, J, I]``, and its geometry."""
    image = _read_sitk(path)
    _check_3d(image, path)
    return sitk.GetArrayFromImage(image), Geometry.from_sitk(image)


def read_image(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, Geometry]:
    """One file per channel -> ``float32 [C, K, J, I]`` and the (common) geometry.

    Refuses NaN or infinite voxels and channels on different grids.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise UserError("no image given")
    channels, geometry = [], None
    for path in paths:
        array, geo = read_volume(path)
        array = array.astype(np.float32, copy=False)
        bad = ~np.isfinite(array)
        if bad.any():
            raise UserError(f"{path}: {int(bad.sum())} voxel(s) are NaN or infinite; fix or mask them "
                            "(e.g. set them to the background value) before training")
        if geometry is None:
            geometry = geo
        elif not geometry.same_grid(geo):
            raise UserError(f"channels are on different grids: {paths[0]} is {geometry.describe()}, {path} is "
                            f"{geo.describe()}; resample every channel onto the first one's grid")
        channels.append(array)
    return np.stack(channels), geometry


def read_labels(path: str | os.PathLike, geometry: Geometry) -> np.ndarray:
    """An integer label map ``[K, J, I]`` on exactly the image's grid (values >= 0)."""
    array, geo = read_volume(path)
    if not geo.same_grid(geometry):
        raise UserError(f"{path}: the label map is on a different grid ({geo.describe()}) than the image "
                        f"({geometry.describe()}); resample it onto the image (in Slicer: export the "
                        "segmentation to a label map with the image as reference)")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise UserError(f"{path}: label values must be whole numbers (0 = background, 1..N = classes)")
        array = array.astype(np.int32)
    elif array.dtype.kind not in "iub":
        raise UserError(f"{path}: unsupported label pixel type {array.dtype}; save it as an integer label map")
    if array.size and array.min() < 0:
        raise UserError(f"{path}: negative label values; use 0 for background and 1..N for the classes")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    return array


def _label_dtype(array: np.ndarray):
    top = int(array.max()) if array.size else 0
    return np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.int32


def write_volume(array: np.ndarray, geometry: Geometry, path: str | os.PathLike, *, compress: bool = False) -> None:
    """Write ``array [K, J, I]`` on ``geometry``; integer arrays as the smallest unsigned type that holds
    them, floats as float32. Written to a temporary file first and renamed, so a reader never sees half."""
    _check_extension(path)
    array = np.asarray(array)
    if array.shape != tuple(reversed(geometry.size)):
        raise ValueError(f"array shape {array.shape} does not match the grid {geometry.size} (I, J, K)")
    if array.dtype.kind in "iub":
        array = array.astype(_label_dtype(array), copy=False)
    else:
        array = array.astype(np.float32, copy=False)
    image = sitk.GetImageFromArray(array)
    geometry.apply_to(image)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    ext = _extension(target)
    if ext in (".mhd", ".nhdr"):  # header + data file: written in place
        sitk.WriteImage(image, str(target), compress)
        return
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=ext)
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, compress)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_outputs_not_inputs(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse to write over an input file (the user's data is never modified)."""
    resolved = {Path(p).resolve() for p in inputs if p}
    for out in outputs:
        if out and Path(out).resolve() in resolved:
            raise UserError(f"{out}: is also an input; choose another output path (inputs are never overwritten)")
