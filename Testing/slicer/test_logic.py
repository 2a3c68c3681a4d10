"""The module's logic on real MRML nodes (slicer-core) with a stand-in engine child process.

The stand-in (``standin_engine.py``) speaks the contract in milliseconds, so these tests check the module's
side: the job folder it writes, the command line, the nodes it fills, the engine's out-of-memory warning, cancel
and failures. ``test_real_engine.py`` runs the same path with the real engine.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import poll_until, progressed, standin_command

from MisMatchSegmentationLib import jobfolder, plots
from MisMatchSegmentationLib.logic import (MisMatchLogic, SegmentRequest, TrainingRequest, describe_progress,
                                           format_duration, removed_slices, structure_goes_on_note)


def calls(log) -> list[dict]:
    return [json.loads(line) for line in (log / "calls.jsonl").read_text().splitlines()]


@pytest.fixture
def logic_for(tmp_path):
    def make(mode: str) -> MisMatchLogic:
        return MisMatchLogic(work_dir=tmp_path / "work", command=standin_command(mode))
    return make


def train_request(volume, labels, **kw) -> TrainingRequest:
    ids = [labels.GetSegmentation().GetNthSegmentID(n) for n in range(labels.GetSegmentation().GetNumberOfSegments())]
    return TrainingRequest(volumes=[volume], segmentation=labels, segment_ids=ids, steps=5, device="cpu", **kw)


def test_training_writes_the_job_and_gets_a_model(ct_chest, logic_for, standin_log):
    import slicer

    volume, labels = ct_chest
    before = slicer.util.arrayFromSegmentBinaryLabelmap(labels, labels.GetSegmentation().GetNthSegmentID(0), volume).copy()
    logic = logic_for("ok")
    job = logic.start_training(train_request(volume, labels, held_out=[24]))
    assert logic.running
    events = logic.wait(timeout=60)
    done = events[-1]
    assert done == {"event": "done", "job": "train", "status": "completed", "message": done["message"]}
    assert done["message"].startswith("Trained 5 steps") and "Press Segment" in done["message"]
    assert logic.current_model is not None and (logic.current_model / "model.json").is_file()
    assert not job.folder.exists(), "the job folder is removed once the model is written"
    args = calls(standin_log)[0]["args"]
    assert args[0] == "train" and args[1].endswith("image.nrrd")
    assert args[args.index("--labelled-slices") + 1] == "10,17"  # 24 is held out
    assert args[args.index("--axis") + 1] == "k" and args[args.index("--batch-size") + 1] == "4"
    assert args[args.index("--method") + 1] == "mismatch" and args[args.index("--events") + 1] == "-"
    card = json.loads((logic.current_model / "model.json").read_text())
    assert [c["name"] for c in card["classes"]] == ["right lung", "left lung"]
    # the loss curve went into table + series + chart nodes as events arrived
    chart = slicer.mrmlScene.GetFirstNodeByName(plots.LOSS_CHART)
    assert chart is not None and chart.GetNumberOfPlotSeriesNodes() == 3  # loss, dice, consistency
    table = slicer.mrmlScene.GetFirstNodeByName(plots.LOSS_CHART + " table")
    assert table.GetNumberOfRows() == 5
    np.testing.assert_array_equal(
        slicer.util.arrayFromSegmentBinaryLabelmap(labels, labels.GetSegmentation().GetNthSegmentID(0), volume), before)


def test_out_of_memory_is_the_engines_to_handle_and_the_panel_says_so(ct_chest, logic_for, standin_log):
    volume, labels = ct_chest
    logic = logic_for("oom")
    logic.start_training(train_request(volume, labels, batch_size=4))
    events = logic.wait(timeout=60)
    status = [e for e in events if e["event"] == "status"]
    assert [s["message"] for s in status] == ["GPU out of memory: retrying with batch sizes 2 labelled + 2 unlabelled."]
    assert events[-1]["status"] == "completed"
    assert "after a GPU out-of-memory (GPU out of memory: retrying with batch sizes 2" in events[-1]["message"]
    batches = [c["args"][c["args"].index("--batch-size") + 1] for c in calls(standin_log)]
    assert batches == ["4"]   # one engine run: the logic does not retry on its own


def test_out_of_memory_with_one_slice_per_batch_fails_with_advice(ct_chest, logic_for, standin_log):
    volume, labels = ct_chest
    logic = logic_for("oom-fail")
    logic.start_training(train_request(volume, labels, batch_size=8))
    done = logic.wait(timeout=60)[-1]
    assert done["status"] == "failed"
    assert done["message"].startswith("GPU out of memory: lower the patch size or the width, or train on the CPU")
    assert "even with one slice per batch" in done["message"]
    assert len(calls(standin_log)) == 1 and logic.current_model is None and not logic.running


def test_a_crashed_engine_leaves_the_logic_usable(ct_chest, logic_for, standin_log, tmp_path):
    volume, labels = ct_chest
    logic = logic_for("crash")
    logic.start_training(train_request(volume, labels))
    done = logic.wait(timeout=60)[-1]
    assert done["status"] == "failed" and "killed" in done["message"]
    assert "Segmentation fault in a stand-in" in done["message"]
    assert not logic.running and list((tmp_path / "work" / "jobs").iterdir()) == []
    logic.command = standin_command("ok")
    logic.start_training(train_request(volume, labels))
    assert logic.wait(timeout=60)[-1]["status"] == "completed"


def test_cancel_through_the_logic(ct_chest, logic_for, standin_log):
    volume, labels = ct_chest
    logic = logic_for("slow")
    logic.start_training(train_request(volume, labels))
    poll_until(logic, progressed)
    assert logic.status.startswith("Training: step")
    logic.cancel()
    done = logic.wait(timeout=30)[-1]
    assert done["status"] == "cancelled" and logic.current_model is None


def test_only_one_job_at_a_time(ct_chest, logic_for, standin_log):
    volume, labels = ct_chest
    logic = logic_for("slow")
    logic.start_training(train_request(volume, labels))
    with pytest.raises(jobfolder.JobError, match="already running"):
        logic.start_training(train_request(volume, labels))
    logic.cancel()
    logic.wait(timeout=30)


def test_segment_fills_new_nodes_on_the_input_grid_with_reliability_and_next_slice(ct_chest, logic_for, standin_log):
    import slicer

    volume, labels = ct_chest
    logic = logic_for("ok")
    logic.start_training(train_request(volume, labels, held_out=[24]))
    logic.wait(timeout=60)
    ids = [labels.GetSegmentation().GetNthSegmentID(n) for n in range(2)]
    before = {s: slicer.util.arrayFromSegmentBinaryLabelmap(labels, s, volume).copy() for s in ids}
    n_segmentations = len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode"))
    logic.start_segmenting(SegmentRequest(volumes=[volume], model=logic.current_model, device="cpu",
                                          segmentation=labels, held_out=[24]))
    done = logic.wait(timeout=60)[-1]
    assert done["status"] == "completed", done["message"]
    assert "ECE on held-out slices 24: 0.050" in done["message"]
    args = calls(standin_log)[-1]["args"]
    assert args[args.index("--eval-slices") + 1] == "24"
    seg = logic.results["segmentation"]
    assert len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")) == n_segmentations + 1
    segmentation = seg.GetSegmentation()
    assert [segmentation.GetNthSegment(n).GetName() for n in range(2)] == ["right lung", "left lung"]
    np.testing.assert_allclose(segmentation.GetNthSegment(0).GetColor(), (0.8, 0.4, 0.3))
    np.testing.assert_allclose(segmentation.GetNthSegment(1).GetColor(), (0.3, 0.5, 0.9))
    for key in ("confidence", "disagreement"):
        node = logic.results[key]
        np.testing.assert_array_equal(jobfolder.ijk_to_ras(node), jobfolder.ijk_to_ras(volume))
        assert slicer.util.arrayFromVolume(node).shape == (34, 128, 128)
    assert np.all(slicer.util.arrayFromVolume(logic.results["confidence"]) == np.float32(0.75))
    assert logic.results["confidence"].GetName() == "CTChest MisMatch confidence"
    # the stand-in's segmentation: voxels darker than the median, left half class 2; the painted slices that
    # reached it as --labels (10 and 17, not the held-out 24) are kept as painted
    ct = slicer.util.arrayFromVolume(volume).astype(np.float32)
    expected_1 = (ct < np.median(ct))
    expected_1[:, :, :64] = False
    expected_1[[10, 17]] = before[ids[0]][[10, 17]] > 0
    got_1 = slicer.util.arrayFromSegmentBinaryLabelmap(seg, segmentation.GetNthSegmentID(0), volume) > 0
    np.testing.assert_array_equal(got_1, expected_1)
    # the reliability diagram: mean and both decoders, plus the diagonal, ECE in the title
    chart = logic.results["reliability"]
    assert chart.GetNumberOfPlotSeriesNodes() == 4
    assert chart.GetTitle() == "Reliability on held-out slices 24: ECE mean 0.050, positive 0.070, negative 0.090"
    mean_table = slicer.mrmlScene.GetFirstNodeByName(plots.RELIABILITY_CHART + " table: mean of decoders")
    assert mean_table.GetNumberOfRows() == 9  # the empty bin is left out
    # the user's labels never change
    for s in ids:
        np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(labels, s, volume), before[s])
    # next uncertain slice: the stand-in ranks 33, 32, ... first; labelled slices are skipped
    slice_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceNode")
    slice_node.SetLayoutName("Red")
    slice_node.SetOrientationToAxial()
    chosen = [logic.next_uncertain_slice(volume, labels)[0] for _ in range(3)]
    assert chosen == [33, 32, 31]
    slice_index, ras = logic.next_uncertain_slice(volume, labels)
    assert slice_index == 30
    np.testing.assert_allclose(ras, jobfolder.slice_centre_ras(volume, "k", 30))
    ijk = np.linalg.inv(jobfolder.ijk_to_ras(volume)) @ np.array([*ras, 1.0])
    np.testing.assert_allclose(ijk[:3], [63.5, 63.5, 30], atol=1e-9)
    np.testing.assert_allclose(slice_node.GetSliceToRAS().GetElement(2, 3), ras[2], atol=1e-6)
    # segmenting again into the same output node replaces its content instead of adding nodes
    logic.start_segmenting(SegmentRequest(volumes=[volume], model=logic.current_model, device="cpu",
                                          output_segmentation=seg, confidence_volume=logic.results["confidence"]))
    assert logic.wait(timeout=60)[-1]["status"] == "completed"
    assert logic.results["segmentation"] is seg
    assert len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")) == n_segmentations + 1


def test_next_uncertain_slice_skips_labelled_slices(ct_chest, logic_for):
    volume, labels = ct_chest
    logic = logic_for("ok")
    logic.report = {"slice_axis": "k", "uncertain_slices": [{"slice": 17}, {"slice": 5}, {"slice": 10}, {"slice": 3}]}
    assert [logic.next_uncertain_slice(volume, labels, jump=False)[0] for _ in range(3)] == [5, 3, 5]
    logic.report = {"slice_axis": "k", "uncertain_slices": [{"slice": 10}]}
    assert logic.next_uncertain_slice(volume, labels, jump=False) is None


def test_refuses_to_write_into_the_label_segmentation(ct_chest, logic_for, standin_log):
    volume, labels = ct_chest
    logic = logic_for("ok")
    logic.start_training(train_request(volume, labels))
    logic.wait(timeout=60)
    with pytest.raises(jobfolder.JobError, match="holds your labels"):
        logic.start_segmenting(SegmentRequest(volumes=[volume], model=logic.current_model, segmentation=labels,
                                              output_segmentation=labels))


def test_save_and_load_model(ct_chest, logic_for, standin_log, tmp_path):
    from MisMatchSegmentationLib.modelcard import ModelCardError

    volume, labels = ct_chest
    logic = logic_for("ok")
    with pytest.raises(jobfolder.JobError, match="no model"):
        logic.save_model(tmp_path / "saved")
    logic.start_training(train_request(volume, labels))
    logic.wait(timeout=60)
    saved = logic.save_model(tmp_path / "saved")
    assert sorted(p.name for p in saved.iterdir()) == ["model.json", "model.safetensors"]
    other = logic_for("ok")
    card = other.load_model(saved)
    assert other.current_model != saved and card["classes"][0]["name"] == "right lung"
    (saved / "model.safetensors").write_bytes(b"changed")
    with pytest.raises(ModelCardError, match="checksum"):
        other.load_model(saved)


def test_progress_text():
    assert describe_progress({"event": "progress", "phase": "train", "step": 120, "total": 300, "loss": 0.31234,
                              "eta": 83.2}) == "Training: step 120/300, loss 0.3123, 1:23 left"
    assert describe_progress({"phase": "segment", "step": 8, "total": 34, "loss": None, "eta": None}) == \
        "Segmenting: slice 8/34"
    assert format_duration(3725) == "1:02:05" and format_duration(None) == "?"


# -- empty slices and segmenting with the painted labels -------------------------------------------------------
def trained(logic, volume, labels):
    logic.start_training(train_request(volume, labels, held_out=[24]))
    assert logic.wait(timeout=60)[-1]["status"] == "completed"
    return logic.current_model


def test_training_passes_the_empty_slices(ct_chest, logic_for, standin_log):
    volume, labels = ct_chest
    logic = logic_for("ok")
    logic.start_training(train_request(volume, labels, empty_slices=[3, 0, 1, 2, 30]))
    assert logic.wait(timeout=60)[-1]["status"] == "completed"
    logic.start_training(train_request(volume, labels))
    assert logic.wait(timeout=60)[-1]["status"] == "completed"
    with_empty, without = (c["args"] for c in calls(standin_log))
    assert with_empty[with_empty.index("--empty-slices") + 1] == "0,1,2,3,30"
    assert with_empty[with_empty.index("--labelled-slices") + 1] == "10,17,24"
    assert "--empty-slices" not in without


@pytest.mark.parametrize("empty, message", [
    ([17], "slice 17 is marked empty but has painted voxels of right lung, left lung: unpaint it or remove it "
           "from Empty slices"),
    ([5, 24], r"slice\(s\) 24 are both held out and marked empty"),
    ([5, 34], r"empty slice\(s\) 34 are outside 0..33 along k"),
])
def test_wrong_empty_slices_stop_training_before_the_engine_starts(ct_chest, logic_for, standin_log, tmp_path,
                                                                  empty, message):
    volume, labels = ct_chest
    logic = logic_for("ok")
    with pytest.raises(jobfolder.JobError, match=message):
        logic.start_training(train_request(volume, labels, held_out=[24], empty_slices=empty))
    assert not logic.running and not (standin_log / "calls.jsonl").exists()
    assert list((tmp_path / "work" / "jobs").iterdir()) == []


def test_training_on_a_constant_volume_stops_before_the_engine_starts_but_fill_runs(ct_chest, logic_for, standin_log,
                                                                                  tmp_path):
    """A new, empty volume chosen as the input by mistake: training would learn nothing for minutes, so it stops
    with one message (first or second channel); Fill, which interpolates the painted shapes, still runs."""
    import slicer

    volume, labels = ct_chest
    flat = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "New volume")
    flat.CopyOrientation(volume)
    slicer.util.updateVolumeFromArray(flat, np.zeros(slicer.util.arrayFromVolume(volume).shape, np.int16))
    logic = logic_for("ok")
    for volumes in ([flat], [volume, flat]):
        request = train_request(volume, labels)
        request.volumes = volumes
        with pytest.raises(jobfolder.JobError, match=r"^New volume is constant \(every voxel is 0\), so there is "
                                                     "nothing to learn from: choose the volume you painted on"):
            logic.start_training(request)
    assert not logic.running and not (standin_log / "calls.jsonl").exists()
    assert not list((tmp_path / "work").glob("jobs/*"))
    logic.start_filling(train_request(flat, labels))
    assert logic.wait(timeout=60)[-1]["status"] == "completed"


def test_segment_passes_the_painted_labels_without_the_held_out_slices(ct_chest, logic_for, standin_log):
    import SimpleITK as sitk
    import slicer

    volume, labels = ct_chest
    logic = logic_for("ok")
    model = trained(logic, volume, labels)
    ids = [labels.GetSegmentation().GetNthSegmentID(n) for n in range(2)]
    before = {s: slicer.util.arrayFromSegmentBinaryLabelmap(labels, s, volume).copy() for s in ids}
    # learn order was right lung = 1, left lung = 2; paint order in the user's segmentation does not matter
    logic.start_segmenting(SegmentRequest(volumes=[volume], model=model, device="cpu", segmentation=labels,
                                          held_out=[24], empty_slices=[0, 1, 33]))
    done = logic.wait(timeout=60)[-1]
    assert done["status"] == "completed", done["message"]
    assert "without your painted slices" not in done["message"] and "drew parts" not in done["message"]
    args = calls(standin_log)[-1]["args"]
    assert args[args.index("--labels") + 1].endswith("painted.nrrd")
    assert args[args.index("--empty-slices") + 1] == "0,1,33"
    assert args[args.index("--truth") + 1].endswith("truth.nrrd") and args[args.index("--eval-slices") + 1] == "24"
    seen = sitk.ReadImage(str(standin_log / "labels-seen.nrrd"))
    painted = sitk.GetArrayFromImage(seen)
    assert jobfolder.labelled_slices(painted, "k") == [10, 17], "the held-out slice 24 must not be painted"
    np.testing.assert_array_equal(painted[[10, 17]] == 1, before[ids[0]][[10, 17]] > 0)
    np.testing.assert_array_equal(painted[[10, 17]] == 2, before[ids[1]][[10, 17]] > 0)
    assert set(np.unique(painted).tolist()) == {0, 1, 2}
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])  # painted.nrrd is on the volume's exact grid
    np.testing.assert_allclose(lps_to_ras @ np.array(seen.GetDirection()).reshape(3, 3) @ np.diag(seen.GetSpacing()),
                               jobfolder.ijk_to_ras(volume)[:3, :3], atol=1e-9)
    np.testing.assert_allclose(lps_to_ras @ np.array(seen.GetOrigin()), jobfolder.ijk_to_ras(volume)[:3, 3], atol=1e-6)
    # the painted slices are kept in the result; the user's segmentation never changes
    result = logic.results["segmentation"]
    got = slicer.util.arrayFromSegmentBinaryLabelmap(result, result.GetSegmentation().GetNthSegmentID(1), volume)
    np.testing.assert_array_equal(got[[10, 17]] > 0, before[ids[1]][[10, 17]] > 0)
    for s in ids:
        np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(labels, s, volume), before[s])
    assert labels.GetSegmentation().GetNumberOfSegments() == 2
    # the held-out slice is scored, the painted ones are not in the ranking
    ranked = [u["slice"] for u in logic.report["uncertain_slices"]]
    assert 24 in ranked and 10 not in ranked and 0 not in ranked


def test_segment_refuses_an_empty_slice_with_painted_voxels_of_the_models_classes(ct_chest, logic_for,
                                                                                  standin_log, tmp_path):
    volume, labels = ct_chest
    logic = logic_for("ok")
    model = trained(logic, volume, labels)
    n_calls = len(calls(standin_log))
    with pytest.raises(jobfolder.JobError, match="slice 10 is marked empty but has painted voxels of right lung"):
        logic.start_segmenting(SegmentRequest(volumes=[volume], model=model, segmentation=labels, empty_slices=[10]))
    with pytest.raises(jobfolder.JobError, match="both held out and marked empty"):
        logic.start_segmenting(SegmentRequest(volumes=[volume], model=model, segmentation=labels, held_out=[24],
                                              empty_slices=[24]))
    assert len(calls(standin_log)) == n_calls and not logic.running
    assert list((tmp_path / "work" / "jobs").iterdir()) == []


def test_segment_without_a_segment_named_like_the_classes_says_so(ct_chest, logic_for, standin_log):
    import slicer

    volume, labels = ct_chest
    logic = logic_for("ok")
    model = trained(logic, volume, labels)
    other = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Tumour labels")
    other.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    sid = other.GetSegmentation().AddEmptySegment("tumour", "tumour", (0.9, 0.9, 0.1))
    mask = np.zeros((34, 128, 128), np.uint8)
    mask[12, 40:60, 40:60] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, other, sid, volume)
    logic.start_segmenting(SegmentRequest(volumes=[volume], model=model, device="cpu", segmentation=other,
                                          held_out=[12], empty_slices=[0]))
    done = logic.wait(timeout=60)[-1]
    assert done["status"] == "completed", done["message"]
    assert ("your segmentation has no segment named like the model's classes: segmented without your painted "
            "slices") in done["message"]
    args = calls(standin_log)[-1]["args"]
    assert "--labels" not in args and "--empty-slices" not in args and "--truth" not in args
    assert "--no-labels" in args
    assert not (standin_log / "labels-seen.nrrd").exists()
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(other, sid, volume), mask)


def test_segment_with_some_classes_unnamed_uses_the_others_and_says_so(ct_chest, logic_for, standin_log):
    import SimpleITK as sitk

    volume, labels = ct_chest
    logic = logic_for("ok")
    model = trained(logic, volume, labels)
    segmentation = labels.GetSegmentation()
    segmentation.GetSegment(segmentation.GetNthSegmentID(1)).SetName("left lung (old)")
    logic.start_segmenting(SegmentRequest(volumes=[volume], model=model, device="cpu", segmentation=labels))
    done = logic.wait(timeout=60)[-1]
    assert done["status"] == "completed", done["message"]
    assert "no segment of your segmentation is named left lung" in done["message"]
    painted = sitk.GetArrayFromImage(sitk.ReadImage(str(standin_log / "labels-seen.nrrd")))
    assert set(np.unique(painted).tolist()) == {0, 1} and jobfolder.labelled_slices(painted, "k") == [10, 17, 24]


def test_segment_names_the_slices_where_parts_were_removed(ct_chest, logic_for, standin_log, monkeypatch):
    volume, labels = ct_chest
    logic = logic_for("ok")
    model = trained(logic, volume, labels)
    monkeypatch.setenv("STANDIN_REMOVED", json.dumps({"12": 0.05, "30": 0.002, "5": 0.0005, "20": 0.01, "7": 0.2}))
    logic.start_segmenting(SegmentRequest(volumes=[volume], model=model, device="cpu", segmentation=labels,
                                          held_out=[24]))
    done = logic.wait(timeout=60)[-1]
    assert done["status"] == "completed", done["message"]
    assert ("the model also drew parts away from your structure on slices 7, 12, 20: they were removed; "
            "check them") in done["message"]
    assert logic.status == done["message"]
    monkeypatch.setenv("STANDIN_REMOVED", json.dumps({"5": 0.0005}))
    logic.start_segmenting(SegmentRequest(volumes=[volume], model=model, device="cpu", segmentation=labels))
    done = logic.wait(timeout=60)[-1]
    assert done["status"] == "completed" and "drew parts" not in done["message"]


def test_removed_slices():
    rows = [{"slice": 3, "removed_fraction": 0.3}, {"slice": 9}, {"slice": 1, "removed_fraction": 0.001},
            {"slice": 2, "removed_fraction": 0.0011}]
    assert removed_slices({"uncertain_slices": rows}) == [2, 3]
    assert removed_slices({"uncertain_slices": rows}, most=1) == [3]
    assert removed_slices(None) == [] and removed_slices({"uncertain_slices": None}) == []


def test_segment_with_every_painted_slice_held_out_goes_without_labels(ct_chest, logic_for, standin_log):
    volume, labels = ct_chest
    logic = logic_for("ok")
    model = trained(logic, volume, labels)
    logic.start_segmenting(SegmentRequest(volumes=[volume], model=model, device="cpu", segmentation=labels,
                                          held_out=[10, 17, 24], empty_slices=[0]))
    done = logic.wait(timeout=60)[-1]
    assert done["status"] == "completed", done["message"]
    assert "no painted slice outside the held-out ones: segmented without your painted slices" in done["message"]
    args = calls(standin_log)[-1]["args"]
    assert "--labels" not in args and "--empty-slices" not in args
    assert "--no-labels" in args   # not the painted slices the model folder keeps from training either
    assert args[args.index("--eval-slices") + 1] == "10,17,24"


def test_structure_goes_on_note():
    assert structure_goes_on_note({"structure_goes_on": {"below": 13}}) == (
        "the segmentation follows the structure past your painted slices down to slice 13, where the network "
        "alone sees it go on: check it")
    assert "down to slice 3 and up to slice 40," in structure_goes_on_note(
        {"structure_goes_on": {"above": 40, "below": 3}})
    assert structure_goes_on_note({}) == structure_goes_on_note(None) == ""


def test_engine_notes_are_the_end_events_sentences_for_the_user():
    from MisMatchSegmentationLib.logic import engine_notes

    assert engine_notes({"end": {"notes": ["grey matter: the intensities 0.48 to 0.76 ..."]}}) == \
        ["grey matter: the intensities 0.48 to 0.76 ..."]
    assert engine_notes({"end": {}}) == engine_notes({"end": None}) == engine_notes({}) == []
    assert engine_notes({"end": {"notes": "not a list"}}) == []


def test_fill_writes_the_painted_slices_filled_into_a_new_segmentation_before_any_training(ct_chest, logic_for,
                                                                                          standin_log):
    """Fill: the painted slices (held-out ones removed) to the engine's fill, no model; the result in a new
    segmentation with the user's segment names and colours, the user's own segmentation untouched."""
    import slicer

    volume, labels = ct_chest
    ids = [labels.GetSegmentation().GetNthSegmentID(n) for n in range(2)]
    before = {s: slicer.util.arrayFromSegmentBinaryLabelmap(labels, s, volume).copy() for s in ids}
    logic = logic_for("ok")
    assert logic.current_model is None
    job = logic.start_filling(train_request(volume, labels, held_out=[24]))
    assert logic.status.startswith("Filling")
    done = logic.wait(timeout=60)[-1]
    assert (done["job"], done["status"]) == ("fill", "completed"), done["message"]
    assert done["message"].startswith("Filled CTChest from 2 painted slice(s)") and "no network" in done["message"]
    assert "; a note of the stand-in's fill for the user" in done["message"]   # the engine's end event's notes
    args = calls(standin_log)[-1]["args"]
    assert args[0] == "fill" and args[args.index("--labelled-slices") + 1] == "10,17" and "--report" in args
    assert args[args.index("--axis") + 1] == "k" and "--model" not in args
    seg = logic.results["segmentation"]
    segmentation = seg.GetSegmentation()
    assert [segmentation.GetNthSegment(n).GetName() for n in range(2)] == ["right lung", "left lung"]
    np.testing.assert_allclose(segmentation.GetNthSegment(0).GetColor(), (0.8, 0.4, 0.3))
    filled = slicer.util.arrayFromSegmentBinaryLabelmap(seg, segmentation.GetNthSegmentID(0), volume)
    np.testing.assert_array_equal(filled[13], before[ids[0]][10])    # the stand-in copies the nearest slice
    assert logic.current_model is None and not job.folder.exists()
    assert "Label next: slice 33: it is 16 slices from any painted slice, in the widest unpainted stretch" in \
        done["message"]
    assert logic.next_uncertain_slice(volume, labels, ids, jump=False)[0] == 33
    for s in ids:
        np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(labels, s, volume), before[s])
    # again into the same output: the module's own node is replaced without asking
    logic.start_filling(train_request(volume, labels), seg)
    assert logic.wait(timeout=60)[-1]["status"] == "completed" and logic.results["segmentation"] is seg


def test_fill_never_writes_into_the_users_own_segmentations_without_asking(ct_chest, logic_for, standin_log):
    import slicer

    from MisMatchSegmentationLib.logic import OverwriteNeedsConfirmation

    volume, labels = ct_chest
    logic = logic_for("ok")
    with pytest.raises(jobfolder.JobError, match="holds your labels"):
        logic.start_filling(train_request(volume, labels), labels)
    mine = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my work")
    mine.GetSegmentation().AddEmptySegment("liver", "liver", (0.5, 0.2, 0.2))
    with pytest.raises(OverwriteNeedsConfirmation):
        logic.start_filling(train_request(volume, labels), mine)
    assert not (standin_log / "calls.jsonl").exists()   # nothing started
    logic.start_filling(train_request(volume, labels), mine, confirm_overwrite=True)
    assert logic.wait(timeout=60)[-1]["status"] == "completed"
    assert mine.GetSegmentation().GetNthSegment(0).GetName() == "right lung"
