"""MisMatch for 3D Slicer: annotate a few slices, train in the background, segment, read the reliability diagram.

The four classes of Slicer's scripted-module template. The real work lives in ``MisMatchSegmentationLib``
(job folder, child process, state machine, plots, devices, install); training and segmentation run in the
engine (``Trainer/mismatch``) as a child process of Slicer's Python, never in the GUI process.
"""

import logging
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from MisMatchSegmentationLib import devices, install, jobfolder, modelcard
from MisMatchSegmentationLib.jobfolder import JobError
from MisMatchSegmentationLib.logic import MisMatchLogic, SegmentRequest, TrainingRequest
from MisMatchSegmentationLib.modelcard import ModelCardError
from MisMatchSegmentationLib.process import engine_environment, find_python
from MisMatchSegmentationLib.state import PanelStateMachine, State, TransitionError

HOMEPAGE = "https://github.com/mismatch-slicer/SlicerMisMatch"
DEVICE_SETTING = "MisMatch/Device"
POLL_INTERVAL_MS = 200

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
            "paint the structure on a few slices, press Train, then Segment; read the reliability diagram "
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
    steps: Annotated[int, WithinRange(10, 100000)] = 200
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
# MisMatchSegmentationWidget
#
class MisMatchSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.state = PanelStateMachine()
        self.timer = None
        self._plotViews = {}

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MisMatchSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MisMatchSegmentationLogic()

        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.onPoll)
        for plot in (self.ui.lossPlotWidget, self.ui.reliabilityPlotWidget):
            plot.setMinimumHeight(220)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentSelector.connect("segmentSelectionChanged(QStringList)", self.onSegmentSelectionChanged)
        self.ui.labelSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onLabelSegmentationChanged)
        self.ui.addHeldOutSliceButton.connect("clicked(bool)", self.onAddHeldOutSlice)
        self.ui.markEmptySliceButton.connect("clicked(bool)", self.onMarkEmptySlice)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.nextUncertainButton.connect("clicked(bool)", self.onNextUncertain)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.saveModelButton.connect("clicked(bool)", self.onSaveModel)
        self.ui.refreshDevicesButton.connect("clicked(bool)", self.onRefreshDevices)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)

        self._fillDevices([devices.Device("auto", _("Automatic (GPU if usable)")), devices.Device("cpu", "CPU")], "")
        self.state.listeners.append(self._showState)
        self.initializeParameterNode()
        self._showState(self.state.view())

    def cleanup(self) -> None:
        if self.logic is not None and self.logic.running:
            self.logic.cancel()  # never leave a training child behind when the module goes away
        if self.timer is not None:
            self.timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node -------------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not self._parameterNode.labelSegmentation:
            self._parameterNode.labelSegmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")

    def setParameterNode(self, inputParameterNode: Optional[MisMatchSegmentationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            if self._parameterNode.currentModelPath and os.path.isdir(self._parameterNode.currentModelPath):
                self.logic.current_model = Path(self._parameterNode.currentModelPath)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        self.ui.segmentSelector.setCurrentNode(p.labelSegmentation)
        segmentation = p.labelSegmentation.GetSegmentation() if p.labelSegmentation else None
        wanted = [s for s in p.segmentIDs.split(",") if s and segmentation and segmentation.GetSegment(s)]
        if list(self.ui.segmentSelector.selectedSegmentIDs()) != wanted:
            self.ui.segmentSelector.setSelectedSegmentIDs(wanted)
        self.state.set_inputs(bool(p.inputVolume), self._labelsReason())
        self.state.set_model(self.logic.current_model is not None)
        self._showModel()

    def onLabelSegmentationChanged(self, node) -> None:
        self.ui.segmentSelector.setCurrentNode(node)

    def onSegmentSelectionChanged(self, segmentIDs) -> None:
        if self._parameterNode is not None:
            self._parameterNode.segmentIDs = ",".join(segmentIDs)

    def _labelsReason(self) -> str:
        seg = self._parameterNode.labelSegmentation
        if seg is None:
            return _("Choose the segmentation that holds your labels")
        if seg.GetSegmentation().GetNumberOfSegments() == 0:
            return _("Paint the structure on a few slices with the Segment Editor first")
        if self._parameterNode.outputSegmentation is seg:
            return _("The output segmentation must not be your label segmentation")
        return ""

    # -- what the panel shows -------------------------------------------------------------------------
    def _showState(self, view) -> None:
        for button, state in ((self.ui.trainButton, view.train), (self.ui.segmentButton, view.segment)):
            button.text = state.text
            button.toolTip = state.tooltip
            button.enabled = state.enabled
        self.ui.nextUncertainButton.enabled = view.next_uncertain
        self.ui.saveModelButton.enabled = view.save_model
        self.ui.importModelButton.enabled = view.import_model
        for section in (self.ui.inputsCollapsibleButton, self.ui.modelCollapsibleButton,
                        self.ui.trainingCollapsibleButton, self.ui.outputsCollapsibleButton):
            section.enabled = view.edit_inputs
        self.ui.progressBar.visible = view.progress_visible
        self.ui.statusLabel.text = view.status

    def _showModel(self) -> None:
        path = self.logic.current_model
        if path is None:
            self.ui.modelInfoLabel.text = _("none: train one, or load a saved model")
            return
        try:
            self.ui.modelInfoLabel.text = modelcard.describe(modelcard.read_card(path, check_weights=False))
        except ModelCardError as exc:
            self.ui.modelInfoLabel.text = str(exc)

    def _showChart(self, plotWidget, chartNode) -> None:
        if chartNode is None:
            return
        key = plotWidget.objectName
        viewNode = self._plotViews.get(key)
        if viewNode is None or viewNode.GetScene() is None:
            viewNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotViewNode", f"MisMatch {key}")
            self._plotViews[key] = viewNode
            plotWidget.setMRMLPlotViewNode(viewNode)
        viewNode.SetPlotChartNodeID(chartNode.GetID())

    # -- devices --------------------------------------------------------------------------------------
    def _fillDevices(self, deviceList, message) -> None:
        combo = self.ui.deviceComboBox
        wanted = qt.QSettings().value(DEVICE_SETTING, "auto")
        combo.blockSignals(True)
        combo.clear()
        for device in deviceList:
            combo.addItem(device.label, device.id)
        index = max(0, combo.findData(wanted))
        combo.setCurrentIndex(index)
        combo.blockSignals(False)
        self.ui.deviceMessageLabel.text = message
        self.ui.deviceMessageLabel.visible = bool(message)

    def onRefreshDevices(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not look for GPUs."), waitCursor=True):
            probe = devices.probe_devices(find_python(), env=engine_environment())
            found, message = devices.describe(probe)
            self._fillDevices([devices.Device("auto", _("Automatic (GPU if usable)"))] + found, message)

    def onDeviceChanged(self, index) -> None:
        qt.QSettings().setValue(DEVICE_SETTING, self.ui.deviceComboBox.itemData(index) or "auto")

    def _device(self) -> str:
        return self.ui.deviceComboBox.currentData or "auto"

    # -- actions --------------------------------------------------------------------------------------
    def _ensureDependencies(self) -> bool:
        try:
            with slicer.util.WaitCursor():
                install.ensure_dependencies()
            return True
        except install.InstallDeclined as exc:
            self.state.report(str(exc))
            return False

    def onTrainButton(self) -> None:
        if self.state.state == State.TRAINING:
            self._cancel()
            return
        if not self._ensureDependencies():
            return
        try:
            request = self.logic.trainingRequest(self._parameterNode, self._device())
            self.state.start_training()
            self.logic.start_training(request)
        except (JobError, ModelCardError, OSError, RuntimeError) as exc:
            self._failedToStart(exc)
            return
        self.ui.progressBar.value = 0
        self.timer.start()

    def onSegmentButton(self) -> None:
        if self.state.state == State.SEGMENTING:
            self._cancel()
            return
        if not self._ensureDependencies():
            return
        try:
            request = self.logic.segmentRequest(self._parameterNode, self._device())
            self.state.start_segmenting()
            self.logic.start_segmenting(request)
        except (JobError, ModelCardError, OSError, RuntimeError) as exc:
            self._failedToStart(exc)
            return
        self.ui.progressBar.value = 0
        self.timer.start()

    def _failedToStart(self, exc) -> None:
        if self.state.state in (State.TRAINING, State.SEGMENTING):
            self.state.finish("failed", str(exc))
        else:
            self.state.report(_("Cannot start: ") + str(exc))

    def _cancel(self) -> None:
        try:
            self.state.request_cancel()
        except TransitionError:
            return
        self.logic.cancel()

    def onPoll(self) -> None:
        for event in self.logic.poll():
            kind = event.get("event")
            if kind in ("progress", "start", "status"):
                self.ui.progressBar.value = int(round(100 * self.logic.fraction))
                if self.state.state != State.CANCELLING:
                    self.state.report(event["message"] if kind == "status" else self.logic.status)
                if kind == "progress" and event.get("phase") == "train":
                    self._showChart(self.ui.lossPlotWidget, self.logic.loss_curve.chart)
            elif kind == "log" and event.get("level") == "warning":
                logging.warning("MisMatch: %s", event.get("message"))
            elif kind == "log":
                logging.info("MisMatch: %s", event.get("message"))
            elif kind == "done":
                self.timer.stop()
                self._jobDone(event)

    def _jobDone(self, event) -> None:
        if event["status"] == "completed" and event["job"] == "train":
            self._parameterNode.currentModelPath = str(self.logic.current_model)
            self._parameterNode.modelSource = "Current model"
        if event["status"] == "completed" and event["job"] == "segment":
            results = self.logic.results
            with slicer.util.NodeModify(self._parameterNode):
                self._parameterNode.outputSegmentation = results["segmentation"]
                self._parameterNode.confidenceVolume = results["confidence"]
                self._parameterNode.disagreementVolume = results["disagreement"]
            slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume,
                                             foreground=results["confidence"], foregroundOpacity=0.4)
            self._showChart(self.ui.reliabilityPlotWidget, results.get("reliability"))
            self.state.set_uncertainty(bool(self.logic.report and self.logic.report.get("uncertain_slices")))
        self.state.finish(event["status"], event["message"])
        self.state.set_model(self.logic.current_model is not None)
        self._showModel()

    def onNextUncertain(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not go to the next uncertain slice."), waitCursor=True):
            found = self.logic.next_uncertain_slice(p.inputVolume, p.labelSegmentation,
                                                    [s for s in p.segmentIDs.split(",") if s])
            if found is None:
                self.state.report(_("Every slice in the uncertainty ranking is labelled: segment again."))
            else:
                self.state.report(_("Slice {slice} ({axis} axis): the decoders disagree most here among the "
                                    "unlabelled slices. Correct it, then Train from the current model.")
                                  .format(slice=found[0], axis=self.logic.report_axis))

    def onAddHeldOutSlice(self) -> None:
        self._addCurrentSlice("heldOutSlices", "held-out slices")

    def onMarkEmptySlice(self) -> None:
        self._addCurrentSlice("emptySlices", "empty slices")

    def _addCurrentSlice(self, field: str, what: str) -> None:
        """Add the red view's slice index (along the training axis) to the slice list in parameter ``field``."""
        p = self._parameterNode
        if not p.inputVolume:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not read the red view's slice."), waitCursor=False):
            index = self.logic.sliceIndexInView(p.inputVolume, p.sliceOrientation, "Red")
            slices = sorted(set(jobfolder.parse_slices(getattr(p, field), what)) | {index})
            setattr(p, field, ", ".join(str(s) for s in slices))

    def onImportModel(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Load a MisMatch model folder"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("This folder is not a usable MisMatch model."), waitCursor=True):
            card = self.logic.load_model(folder)
            self._parameterNode.currentModelPath = str(self.logic.current_model)
            self.state.set_model(True)
            self.state.report(_("Loaded: ") + modelcard.describe(card))
            self._showModel()

    def onSaveModel(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Save the model into a folder"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not save the model."), waitCursor=True):
            saved = self.logic.save_model(folder)
            self.state.report(_("Model saved to {folder}.").format(folder=saved))


#
# MisMatchSegmentationLogic
#
class MisMatchSegmentationLogic(ScriptedLoadableModuleLogic, MisMatchLogic):
    """Batch-mode entry point: everything the panel does, without the panel (see MisMatchLogic)."""

    def __init__(self, **kwargs) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        MisMatchLogic.__init__(self, **kwargs)

    def getParameterNode(self):
        return MisMatchSegmentationParameterNode(super().getParameterNode())

    @staticmethod
    def volumes(p) -> list:
        return [v for v in (p.inputVolume, p.secondChannel, p.thirdChannel) if v is not None]

    def trainingRequest(self, p, device: str = "auto") -> TrainingRequest:
        init = None
        if p.modelSource == "Current model":
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

    def segmentRequest(self, p, device: str = "auto") -> SegmentRequest:
        return SegmentRequest(
            volumes=self.volumes(p), model=self.current_model, device=device, segmentation=p.labelSegmentation,
            held_out=jobfolder.parse_slices(p.heldOutSlices),
            empty_slices=jobfolder.parse_slices(p.emptySlices, "empty slices"),
            output_segmentation=p.outputSegmentation, confidence_volume=p.confidenceVolume,
            disagreement_volume=p.disagreementVolume)

    def sliceIndexInView(self, volume, orientation: str, viewName: str = "Red") -> int:
        """Index, along the training slice axis, of the slice shown in a slice view (world coordinates: the
        volume's parent transforms are honoured)."""
        sliceNode = slicer.app.layoutManager().sliceWidget(viewName).mrmlSliceNode()
        ras = [sliceNode.GetSliceToRAS().GetElement(r, 3) for r in range(3)]
        return jobfolder.slice_index_at(volume, jobfolder.axis_for_orientation(volume, orientation), ras)

    def waitForJob(self, timeout: float = 600.0) -> list:
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
    """Loads CTChest from Sample Data, labels the lungs on a few slices, trains a few steps on the CPU,
    segments, and checks the outputs. Runs on the Slicer factory (downloads torch through the PyTorch
    extension when it is missing)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_TrainSegmentFewSlices()

    def test_TrainSegmentFewSlices(self):
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
        done = logic.waitForJob(timeout=600)[-1]
        self.assertEqual(done["status"], "completed", done["message"])
        self.assertIsNotNone(logic.current_model)

        self.delayDisplay("Segmenting")
        logic.start_segmenting(SegmentRequest(volumes=[volume], model=logic.current_model, device="cpu",
                                              segmentation=labels, held_out=[labelled[1]]))
        done = logic.waitForJob(timeout=600)[-1]
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
