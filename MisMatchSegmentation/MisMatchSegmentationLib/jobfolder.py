"""MRML nodes to job-folder files and back (docs/contract.md).

Files are written and read with Slicer's own storage nodes, uncompressed (.nrrd), so that the engine sees
exactly the grid Slicer shows (IJK-to-RAS becomes the file's LPS origin, spacing and direction). Nothing the
user gave is modified: labels are exported from the segmentation to a new array, results go into new (or the
designated output) nodes on the input volume's exact grid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import vtk

import slicer

from .engine import contract

OUTPUT_ATTRIBUTE = "MisMatch.Output"  # node attribute on the nodes the module created for its results
AXES = ("k", "j", "i")  # contract axis name -> numpy axis of a [K, J, I] array: k=0, j=1, i=2
ORIENTATION_RAS_AXIS = {"Sagittal": 0, "Coronal": 1, "Axial": 2}  # R, A, S


class JobError(ValueError):
    """An input problem the user can fix; the message says how."""


# -- geometry -----------------------------------------------------------------------------------------------
def ijk_to_ras(volume_node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_shape(volume_node) -> tuple[int, int, int]:
    """``(K, J, I)``, the numpy shape of the volume's voxel array."""
    i, j, k = volume_node.GetImageData().GetDimensions()
    return k, j, i


def axis_for_orientation(volume_node, orientation: str) -> str:
    """The grid axis (``k``, ``j`` or ``i``) whose direction is closest to the anatomical slice normal:
    Axial -> superior, Coronal -> anterior, Sagittal -> right. Oblique grids pick the best-aligned axis."""
    if orientation in AXES:
        return orientation
    if orientation not in ORIENTATION_RAS_AXIS:
        raise JobError(f"unknown slice orientation {orientation!r}; choose Axial, Coronal or Sagittal")
    directions = ijk_to_ras(volume_node)[:3, :3]
    directions = directions / np.linalg.norm(directions, axis=0, keepdims=True)
    alignment = np.abs(directions[ORIENTATION_RAS_AXIS[orientation], :])  # per I, J, K column
    return "ijk"[int(np.argmax(alignment))]


def numpy_axis(axis: str) -> int:
    return AXES.index(axis)


def same_grid(a, b, tolerance: float = 1e-4) -> bool:
    return (volume_shape(a) == volume_shape(b)
            and np.allclose(ijk_to_ras(a), ijk_to_ras(b), atol=tolerance, rtol=0))


def slice_centre_ras(volume_node, axis: str, index: int) -> tuple[float, float, float]:
    """RAS position of the centre of slice ``index`` along grid axis ``axis``."""
    k, j, i = volume_shape(volume_node)
    ijk = np.array([(i - 1) / 2.0, (j - 1) / 2.0, (k - 1) / 2.0, 1.0])
    ijk["ijk".index(axis)] = index
    ras = ijk_to_ras(volume_node) @ ijk
    return float(ras[0]), float(ras[1]), float(ras[2])


def _transform_between(source, target):
    import slicer

    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(source, target, transform)
    return transform


def local_to_world(node, ras) -> tuple[float, float, float]:
    """A point in the node's own RAS (before its parent transforms) in world RAS, where slice views are."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return tuple(float(c) for c in ras[:3])
    return tuple(float(c) for c in _transform_between(parent, None).TransformPoint([float(c) for c in ras[:3]]))


def world_to_local(node, ras) -> tuple[float, float, float]:
    """A world RAS point in the node's own RAS (its parent transforms undone)."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return tuple(float(c) for c in ras[:3])
    return tuple(float(c) for c in _transform_between(None, parent).TransformPoint([float(c) for c in ras[:3]]))


def slice_index_at(volume_node, axis: str, world_ras) -> int:
    """Index along grid ``axis`` of the volume's slice through the world point ``world_ras`` (e.g. a slice
    view's centre), honouring the volume's parent transforms."""
    local = world_to_local(volume_node, world_ras)
    ras_to_ijk = np.linalg.inv(ijk_to_ras(volume_node))
    ijk = ras_to_ijk @ np.array([local[0], local[1], local[2], 1.0])
    return int(round(float(ijk["ijk".index(axis)])))


