"""MRML nodes -> job folder files -> MRML nodes, with real MRML classes (slicer-core) and real storage nodes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import oblique_volume

from MisMatchSegmentationLib import jobfolder

LPS = np.diag([-1.0, -1.0, 1.0])


def sitk_ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """IJK-to-RAS of a SimpleITK image (LPS): RAS = diag(-1, -1, 1) * (origin + D * diag(spacing) * ijk)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = LPS @ direction @ np.diag(image.GetSpacing())
    m[:3, 3] = LPS @ np.array(image.GetOrigin())
    return m


def test_oblique_anisotropic_volume_is_written_on_its_exact_grid(scene, tmp_path):
    node, matrix, array = oblique_volume(scene)
    path = jobfolder.write_volume(node, tmp_path / "image.nrrd")
    assert path.read_bytes()[:4] == b"NRRD" and b"encoding: raw" in path.read_bytes()[:1000]
    image = sitk.ReadImage(str(path))
    np.testing.assert_allclose(sitk_ijk_to_ras(image), matrix, atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)


def test_label_map_follows_the_oblique_grid_and_reads_back_exactly(scene, tmp_path):
    node, matrix, _ = oblique_volume(scene)
    labels = np.zeros((9, 11, 13), np.uint8)
    labels[4, 2:6, 3:9] = 2
    path = jobfolder.write_labelmap(labels, node, tmp_path / "labels.nrrd")
    image = sitk.ReadImage(str(path))
    np.testing.assert_allclose(sitk_ijk_to_ras(image), matrix, atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
    # the engine writes its outputs with SimpleITK on the input grid; read one back into a node
    out = sitk.GetImageFromArray(labels.astype(np.float32) / 2)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(tmp_path / "confidence.nrrd"))
    confidence = jobfolder.read_volume_on_grid(tmp_path / "confidence.nrrd", node, None)
    assert confidence.GetScene() is scene
    np.testing.assert_array_equal(jobfolder.ijk_to_ras(confidence), jobfolder.ijk_to_ras(node))
    import slicer

    np.testing.assert_array_equal(slicer.util.arrayFromVolume(confidence), labels.astype(np.float32) / 2)


def test_a_result_on_another_grid_is_refused(scene, tmp_path):
    node, _, _ = oblique_volume(scene)
    image = sitk.GetImageFromArray(np.zeros((9, 11, 13), np.float32))
    sitk.WriteImage(image, str(tmp_path / "wrong.nrrd"))
    with pytest.raises(jobfolder.JobError, match="different grid"):
        jobfolder.read_volume_on_grid(tmp_path / "wrong.nrrd", node, None)


def test_axis_for_orientation_picks_the_best_aligned_grid_axis(scene):
    node, _, _ = oblique_volume(scene)
    assert jobfolder.axis_for_orientation(node, "Axial") == "k"
    import slicer

    coronal = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), np.int16),
                                             ijkToRAS=np.array([[1, 0, 0, 0], [0, 0, 3, 0], [0, -1, 0, 0], [0, 0, 0, 1.0]]))
    assert jobfolder.axis_for_orientation(coronal, "Axial") == "j"
    assert jobfolder.axis_for_orientation(coronal, "Coronal") == "k"
    assert jobfolder.axis_for_orientation(coronal, "Sagittal") == "i"
    with pytest.raises(jobfolder.JobError):
        jobfolder.axis_for_orientation(coronal, "Oblique")


def test_slice_centre_ras_uses_the_volume_geometry(scene):
    node, matrix, _ = oblique_volume(scene)  # 9 slices (K) of 11 x 13 (J x I)
    ras = jobfolder.slice_centre_ras(node, "k", 4)
    np.testing.assert_allclose(ras, (matrix @ np.array([6.0, 5.0, 4.0, 1.0]))[:3])
    ras = jobfolder.slice_centre_ras(node, "i", 0)
    np.testing.assert_allclose(ras, (matrix @ np.array([0.0, 5.0, 4.0, 1.0]))[:3])


def test_parse_slices():
    assert jobfolder.parse_slices("3, 7; 10-12,7") == [3, 7, 10, 11, 12]
    assert jobfolder.parse_slices("") == []
    for bad in ("x", "5-3", "-2"):
        with pytest.raises(jobfolder.JobError, match="^held-out slices: "):
            jobfolder.parse_slices(bad)
    with pytest.raises(jobfolder.JobError, match="^empty slices: 'x' is not a slice number"):
        jobfolder.parse_slices("1, x", "empty slices")


def test_training_inputs_from_ctchest_keep_names_colours_and_the_user_segmentation(ct_chest, tmp_path):
    import slicer

    volume, labels_node = ct_chest
    ids = [labels_node.GetSegmentation().GetNthSegmentID(n) for n in range(2)]
    before = {sid: slicer.util.arrayFromSegmentBinaryLabelmap(labels_node, sid, volume).copy() for sid in ids}
    names_before = [labels_node.GetSegmentation().GetSegment(s).GetName() for s in ids]
    # learn the left lung as class 1 and the right lung as class 2; hold slice 24 out for checking
    order = [ids[1], ids[0]]
    files = jobfolder.write_training_inputs(tmp_path, [volume], labels_node, order, axis="k", held_out=[24])
    assert files.labelled == [10, 17] and files.held_out == [24]
    classes = json.loads(files.classes.read_text())
    assert classes == [{"value": 1, "name": "left lung", "color": [0.3, 0.5, 0.9]},
                       {"value": 2, "name": "right lung", "color": [0.8, 0.4, 0.3]}]
    image = sitk.ReadImage(str(files.images[0]))
    np.testing.assert_allclose(sitk_ijk_to_ras(image), jobfolder.ijk_to_ras(volume), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), slicer.util.arrayFromVolume(volume))
    train = sitk.GetArrayFromImage(sitk.ReadImage(str(files.labels)))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(files.truth)))
    assert jobfolder.labelled_slices(train, "k") == [10, 17]
    assert jobfolder.labelled_slices(truth, "k") == [24]
    np.testing.assert_array_equal(train[10] == 1, before[ids[1]][10] > 0)
    np.testing.assert_array_equal(train[10] == 2, before[ids[0]][10] > 0)
    np.testing.assert_array_equal(truth[24] == 1, before[ids[1]][24] > 0)
    # the user's segmentation is untouched
    for sid in ids:
        np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(labels_node, sid, volume), before[sid])
    assert [labels_node.GetSegmentation().GetSegment(s).GetName() for s in ids] == names_before
    assert labels_node.GetSegmentation().GetNumberOfSegments() == 2


