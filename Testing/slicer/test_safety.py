"""What users do every day, on real MRML nodes with the stand-in engine: closing the scene mid-job, outputs that
must never overwrite their data, cancel behind Slicer's launcher that keeps the checkpoint, the engine's full
output, old models pruned, and slice navigation through a parent transform."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import poll_until, progressed, standin_command, wait_until

from MisMatchSegmentationLib import jobfolder
from MisMatchSegmentationLib.logic import (MisMatchLogic, OverwriteNeedsConfirmation, SegmentRequest,
                                           TrainingRequest, prune)

posix_only = pytest.mark.skipif(os.name == "nt", reason="process groups and signals are POSIX here")


def calls(log) -> list[dict]:
    return [json.loads(line) for line in (log / "calls.jsonl").read_text().splitlines()]


def train_request(volume, labels, **kw) -> TrainingRequest:
    ids = [labels.GetSegmentation().GetNthSegmentID(n) for n in range(labels.GetSegmentation().GetNumberOfSegments())]
    return TrainingRequest(volumes=[volume], segmentation=labels, segment_ids=ids, steps=5, device="cpu", **kw)


@pytest.fixture
def trained_logic(ct_chest, tmp_path, standin_log):
    volume, labels = ct_chest
    logic = MisMatchLogic(work_dir=tmp_path / "work", command=standin_command("ok"))
    logic.start_training(train_request(volume, labels))
    assert logic.wait(timeout=60)[-1]["status"] == "completed"
    return logic


# -- 4. never overwrite the user's data -------------------------------------------------------------------
def test_the_input_volume_is_refused_as_confidence_or_disagreement_output(ct_chest, trained_logic):
    import slicer

    volume, labels = ct_chest
    before = slicer.util.arrayFromVolume(volume).copy()
    for key in ("confidence_volume", "disagreement_volume"):
        with pytest.raises(jobfolder.JobError, match="an input of this job"):
            trained_logic.start_segmenting(SegmentRequest(volumes=[volume], model=trained_logic.current_model,
                                                          segmentation=labels, **{key: volume}))
    assert not trained_logic.running
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), before)


def test_an_extra_channel_is_an_input_too(ct_chest, trained_logic):
    import slicer

    volume, labels = ct_chest
    second = slicer.util.addVolumeFromArray(slicer.util.arrayFromVolume(volume).copy(), name="T2")
    second.CopyOrientation(volume)
    with pytest.raises(jobfolder.JobError, match="an input of this job"):
        trained_logic.start_segmenting(SegmentRequest(volumes=[volume, second], model=trained_logic.current_model,
                                                      disagreement_volume=second))


def test_one_volume_cannot_take_both_maps(ct_chest, trained_logic):
    import slicer

    volume, labels = ct_chest
    other = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "spare")
    with pytest.raises(jobfolder.JobError, match="the same volume"):
        trained_logic.start_segmenting(SegmentRequest(volumes=[volume], model=trained_logic.current_model,
                                                      confidence_volume=other, disagreement_volume=other))


def test_a_users_own_segmentation_is_replaced_only_after_confirmation(ct_chest, trained_logic):
    import slicer

    volume, labels = ct_chest
    mine = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "My liver work")
    mine.GetSegmentation().AddEmptySegment("liver", "liver", [0.6, 0.3, 0.2])
    request = SegmentRequest(volumes=[volume], model=trained_logic.current_model, output_segmentation=mine)
    with pytest.raises(OverwriteNeedsConfirmation, match="holds 1 segment"):
        trained_logic.start_segmenting(request)
    assert mine.GetSegmentation().GetNthSegment(0).GetName() == "liver" and not trained_logic.running
    request.confirm_overwrite = True
    trained_logic.start_segmenting(request)
    assert trained_logic.wait(timeout=60)[-1]["status"] == "completed"
    assert trained_logic.results["segmentation"] is mine
    # now it holds the module's output: segmenting into it again needs no new confirmation
    assert mine.GetAttribute("MisMatch.Output") == "segmentation"
    trained_logic.start_segmenting(SegmentRequest(volumes=[volume], model=trained_logic.current_model,
                                                  output_segmentation=mine))
    assert trained_logic.wait(timeout=60)[-1]["status"] == "completed"


def test_an_empty_segmentation_and_user_picked_volumes_that_are_not_inputs_are_fine(ct_chest, trained_logic):
    import slicer

    volume, labels = ct_chest
    empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    spare = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "spare")
    trained_logic.start_segmenting(SegmentRequest(volumes=[volume], model=trained_logic.current_model,
                                                  output_segmentation=empty, confidence_volume=spare))
    assert trained_logic.wait(timeout=60)[-1]["status"] == "completed"
    assert trained_logic.results["confidence"] is spare and trained_logic.results["segmentation"] is empty
    created = trained_logic.results["disagreement"]
    assert created.GetAttribute("MisMatch.Output") == "disagreement"


# -- 3. scene closed while a job runs ---------------------------------------------------------------------
@posix_only
def test_scene_closed_while_training_cancels_and_forgets_the_scene(ct_chest, tmp_path, standin_log):
    import slicer

    volume, labels = ct_chest
    logic = MisMatchLogic(work_dir=tmp_path / "work", command=standin_command("slow"))
    logic.report = {"slice_axis": "k", "uncertain_slices": [{"slice": 3}]}
    logic._visited = [3]
    job = logic.start_training(train_request(volume, labels))
    poll_until(logic, progressed)
    logic.abandon()  # what the widget does at StartCloseEvent
    slicer.mrmlScene.Clear(0)
    assert not logic.running and logic.busy
    assert logic.report is None and logic._visited == [] and logic.results == {}

    def job_over() -> bool:
        assert logic.poll() == []  # nothing of the closed scene's job reaches the panel
        return not logic.busy

    wait_until(job_over, what="the closed scene's job ended")
    assert not job.folder.exists() and not job.output.exists()
    assert logic.interrupted is None and logic.current_model is None


def test_results_of_a_volume_removed_while_segmenting_are_not_imported(ct_chest, trained_logic, standin_log):
    import slicer

    volume, labels = ct_chest
    n_segmentations = len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode"))
    trained_logic.start_segmenting(SegmentRequest(volumes=[volume], model=trained_logic.current_model))
    slicer.mrmlScene.RemoveNode(volume)
    done = trained_logic.wait(timeout=60)[-1]
    assert done["status"] == "failed" and "removed from the scene" in done["message"]
    assert len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")) == n_segmentations
    assert not trained_logic.running


def test_old_models_are_pruned_keeping_the_current_one(ct_chest, tmp_path, standin_log):
    volume, labels = ct_chest
    logic = MisMatchLogic(work_dir=tmp_path / "work", command=standin_command("ok"))
    models = tmp_path / "work" / "models"
    for n in range(6):
        old = models / f"model-old-{n}"
        old.mkdir(parents=True)
        os.utime(old, (1000 + n, 1000 + n))
    logic.current_model = models / "model-old-0"  # the oldest, but the one in use
    logic.start_training(train_request(volume, labels))
    assert logic.wait(timeout=60)[-1]["status"] == "completed"
    left = sorted(p.name for p in models.iterdir())
    assert logic.current_model.name in left and len(left) == 1 + 3
    assert {"model-old-5", "model-old-4"} <= set(left) and "model-old-1" not in left
    assert prune(tmp_path / "nothing-here", 3) == []


# -- 5. cancel behind the launcher keeps the checkpoint; Resume continues from it --------------------------
@posix_only
def test_cancel_behind_the_launcher_keeps_the_checkpoint_and_resume_continues(ct_chest, tmp_path, standin_log):
    volume, labels = ct_chest
    logic = MisMatchLogic(work_dir=tmp_path / "work", command=standin_command("slow", launcher=True))
    job = logic.start_training(train_request(volume, labels))
    job.process.launcher = True  # the stand-in launcher is not named PythonSlicer here
    poll_until(logic, progressed)
    logic.cancel()
    done = logic.wait(timeout=30)[-1]
    assert done["status"] == "cancelled" and done["message"].startswith("Cancelled at step ")
    assert "checkpoint is kept" in done["message"] and "Resume" in done["message"]
    assert logic.interrupted is job and (job.output / "checkpoint" / "state.json").is_file()
    assert job.folder.is_dir(), "the inputs of the interrupted run are needed to resume it"
    logic.command = standin_command("ok")
    logic.resume_training()
    done = logic.wait(timeout=60)[-1]
    assert done["status"] == "completed"
    args = calls(standin_log)[-1]["args"]
    assert "--resume" in args and args[args.index("--out") + 1] == str(job.output)
    assert logic.current_model == job.output and logic.interrupted is None


@posix_only
def test_a_new_training_discards_the_interrupted_one(ct_chest, tmp_path, standin_log):
    volume, labels = ct_chest
    logic = MisMatchLogic(work_dir=tmp_path / "work", command=standin_command("slow"))
    job = logic.start_training(train_request(volume, labels))
    poll_until(logic, progressed)
    logic.cancel()
    logic.wait(timeout=30)
    assert logic.interrupted is job
    logic.command = standin_command("ok")
    logic.start_training(train_request(volume, labels))
    assert logic.interrupted is None and not job.folder.exists() and not job.output.exists()
    logic.wait(timeout=60)
    with pytest.raises(jobfolder.JobError, match="no interrupted training"):
        logic.resume_training()


@posix_only
def test_the_stop_file_is_passed_when_the_engine_watches_it(ct_chest, tmp_path, standin_log):
    volume, labels = ct_chest
    logic = MisMatchLogic(work_dir=tmp_path / "work", command=standin_command("deaf"), stop_file=True)
    job = logic.start_training(train_request(volume, labels))
    job.process.kill_grace = 60
    poll_until(logic, progressed)
    logic.cancel()
    done = logic.wait(timeout=90)[-1]
    # the engine saw the stop file and wrote its checkpoint; killed after the grace period, it would have none
    assert done["status"] == "cancelled" and "checkpoint is kept" in done["message"], done["message"]
    args = calls(standin_log)[-1]["args"]
    assert args[args.index("--stop-file") + 1] == str(job.folder / "STOP")
    # without engine support nothing is passed
    logic = MisMatchLogic(work_dir=tmp_path / "work2", command=standin_command("ok"), stop_file=False)
    logic.start_training(train_request(volume, labels))
    logic.wait(timeout=60)
    assert "--stop-file" not in calls(standin_log)[-1]["args"]


# -- 6. the engine's whole output ------------------------------------------------------------------------
def test_the_engines_whole_output_is_kept_logged_and_named_on_failure(ct_chest, tmp_path, standin_log):
    volume, labels = ct_chest
    logic = MisMatchLogic(work_dir=tmp_path / "work", command=standin_command("crash"))
    logic.start_training(train_request(volume, labels))
    events = logic.wait(timeout=60)
    lines = [line for e in events if e["event"] == "output" for line in e["lines"]]
    assert "Traceback (most recent call last):" in lines and "Segmentation fault in a stand-in" in lines
    assert logic.log_lines == lines
    done = events[-1]
    assert done["status"] == "failed"
    assert str(logic.log_path) in done["message"] and "Log section" in done["message"]
    log = Path(logic.log_path).read_text()
    assert log.startswith("$ ") and "Segmentation fault in a stand-in" in log
    assert logic.log_path.parent == tmp_path / "work" / "logs"


# -- 7. slice navigation through a parent transform --------------------------------------------------------
def transformed(volume):
    import slicer
    import vtk

    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 40.0)
    m.SetElement(2, 3, -73.0)  # 7.3 slices of 10 mm along S
    m.SetElement(0, 0, 0.0)
    m.SetElement(0, 1, -1.0)
    m.SetElement(1, 0, 1.0)
    m.SetElement(1, 1, 0.0)  # and a 90 degree turn about S
    transform.SetMatrixTransformToParent(m)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    return m


def test_next_uncertain_slice_jumps_to_the_transformed_volume(ct_chest, logic_for_ok):
    volume, labels = ct_chest
    m = transformed(volume)
    logic = logic_for_ok
    logic.report = {"slice_axis": "k", "uncertain_slices": [{"slice": 5}]}
    index, ras = logic.next_uncertain_slice(volume, labels, jump=False)
    local = jobfolder.slice_centre_ras(volume, "k", 5)
    world = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)]) @ np.array([*local, 1.0])
    np.testing.assert_allclose(ras, world[:3], atol=1e-6)
    assert jobfolder.slice_index_at(volume, "k", ras) == 5


def test_the_slice_under_a_view_is_found_through_the_transform(ct_chest):
    volume, labels = ct_chest
    for index in (0, 12, 33):
        local = jobfolder.slice_centre_ras(volume, "k", index)
        assert jobfolder.slice_index_at(volume, "k", local) == index  # no transform: local is world
    m = transformed(volume)
    matrix = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    for index in (0, 12, 33):
        world = matrix @ np.array([*jobfolder.slice_centre_ras(volume, "k", index), 1.0])
        assert jobfolder.slice_index_at(volume, "k", world[:3]) == index
        np.testing.assert_allclose(jobfolder.world_to_local(volume, world[:3]),
                                   jobfolder.slice_centre_ras(volume, "k", index), atol=1e-6)


@pytest.fixture
def logic_for_ok(tmp_path):
    return MisMatchLogic(work_dir=tmp_path / "work", command=standin_command("ok"))
