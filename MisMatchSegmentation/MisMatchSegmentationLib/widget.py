"""The module's panel: the Qt widget of ``MisMatchSegmentation.py`` (Slicer finds it there by its name).

It binds the .ui file to the parameter node, starts jobs through the module's logic and shows their progress,
loss curve, results and reliability diagram; the work is done by the logic (``logic.py``) and the engine.
Unlike the rest of this package it needs the application (Qt, ``slicer.app``): Testing/slicer reads it with ast
(test_ui, test_module_file) and the module's in-Slicer self-test runs it.
"""

import logging
import os
from pathlib import Path

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from . import devices, install, jobfolder, modelcard, process, reloading
from .jobfolder import JobError
from .logic import OverwriteNeedsConfirmation, SegmentRequest, check_outputs
from .modelcard import ModelCardError
from .process import engine_environment, find_python
from .state import PanelStateMachine, State, TransitionError

DEVICE_SETTING = "MisMatch/Device"
POLL_INTERVAL_MS = 200


def _moduleLogic():
    """The module's logic (``MisMatchSegmentationLogic`` in the module file, which Slicer has loaded before it
    creates this widget; imported here, not at the top, because the module file imports this one)."""
    from MisMatchSegmentation import MisMatchSegmentationLogic

    return MisMatchSegmentationLogic()


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
        self.logic = _moduleLogic()

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
        self.ui.fillButton.connect("clicked(bool)", self.onFillButton)
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

    def setParameterNode(self, inputParameterNode) -> None:
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
            return _("Paint the structure with the Segment Editor first, on a few slices spread evenly over it")
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
        for button, state in ((self.ui.trainButton, view.train), (self.ui.segmentButton, view.segment),
                              (self.ui.fillButton, view.fill)):
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
    def _ensureDependencies(self, torch: bool = True) -> bool:
        """Install what the engine needs on first use, with a progress dialog that shows pip's output (the torch
        download is several GB; ``torch`` False: not for a job that runs without it, Fill); a failure opens an
        error dialog that says what failed and what to do."""
        if not install.dependencies_missing(torch=torch):
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
                install.ensure_dependencies(progress=progress, torch=torch)
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
        def start():
            request = self.logic.training_request(self._parameterNode, self._device())
            self.state.start_training()
            self.logic.start_training(request)
            self.state.set_checkpoint(False)  # a new training starts over: the interrupted one is gone
        self._startJob(State.TRAINING, start)

    def _replaceConfirmed(self, outputs: SegmentRequest, refused: str) -> bool:
        """Sets ``outputs.confirm_overwrite`` when the output segmentation is one of the user's own and they agree
        to replace it; False (with ``refused`` in the status line) when they do not. Other output problems raise
        :class:`JobError` (the panel shows them)."""
        try:
            check_outputs(outputs)
        except OverwriteNeedsConfirmation as exc:
            if not self.confirm(str(exc)[:1].upper() + str(exc)[1:] + "\n\n" + _("Replace them?")):
                self.state.report(refused)
                return False
            outputs.confirm_overwrite = True
        return True

    def _startJob(self, running: State, start, torch: bool = True) -> None:
        """Cancel the job of state ``running``, or start one: ``start()`` returns False when it did not start;
        ``torch``: whether the job's engine needs torch installed (not Fill)."""
        if self.state.state == running:
            self._cancel()
            return
        if not self._ensureDependencies(torch=torch):
            return
        try:
            if start() is False:
                return
        except (JobError, ModelCardError, OSError, RuntimeError) as exc:
            self._failedToStart(exc)
            return
        self.ui.progressBar.value = 0
        self.timer.start()

    def onSegmentButton(self) -> None:
        def start():
            request = self.logic.segment_request(self._parameterNode, self._device())
            if not self._replaceConfirmed(request, _("Not segmented: your segmentation was left as it is.")):
                return False
            self.state.start_segmenting()
            self.logic.start_segmenting(request)
        self._startJob(State.SEGMENTING, start)

    def onFillButton(self) -> None:
        def start():
            p = self._parameterNode
            request = self.logic.training_request(p, self._device(), continue_model=False)
            outputs = SegmentRequest(volumes=request.volumes, model=None, segmentation=p.labelSegmentation,
                                     output_segmentation=p.outputSegmentation)
            if not self._replaceConfirmed(outputs, _("Not filled: your segmentation was left as it is.")):
                return False
            self.state.start_filling()
            self.logic.start_filling(request, p.outputSegmentation, confirm_overwrite=outputs.confirm_overwrite)
        self._startJob(State.FILLING, start, torch=False)

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
        if self.state.state in (State.TRAINING, State.SEGMENTING, State.FILLING):
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
        if self.state.state not in (State.TRAINING, State.SEGMENTING, State.FILLING, State.CANCELLING):
            return  # the panel was re-armed meanwhile (scene closed)
        if self._parameterNode is None:  # no parameter node (module left, scene closing): no results to show
            self.state.finish(event["status"], event["message"])
            return
        if event["status"] == "failed":
            self.ui.logCollapsibleButton.collapsed = False
        if event["status"] == "completed" and event["job"] == "train":
            self._parameterNode.currentModelPath = str(self.logic.current_model)
            self._parameterNode.modelSource = "Current model"
        if event["status"] == "completed" and event["job"] == "fill":
            self._parameterNode.outputSegmentation = self.logic.results["segmentation"]
            self.state.set_uncertainty(bool(self.logic.report and self.logic.report.get("uncertain_slices")))
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
                                    "model: a warm-start round, a fifth of the first training's steps.")
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
            index = self.logic.slice_index_in_view(p.inputVolume, p.sliceOrientation, "Red")
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
