"""MisMatch for 3D Slicer: annotate a few slices, train in the background, segment, read the reliability diagram.

The four classes of Slicer's scripted-module template. The real work lives in ``MisMatchSegmentationLib``
(job folder, child process, state machine, plots, devices, install); training and segmentation run in the
engine (``Trainer/mismatch``) as a child process of Slicer's Python, never in the GUI process.

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

import logging  # noqa: E402  (after the version check)
import os  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

import qt  # noqa: E402
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from MisMatchSegmentationLib import devices, install, jobfolder, modelcard, process, reloading
from MisMatchSegmentationLib.jobfolder import JobError
from MisMatchSegmentationLib.logic import (MisMatchLogic, OverwriteNeedsConfirmation, SegmentRequest,
                                           TrainingRequest, check_outputs)
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
        # dialogs, replaceable by the self-test (a modal dialog would block an unattended run)
        self.errorDisplay = slicer.util.errorDisplay
        self.confirm = slicer.util.confirmOkCancelDisplay

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
        slicer.app.connect("aboutToQuit()", self.onAboutToQuit)

        self.ui.segmentSelector.connect("segmentSelectionChanged(QStringList)", self.onSegmentSelectionChanged)
        self.ui.labelSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onLabelSegmentationChanged)
        self.ui.addHeldOutSliceButton.connect("clicked(bool)", self.onAddHeldOutSlice)
        self.ui.markEmptySliceButton.connect("clicked(bool)", self.onMarkEmptySlice)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.resumeButton.connect("clicked(bool)", self.onResumeButton)
        self.ui.copyLogButton.connect("clicked(bool)", self.onCopyLog)
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
        if self.logic is not None:
            self.logic.shutdown()  # never leave an engine behind when the module goes away
        if self.timer is not None:
            self.timer.stop()
        try:
            slicer.app.disconnect("aboutToQuit()", self.onAboutToQuit)
        except (AttributeError, ValueError, TypeError):
            pass
        self.removeObservers()

    def onAboutToQuit(self) -> None:
        """Slicer is quitting: end every engine process tree now (a training would otherwise outlive Slicer)."""
        if self.logic is not None:
            self.logic.shutdown()
        process.kill_all()

    def onReload(self) -> None:
        """Reload the library too (Slicer reloads the module file only), after ending any running job: the
        reloaded widget would not know it."""
        if self.logic is not None:
            self.logic.shutdown()
        reloading.reload_library()
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        """The scene is closing: a running job is cancelled and its results discarded, the report, the
        uncertain-slice ranking, the visited slices and an interrupted run are forgotten, the panel is idle."""
        running = self.logic is not None and self.logic.running
        if self.logic is not None:
            self.logic.abandon()
        if running:
            self.state.abort(_("The scene was closed while a job ran: the job was cancelled and its results "
                               "discarded."))
        else:
            self.state.set_uncertainty(False)
            self.state.set_checkpoint(False)
        self.ui.progressBar.value = 0
        self._plotViews = {}  # their view nodes go with the scene
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
        self.state.set_outputs(self._outputsReason())
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
        return ""

    def _outputsReason(self) -> str:
        """Why Segment cannot write into the chosen outputs (an input of the job, the label segmentation), or "".
        A segmentation of the user's own is asked about when Segment is pressed."""
        p = self._parameterNode
        request = SegmentRequest(volumes=self.logic.volumes(p), model=None, segmentation=p.labelSegmentation,
                                 output_segmentation=p.outputSegmentation, confidence_volume=p.confidenceVolume,
                                 disagreement_volume=p.disagreementVolume, confirm_overwrite=True)
        try:
            check_outputs(request)
        except JobError as exc:
            text = str(exc)
            return text[:1].upper() + text[1:]
        return ""

    # -- what the panel shows -------------------------------------------------------------------------
    def _showState(self, view) -> None:
        for button, state in ((self.ui.trainButton, view.train), (self.ui.segmentButton, view.segment)):
            button.text = state.text
            button.toolTip = state.tooltip
            button.enabled = state.enabled
        self.ui.nextUncertainButton.enabled = view.next_uncertain
        self.ui.resumeButton.enabled = view.resume
        self.ui.resumeButton.visible = view.resume
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
        """Install what the engine needs on first use, with a progress dialog that shows pip's output (the torch
        download is several GB); a failure opens an error dialog that says what failed and what to do."""
        if not install.dependencies_missing():
            return True
        dialog = slicer.util.createProgressDialog(windowTitle=_("MisMatch: installing"), maximum=0,
                                                  labelText=_("Preparing the installation..."))
        heading = [""]

        def progress(text):
            heading[0] = text
            self._appendLog([text])
            dialog.labelText = text
            slicer.app.processEvents()

        def line(text):
            self._appendLog([text])
            dialog.labelText = heading[0] + "\n\n" + text[-160:]
            slicer.app.processEvents()

        try:
            with install.forward_log(line):
                install.ensure_dependencies(progress=progress)
            return True
        except install.InstallDeclined as exc:
            self.state.report(str(exc))
            return False
        except install.InstallFailed as exc:
            self.state.report(str(exc))
            self.ui.logCollapsibleButton.collapsed = False
            self.errorDisplay(str(exc), windowTitle=_("MisMatch: installation failed"), detailedText=exc.details)
            return False
        finally:
            dialog.close()

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
            self.state.set_checkpoint(False)  # a new training starts over: the interrupted one is gone
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
            try:
                check_outputs(request)
            except OverwriteNeedsConfirmation as exc:
                if not self.confirm(str(exc)[:1].upper() + str(exc)[1:] + "\n\n" + _("Replace them?")):
                    self.state.report(_("Not segmented: your segmentation was left as it is."))
                    return
                request.confirm_overwrite = True
            self.state.start_segmenting()
            self.logic.start_segmenting(request)
        except (JobError, ModelCardError, OSError, RuntimeError) as exc:
            self._failedToStart(exc)
            return
        self.ui.progressBar.value = 0
        self.timer.start()

    def onResumeButton(self) -> None:
        try:
            self.state.start_training(resume=True)
            self.logic.resume_training()
        except (JobError, ModelCardError, OSError, RuntimeError, TransitionError) as exc:
            self._failedToStart(exc)
            self.state.set_checkpoint(self.logic.interrupted is not None)
            return
        self.ui.progressBar.value = 0
        self.timer.start()

    def _appendLog(self, lines) -> None:
        """The engine's output (and the installers'), into the Log section and the Python console."""
        if not lines:
            return
        text = "\n".join(lines)
        self.ui.logTextEdit.appendPlainText(text)
        print(text)

    def onCopyLog(self) -> None:
        qt.QApplication.clipboard().setText(self.ui.logTextEdit.plainText)
        self.state.report(_("The log is on the clipboard.") + (
            " " + _("Full log file: {path}").format(path=self.logic.log_path) if self.logic.log_path else ""))

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
            if kind == "output":
                self._appendLog(event.get("lines"))
            elif kind in ("progress", "start", "status"):
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
                self._jobDone(event)
        if not self.logic.busy:
            self.timer.stop()

    def _jobDone(self, event) -> None:
        if self.state.state not in (State.TRAINING, State.SEGMENTING, State.CANCELLING):
            return  # the panel was re-armed meanwhile (scene closed)
        if self._parameterNode is None:  # no parameter node (module left, scene closing): no results to show
            self.state.finish(event["status"], event["message"])
            return
        if event["status"] == "failed":
            self.ui.logCollapsibleButton.collapsed = False
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
        self.state.set_checkpoint(self.logic.interrupted is not None)
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
                hint = self.logic.next_hint or _("slice {slice}: the decoders disagree most here").format(
                    slice=found[0])
                self.state.report(_("Label next, {hint} ({axis} axis). Correct it, then Train from the current "
                                    "model: a warm-start round, a quarter of the first training's steps.")
                                  .format(hint=hint, axis=self.logic.report_axis))

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
    """The module's own tests, run by Slicer's factory (``ctest``), by ``Slicer --testing`` and by the module's
    *Reload and Test* button. They need neither network nor GPU nor torch: the engine is the stand-in in
    ``MisMatchSegmentationTesting`` (plain Python that speaks the engine's contract), run by Slicer's own
    PythonSlicer launcher. The logic scenarios are the ones Testing/slicer/test_scenarios.py runs with
    slicer-core; the widget flows need the application and run only here.

    ``test_RealEngine`` trains the real engine on CTChest and needs torch and the Sample Data download: it is off
    by default (as in SlicerMONAIAuto3DSeg), on with the environment variable ``MISMATCH_TEST_REAL_ENGINE=1``.
    """

    TEST_METHODS = ("test_LogicTrainSegment", "test_LogicCancelKeepsCheckpoint", "test_LogicOutputsRefuseInputs",
                    "test_WidgetTrainProgressDone", "test_WidgetCancel", "test_WidgetSceneClosedMidJob",
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
        install.dependencies_missing = lambda *args: False
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
        return widget.state.state not in (State.TRAINING, State.SEGMENTING, State.CANCELLING)

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
        install.dependencies_missing = lambda *args: True
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
