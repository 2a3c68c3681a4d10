"""MisMatch for 3D Slicer: annotate a few slices, train in the background, segment, read the reliability diagram.

The four classes of Slicer's scripted-module template: the module, the widget (the panel, imported from
``MisMatchSegmentationLib/widget.py``), the logic and the test, with the parameter node. The real work lives in
``MisMatchSegmentationLib`` (job folder, child process, state machine, plots, devices, install); training and
segmentation run in the engine (``Trainer/mismatch``) as a child process of Slicer's Python, never in the GUI
process.

Supported: 3D Slicer 5.10 and later (Python 3.12). On an older Slicer (5.8 embeds Python 3.9) the module refuses
to load with one message instead of failing somewhere inside; the check comes first, before any import that an
old Slicer lacks, and this file keeps to syntax that Python 3.9 parses.
"""

import sys

MINIMUM_SLICER = "5.10"
MINIMUM_PYTHON = (3, 12)


def unsupportedReason(versionInfo=None):
    """Why this Slicer cannot run the module (its Python is older than Slicer 5.10's), or None."""
    versionInfo = tuple(versionInfo or sys.version_info)
    if versionInfo[:2] >= MINIMUM_PYTHON:
        return None
    return ("MisMatch Segmentation needs 3D Slicer {slicer} or later (Python {need}); this Slicer runs Python "
            "{have}. Install the current Slicer release from https://download.slicer.org and the MisMatch "
            "extension for it.").format(slicer=MINIMUM_SLICER, need=".".join(map(str, MINIMUM_PYTHON)),
                                        have=".".join(map(str, versionInfo[:3])))


if unsupportedReason() is not None:
    raise ImportError(unsupportedReason())

import os  # noqa: E402  (after the version check)
import time  # noqa: E402
from typing import Annotated  # noqa: E402

import slicer  # noqa: E402
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest)

from MisMatchSegmentationLib import install, jobfolder
from MisMatchSegmentationLib.jobfolder import JobError
from MisMatchSegmentationLib.logic import MisMatchLogic, SegmentRequest, TrainingRequest
from MisMatchSegmentationLib.state import State
from MisMatchSegmentationLib.widget import MisMatchSegmentationWidget  # noqa: F401  (Slicer finds the panel by name)

HOMEPAGE = "https://github.com/mismatch-slicer/SlicerMisMatch"

# Parameter-node fields set through a widget that the code binds itself (not through SlicerParameterName),
# and fields the user never sets. Testing/slicer/test_ui.py checks both lists against the .ui file.
MANUALLY_BOUND = {"segmentIDs": "segmentSelector"}
INTERNAL_FIELDS = {"currentModelPath"}


#
# MisMatchSegmentation
#
class MisMatchSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MisMatch Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MisMatch for 3D Slicer developers"]
        self.parent.helpText = _(
            "Semi-supervised segmentation from a few labelled slices with MisMatch (Xu et al., MIDL 2022): "
            "paint the structure on a few slices spread evenly over it (the first and last about half a gap "
            "inside its ends: the model takes the structure to end there) and in each separate part of it (only "
            "what is connected to painted voxels is kept), press Train, then Segment; read the "
            "reliability diagram "
            "and go to the next uncertain slice to correct and retrain. "
            f'See the <a href="{HOMEPAGE}/blob/main/docs/slicer-module.md">module documentation</a>.')
        self.parent.acknowledgementText = _(
            "MisMatch: Xu M.-C. et al., Learning morphological feature perturbations for calibrated "
            "semi-supervised segmentation, MIDL 2022. Built with 3D Slicer and PyTorch.")


