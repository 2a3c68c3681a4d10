"""What a 3D Slicer user would do instead: the Segment Editor's *Fill between slices* and *Grow from seeds*.

Both run Slicer's own filters from ``slicer-core`` (``pip install slicer-core``, Python 3.11), on exactly the
labelled slices the learned methods get, configured as the Segment Editor effects configure them
(read from Slicer's ``SegmentEditorFillBetweenSlicesEffect.py``, ``SegmentEditorGrowFromSeedsEffect.py`` and
``AbstractScriptedSegmentEditorAutoCompleteEffect.py``):

*Fill between slices* (``vtkITKMorphologicalContourInterpolator``): the effect creates the filter, sets its
input to the merged label map of all visible segments (segment n -> label value n, 0 = empty) and calls
``Update()`` without setting any option, so the wrapper's defaults apply (slicer-core 5.13: ``Axis = -1``
(every axis; the filter finds the annotated slices itself), ``Label = 0`` (every label),
``UseDistanceTransform = off``, ``UseBallStructuringElement = off``, ``HeuristicAlignment = on``). All
segments are interpolated together in one multi-label image. The filter only interpolates *between*
annotated slices (nothing beyond the first and last labelled slice), and the effect's help asks the user
to leave at least one empty slice between segmented slices: two adjacent labelled slices can make it copy
one slice instead of interpolating (seen on a sphere), which is why :func:`~mismatch.benchmark.datasets.draw_split`
keeps labelled slices apart by default.

*Grow from seeds* (``vtkImageGrowCutSegment``, the filter behind the effect in Slicer up to 5.6 and the one
``slicer-core`` 5.13 ships; later Slicer versions moved the effect to ``vtkITK.vtkITKGrowCut``): the
intensity volume and the merged seed label map (one label value per segment; here the classes, plus one
extra value for a "background" segment painted on the labelled slices' label-0 voxels, because the effect
needs at least two segments), ``SetDistancePenalty(SeedLocalityFactor)`` with the effect's default 0.0, no
mask (the effect's "edit allowed everywhere"). The voxel spacing is set on the VTK images. The effect runs
the filter on the seeds' bounding box grown by 20 % of its size per axis (at least 3 voxels) when no mask is
used; outside that box nothing is segmented. The background value is mapped back to 0 in the output.

Both filters, in slicer-core 5.13, were seen to leave the Python interpreter crashing at exit (segmentation
fault after all results were written). :func:`run_in_subprocess` therefore runs them in a child Python
process: the benchmark and the tests only call them through it.

Arrays are ``[K, J, I]`` (numpy order of SimpleITK arrays); ``axis`` is the numpy axis of the slices
(0 = ``k``); ``spacing`` is ``(K, J, I)`` in mm. Label maps are integer, 0 = background, 1..N = classes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import UserError

__all__ = ["fill_between_slices", "grow_from_seeds", "run_in_subprocess", "slicer_filters_available",
           "labelled_slices_only", "METHODS", "FILL_EXTENT_GROWTH", "GROW_EXTENT_GROWTH"]

# The effects' margins around the seeds' bounding box (AbstractScriptedSegmentEditorAutoCompleteEffect:
# extentGrowthRatio 0.1 by default, 0.2 for Grow from seeds without a mask; at least 3 voxels).
FILL_EXTENT_GROWTH = 0.1
GROW_EXTENT_GROWTH = 0.2
MIN_EXTENT_MARGIN = 3

#: benchmark method names -> function names accepted by :func:`run_in_subprocess`
METHODS = {"slicer-fill-between": "fill_between_slices", "slicer-grow-from-seeds": "grow_from_seeds"}


def slicer_filters_available() -> bool:
    """Whether ``slicer-core`` is installed (checked without importing it, so nothing can crash at exit)."""
    return importlib.util.find_spec("slicer_core") is not None


def _require_slicer() -> None:
    if not slicer_filters_available():
        raise UserError("Slicer's Fill between slices / Grow from seeds need slicer-core: "
                        "pip install slicer-core (Python 3.11), then run again")


def labelled_slices_only(labels: np.ndarray, labelled_slices: Sequence[int], axis: int = 0) -> np.ndarray:
    """Copy of ``labels`` ``[K, J, I]`` with every slice (along ``axis``) not in ``labelled_slices`` set to 0."""
    labels = np.asarray(labels)
    keep = np.zeros(labels.shape[axis], dtype=bool)
    keep[np.asarray(list(labelled_slices), dtype=int)] = True
    shape = [1, 1, 1]
    shape[axis] = -1
    return np.where(keep.reshape(shape), labels, 0).astype(labels.dtype)


def _grown_box(seeds: np.ndarray, ratio: float) -> tuple[slice, ...]:
    """The bounding box of the non-zero voxels grown by ``ratio`` of its size (at least 3 voxels) per axis."""
    nz = np.nonzero(seeds)
    box = []
    for ax in range(3):
        lo, hi = int(nz[ax].min()), int(nz[ax].max())
        m = int(max(MIN_EXTENT_MARGIN, ratio * (hi - lo)))
        box.append(slice(max(0, lo - m), min(seeds.shape[ax], hi + m + 1)))
    return tuple(box)


def _to_vtk(array: np.ndarray, spacing: Sequence[float]):
    """numpy ``[K, J, I]`` -> ``vtkImageData`` (dimensions I, J, K; spacing reordered to x, y, z)."""
    import vtk
    from vtk.util import numpy_support

    array = np.ascontiguousarray(array)
    image = vtk.vtkImageData()
    k, j, i = array.shape
    image.SetDimensions(i, j, k)
    image.SetSpacing(float(spacing[2]), float(spacing[1]), float(spacing[0]))
    image.SetOrigin(0.0, 0.0, 0.0)
    vtk_type = {np.dtype(np.float32): vtk.VTK_FLOAT, np.dtype(np.int16): vtk.VTK_SHORT}[array.dtype]
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True, array_type=vtk_type)
    image.GetPointData().SetScalars(scalars)
    return image


def _from_vtk(image) -> np.ndarray:
    from vtk.util import numpy_support

    i, j, k = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i).copy()


def _check(labels: np.ndarray, labelled_slices: Sequence[int], axis: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be [K, J, I], got shape {labels.shape}")
    if axis not in (0, 1, 2):
        raise ValueError("axis must be 0, 1 or 2 (numpy axis of the slices)")
    if labels.min() < 0 or labels.max() > 32000:
        raise ValueError("label values must be in 0..32000")
    if len(labelled_slices) == 0:
        raise ValueError("no labelled slices")
    return labelled_slices_only(labels, labelled_slices, axis).astype(np.int16)


def fill_between_slices(labels: np.ndarray, labelled_slices: Sequence[int], axis: int = 0,
                        spacing: Sequence[float] = (1.0, 1.0, 1.0), crop: bool = True) -> np.ndarray:
    """Slicer's *Fill between slices* from the labels of ``labelled_slices`` only.

    Args:
        labels: int ``[K, J, I]`` label map (0 = background, 1..N classes); only the slices listed in
            ``labelled_slices`` are read, the others are treated as not segmented.
        labelled_slices: indices along ``axis``.
        axis: numpy axis of the slices (0 = k).
        spacing: ``(K, J, I)`` mm (the interpolation works in index space; recorded on the VTK image).
        crop: run on the labels' bounding box grown as the effect grows it (same result, faster).

    Returns:
        int16 ``[K, J, I]`` label map. Call in a child process (:func:`run_in_subprocess`): see the module
        docstring.
    """
    _require_slicer()
    seeds = _check(labels, labelled_slices, axis)
    out = np.zeros(seeds.shape, dtype=np.int16)
    if not seeds.any():
        return out
    box = _grown_box(seeds, FILL_EXTENT_GROWTH) if crop else (slice(None),) * 3
    import slicer

    interpolator = slicer.vtkITKMorphologicalContourInterpolator()  # options as the effect: defaults
    interpolator.SetInputData(_to_vtk(seeds[box], spacing))
    interpolator.Update()
    out[box] = _from_vtk(interpolator.GetOutput()).astype(np.int16)
    return out


def grow_from_seeds(image: np.ndarray, labels: np.ndarray, labelled_slices: Sequence[int], axis: int = 0,
                    spacing: Sequence[float] = (1.0, 1.0, 1.0), seed_locality: float = 0.0,
                    crop: bool = True) -> np.ndarray:
    """Slicer's *Grow from seeds* seeded with the labelled slices: classes and a background segment.

    Args:
        image: float ``[K, J, I]`` intensities (or ``[C, K, J, I]``: channel 0 is used, as the effect uses
            the one source volume).
        labels: int ``[K, J, I]``; on the labelled slices, value c > 0 seeds class c and 0 seeds background.
        labelled_slices: indices along ``axis``.
        axis: numpy axis of the slices (0 = k).
        spacing: ``(K, J, I)`` mm, set on the VTK images.
        seed_locality: the effect's "Seed locality" (``SetDistancePenalty``), default 0.0 as in the effect.
        crop: run on the seeds' bounding box grown by 20 % (at least 3 voxels) per axis, as the effect does;
            outside it the result is 0.

    Returns:
        int16 ``[K, J, I]`` label map (background seed value mapped back to 0).
    """
    _require_slicer()
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 4:
        image = image[0]
    labels = np.asarray(labels)
    if image.shape != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} differ")
    classes = _check(labels, labelled_slices, axis)
    background_value = int(labels.max()) + 1
    on_slice = labelled_slices_only(np.ones(labels.shape, dtype=np.int16), labelled_slices, axis).astype(bool)
    seeds = np.where(on_slice & (classes == 0), background_value, classes).astype(np.int16)
    box = _grown_box(seeds, GROW_EXTENT_GROWTH) if crop else (slice(None),) * 3
    import slicer

    grow = slicer.vtkImageGrowCutSegment()
    grow.SetIntensityVolume(_to_vtk(image[box], spacing))
    grow.SetSeedLabelVolume(_to_vtk(seeds[box], spacing))
    grow.SetDistancePenalty(float(seed_locality))
    grow.Update()
    result = _from_vtk(grow.GetOutput()).astype(np.int16)
    result[result == background_value] = 0
    out = np.zeros(labels.shape, dtype=np.int16)
    out[box] = result
    return out


_FUNCTIONS = {"fill_between_slices": fill_between_slices, "grow_from_seeds": grow_from_seeds}


def run_in_subprocess(fn_name: str, timeout: float | None = 600.0, **kwargs: Any) -> np.ndarray:
    """Run :func:`fill_between_slices` or :func:`grow_from_seeds` (by name, or by benchmark method name in
    :data:`METHODS`) in a child Python process and return its label map.

    numpy-array arguments travel through a temporary ``.npz``, the others as JSON. The child writes its
    result to a temporary file, renames it into place with a completion flag, and ends with ``os._exit(0)``.
    A result written completely counts as success even if the child then dies from a signal (the crash at
    exit seen with these filters); a child that fails before writing raises ``RuntimeError`` with the end
    of its stderr.
    """
    fn_name = METHODS.get(fn_name, fn_name)
    if fn_name not in _FUNCTIONS:
        raise ValueError(f"unknown filter {fn_name!r}; use one of {sorted(_FUNCTIONS) + sorted(METHODS)}")
    _require_slicer()
    arrays = {k: np.asarray(v) for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    others = {k: (list(v) if isinstance(v, (tuple, range)) else v) for k, v in kwargs.items() if k not in arrays}
    others = json.loads(json.dumps(others, default=lambda o: o.tolist() if hasattr(o, "tolist") else int(o)))
    with tempfile.TemporaryDirectory(prefix="mismatch-classical-") as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, **arrays)
        (Path(tmp) / "args.json").write_text(json.dumps({"fn": fn_name, "kwargs": others}))
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.run([sys.executable, "-m", "mismatch.benchmark.classical", tmp],
                              capture_output=True, text=True, env=env, timeout=timeout)
        if dst.exists():
            with np.load(dst) as result:
                if "complete" in result.files and bool(result["complete"]):
                    # A signal after the result was written (returncode < 0) is the known crash at exit.
                    return result["labels"]
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"{fn_name} failed in its child process (exit status {proc.returncode}) before "
                           f"writing a result:\n{tail}")


def _child(folder: str) -> None:
    folder_p = Path(folder)
    spec = json.loads((folder_p / "args.json").read_text())
    with np.load(folder_p / "in.npz") as data:
        kwargs = {k: data[k] for k in data.files}
    kwargs.update(spec["kwargs"])
    result = _FUNCTIONS[spec["fn"]](**kwargs)
    partial = folder_p / "out.partial.npz"
    with open(partial, "wb") as f:
        np.savez(f, labels=result, complete=np.array(True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, folder_p / "out.npz")


if __name__ == "__main__":
    _child(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown, where slicer-core's filters were seen to crash
