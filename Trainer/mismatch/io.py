"""Reading and writing volumes with SimpleITK, with the input checks a user needs.

Conventions:

- In memory an image is ``float32 [C, K, J, I]`` (C channels, then the numpy order of SimpleITK arrays:
  K slowest, I fastest), a label map an integer ``[K, J, I]`` (0 = background or unlabelled, 1..N classes).
- :class:`Geometry` is SimpleITK's, in LPS millimetres: size ``(I, J, K)``, spacing ``(I, J, K)``, the
  origin (centre of voxel ``(0, 0, 0)``) and the 3x3 direction matrix, row-major, whose columns are the
  directions of the I, J and K axes.
- Formats by extension: ``.nrrd``, ``.nhdr``, ``.nii``, ``.nii.gz``, ``.mha``, ``.mhd``.

Every bad input is a :class:`~mismatch.errors.UserError` whose one line says what is wrong and what to do.
Reading never modifies a file. Writing never leaves a half-written file under its final name, even when the
process is killed: a file is written under a temporary name in the target folder and renamed into place
(:func:`atomic_output`); a two-file format (``.mhd``, ``.nhdr``) gets a fresh data file and its header is
renamed into place last; a folder (a model, a checkpoint) is built beside the target and swapped in by
renames, the previous one kept until the new one is complete (:func:`replace_folder`).

NIfTI caveat: NIfTI stores the grid as a float32 affine, so spacing, direction and origin come back to
float32 precision (about 1e-7 relative; a few 1e-5 mm for an origin hundreds of mm from zero). The grid
comparison (:meth:`Geometry.same_grid`) tolerates this. SimpleITK's NIfTI reader turns NaN / infinite
voxels into 0 silently, so :func:`read_image` scans float NIfTI files' raw data for them itself.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import SimpleITK as sitk

from .errors import UserError

SUPPORTED_EXTENSIONS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


@dataclass(frozen=True)
class Geometry:
    """The image grid, as SimpleITK has it (LPS).

    ``size``: voxels along I, J, K (``image.GetSize()``; the numpy array is ``[K, J, I]``).
    ``spacing``: mm between voxel centres along I, J, K. ``origin``: LPS position (mm) of voxel (0, 0, 0).
    ``direction``: 9 values, the row-major 3x3 matrix whose columns are the I, J, K axis directions.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Geometry":
        """The grid of a 3D ``sitk.Image``."""
        return cls(tuple(int(s) for s in image.GetSize()), tuple(float(s) for s in image.GetSpacing()),
                   tuple(float(o) for o in image.GetOrigin()), tuple(float(d) for d in image.GetDirection()))

    @property
    def shape(self) -> tuple[int, int, int]:
        """The numpy shape ``(K, J, I)`` of a volume on this grid."""
        return (self.size[2], self.size[1], self.size[0])

    def apply_to(self, image: sitk.Image) -> None:
        """Set spacing, origin and direction of ``image`` (its size must already be ``size``)."""
        image.SetSpacing(tuple(self.spacing))
        image.SetOrigin(tuple(self.origin))
        image.SetDirection(tuple(self.direction))

    def differences(self, other: "Geometry", atol: float = 1e-4) -> list[str]:
        """Names of what differs (``"size"``, ``"spacing"``, ``"origin"``, ``"direction"``), empty if the same.

        Spacing is compared with relative tolerance ``atol``; the origin with ``atol`` times the largest
        spacing (at least 1 mm), i.e. a small fraction of a voxel; the direction (unitless) with ``atol``.
        """
        out = []
        if tuple(self.size) != tuple(other.size):
            out.append("size")
        sp_a, sp_b = np.asarray(self.spacing, float), np.asarray(other.spacing, float)
        if sp_a.shape != sp_b.shape or not np.allclose(sp_a, sp_b, rtol=atol, atol=0):
            out.append("spacing")
        scale = max(1.0, float(np.abs(sp_a).max()) if sp_a.size else 1.0)
        if not np.allclose(self.origin, other.origin, rtol=0, atol=atol * scale):
            out.append("origin")
        if not np.allclose(self.direction, other.direction, rtol=0, atol=atol):
            out.append("direction")
        return out

    def same_grid(self, other: "Geometry", atol: float = 1e-4) -> bool:
        """Same size, and spacing, origin and direction equal within tolerance (see :meth:`differences`)."""
        return not self.differences(other, atol)

    def is_oblique(self) -> bool:
        """True when the axes are not aligned with L, P, S (a rotated grid)."""
        return not np.allclose(np.abs(self.direction), np.abs(np.round(self.direction)), atol=1e-6)

    def describe(self) -> str:
        """Short human text, e.g. ``"128x128x34 voxels, spacing 3.05x3.05x10 mm, origin (193.1, 216.4, -340.2)"``."""
        size = "x".join(str(s) for s in self.size)
        spacing = "x".join(f"{s:.4g}" for s in self.spacing)
        origin = ", ".join(f"{o:.4g}" for o in self.origin)
        text = f"{size} voxels, spacing {spacing} mm, origin ({origin})"
        if self.is_oblique() or not np.allclose(self.direction, np.eye(3).ravel(), atol=1e-6):
            text += ", direction (" + ", ".join(f"{d:.3g}" for d in self.direction) + ")"
        return text

    def to_dict(self) -> dict:
        """JSON-serialisable: lists of numbers under ``size``, ``spacing``, ``origin``, ``direction``."""
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(int(v) for v in d["size"]), tuple(float(v) for v in d["spacing"]),
                   tuple(float(v) for v in d["origin"]), tuple(float(v) for v in d["direction"]))


