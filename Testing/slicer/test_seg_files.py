"""The engine's command line and Slicer's own segmentation files (.seg.nrrd), read and written by Slicer's real
storage node (slicer-core): what a user who paints in Slicer and runs `mismatch` on the saved files gets."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import slicerio_data

from mismatch.errors import UserError
from mismatch.io import Geometry, read_labels, segment_names, write_volume


def _save_segmentation(node, path) -> None:
    import slicer

    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    storage.SetCropToMinimumExtent(True)   # what Slicer does when it saves a segmentation
    assert storage.WriteData(node)


def test_a_seg_nrrd_saved_by_slicer_cropped_to_its_segments_is_read_on_the_image_grid(ct_chest, tmp_path):
    import slicer

    volume, labels = ct_chest
    path = tmp_path / "painted.seg.nrrd"
    _save_segmentation(labels, path)
    grid = Geometry.from_sitk(sitk.ReadImage(str(slicerio_data() / "CTChest4.nrrd")))
    assert sitk.ReadImage(str(path)).GetSize() != grid.size   # the file really is a cropped block
    told = []
    array = read_labels(path, grid, log=told.append)
    assert array.shape == grid.shape and told and "nothing resampled" in told[0]
    names = segment_names(path)
    assert sorted(c["name"] for c in names.values()) == ["left lung", "right lung"]
    segmentation = labels.GetSegmentation()
    for value, named in names.items():
        sid = segmentation.GetSegmentIdBySegmentName(named["name"])
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(labels, sid, volume)
        np.testing.assert_array_equal(array == value, mask.astype(bool))
        np.testing.assert_allclose(named["color"], segmentation.GetSegment(sid).GetColor(), atol=1e-5)


def test_a_segmentation_the_engine_writes_loads_in_slicer_with_its_names_colours_and_voxels(scene, tmp_path):
    import slicer

    source = sitk.ReadImage(str(slicerio_data() / "CTChest4.nrrd"))
    grid = Geometry.from_sitk(source)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(slicerio_data() / "CTChest4.nrrd"))
    assert storage.ReadData(volume)
    labels = np.zeros(grid.shape, np.uint8)
    labels[10:20, 30:60, 20:50] = 3
    labels[12:18, 70:90, 60:100] = 7
    classes = [{"value": 3, "name": "tumour", "color": [0.9, 0.2, 0.1]},
               {"value": 7, "name": "oedema", "color": [0.1, 0.6, 0.9]}]
    path = tmp_path / "result.seg.nrrd"
    write_volume(labels, grid, path, segments=classes)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(str(path))
    assert reader.ReadData(node)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    for c in classes:
        sid = segmentation.GetSegmentIdBySegmentName(c["name"])
        assert sid, f"no segment named {c['name']}"
        np.testing.assert_allclose(segmentation.GetSegment(sid).GetColor(), c["color"], atol=1e-5)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(node, sid, volume)
        np.testing.assert_array_equal(mask.astype(bool), labels == c["value"])
    # and back: the engine reads its own file as the classes it wrote
    assert {v: n["name"] for v, n in segment_names(path).items()} == {3: "tumour", 7: "oedema"}


def test_labels_outside_the_image_or_on_a_resampled_grid_are_refused_not_dropped(tmp_path):
    grid = Geometry((20, 20, 10), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    block = np.zeros((4, 5, 6), np.uint8)
    block[0, 0, 0] = 1
    image = sitk.GetImageFromArray(block)
    image.SetSpacing((1.0, 1.0, 2.0))
    image.SetOrigin((-1.0, 3.0, 4.0))   # one voxel before the image along i: the painted voxel is outside
    sitk.WriteImage(image, str(tmp_path / "outside.nrrd"))
    with pytest.raises(UserError, match="1 labelled voxel"):
        read_labels(tmp_path / "outside.nrrd", grid)
    image.SetOrigin((0.5, 3.0, 4.0))    # half a voxel off: would need resampling
    sitk.WriteImage(image, str(tmp_path / "shifted.nrrd"))
    with pytest.raises(UserError, match="resample"):
        read_labels(tmp_path / "shifted.nrrd", grid)
    image.SetOrigin((2.0, 3.0, 4.0))    # a block at voxel (2, 3, 2)
    sitk.WriteImage(image, str(tmp_path / "block.nrrd"))
    placed = read_labels(tmp_path / "block.nrrd", grid)
    assert np.argwhere(placed).tolist() == [[2, 3, 2]] and placed.shape == (10, 20, 20)