# -- writing ------------------------------------------------------------------------------------------------
def write_volume(volume_node, path: Path) -> Path:
    """Write a volume node with Slicer's volume storage node, uncompressed (the engine reads it at once)."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(0)
    if not storage.WriteData(volume_node):
        raise JobError(f"could not write {volume_node.GetName()} to {path}: check the disk space and that "
                       "the temporary folder is writable")
    return Path(path)


def _labelmap_node_like(reference_volume, array: np.ndarray):
    """A label map node (not added to the scene) with ``array`` [K, J, I] on the reference's grid."""
    node = slicer.vtkMRMLLabelMapVolumeNode()
    m = vtk.vtkMatrix4x4()
    reference_volume.GetIJKToRASMatrix(m)
    node.SetIJKToRASMatrix(m)
    from vtk.util import numpy_support

    image = vtk.vtkImageData()
    k, j, i = array.shape
    image.SetDimensions(i, j, k)
    flat = np.ascontiguousarray(array).ravel()
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True,
                                                               array_type=numpy_support.get_vtk_array_type(flat.dtype)))
    node.SetAndObserveImageData(image)
    return node


def write_labelmap(array: np.ndarray, reference_volume, path: Path) -> Path:
    return write_volume(_labelmap_node_like(reference_volume, array), path)


def segment_classes(segmentation_node, segment_ids: list[str]) -> list[dict]:
    """``classes.json`` entries: values 1..N in the order of ``segment_ids``, the user's names and colours."""
    segmentation = segmentation_node.GetSegmentation()
    classes = []
    for value, segment_id in enumerate(segment_ids, start=1):
        segment = segmentation.GetSegment(segment_id)
        if segment is None:
            raise JobError(f"segment {segment_id!r} is not in {segmentation_node.GetName()}; choose the "
                           "segments to learn again")
        classes.append({"value": value, "name": segment.GetName(),
                        "color": [round(float(c), 6) for c in segment.GetColor()]})
    return classes


def labels_from_segments(segmentation_node, segment_ids: list[str], reference_volume) -> np.ndarray:
    """uint8 [K, J, I] on the reference grid: 0 = unlabelled, value n = the n-th chosen segment (later
    segments win where segments overlap). Reads the segmentation; never changes it."""
    return _paint(segmentation_node, enumerate(segment_ids, start=1), reference_volume)


def _paint(segmentation_node, pairs, reference_volume) -> np.ndarray:
    """uint8 [K, J, I] on the reference grid with ``value`` where segment ``segment_id`` is, for each
    ``(value, segment_id)`` of ``pairs`` in turn (a later one wins where they overlap)."""
    labels = np.zeros(volume_shape(reference_volume), dtype=np.uint8)
    for value, segment_id in pairs:
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, reference_volume)
        if mask is not None:
            labels[np.asarray(mask) > 0] = value
    return labels


def labelled_slices(labels: np.ndarray, axis: str) -> list[int]:
    """Slices along ``axis`` with at least one labelled voxel."""
    other = tuple(a for a in range(3) if a != numpy_axis(axis))
    return [int(s) for s in np.flatnonzero(labels.any(axis=other))]


def keep_slices(labels: np.ndarray, axis: str, slices) -> np.ndarray:
    """A copy of ``labels`` with everything outside ``slices`` set to 0."""
    out = np.zeros_like(labels)
    index = [slice(None)] * 3
    index[numpy_axis(axis)] = list(slices)
    out[tuple(index)] = labels[tuple(index)]
    return out


def parse_slices(text: str, what: str = "held-out slices") -> list[int]:
    """``"3, 7, 10-12"`` -> ``[3, 7, 10, 11, 12]`` as the engine reads slice lists (``mismatch.contract``);
    ``what`` names the field in the error message."""
    return contract.parse_slices(text, what, error=JobError)


format_slices = contract.format_slices