#
# MisMatchSegmentationParameterNode
#
@parameterNodeWrapper
class MisMatchSegmentationParameterNode:
    """Per-scene settings of the panel (saved with the scene). Device and folders are user preferences
    (QSettings), not per-scene."""

    inputVolume: vtkMRMLScalarVolumeNode
    secondChannel: vtkMRMLScalarVolumeNode
    thirdChannel: vtkMRMLScalarVolumeNode
    labelSegmentation: vtkMRMLSegmentationNode
    segmentIDs: str = ""  # comma-separated, in order; empty: all segments
    sliceOrientation: Annotated[str, Choice(["Axial", "Coronal", "Sagittal"])] = "Axial"
    heldOutSlices: str = ""
    emptySlices: str = ""  # slices checked and found without the structure
    modelSource: Annotated[str, Choice(["New model", "Current model"])] = "New model"
    method: Annotated[str, Choice(["MisMatch", "U-Net"])] = "MisMatch"
    # training defaults: the engine's (mismatch.train.TrainConfig; Testing/slicer/test_defaults.py checks them)
    steps: Annotated[int, WithinRange(10, 100000)] = 180
    learningRate: Annotated[float, WithinRange(1e-6, 1.0)] = 2e-3
    alpha: Annotated[float, WithinRange(0.0, 1.0)] = 0.002
    batchSize: Annotated[int, WithinRange(1, 64)] = 4
    patchSize: Annotated[int, WithinRange(0, 1024)] = 128
    width: Annotated[int, WithinRange(4, 128)] = 16
    outputSegmentation: vtkMRMLSegmentationNode
    confidenceVolume: vtkMRMLScalarVolumeNode
    disagreementVolume: vtkMRMLScalarVolumeNode
    currentModelPath: str = ""


#
# MisMatchSegmentationWidget: the panel, in MisMatchSegmentationLib/widget.py (imported above)
#

#
# MisMatchSegmentationLogic
#
class MisMatchSegmentationLogic(ScriptedLoadableModuleLogic, MisMatchLogic):
    """Batch-mode entry point: everything the panel does, without the panel (see MisMatchLogic). Its methods
    are named like MisMatchLogic's (snake_case); ``getParameterNode`` is Slicer's own."""

    def __init__(self, **kwargs) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        MisMatchLogic.__init__(self, **kwargs)

    def getParameterNode(self):
        return MisMatchSegmentationParameterNode(super().getParameterNode())

    @staticmethod
    def volumes(p) -> list:
        return [v for v in (p.inputVolume, p.secondChannel, p.thirdChannel) if v is not None]

    def training_request(self, p, device: str = "auto", continue_model: bool = True) -> TrainingRequest:
        """The panel's inputs and training settings; ``continue_model`` False: no model to start from whatever
        *Start from* says (Fill, which trains nothing)."""
        init = None
        if continue_model and p.modelSource == "Current model":
            if self.current_model is None:
                raise JobError(_("there is no current model to continue from: choose 'New model'"))
            init = self.current_model
        return TrainingRequest(
            volumes=self.volumes(p), segmentation=p.labelSegmentation,
            segment_ids=[s for s in p.segmentIDs.split(",") if s], orientation=p.sliceOrientation,
            held_out=jobfolder.parse_slices(p.heldOutSlices),
            empty_slices=jobfolder.parse_slices(p.emptySlices, "empty slices"), method=p.method, steps=p.steps,
            learning_rate=p.learningRate, alpha=p.alpha, batch_size=p.batchSize, patch_size=p.patchSize,
            width=p.width, device=device, init_model=init)

    def segment_request(self, p, device: str = "auto") -> SegmentRequest:
        return SegmentRequest(
            volumes=self.volumes(p), model=self.current_model, device=device, segmentation=p.labelSegmentation,
            held_out=jobfolder.parse_slices(p.heldOutSlices),
            empty_slices=jobfolder.parse_slices(p.emptySlices, "empty slices"),
            output_segmentation=p.outputSegmentation, confidence_volume=p.confidenceVolume,
            disagreement_volume=p.disagreementVolume)

    def slice_index_in_view(self, volume, orientation: str, view_name: str = "Red") -> int:
        """Index, along the training slice axis, of the slice shown in a slice view (world coordinates: the
        volume's parent transforms are honoured)."""
        sliceNode = slicer.app.layoutManager().sliceWidget(view_name).mrmlSliceNode()
        ras = [sliceNode.GetSliceToRAS().GetElement(r, 3) for r in range(3)]
        return jobfolder.slice_index_at(volume, jobfolder.axis_for_orientation(volume, orientation), ras)

    def wait_for_job(self, timeout: float = 600.0) -> list:
        """Poll until the job is over, keeping the application responsive (self-test, scripts)."""
        deadline = time.monotonic() + timeout
        events = []
        while self.running:
            events += self.poll()
            slicer.app.processEvents()
            if time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"MisMatch job not finished within {timeout} s")
            time.sleep(0.05)
        return events


