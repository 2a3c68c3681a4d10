"""Logic scenarios shared by the module's self-test inside Slicer (``MisMatchSegmentationTest``) and the pytest
suite outside it (Testing/slicer/test_scenarios.py, with slicer-core): a small phantom volume with a structure
painted on three slices, and the logic run against the stand-in engine (no torch, no network, no GPU).

Each scenario raises ``AssertionError`` with what went wrong. Nothing here imports Qt.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from . import standin_command

PAINTED = (6, 12, 18)  # the phantom's painted slices along k


def python_for_standin() -> str:
    """The interpreter for the stand-in engine: Slicer's PythonSlicer inside Slicer, this Python outside."""
    from MisMatchSegmentationLib.process import find_python

    return find_python()


def make_logic(mode: str = "ok", **kwargs):
    """A logic that runs the stand-in engine in ``mode``, in a fresh working folder; ``STANDIN_LOG`` is set to a
    folder of its own (the stand-in records its calls there)."""
    from MisMatchSegmentationLib.logic import MisMatchLogic

    base = Path(tempfile.gettempdir()) / "MisMatchSelfTest" / uuid.uuid4().hex[:8]
    (base / "standin-log").mkdir(parents=True)
    os.environ["STANDIN_LOG"] = str(base / "standin-log")
    return MisMatchLogic(work_dir=base / "work", command=standin_command(python_for_standin(), mode), **kwargs)


def make_phantom(name: str = "Phantom"):
    """``(volume, segmentation, segment id)``: a 24 x 40 x 48 volume (1 x 1.5 x 2.5 mm spacing) with a bright
    ellipsoid, and a segmentation with that ellipsoid painted on slices ``PAINTED`` only."""
    import slicer

    k, j, i = np.mgrid[0:24, 0:40, 0:48]
    inside = ((k - 12) / 9.0) ** 2 + ((j - 20) / 12.0) ** 2 + ((i - 24) / 15.0) ** 2 <= 1.0
    rng = np.random.default_rng(0)
    array = (inside * 300 + rng.normal(0, 20, inside.shape)).astype(np.int16)
    matrix = np.diag([1.0, 1.5, 2.5, 1.0])
    matrix[:3, 3] = (-20.0, 10.0, 35.0)
    volume = slicer.util.addVolumeFromArray(array, ijkToRAS=matrix, name=name)
    labels = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} labels")
    labels.CreateDefaultDisplayNodes()
    labels.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment_id = labels.GetSegmentation().AddEmptySegment("blob", "blob", [0.9, 0.6, 0.2])
    painted = np.zeros(array.shape, np.uint8)
    for s in PAINTED:
        painted[s] = inside[s]
    slicer.util.updateSegmentBinaryLabelmapFromArray(painted, labels, segment_id, volume)
    return volume, labels, segment_id


def wait_for(logic, timeout: float = 120.0) -> list:
    events = logic.wait(timeout=timeout)
    if not events or events[-1].get("event") != "done":
        raise AssertionError(f"the job did not end with a done event: {events[-3:]}")
    return events


def train_then_segment(logic, volume, labels, segment_id) -> dict:
    """Train (stand-in) and segment; checks the model, the new nodes on the volume's grid, the label
    segmentation left untouched. Returns the results."""
    import slicer

    from MisMatchSegmentationLib import jobfolder
    from MisMatchSegmentationLib.logic import SegmentRequest, TrainingRequest

    before = slicer.util.arrayFromSegmentBinaryLabelmap(labels, segment_id, volume).copy()
    logic.start_training(TrainingRequest(volumes=[volume], segmentation=labels, segment_ids=[segment_id],
                                         held_out=[PAINTED[1]], steps=5, device="cpu"))
    done = wait_for(logic)[-1]
    assert done["status"] == "completed", done["message"]
    assert logic.current_model is not None and (Path(logic.current_model) / "model.json").is_file()
    logic.start_segmenting(SegmentRequest(volumes=[volume], model=logic.current_model, device="cpu",
                                          segmentation=labels, held_out=[PAINTED[1]]))
    done = wait_for(logic)[-1]
    assert done["status"] == "completed", done["message"]
    results = logic.results
    segmentation = results["segmentation"].GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1 and segmentation.GetNthSegment(0).GetName() == "blob"
    for key in ("confidence", "disagreement"):
        assert np.allclose(jobfolder.ijk_to_ras(results[key]), jobfolder.ijk_to_ras(volume)), key
        assert results[key].GetAttribute("MisMatch.Output") == key
    assert results.get("reliability") is not None, "no reliability diagram for the held-out slice"
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(labels, segment_id, volume), before), \
        "the label segmentation was modified"
    found = logic.next_uncertain_slice(volume, labels, jump=False)
    assert found is not None and found[0] not in PAINTED
    return results


def cancel_keeps_the_checkpoint(volume, labels, segment_id) -> None:
    """Cancel a (stand-in) training: it ends at a step with its checkpoint kept, and Resume continues."""
    from MisMatchSegmentationLib.logic import TrainingRequest

    logic = make_logic("slow")
    job = logic.start_training(TrainingRequest(volumes=[volume], segmentation=labels, segment_ids=[segment_id],
                                               steps=5, device="cpu"))
    deadline = time.monotonic() + 60
    while not any(e.get("event") == "progress" for e in logic.poll()):
        assert time.monotonic() < deadline, "no progress from the stand-in engine"
        time.sleep(0.02)
    logic.cancel()
    done = wait_for(logic, timeout=60)[-1]
    assert done["status"] == "cancelled", done["message"]
    # the engine stopped and wrote its checkpoint; one killed after the grace period writes none
    assert "checkpoint is kept" in done["message"], f"the engine was killed, not stopped: {done['message']}"
    assert logic.interrupted is job
    logic.command = standin_command(python_for_standin(), "ok")
    logic.resume_training()
    done = wait_for(logic)[-1]
    assert done["status"] == "completed" and logic.current_model == job.output, done["message"]


def outputs_refuse_the_inputs(volume, labels, segment_id) -> None:
    """The input volume is refused as a confidence or disagreement output; the label segmentation as the
    output segmentation; a user's own segmentation needs a confirmation."""
    import slicer

    from MisMatchSegmentationLib.jobfolder import JobError
    from MisMatchSegmentationLib.logic import OverwriteNeedsConfirmation, SegmentRequest, check_outputs

    for kwargs in ({"confidence_volume": volume}, {"disagreement_volume": volume},
                   {"output_segmentation": labels}):
        try:
            check_outputs(SegmentRequest(volumes=[volume], model=None, segmentation=labels, **kwargs))
        except JobError:
            continue
        raise AssertionError(f"accepted {kwargs} as an output")
    mine = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my own work")
    mine.GetSegmentation().AddEmptySegment("mine", "mine", [0.2, 0.2, 0.9])
    try:
        check_outputs(SegmentRequest(volumes=[volume], model=None, output_segmentation=mine))
    except OverwriteNeedsConfirmation:
        pass
    else:
        raise AssertionError("a segmentation of the user's own would be replaced without a confirmation")
    check_outputs(SegmentRequest(volumes=[volume], model=None, output_segmentation=mine, confirm_overwrite=True))