def check_empty_slices(labels: np.ndarray, axis: str, empty, held_out, names: dict) -> list[int]:
    """The sorted empty-marked slices, after checking them against the volume, the held-out slices and the
    painted labels ``labels`` (values -> segment names in ``names``). Raises one :class:`JobError` that says
    what to fix."""
    empty = sorted(set(int(s) for s in (empty or [])))
    n_slices = labels.shape[numpy_axis(axis)]
    outside = [s for s in empty if not 0 <= s < n_slices]
    if outside:
        raise JobError(f"empty slice(s) {format_slices(outside)} are outside 0..{n_slices - 1} along {axis}: "
                       "remove them from Empty slices")
    both = [s for s in empty if s in set(held_out or [])]
    if both:
        raise JobError(f"slice(s) {format_slices(both)} are both held out and marked empty: a held-out slice is "
                       "kept out of training, an empty one is trained on; remove them from one of the two lists")
    for s in empty:
        values = np.unique(np.take(labels, s, axis=numpy_axis(axis)))
        painted = [names.get(int(v), f"label {int(v)}") for v in values if v != 0]
        if painted:
            raise JobError(f"slice {s} is marked empty but has painted voxels of {', '.join(painted)}: "
                           "unpaint it or remove it from Empty slices")
    return empty


@dataclass
class TrainingFiles:
    """What :func:`write_training_inputs` wrote."""

    images: list[Path]
    labels: Path
    classes: Path
    truth: Path | None
    axis: str
    labelled: list[int]
    held_out: list[int]
    empty: list[int] = field(default_factory=list)


def check_channels(volumes: list) -> None:
    if not volumes or volumes[0] is None or volumes[0].GetImageData() is None:
        raise JobError("choose the input volume (it has no image data)")
    for n, extra in enumerate(volumes[1:], start=2):
        if extra.GetImageData() is None or not same_grid(volumes[0], extra):
            raise JobError(f"channel {n} ({extra.GetName()}) is not on the grid of {volumes[0].GetName()}: "
                           "resample it onto the first volume first (Resample Image (BRAINS) module)")


def check_not_constant(volumes: list) -> None:
    """A :class:`JobError` for an input volume whose voxels all hold one value (e.g. a new empty volume chosen by
    mistake): training on it would run for minutes and learn nothing (the engine refuses it too)."""
    check_channels(volumes)
    for volume in volumes:
        low, high = volume.GetImageData().GetScalarRange()
        if low == high:
            raise JobError(f"{volume.GetName()} is constant (every voxel is {low:g}), so there is nothing to learn "
                           "from: choose the volume you painted on as the input")


def write_images(volumes: list, folder: Path) -> list[Path]:
    check_channels(volumes)
    folder.mkdir(parents=True, exist_ok=True)
    names = ["image.nrrd"] if len(volumes) == 1 else [f"image_{n}.nrrd" for n in range(len(volumes))]
    return [write_volume(v, folder / name) for v, name in zip(volumes, names)]


def write_training_inputs(folder: Path, volumes: list, segmentation_node, segment_ids: list[str],
                          axis: str, held_out: list[int] | None = None,
                          empty: list[int] | None = None) -> TrainingFiles:
    """Images, ``labels.nrrd`` (held-out slices removed), ``truth.nrrd`` (held-out slices only, for
    evaluation) and ``classes.json``. ``empty``: slices the user checked and found without the structure
    (checked by :func:`check_empty_slices`; the engine gets them as ``--empty-slices``)."""
    if segmentation_node is None:
        raise JobError("choose the segmentation that holds your labels")
    if not segment_ids:
        raise JobError(f"{segmentation_node.GetName()} has no segments: paint the structure on a few slices "
                       "with the Segment Editor first")
    images = write_images(volumes, folder)
    reference = volumes[0]
    labels = labels_from_segments(segmentation_node, segment_ids, reference)
    all_labelled = labelled_slices(labels, axis)
    held_out = sorted(set(held_out or []))
    n_slices = labels.shape[numpy_axis(axis)]
    bad = [s for s in held_out if not 0 <= s < n_slices]
    if bad:
        raise JobError(f"held-out slice(s) {format_slices(bad)} are outside 0..{n_slices - 1} along {axis}")
    classes = segment_classes(segmentation_node, segment_ids)
    empty = check_empty_slices(labels, axis, empty, held_out, {c["value"]: c["name"] for c in classes})
    training = [s for s in all_labelled if s not in held_out]
    if not training:
        raise JobError("no labelled slice is left for training: paint the structure on at least one slice "
                       "that is not held out" if all_labelled else
                       "the chosen segments are empty: paint the structure on a few slices first")
    train_labels = keep_slices(labels, axis, training)
    labels_path = write_labelmap(train_labels, reference, folder / "labels.nrrd")
    truth_path = None
    if held_out:
        truth_path = write_labelmap(keep_slices(labels, axis, held_out), reference, folder / "truth.nrrd")
    classes_path = folder / "classes.json"
    classes_path.write_text(json.dumps(classes, indent=1) + "\n", encoding="utf-8")
    return TrainingFiles(images=images, labels=labels_path, classes=classes_path, truth=truth_path, axis=axis,
                         labelled=training, held_out=held_out, empty=empty)