#
# MisMatchSegmentationTest
#
class MisMatchSegmentationTest(ScriptedLoadableModuleTest):
    """The module's own tests, run by Slicer's factory (``ctest``), by ``Slicer --testing`` and by the module's
    *Reload and Test* button. They need neither network nor GPU nor torch: the engine is the stand-in in
    ``MisMatchSegmentationTesting`` (plain Python that speaks the engine's contract), run by Slicer's own
    PythonSlicer launcher. The logic scenarios are the ones Testing/slicer/test_scenarios.py runs with
    slicer-core; the widget flows need the application and run only here.

    ``test_RealEngine`` trains the real engine on CTChest and needs torch and the Sample Data download: it is off
    by default (as in SlicerMONAIAuto3DSeg), on with the environment variable ``MISMATCH_TEST_REAL_ENGINE=1``.
    """

    TEST_METHODS = ("test_LogicTrainSegment", "test_LogicCancelKeepsCheckpoint", "test_LogicOutputsRefuseInputs",
                    "test_WidgetTrainProgressDone", "test_WidgetFill", "test_WidgetCancel", "test_WidgetSceneClosedMidJob",
                    "test_WidgetInstallFailure", "test_WidgetOutputSelectorsRefuseInputs", "test_RealEngine")

    def setUp(self):
        self._restore()
        slicer.mrmlScene.Clear()

    def tearDown(self):
        self._restore()

    def runTest(self):
        for name in self.TEST_METHODS:
            self.setUp()
            try:
                getattr(self, name)()
            finally:
                self.tearDown()

    # -- helpers --------------------------------------------------------------------------------------------
    def _scenarios(self):
        from MisMatchSegmentationTesting import scenarios

        return scenarios

    def _widget(self, mode: str = "ok"):
        """The module's panel, entered, its logic running the stand-in engine; nothing to install."""
        from MisMatchSegmentationTesting import standin_command

        widget = slicer.util.getModuleWidget("MisMatchSegmentation")
        widget.enter()
        scenarios = self._scenarios()
        fresh = scenarios.make_logic(mode)
        widget.logic.work_dir = fresh.work_dir
        widget.logic.command = standin_command(scenarios.python_for_standin(), mode)
        widget.logic.current_model = None
        self._saved = (widget, install.dependencies_missing, install.ensure_dependencies, widget.errorDisplay,
                       widget.confirm)
        install.dependencies_missing = lambda *args, **kwargs: False
        self.errors, self.questions = [], []
        widget.errorDisplay = lambda text, **kwargs: self.errors.append((text, kwargs))
        widget.confirm = lambda text: self.questions.append(text) or False
        volume, labels, segmentId = scenarios.make_phantom()
        p = widget._parameterNode
        p.inputVolume, p.labelSegmentation, p.segmentIDs = volume, labels, segmentId
        p.steps, p.heldOutSlices, p.modelSource = 5, "", "New model"
        p.outputSegmentation = p.confidenceVolume = p.disagreementVolume = None
        return widget, volume, labels

    def _restore(self):
        """Undo what ``_widget`` replaced and stop whatever the panel still runs."""
        saved, self._saved = getattr(self, "_saved", None), None
        if saved is None:
            return
        widget, install.dependencies_missing, install.ensure_dependencies, widget.errorDisplay, widget.confirm = saved
        if widget.logic.busy:
            widget.logic.shutdown()
            widget.logic.wait(timeout=30)

    def _waitFor(self, predicate, timeout: float = 60.0, what: str = "the panel") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not reached within {timeout} s")
            slicer.app.processEvents()
            time.sleep(0.02)

    def _idle(self, widget) -> bool:
        return widget.state.state not in (State.TRAINING, State.SEGMENTING, State.FILLING, State.CANCELLING)

    # -- the logic with the stand-in engine ----------------------------------------------------------------
    def test_LogicTrainSegment(self):
        self.delayDisplay("Logic: train and segment with the stand-in engine")
        scenarios = self._scenarios()
        volume, labels, segmentId = scenarios.make_phantom()
        scenarios.train_then_segment(scenarios.make_logic("ok"), volume, labels, segmentId)

    def test_LogicCancelKeepsCheckpoint(self):
        self.delayDisplay("Logic: cancel behind PythonSlicer keeps the checkpoint; resume continues")
        scenarios = self._scenarios()
        scenarios.cancel_keeps_the_checkpoint(*scenarios.make_phantom())

    def test_LogicOutputsRefuseInputs(self):
        self.delayDisplay("Logic: outputs never overwrite the inputs")
        scenarios = self._scenarios()
        scenarios.outputs_refuse_the_inputs(*scenarios.make_phantom())

    # -- the panel ------------------------------------------------------------------------------------------
    def test_WidgetTrainProgressDone(self):
        self.delayDisplay("Panel: Train -> progress -> done, then Segment")
        widget, volume, labels = self._widget("ok")
        self.assertTrue(widget.ui.trainButton.enabled, widget.ui.trainButton.toolTip)
        widget.ui.trainButton.click()
        self.assertEqual(widget.ui.trainButton.text, "Cancel")
        self._waitFor(lambda: self._idle(widget), what="training")
        self.assertEqual(widget.state.state, State.COMPLETED, widget.ui.statusLabel.text)
        self.assertIsNotNone(widget.logic.current_model)
        self.assertEqual(widget._parameterNode.modelSource, "Current model")
        self.assertIn("Trained 5 steps", widget.ui.statusLabel.text)
        self.assertIn('"event": "end"', widget.ui.logTextEdit.plainText)
        self.assertTrue(widget.ui.segmentButton.enabled)
        widget.ui.segmentButton.click()
        self._waitFor(lambda: self._idle(widget), what="segmenting")
        self.assertEqual(widget.state.state, State.COMPLETED, widget.ui.statusLabel.text)
        self.assertIsNotNone(widget._parameterNode.outputSegmentation)
        self.assertIsNotNone(widget._parameterNode.confidenceVolume)
        self.assertTrue(widget.ui.nextUncertainButton.enabled)

    def test_WidgetFill(self):
        self.delayDisplay("Panel: Fill gives a segmentation from the painted slices, before any model")
        widget, volume, labels = self._widget("ok")
        self.assertTrue(widget.ui.fillButton.enabled, widget.ui.fillButton.toolTip)
        self.assertFalse(widget.ui.segmentButton.enabled)
        widget.ui.fillButton.click()
        self._waitFor(lambda: self._idle(widget), what="filling")
        self.assertEqual(widget.state.state, State.COMPLETED, widget.ui.statusLabel.text)
        self.assertIn("Filled", widget.ui.statusLabel.text)
        self.assertIsNotNone(widget._parameterNode.outputSegmentation)
        self.assertIsNone(widget.logic.current_model)
        self.assertFalse(widget.ui.nextUncertainButton.enabled)

    def test_WidgetCancel(self):
        self.delayDisplay("Panel: Cancel keeps the checkpoint and offers Resume")
        widget, volume, labels = self._widget("slow")
        widget.ui.trainButton.click()
        self._waitFor(lambda: widget.ui.progressBar.visible and "step" in widget.ui.statusLabel.text,
                      what="first training steps")
        widget.ui.trainButton.click()  # Cancel
        self.assertEqual(widget.state.state, State.CANCELLING)
        self.assertFalse(widget.ui.trainButton.enabled)
        self._waitFor(lambda: self._idle(widget), timeout=30, what="cancel")
        self.assertIn("checkpoint is kept", widget.ui.statusLabel.text)
        self.assertTrue(widget.ui.resumeButton.enabled)
        self.assertEqual(widget.ui.trainButton.text, "Train")

    def test_WidgetSceneClosedMidJob(self):
        self.delayDisplay("Panel: closing the scene while training re-arms the panel")
        widget, volume, labels = self._widget("slow")
        widget.ui.trainButton.click()
        self._waitFor(lambda: "step" in widget.ui.statusLabel.text, what="first training steps")
        slicer.mrmlScene.Clear()
        self.assertTrue(self._idle(widget))
        self.assertIn("scene was closed", widget.ui.statusLabel.text)
        self.assertEqual(widget.ui.trainButton.text, "Train")
        self.assertFalse(widget.ui.nextUncertainButton.enabled)
        self.assertIsNone(widget.logic.report)
        self._waitFor(lambda: not widget.logic.busy, timeout=30, what="the abandoned engine stopping")

    def test_WidgetInstallFailure(self):
        self.delayDisplay("Panel: a failed install opens an error dialog and leaves the panel usable")
        widget, volume, labels = self._widget("ok")

        def failing(**kwargs):
            try:
                raise OSError("No space left on device")
            except OSError as exc:
                raise install.InstallFailed("PyTorch", exc, install.TORCH_ADVICE) from exc
        install.dependencies_missing = lambda *args, **kwargs: True
        install.ensure_dependencies = failing  # tearDown restores both
        widget.ui.trainButton.click()
        self.assertEqual(len(self.errors), 1)
        text, kwargs = self.errors[0]
        self.assertIn("Installing PyTorch failed", text)
        self.assertIn("free disk space", text)
        self.assertIn("No space left on device", kwargs.get("detailedText", ""))
        self.assertTrue(self._idle(widget))
        self.assertTrue(widget.ui.trainButton.enabled)

    def test_WidgetOutputSelectorsRefuseInputs(self):
        self.delayDisplay("Panel: outputs that are inputs disable Segment; a user's segmentation needs a yes")
        widget, volume, labels = self._widget("ok")
        widget.ui.trainButton.click()
        self._waitFor(lambda: self._idle(widget), what="training")
        p = widget._parameterNode
        p.confidenceVolume = volume
        self.assertFalse(widget.ui.segmentButton.enabled)
        self.assertIn("an input of this job", widget.ui.segmentButton.toolTip)
        p.confidenceVolume = None
        p.outputSegmentation = labels
        self.assertFalse(widget.ui.segmentButton.enabled)
        p.outputSegmentation = None
        mine = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my work")
        mine.GetSegmentation().AddEmptySegment("mine", "mine", [0.1, 0.2, 0.9])
        p.outputSegmentation = mine
        self.assertTrue(widget.ui.segmentButton.enabled)
        widget.ui.segmentButton.click()  # the confirmation is answered no
        self.assertEqual(len(self.questions), 1)
        self.assertTrue(self._idle(widget))
        self.assertEqual(mine.GetSegmentation().GetNthSegment(0).GetName(), "mine")

    # -- the real engine: needs torch and a download; off by default ---------------------------------------
    def test_RealEngine(self):
        if os.environ.get("MISMATCH_TEST_REAL_ENGINE") != "1":
            self.delayDisplay("Real-engine test skipped (set MISMATCH_TEST_REAL_ENGINE=1: needs torch and "
                              "the CTChest download)")
            return
        import numpy as np
        import SampleData

        self.delayDisplay("Loading CTChest and labelling the lungs on three slices")
        volume = SampleData.SampleDataLogic().downloadSample("CTChest")
        ct = slicer.util.arrayFromVolume(volume)
        labels = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Lung labels")
        labels.CreateDefaultDisplayNodes()
        labels.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentId = labels.GetSegmentation().AddEmptySegment("lungs", "lungs", [0.9, 0.6, 0.5])
        mask = np.zeros(ct.shape, np.uint8)
        k, j, i = ct.shape
        inside = np.zeros(ct.shape[1:], bool)
        inside[j // 5: 4 * j // 5, i // 8: 7 * i // 8] = True  # the chest, not the air around the body
        labelled = [k // 3, k // 2, 2 * k // 3]
        for s in labelled:
            mask[s] = (ct[s] < -400) & inside
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, labels, segmentId, volume)
        before = slicer.util.arrayFromSegmentBinaryLabelmap(labels, segmentId, volume).copy()

        self.delayDisplay("Installing dependencies if needed")
        install.ensure_dependencies(ask=not slicer.app.testingEnabled())

        logic = MisMatchSegmentationLogic()
        self.delayDisplay("Training a few steps on the CPU")
        logic.start_training(TrainingRequest(volumes=[volume], segmentation=labels, segment_ids=[segmentId],
                                             held_out=[labelled[1]], steps=10, width=4, patch_size=64,
                                             batch_size=2, device="cpu"))
        done = logic.wait_for_job(timeout=600)[-1]
        self.assertEqual(done["status"], "completed", done["message"])
        self.assertIsNotNone(logic.current_model)

        self.delayDisplay("Segmenting")
        logic.start_segmenting(SegmentRequest(volumes=[volume], model=logic.current_model, device="cpu",
                                              segmentation=labels, held_out=[labelled[1]]))
        done = logic.wait_for_job(timeout=600)[-1]
        self.assertEqual(done["status"], "completed", done["message"])
        seg = logic.results["segmentation"]
        self.assertEqual(seg.GetSegmentation().GetNumberOfSegments(), 1)
        self.assertEqual(seg.GetSegmentation().GetNthSegment(0).GetName(), "lungs")
        confidence = slicer.util.arrayFromVolume(logic.results["confidence"])
        self.assertEqual(confidence.shape, ct.shape)
        self.assertTrue(0.0 <= float(confidence.min()) and float(confidence.max()) <= 1.0)
        self.assertIsNotNone(logic.results.get("reliability"))
        self.assertIsNotNone(logic.next_uncertain_slice(volume, labels))
        np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(labels, segmentId, volume), before)
        self.delayDisplay("Test passed")