def test_training_inputs_say_what_to_do_when_nothing_is_labelled(ct_chest, tmp_path):
    volume, labels_node = ct_chest
    ids = [labels_node.GetSegmentation().GetNthSegmentID(0)]
    with pytest.raises(jobfolder.JobError, match="not held out"):
        jobfolder.write_training_inputs(tmp_path, [volume], labels_node, ids, "k", held_out=[10, 17, 24])
    with pytest.raises(jobfolder.JobError, match="outside"):
        jobfolder.write_training_inputs(tmp_path, [volume], labels_node, ids, "k", held_out=[40])
    with pytest.raises(jobfolder.JobError, match="Segment Editor"):
        jobfolder.write_training_inputs(tmp_path, [volume], labels_node, [], "k")


def test_import_segmentation_makes_named_coloured_segments_on_the_input_grid(scene, tmp_path):
    import slicer

    node, matrix, _ = oblique_volume(scene)
    labels = np.zeros((9, 11, 13), np.uint8)
    labels[2:5, 3:7, 4:10] = 1
    labels[6, 1:3, 1:3] = 2
    path = jobfolder.write_labelmap(labels, node, tmp_path / "seg.nrrd")
    classes = [{"value": 1, "name": "vessel", "color": [0.9, 0.1, 0.1]},
               {"value": 2, "name": "tumour", "color": [0.1, 0.9, 0.1]}]
    seg = jobfolder.import_segmentation(path, node, classes)
    segmentation = seg.GetSegmentation()
    assert [segmentation.GetNthSegment(n).GetName() for n in range(2)] == ["vessel", "tumour"]
    np.testing.assert_allclose(segmentation.GetNthSegment(1).GetColor(), (0.1, 0.9, 0.1))
    for n, value in ((0, 1), (1, 2)):
        sid = segmentation.GetNthSegmentID(n)
        np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, node) > 0, labels == value)
    # importing again into the same node replaces its segments
    seg2 = jobfolder.import_segmentation(path, node, classes[:1], seg)
    assert seg2 is seg and seg.GetSegmentation().GetNumberOfSegments() == 1


def test_empty_slices_are_checked_against_the_volume_the_held_out_slices_and_the_painting(ct_chest, tmp_path):
    volume, labels_node = ct_chest
    ids = [labels_node.GetSegmentation().GetNthSegmentID(n) for n in range(2)]
    files = jobfolder.write_training_inputs(tmp_path / "ok", [volume], labels_node, ids, "k", held_out=[24],
                                            empty=[33, 0, 1, 0])
    assert files.empty == [0, 1, 33] and files.labelled == [10, 17]
    train = sitk.GetArrayFromImage(sitk.ReadImage(str(files.labels)))
    assert jobfolder.labelled_slices(train, "k") == [10, 17]  # empty slices add no label voxel
    with pytest.raises(jobfolder.JobError) as painted:
        jobfolder.write_training_inputs(tmp_path / "a", [volume], labels_node, ids[1:], "k", empty=[3, 17])
    assert str(painted.value) == ("slice 17 is marked empty but has painted voxels of left lung: unpaint it or "
                                  "remove it from Empty slices")
    with pytest.raises(jobfolder.JobError, match=r"^slice\(s\) 24 are both held out and marked empty"):
        jobfolder.write_training_inputs(tmp_path / "b", [volume], labels_node, ids, "k", held_out=[24], empty=[24])
    with pytest.raises(jobfolder.JobError, match=r"^empty slice\(s\) 34 are outside 0..33 along k"):
        jobfolder.write_training_inputs(tmp_path / "c", [volume], labels_node, ids, "k", empty=[2, 34])
    # along another axis the indices count along that axis (128 slices along j)
    with pytest.raises(jobfolder.JobError, match="outside 0..127 along j"):
        jobfolder.write_training_inputs(tmp_path / "d", [volume], labels_node, ids, "j", empty=[128])


def test_check_empty_slices_names_every_painted_class():
    labels = np.zeros((4, 3, 3), np.uint8)
    labels[2, 0, 0], labels[2, 1, 1] = 1, 3
    assert jobfolder.check_empty_slices(labels, "k", [3, 0], [], {1: "vessel"}) == [0, 3]
    with pytest.raises(jobfolder.JobError, match="slice 2 is marked empty but has painted voxels of vessel, label 3"):
        jobfolder.check_empty_slices(labels, "k", [2], [], {1: "vessel"})
    with pytest.raises(jobfolder.JobError, match="slice 0 is marked empty but has painted voxels of vessel"):
        jobfolder.check_empty_slices(labels, "i", [0], [], {1: "vessel", 3: "x"})