# -- reading results back -----------------------------------------------------------------------------------
def _read_on_grid(path: Path, reference_volume, temporary):
    """Read the engine's output ``path`` into the node ``temporary`` (not in the scene), checked to lie on the
    reference's exact grid: the engine writes every output on the input grid, so a file that does not
    (beyond rounding of the text header) is an error rather than silently resampled."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(temporary):
        raise JobError(f"could not read the engine's output {path}")
    if not same_grid(temporary, reference_volume):
        raise JobError(f"the engine wrote {Path(path).name} on a different grid than {reference_volume.GetName()}")
    return temporary


def read_volume_on_grid(path: Path, reference_volume, node):
    """Read ``path`` into the scalar volume ``node`` (created if None) on the reference's exact grid."""
    if node is None:
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    temporary = _read_on_grid(path, reference_volume, slicer.vtkMRMLScalarVolumeNode())
    m = vtk.vtkMatrix4x4()
    reference_volume.GetIJKToRASMatrix(m)
    node.SetIJKToRASMatrix(m)
    image = vtk.vtkImageData()
    image.DeepCopy(temporary.GetImageData())
    node.SetAndObserveImageData(image)
    node.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
    return node


def array_from_file_on_grid(path: Path, reference_volume) -> np.ndarray:
    """The label map ``path`` as a numpy array ``[K, J, I]``, checked to lie on the reference's grid."""
    from vtk.util import numpy_support

    image = _read_on_grid(path, reference_volume, slicer.vtkMRMLLabelMapVolumeNode()).GetImageData()
    i, j, k = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i).copy()


def import_segmentation(labelmap_path: Path, reference_volume, classes: list[dict], segmentation_node=None,
                        name: str | None = None):
    """Fill ``segmentation_node`` (created if None; its previous segments are replaced) with one segment per
    class, the class's name and colour, reference geometry from the input volume."""
    labels = array_from_file_on_grid(labelmap_path, reference_volume)
    scene = slicer.mrmlScene
    if segmentation_node is None:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation_node.SetName(name or f"{reference_volume.GetName()} MisMatch")
    segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    segmentation_node.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
    segmentation = segmentation_node.GetSegmentation()
    was = segmentation_node.StartModify()
    try:
        segmentation.RemoveAllSegments()
        for cls in classes:
            value = int(cls["value"])
            segment_id = segmentation.AddEmptySegment(f"mismatch_{value}", str(cls.get("name") or f"class_{value}"),
                                                      [float(c) for c in cls.get("color", (0.5, 0.5, 0.5))])
            mask = (labels == value).astype(np.uint8)
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation_node, segment_id, reference_volume)
    finally:
        segmentation_node.EndModify(was)
    return segmentation_node


def labels_for_classes(segmentation_node, classes: list[dict], reference_volume) -> np.ndarray | None:
    """uint8 [K, J, I] with each class's value where the user's segment *of the same name* is; None when no
    class name matches a segment (e.g. a model imported for another structure)."""
    segmentation = segmentation_node.GetSegmentation()
    pairs = []
    for cls in classes:
        segment_id = segmentation.GetSegmentIdBySegmentName(str(cls.get("name", "")))
        if segment_id:
            pairs.append((int(cls["value"]), segment_id))
    return _paint(segmentation_node, pairs, reference_volume) if pairs else None