def _grid_mismatch(name_a, geo_a: Geometry, name_b, geo_b: Geometry) -> str:
    what = ", ".join(geo_a.differences(geo_b)) or "grid"
    return f"{name_a} is {geo_a.describe()} but {name_b} is {geo_b.describe()} (they differ in {what})"


def _extension(path) -> str:
    name = str(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def check_extension(path) -> None:
    """:class:`UserError` unless ``path`` has an extension SimpleITK reads and writes here."""
    if _extension(path) not in SUPPORTED_EXTENSIONS:
        raise UserError(f"{path}: unsupported file type {_extension(path) or '(no extension)'}; "
                        f"use one of {', '.join(SUPPORTED_EXTENSIONS)}")


def _read_sitk(path) -> sitk.Image:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: file not found; check the path")
    if p.is_dir():
        raise UserError(f"{path}: is a folder; give an image file ({', '.join(SUPPORTED_EXTENSIONS)}); "
                        "convert a DICOM series to NRRD or NIfTI first")
    check_extension(path)
    try:
        return sitk.ReadImage(str(p))
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        reason = (lines[-1] if lines else "unknown reason")[:160]
        raise UserError(f"{path}: cannot be read as an image ({reason}); check that the file is complete "
                        "and really is that format") from None


def _check_3d(image: sitk.Image, path, labels: bool = False) -> None:
    dim = image.GetDimension()
    if dim == 2:
        raise UserError(f"{path}: is a 2D image; MisMatch needs a 3D volume (a stack of slices); "
                        "save the volume as one 3D file")
    if dim != 3:
        raise UserError(f"{path}: is a {dim}D image; split the channels (or time points) into one 3D file "
                        "each and pass them as several IMAGEs")
    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp != 1 and labels:
        raise UserError(f"{path}: holds {ncomp} layers of labels (a segmentation whose segments overlap); a label "
                        "map has one label per voxel: in Slicer, make the segments not overlap (Segment Editor, "
                        "masking: overwrite all segments) and save again, or export them to a label map")
    if ncomp != 1:
        raise UserError(f"{path}: has {ncomp} components per voxel (a vector or RGB image); split the "
                        "channels into one 3D file each and pass them as several IMAGEs")


def _nifti_non_finite(path) -> int:
    """Number of NaN / infinite voxels stored in a float NIfTI(-1 or -2) file, read directly.

    SimpleITK's NIfTI reader silently turns them into 0, so :func:`read_image` looks at the raw data.
    Streams the file in chunks (no copy of the volume); 0 for non-float files or a header it cannot parse.
    """
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(540)
        for order in "<>":
            size = int(np.frombuffer(head, f"{order}i4", 1, 0)[0])
            if size in (348, 540):
                break
        else:
            return 0
        if size == 348:
            dims = np.frombuffer(head, f"{order}i2", 8, 40).astype(np.int64)
            code = int(np.frombuffer(head, f"{order}i2", 1, 70)[0])
            offset = int(np.frombuffer(head, f"{order}f4", 1, 108)[0])
        else:
            code = int(np.frombuffer(head, f"{order}i2", 1, 12)[0])
            dims = np.frombuffer(head, f"{order}i8", 8, 16)
            offset = int(np.frombuffer(head, f"{order}i8", 1, 168)[0])
        dtype = {16: f"{order}f4", 64: f"{order}f8"}.get(code)
        if dtype is None:
            return 0
        ndim = int(dims[0])
        remaining = int(np.prod(np.maximum(dims[1:1 + ndim], 1))) if 0 < ndim <= 7 else 0
        itemsize = np.dtype(dtype).itemsize
        offset = max(offset, size + 4 if size == 348 else size)
        f.seek(offset)
        bad = 0
        chunk_items = (16 << 20) // itemsize
        while remaining > 0:
            data = f.read(min(remaining, chunk_items) * itemsize)
            n = len(data) // itemsize
            if n == 0:
                break
            values = np.frombuffer(data, dtype, n)
            bad += n - int(np.count_nonzero(np.isfinite(values)))
            remaining -= n
        return bad


def read_volume(path) -> tuple[np.ndarray, Geometry]:
    """A 3D scalar volume as stored: ``[K, J, I]`` in the file's own dtype, and its geometry.

    A 3D file with one slice (size 1 along K) is fine; 2D, 4D and vector files are a :class:`UserError`.
    """
    image = _read_sitk(path)
    _check_3d(image, path)
    return sitk.GetArrayFromImage(image), Geometry.from_sitk(image)


def read_image(paths) -> tuple[np.ndarray, Geometry]:
    """One file per channel -> ``float32 [C, K, J, I]`` and the common geometry.

    ``paths``: a path or a sequence of paths (the channels of one case, all on the same grid).
    NaN or infinite voxels and channels on different grids are a :class:`UserError`.
    Memory: one SimpleITK image at a time plus the float32 output (no float64 copy).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise UserError("no image given; pass at least one IMAGE file")
    out, geometry = None, None
    for c, path in enumerate(paths):
        image = _read_sitk(path)
        _check_3d(image, path)
        geo = Geometry.from_sitk(image)
        if geometry is None:
            geometry = geo
            out = np.empty((len(paths),) + geo.shape, dtype=np.float32)
        elif not geometry.same_grid(geo):
            raise UserError("channels are on different grids: " + _grid_mismatch(paths[0], geometry, path, geo)
                            + "; resample every channel onto the first one's grid")
        stored_float = image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64)
        view = sitk.GetArrayViewFromImage(image)   # no copy; valid while `image` lives
        np.copyto(out[c], view, casting="unsafe")
        del view, image
        bad = 0
        if not np.isfinite(out[c]).all():
            bad = int(out[c].size - np.count_nonzero(np.isfinite(out[c])))
        elif stored_float and _extension(path) in (".nii", ".nii.gz"):
            bad = _nifti_non_finite(path)
        if bad:
            raise UserError(f"{path}: {bad} voxel(s) are NaN or infinite (or beyond float32 range); "
                            "replace them (e.g. with the background value) and save the file again")
    return out, geometry


def _smallest_label_dtype(lo: int, hi: int):
    if lo >= 0:
        return np.uint8 if hi <= 255 else np.uint16 if hi <= 65535 else np.int32
    return np.int16 if lo >= -32768 and hi <= 32767 else np.int32


def read_labels(path, geometry: Geometry, log: Callable[[str], None] | None = None) -> np.ndarray:
    """An integer label map ``[K, J, I]`` (uint8, uint16 or int32; values >= 0) on exactly ``geometry``.

    A label map on a block of the image's grid (the same spacing and axes, shifted by whole voxels: a Slicer
    ``.seg.nrrd``, which is saved cropped to its segments) is placed on the image's grid as it lies
    (:func:`place_on_grid`; ``log`` is told). Any other grid, labelled voxels outside the image, non-integer
    values (e.g. a float probability map) or negative values are a :class:`UserError`. Float files holding
    whole numbers are accepted and converted.
    """
    array, geo = read_label_volume(path)
    if not geo.same_grid(geometry):
        array = place_on_grid(array, geo, geometry, path, "the image", log)
    return array


def read_label_volume(path) -> tuple[np.ndarray, Geometry]:
    """A label map and its own grid (what ``mismatch evaluate`` compares); the value checks of
    :func:`read_labels`."""
    image = _read_sitk(path)
    _check_3d(image, path, labels=True)
    return check_label_array(sitk.GetArrayFromImage(image), path), Geometry.from_sitk(image)


def grid_offset(block: Geometry, grid: Geometry, tolerance: float = 1e-3) -> tuple[int, int, int] | None:
    """Where ``block``'s voxel (0, 0, 0) lies on ``grid``, as whole voxel indices ``(i, j, k)``, when ``block``
    is a block of ``grid``: the same spacing and axis directions, its origin on one of ``grid``'s voxel centres
    (within ``tolerance`` of a voxel). None otherwise (a grid that would need resampling)."""
    if {"spacing", "direction"} & set(block.differences(grid)):
        return None
    axes = np.asarray(grid.direction, float).reshape(3, 3) * np.asarray(grid.spacing, float)[None, :]
    index = np.linalg.solve(axes, np.asarray(block.origin, float) - np.asarray(grid.origin, float))
    whole = np.round(index)
    if np.abs(index - whole).max() > tolerance:
        return None
    return tuple(int(v) for v in whole)


def place_on_grid(array: np.ndarray, block: Geometry, grid: Geometry, path, grid_name: str,
                  log: Callable[[str], None] | None = None) -> np.ndarray:
    """The label map ``array`` (on ``block``) placed on ``grid``, background elsewhere, when ``block`` is a block
    of ``grid`` (:func:`grid_offset`): nothing is resampled, every voxel keeps its label. A grid that is not
    such a block, or labelled voxels that would fall outside ``grid``, are a :class:`UserError` (a label is
    never dropped)."""
    offset = grid_offset(block, grid)
    if offset is None:
        raise UserError(f"{path}: the label map is on a different grid than {grid_name}: "
                        + _grid_mismatch("the label map", block, grid_name, grid)
                        + f"; resample the label map onto {grid_name} (in Slicer: export the segmentation to a "
                        "label map with the image as reference volume)")
    lo = np.asarray(offset[::-1])                      # numpy order (k, j, i)
    src_lo = np.clip(-lo, 0, array.shape)
    src_hi = np.clip(np.asarray(grid.shape) - lo, 0, array.shape)
    src_hi = np.maximum(src_hi, src_lo)
    inside = tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
    outside = int(np.count_nonzero(array)) - int(np.count_nonzero(array[inside]))
    if outside:
        raise UserError(f"{path}: {outside} labelled voxel(s) of the label map lie outside {grid_name} "
                        f"({block.describe()} against {grid.describe()}); is it the label map of this image?")
    out = np.zeros(grid.shape, dtype=array.dtype)
    out[tuple(slice(a + o, b + o) for a, b, o in zip(src_lo, src_hi, lo))] = array[inside]
    if log is not None:
        size = "x".join(str(s) for s in block.size)
        log(f"{path}: the label map covers a {size}-voxel block of {grid_name}'s grid (from voxel i, j, k = "
            f"{', '.join(str(v) for v in offset)}; a .seg.nrrd is saved cropped to its segments): placed on "
            f"{grid_name}'s grid as it lies, nothing resampled")
    return out


def segment_names(path) -> dict[int, dict]:
    """``{label value: {"name", "color"}}`` of the segments a Slicer ``.seg.nrrd`` names in its header (one
    layer of labels); empty for any other file, or a header without them."""
    if not str(path).lower().endswith(".seg.nrrd"):
        return {}
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return {}
    fields: dict[str, dict[str, str]] = {}
    for key in reader.GetMetaDataKeys():
        match = re.fullmatch(r"Segment(\d+)_(\w+)", key)
        if match:
            fields.setdefault(match.group(1), {})[match.group(2)] = reader.GetMetaData(key)
    out = {}
    for entry in fields.values():
        try:
            value = int(entry["LabelValue"])
            if int(entry.get("Layer", "0")) != 0 or value < 1:
                continue
            named = {"name": entry["Name"].strip() or f"class_{value}"}
            color = [float(c) for c in entry.get("Color", "").split()]
        except (KeyError, ValueError):
            continue
        if len(color) == 3 and all(0.0 <= c <= 1.0 for c in color):
            named["color"] = color
        out[value] = named
    return out


def _segmentation_header(image: sitk.Image, segments: list[dict]) -> None:
    """The header fields that make a label map a Slicer segmentation: one layer, a segment per class with
    its label value, name and colour (what Slicer's own ``.seg.nrrd`` files hold)."""
    extent = " ".join(f"0 {n - 1}" for n in image.GetSize())
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    for n, segment in enumerate(segments):
        color = segment.get("color") or [0.5, 0.5, 0.5]
        for key, value in (("ID", f"Segment_{int(segment['value'])}"), ("Name", str(segment["name"])),
                           ("NameAutoGenerated", "0"), ("Color", " ".join(f"{float(c):.6g}" for c in color[:3])),
                           ("ColorAutoGenerated", "0"), ("LabelValue", str(int(segment["value"]))),
                           ("Layer", "0"), ("Extent", extent), ("Tags", "Segmentation.Status:inprogress|")):
            image.SetMetaData(f"Segment{n}_{key}", value)


def check_label_array(array: np.ndarray, path) -> np.ndarray:
    """``array`` as the smallest unsigned integer type; non-integer or negative values are a
    :class:`UserError` naming ``path``."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise UserError(f"{path}: the label map has non-integer values (is it an intensity or probability "
                            "image?); give an integer label map: 0 = background, 1..N = classes")
    elif array.dtype.kind not in "iu":
        raise UserError(f"{path}: unsupported label pixel type {array.dtype}; save it as an integer label map")
    lo = float(array.min()) if array.size else 0.0
    hi = float(array.max()) if array.size else 0.0
    if lo < 0:
        raise UserError(f"{path}: the label map has negative values (down to {lo:g}); use 0 for background "
                        "and 1..N for the classes")
    if hi > np.iinfo(np.int32).max:
        raise UserError(f"{path}: label value {hi:g} is too large; use 0 for background and 1..N for classes")
    dtype = _smallest_label_dtype(0, int(hi))
    return array if array.dtype == dtype else array.astype(dtype)


def _output_array(array: np.ndarray) -> np.ndarray:
    """Integer/bool arrays -> the smallest type that holds them (unsigned when >= 0); floats -> float32."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype.kind in "iu":
        lo = int(array.min()) if array.size else 0
        hi = int(array.max()) if array.size else 0
        if lo < np.iinfo(np.int32).min or hi > np.iinfo(np.int32).max:
            raise ValueError(f"integer values {lo}..{hi} do not fit a label map (int32)")
        return array.astype(_smallest_label_dtype(lo, hi), copy=False)
    if array.dtype.kind == "f":
        return array.astype(np.float32, copy=False)
    raise ValueError(f"cannot write an array of dtype {array.dtype}")


def write_volume(array: np.ndarray, geometry: Geometry, path, *, compress: bool = False,
                 segments: list[dict] | None = None) -> None:
    """Write ``array [K, J, I]`` on exactly ``geometry``, the format chosen by the extension of ``path``.

    ``segments`` (classes: ``{"value", "name", "color"}``): a label map written to a ``.seg.nrrd`` becomes a
    Slicer segmentation with those named, coloured segments (read back by Slicer and by :func:`segment_names`).

    Integer arrays (label maps) are written as uint8 if their values fit, else uint16, else int32 (int16 /
    int32 if negative); floats as float32. The parent folder is created. Single-file formats are written to
    a temporary file in the same folder and renamed over ``path`` (a reader never sees half a file);
    ``.mhd`` / ``.nhdr`` get a fresh data file ``<name>.<8 hex>.raw`` (``.zraw``, ``.raw.gz``) and their
    header is renamed over ``path`` last, the previous data file removed after. ``compress`` asks for
    compression where the format has it (``.nii.gz`` is always compressed).
    """
    check_extension(path)
    array = np.asarray(array)
    if array.shape != geometry.shape:
        raise ValueError(f"array shape {array.shape} does not match the grid {geometry.size} (I, J, K), "
                         f"expected [K, J, I] = {geometry.shape}")
    image = sitk.GetImageFromArray(_output_array(array))
    geometry.apply_to(image)
    if segments is not None and str(path).lower().endswith(".seg.nrrd"):
        _segmentation_header(image, segments)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if _extension(target) in (".mhd", ".nhdr"):
        _write_two_file(image, target, bool(compress))
        return
    with atomic_output(target) as tmp:
        sitk.WriteImage(image, str(tmp), bool(compress))


# -- writing that a kill cannot tear ----------------------------------------------------------------------

def _temporary_name(target: Path) -> Path:
    """A fresh hidden name beside ``target`` with the same extension (formats are chosen by extension).
    Not mkstemp, whose 0600 mode would stick to the output: outputs get normal permissions."""
    ext = _extension(target) if _extension(target) in SUPPORTED_EXTENSIONS else target.suffix
    stem = target.name[:len(target.name) - len(ext)] if ext else target.name
    return target.parent / f".{stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}"


def _fsync(path: Path) -> None:
    """Flush a file (or, on POSIX, a folder's entries) to the disk; a no-op where that is not possible."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same extension) to write to; when the block ends without error it
    is flushed and renamed over ``path`` (``os.replace``: atomic on POSIX and Windows), otherwise removed.
    A reader, or a process killed at any moment, sees the previous file or the complete new one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(target)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path, text: str) -> None:
    """Write a text file (UTF-8) through :func:`atomic_output`."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


_DATA_FILE_LINE = re.compile(r"^(ElementDataFile[ \t]*=[ \t]*|data ?file:[ \t]*)(\S[^\r\n]*?)(?=[ \t]*\r?$)", re.MULTILINE)


def _data_file_of(header: Path) -> str | None:
    """The data file named by a ``.mhd`` / ``.nhdr`` header (None if unreadable or not a plain name)."""
    try:
        text = header.read_text(encoding="latin-1")
    except OSError:
        return None
    match = _DATA_FILE_LINE.search(text)
    name = match.group(2) if match else None
    return name if name and Path(name).name == name and name.upper() != "LOCAL" else None


def _write_two_file(image: sitk.Image, target: Path, compress: bool) -> None:
    """``.mhd`` / ``.nhdr``: the data goes to a fresh file (``<name>.<8 hex>.raw`` and the like), then the
    header that names it is renamed over ``target``; a kill at any moment leaves the previous header with
    its own data, or the new one with its. The previous data file is removed afterwards."""
    tmp = _temporary_name(target)
    written_data: Path | None = None
    try:
        sitk.WriteImage(image, str(tmp), compress)
        tmp_data = _data_file_of(tmp)
        if tmp_data is None:
            raise RuntimeError(f"SimpleITK wrote a header without a data file name: {tmp}")
        stem_tmp = tmp.name[:len(tmp.name) - len(_extension(tmp))]
        suffix = tmp_data[len(stem_tmp):] if tmp_data.startswith(stem_tmp) else Path(tmp_data).suffix
        stem = target.name[:len(target.name) - len(_extension(target))]
        data_name = f"{stem}.{uuid.uuid4().hex[:8]}{suffix}"
        written_data = target.parent / data_name
        os.replace(target.parent / tmp_data, written_data)
        _fsync(written_data)
        text = tmp.read_text(encoding="latin-1")
        text = _DATA_FILE_LINE.sub(lambda m: m.group(1) + data_name, text, count=1)
        tmp.write_text(text, encoding="latin-1")
        previous = _data_file_of(target) if target.is_file() else None
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        for leftover in target.parent.glob(tmp.name[:len(tmp.name) - len(_extension(tmp))] + ".*"):
            leftover.unlink(missing_ok=True)
        if written_data is not None and _data_file_of(target) != written_data.name:
            written_data.unlink(missing_ok=True)
        raise
    # the previous output's data file, if it was one of ours or SimpleITK's (named after the header)
    if previous and previous != data_name and previous.startswith(stem + "."):
        (target.parent / previous).unlink(missing_ok=True)


def swap_names(target) -> tuple[Path, Path]:
    """The folders :func:`replace_folder` uses beside ``target``: the new one being built, and the previous
    one while it is being swapped out."""
    target = Path(target)
    return (target.parent / f".{target.name}.mismatch-new", target.parent / f".{target.name}.mismatch-old")


def finish_interrupted_swap(target, is_complete: Callable[[Path], bool]) -> None:
    """After a kill between the two renames of :func:`replace_folder` ``target`` is missing: put the complete
    new folder in its place, or else the previous one."""
    target = Path(target)
    new, old = swap_names(target)
    if target.exists() or target.is_symlink():
        return
    if new.is_dir() and is_complete(new):
        os.replace(new, target)
    elif old.is_dir():
        os.replace(old, target)


def resolve_folder(target, is_complete: Callable[[Path], bool]) -> Path:
    """Where to read the folder ``target`` from, without changing anything: ``target`` itself, or after a kill
    between the renames of :func:`replace_folder`, the complete new folder, else the previous one."""
    target = Path(target)
    if target.exists():
        return target
    new, old = swap_names(target)
    if new.is_dir() and is_complete(new):
        return new
    if old.is_dir():
        return old
    return target


def replace_folder(target, write: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> Path:
    """Replace the folder ``target`` by one that ``write(folder)`` fills, so that a kill at any moment
    leaves the previous folder or the complete new one.

    The new folder is built beside ``target`` (:func:`swap_names`), flushed, then ``target`` is renamed
    aside, the new folder renamed to ``target`` and the previous one removed. After a kill between those two
    renames, :func:`resolve_folder` finds the right one and the next call finishes the swap first.
    Everything in the previous folder goes: callers check beforehand that it holds only their files.
    """
    target = Path(target)
    if target.is_symlink():
        target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    finish_interrupted_swap(target, is_complete)
    new, old = swap_names(target)
    if new.exists():
        shutil.rmtree(new)
    new.mkdir()
    try:
        write(new)
        for item in new.iterdir():
            if item.is_file():
                _fsync(item)
        _fsync(new)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(new, target)
    _fsync(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return target


# -- checks before any work ------------------------------------------------------------------------------

def check_writable(path, option: str, *, folder: bool = False, shown=None) -> None:
    """:class:`UserError` unless the output ``path`` can be created: its nearest existing folder must let
    us create a file (tried, not guessed from permission bits), and ``path`` must not be a folder (a file
    output) or a file (``folder=True``). Called before any work, so that a long run never ends on an
    unwritable output. ``shown``: the path the message names (default ``path``)."""
    p = Path(path)
    shown = path if shown is None else shown
    if p.exists():
        if folder and not p.is_dir():
            raise UserError(f"{option} {shown}: exists and is not a folder; give a folder")
        if not folder and p.is_dir():
            raise UserError(f"{option} {shown}: is a folder; give a file name")
    parent = p.parent   # files and folders alike are written beside the target and renamed into place
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{option} {shown}: {parent} is a file, not a folder; choose another path")
    probe = parent / f".mismatch-write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "wb"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"{option} {shown}: cannot write in {parent} ({reason}); choose a folder you can "
                        "write to") from None
    probe.unlink(missing_ok=True)


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs_not_inputs(outputs: Iterable, inputs: Iterable) -> None:
    """:class:`UserError` if an output path is (or resolves to, or is a hard link of) an input file, or if two
    outputs are the same file (the one written last would replace the other).

    ``None`` / empty entries are ignored. Called before anything is written, so the user's files are safe.
    """
    ins = [Path(p) for p in inputs if p]
    seen: list[Path] = []
    for out in outputs:
        if not out:
            continue
        for inp in ins:
            if _same_file(Path(out), inp):
                raise UserError(f"{out}: is also an input ({inp}); choose another output path "
                                "(input files are never overwritten)")
        for other in seen:
            if _same_file(Path(out), other):
                raise UserError(f"{out}: is given for two outputs ({other} too); give each output its own path "
                                "(one would replace the other)")
        seen.append(Path(out))
