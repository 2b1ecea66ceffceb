"""MedVol-R1 for 3D Slicer: ask a question about a scan, see the evidence (key slice + boxes), get a segment.

Only Slicer glue and UI live here.  Model work comes from MedVolR1Lib (the same core as the CLI);
MRML mapping, the ROI edit debounce and the background job live in the Qt-free MedVolR1SlicerGlue
package so they are tested without the Slicer application.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _ensureLibraryImportable() -> None:
    """Installed extension: MedVolR1Lib sits beside this file.  Source tree: it sits in the repository root."""
    if importlib.util.find_spec("MedVolR1Lib") is not None:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (here, os.path.dirname(here)):
        if os.path.isdir(os.path.join(folder, "MedVolR1Lib")) and folder not in sys.path:
            sys.path.insert(0, folder)
            return


_ensureLibraryImportable()

from MedVolR1Lib.errors import AnchorError, MedVolR1Error  # noqa: E402
from MedVolR1SlicerGlue import deps  # noqa: E402
from MedVolR1SlicerGlue import evidence_edits  # noqa: E402
from MedVolR1SlicerGlue import model_source  # noqa: E402
from MedVolR1SlicerGlue import mrml_mapping as mm  # noqa: E402
from MedVolR1SlicerGlue.edits import RoiEditWatcher  # noqa: E402
from MedVolR1SlicerGlue import settings as panel_settings  # noqa: E402
from MedVolR1SlicerGlue.preencode import BackgroundEncoding  # noqa: E402
from MedVolR1SlicerGlue.session import EvidenceSession, Outcome, default_pipeline_factory  # noqa: E402
from MedVolR1SlicerGlue.settings import (  # noqa: E402
    DEVICE_CHOICES,
    PROPAGATOR_CHOICES,
    PanelSettings,
    UserSettings,
    has_evidence_model,
)
from MedVolR1SlicerGlue.slots import reporting  # noqa: E402

EDIT_DEBOUNCE_MS = 400
POLL_INTERVAL_MS = 100
PREENCODE_POLL_MS = 250


def _showError(message, details=None) -> None:
    slicer.util.errorDisplay(message, windowTitle=_("MedVol-R1"), detailedText=details)


# Every Qt slot of the panel: any exception it raises is shown to the user as one message.
_slot = reporting(_showError)


class _ApplicationSettings:
    """MedVolR1SlicerGlue.settings.SettingsStore over Slicer's application settings (qt.QSettings)."""

    def value(self, key: str) -> str:
        value = qt.QSettings().value(key)
        return "" if value is None else str(value)

    def set_value(self, key: str, value: str) -> None:
        qt.QSettings().setValue(key, value)


#
# Module
#


class MedVolR1(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedVol-R1")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedVol-R1 developers (MedVol-R1 project)"]
        self.parent.helpText = _(
            "Draw a box around a structure on one axial slice (or let a trained evidence model find the slice and "
            "boxes from a question) and get its 3D segment. Move a box, add boxes on other slices, or limit how far "
            "up or down the segment may reach, and the segment follows; Undo steps back. Research use only. "
            "MedVol-R1 needs 3D Slicer 5.10 or later. "
            'See the <a href="https://github.com/medvol-r1/SlicerMedVolR1/blob/main/docs/slicer_module.md">module documentation</a>.'
        )
        self.parent.acknowledgementText = _(
            "Uses Qwen2.5-VL (Alibaba), SAM2 (Meta), MedSAM2 and LiteMedSAM (Bo Wang lab), and the TotalSegmentator "
            "example CT (Wasserthal et al.) for the sample data."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data
#


def registerSampleData() -> None:
    """The example CT in the Sample Data module (category MedVol-R1), as Slicer's module template registers data.

    The CT sits inside TotalSegmentator's sdist on PyPI (sha256-checked by MedVolR1Lib.sample_data), so a
    custom downloader fetches and loads it instead of a plain URL."""
    import SampleData

    iconsPath = os.path.join(os.path.dirname(__file__), "Resources/Icons")
    logic = SampleData.SampleDataLogic
    if hasattr(logic, "registerCustomSampleDataCategory"):
        logic.registerCustomSampleDataCategory("MedVol-R1", title=_("MedVol-R1"))
    logic.registerCustomSampleDataSource(
        category="MedVol-R1",
        sampleName="MedVolR1AbdomenCT",
        thumbnailFileName=os.path.join(iconsPath, "MedVolR1AbdomenCT.png"),
        nodeNames="MedVolR1AbdomenCT",
        customDownloader=_loadSampleCT,
    )


@_slot
def _loadSampleCT(source=None):
    from MedVolR1Lib.sample_data import fetch_sample

    with slicer.util.WaitCursor():
        sample = fetch_sample()
    return slicer.util.loadVolume(str(sample.ct_path), {"name": "MedVolR1AbdomenCT"})


#
# Parameter node
#


@parameterNodeWrapper
class MedVolR1ParameterNode:
    """Panel state, saved with the scene.  Combo boxes are synced by the widget (see _syncCombos)."""

    inputVolume: vtkMRMLScalarVolumeNode
    query: str = ""
    model: str = ""
    adapter: str = ""
    propagator: str = "auto"
    samCheckpoint: str = ""
    device: str = "auto"
    # Worker Python, server address and token file are application settings, never here: a scene must not
    # name a program to run or a server to send a scan to (MedVolR1SlicerGlue.settings.USER_SETTING_KEYS).
    outputSegmentation: vtkMRMLSegmentationNode


class _QtSingleShot:
    """qt.QTimer adapter for RoiEditWatcher (restarting it merges a burst of drag ends into one run)."""

    def __init__(self):
        self._callback = None
        self._timer = qt.QTimer()
        self._timer.setSingleShot(True)
        self._timer.connect("timeout()", self._fire)

    def start(self, delay_ms, callback):
        self._callback = callback
        self._timer.start(int(delay_ms))

    def stop(self):
        self._timer.stop()

    def _fire(self):
        if self._callback is not None:
            self._callback()


#
# Widget
#


class MedVolR1Widget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._watcher = None
        self._pollTimer = None
        self._syncingCombos = False
        self._preencode = None
        self._preencodeTimer = None
        self._preencodeInput = None
        self._preencodeLabel = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedVolR1.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MedVolR1Logic()
        self._watcher = RoiEditWatcher(self.onEvidenceEdited, _QtSingleShot(), EDIT_DEBOUNCE_MS)
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPoll)

        self.ui.propagatorComboBox.addItems(list(PROPAGATOR_CHOICES))
        # Where the models run is this computer's setting (QSettings), never the scene's.
        self._userStore = self.logic.userStore
        user = panel_settings.load_user_settings(self._userStore)
        self.ui.serverLineEdit.text = user.server_url
        self.ui.serverTokenLineEdit.text = user.server_token_file
        self.ui.pythonLineEdit.text = user.python_executable
        # No torch import and no CUDA in Slicer's process: the list is what this OS can have; "Check" asks the worker.
        self.ui.deviceComboBox.addItems(list(self._deviceChoices()))
        self.ui.deviceLabel.text = _("checked when a run starts")
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setEnabled(False)
        # Supported versions: said when the panel opens, before anything can be downloaded.
        self._unsupported = deps.python_support()
        if self._unsupported:
            self.ui.statusLabel.text = self._unsupported
        elif (deps.run_mode(user.server_url, user.python_executable) == "slicer" and not deps.torch_available_for()
              and not deps.is_installed(deps.TORCH)):  # Slicer's x86_64 Python on a Mac: said before any download
            self.ui.statusLabel.text = _("PyTorch cannot be installed into this Slicer's Python on this Mac: choose a "
                                         "Worker Python or a Server under Advanced (Segment shows how).")

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.findEvidenceButton.connect("clicked(bool)", self.onFindEvidence)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.addBoxButton.connect("clicked(bool)", self.onAddBox)
        self.ui.removeBoxButton.connect("clicked(bool)", self.onRemoveBox)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.limitTopButton.connect("clicked(bool)", lambda: self.onLimitExtent("top"))
        self.ui.limitBottomButton.connect("clicked(bool)", lambda: self.onLimitExtent("bottom"))
        self.ui.clearLimitButton.connect("clicked(bool)", self.onClearLimits)
        self.ui.evidenceListWidget.connect("itemClicked(QListWidgetItem*)", self.onEvidenceItemClicked)
        self.ui.evidenceListWidget.connect("itemSelectionChanged()", self._updateButtons)
        self.ui.detectDevicesButton.connect("clicked(bool)", self.onDetectDevices)
        for lineEdit in (self.ui.serverLineEdit, self.ui.serverTokenLineEdit, self.ui.pythonLineEdit):
            lineEdit.connect("editingFinished()", self.onUserSettingsChanged)
        self.ui.propagatorComboBox.connect("currentIndexChanged(int)", self.onPropagatorChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.modelBrowseButton.connect("clicked(bool)", lambda: self._browse(self.ui.modelLineEdit, folder=True))
        self.ui.adapterBrowseButton.connect("clicked(bool)", lambda: self._browse(self.ui.adapterLineEdit, folder=True))
        self.ui.samCheckpointBrowseButton.connect("clicked(bool)", lambda: self._browse(self.ui.samCheckpointLineEdit, folder=False))
        self.ui.serverTokenBrowseButton.connect("clicked(bool)", lambda: self._browse(self.ui.serverTokenLineEdit, folder=False, title=_("Choose the token file"), userSetting=True))
        self.ui.pythonBrowseButton.connect("clicked(bool)", lambda: self._browse(self.ui.pythonLineEdit, folder=False, title=_("Choose a Python interpreter"), userSetting=True))

        self._setupPreEncoding()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._preencodeTimer is not None:
            self._preencodeTimer.stop()
        self.removeObservers()
        if self.logic is not None:
            self.logic.shutdown()
        if self._watcher is not None:
            self._watcher.clear()
        if self._pollTimer is not None:
            self._pollTimer.stop()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    @_slot
    def onSceneStartClose(self, caller, event) -> None:
        self._preencode.close()
        self._preencodeInput = None
        self.logic.session.cancel()
        self._watcher.clear()
        self.setParameterNode(None)

    @_slot
    def onSceneEndClose(self, caller, event) -> None:
        self.logic.resetSession()
        self._preencode.session = self.logic.session
        self.logic.session.background = self._preencode
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._syncCombos()
            self._updateButtons()
            self._refreshEvidenceList()

    # ---------------------------------------------------------------------------------------------- GUI state
    def _syncCombos(self) -> None:
        """Parameter node -> combo boxes.  Not bound by connectGui: QComboBoxToStringableConnector needs a fixed
        Choice annotation, and the device list depends on this machine.  Signals are ignored while syncing, or
        setting the first combo would write the second combo's stale text back into the parameter node."""
        self._syncingCombos = True
        try:
            for combo, value in ((self.ui.propagatorComboBox, self._parameterNode.propagator), (self.ui.deviceComboBox, self._parameterNode.device)):
                index = combo.findText(value)
                combo.setCurrentIndex(index if index >= 0 else 0)
        finally:
            self._syncingCombos = False
        # A saved value this machine lacks (e.g. 'cuda' in a scene from another computer) falls back to the first item.
        self.onPropagatorChanged()
        self.onDeviceChanged()

    @_slot
    def onPropagatorChanged(self, _index=None) -> None:
        if self._parameterNode and not self._syncingCombos and self._parameterNode.propagator != self.ui.propagatorComboBox.currentText:
            self._parameterNode.propagator = self.ui.propagatorComboBox.currentText

    @_slot
    def onDeviceChanged(self, _index=None) -> None:
        if self._parameterNode and not self._syncingCombos and self._parameterNode.device != self.ui.deviceComboBox.currentText:
            self._parameterNode.device = self.ui.deviceComboBox.currentText

    def _userSettings(self) -> UserSettings:
        return panel_settings.load_user_settings(self._userStore)

    def _deviceChoices(self) -> tuple:
        user = self._userSettings()
        return panel_settings.device_choices(deps.run_mode(user.server_url, user.python_executable))

    def _setDeviceItems(self, choices) -> None:
        self._syncingCombos = True
        try:
            self.ui.deviceComboBox.clear()
            self.ui.deviceComboBox.addItems([d for d in DEVICE_CHOICES if d in choices])
        finally:
            self._syncingCombos = False
        if self._parameterNode:
            self._syncCombos()

    @_slot
    def onUserSettingsChanged(self) -> None:
        """Server, token file or worker Python edited: saved in the application settings (not the scene)."""
        panel_settings.save_user_settings(self._userStore, UserSettings(
            python_executable=self.ui.pythonLineEdit.text, server_url=self.ui.serverLineEdit.text,
            server_token_file=self.ui.serverTokenLineEdit.text))
        self._setDeviceItems(self._deviceChoices())
        self._updateButtons()

    @_slot
    def onDetectDevices(self) -> None:
        """On request only, and never in Slicer's process: the worker's Python imports torch and asks CUDA."""
        user = self._userSettings()
        if deps.run_mode(user.server_url, user.python_executable) == "server":
            self.ui.deviceLabel.text = _("the server checks its own devices")
            return
        from MedVolR1Lib.service.client import default_python

        with slicer.util.WaitCursor():
            devices = panel_settings.detect_devices(default_python(user.python_executable))
        allowed = self._deviceChoices()
        self._setDeviceItems([d for d in devices.choices if d in allowed])
        self.ui.deviceLabel.text = devices.summary

    @_slot
    def _updateButtons(self, caller=None, event=None) -> None:
        busy = self.logic is not None and self.logic.session.busy
        unsupported = bool(getattr(self, "_unsupported", None))  # this Slicer is too old: nothing can run
        node = self._parameterNode.inputVolume if self._parameterNode else None
        hasVolume = node is not None
        hasQuery = bool(self._parameterNode and self._parameterNode.query.strip())
        settings = self.logic.settingsFrom(self._parameterNode) if self._parameterNode else None
        hasModel = settings is not None and has_evidence_model(settings)
        hasEvidence = hasVolume and bool(mm.evidence_rois(slicer.mrmlScene, node))
        self.ui.findEvidenceButton.enabled = not busy and not unsupported and hasVolume and hasQuery and hasModel
        self.ui.segmentButton.enabled = not busy and not unsupported and hasVolume and (hasEvidence or (hasQuery and hasModel))
        self.ui.cancelButton.enabled = busy
        noModelHint = _("Finding evidence needs a trained evidence model: open Advanced and set 'Evidence model' to its "
                        "Hugging Face name or folder. Without one, draw an evidence box on the key slice and press Segment.")
        if not hasModel:
            self.ui.findEvidenceButton.toolTip = noModelHint
        elif not hasQuery:
            self.ui.findEvidenceButton.toolTip = _("Type a question first")
        else:
            self.ui.findEvidenceButton.toolTip = _("Ask the evidence model for the key slice and boxes")
        self.ui.evidenceModelHintLabel.text = "" if hasModel else noModelHint
        self.ui.evidenceModelHintLabel.visible = not hasModel
        self.ui.addBoxButton.text = _("Add box on this slice") if hasEvidence else _("Draw evidence box")
        self.ui.addBoxButton.enabled = hasVolume
        self.ui.removeBoxButton.enabled = not busy and self._selectedRoi() is not None
        self.ui.undoButton.enabled = not busy and self.logic is not None and self.logic.session.history.can_undo
        for button in (self.ui.limitTopButton, self.ui.limitBottomButton):
            button.enabled = not busy and hasVolume
        self.ui.clearLimitButton.enabled = not busy and hasVolume and evidence_edits.extent_limit(node) is not None
        self.ui.extentLabel.text = self.logic.extentText(node) if hasVolume else _("Extent: whole scan")
        self._followInputVolume(node, settings)

    def _refreshEvidenceList(self) -> None:
        """One line per evidence box, with its slice as Slicer shows it; keeps the selection."""
        selected = self._selectedRoi()
        self.ui.evidenceListWidget.clear()
        node = self._parameterNode.inputVolume if self._parameterNode else None
        if node is None:
            return
        try:
            listed = evidence_edits.evidence_list(slicer.mrmlScene, node)  # the node's cached grid: no voxel copy
        except MedVolR1Error:
            return
        if listed:
            for roi, label in listed:
                item = qt.QListWidgetItem(f"{roi.GetName()}: {label}")
                item.setData(qt.Qt.UserRole, roi.GetID())
                self.ui.evidenceListWidget.addItem(item)
                if roi is selected:
                    self.ui.evidenceListWidget.setCurrentItem(item)
        self._updateButtons()

    def _selectedRoi(self):
        item = self.ui.evidenceListWidget.currentItem()
        return slicer.mrmlScene.GetNodeByID(item.data(qt.Qt.UserRole)) if item is not None else None

    @_slot
    def onEvidenceItemClicked(self, item) -> None:
        roi = slicer.mrmlScene.GetNodeByID(item.data(qt.Qt.UserRole))
        if roi is not None:
            center, _size = mm.roi_center_size(roi)
            self.logic.jumpAllSlices(center)
        self._updateButtons()

    @_slot
    def _browse(self, lineEdit, folder: bool, title: str = "", userSetting: bool = False) -> None:
        start = lineEdit.text or os.path.expanduser("~")
        if folder:
            path = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Choose a folder"), start)
        else:
            path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), title or _("Choose the MedSAM2 checkpoint"), start)
        if path:
            lineEdit.text = path  # emits textChanged, which QLineEditToStrConnector observes
            if userSetting:
                self.onUserSettingsChanged()

    def _setBusy(self, busy: bool, message: str = "") -> None:
        self.ui.progressBar.setVisible(busy)
        if busy:
            self.ui.progressBar.setValue(0)
            self._pollTimer.start()
        else:
            self._pollTimer.stop()
        if message:
            self.ui.statusLabel.text = message
        self._updateButtons()

    # ------------------------------------------------------------------------------------------------ actions
    def _start(self, action: str) -> None:
        settings = self.logic.settingsFrom(self._parameterNode)
        volumeNode, query = self._parameterNode.inputVolume, self._parameterNode.query
        local = not settings.server_url
        needsModel = action == "evidence" or not mm.evidence_rois(slicer.mrmlScene, volumeNode)
        try:
            installed = self.logic.ensureDependencies(settings)
        except (RuntimeError, deps.UnsupportedPython) as exc:  # refused plan, pip failure, old torch
            slicer.util.errorDisplay(str(exc), windowTitle=_("MedVol-R1: install dependencies"))
            return
        if not installed:
            self.ui.statusLabel.text = _("Missing Python packages were not installed; nothing was run")
            return
        if not self._uploadAllowed(settings):
            return
        if needsModel and local and not self._modelIsHere(settings):  # a server fetches its own models
            return
        self._useSelectedSegmentation()
        try:
            if action == "evidence":
                self.logic.session.start_find_evidence(volumeNode, query, settings)
            else:
                self.logic.session.start_segment(volumeNode, query, settings)
        except (MedVolR1Error, ValueError) as exc:
            slicer.util.errorDisplay(str(exc), windowTitle=_("MedVol-R1"))
            return
        self._setBusy(True, _("Finding evidence...") if action == "evidence" else _("Segmenting..."))

    def _uploadAllowed(self, settings: PanelSettings) -> bool:
        """Server mode: the first scan sent to a server is confirmed by the user, and the answer remembered for it."""
        if not settings.server_url:
            return True
        if panel_settings.confirm_upload(self._userStore, settings.server_url, lambda question: slicer.util.confirmOkCancelDisplay(
                question, windowTitle=_("MedVol-R1: send the scan to a server?"))):
            return True
        self.ui.statusLabel.text = _("Nothing was sent to the server; nothing was run")
        return False

    def _useSelectedSegmentation(self) -> None:
        """Every run writes into the segmentation chosen in the selector (None: a new one is created)."""
        self.logic.session.segmentation_node = self._parameterNode.outputSegmentation

    def _modelIsHere(self, settings: PanelSettings) -> bool:
        """A Hugging Face id not downloaded yet: ask (several GB), then download with a progress dialog."""
        plan = model_source.download_plan(settings.model)
        if not model_source.confirm_download(plan, lambda text: slicer.util.confirmOkCancelDisplay(text, windowTitle=_("MedVol-R1: download the evidence model"))):
            self.ui.statusLabel.text = _("The evidence model was not downloaded; nothing was run")
            return False
        if plan is None:
            return True
        download = model_source.ModelDownload(plan.repo_id).start()
        dialog = slicer.util.createProgressDialog(parent=slicer.util.mainWindow(), value=0, maximum=100,
                                                  windowTitle=_("MedVol-R1"), labelText=_("Downloading {model}").format(model=plan.repo_id))
        try:
            while not download.done:  # pump loop: sleep releases the GIL so the download thread runs at full speed
                if dialog.wasCanceled:
                    download.cancel()
                dialog.setValue(int(100 * download.progress.fraction))
                dialog.setLabelText(_("Downloading {model}: {progress}").format(model=plan.repo_id, progress=download.progress.message))
                slicer.app.processEvents()
                time.sleep(0.1)
        finally:
            dialog.close()
        if download.error is not None:
            slicer.util.errorDisplay(_("The evidence model could not be downloaded: ") + str(download.error), windowTitle=_("MedVol-R1"))
            return False
        return True

    @_slot
    def onFindEvidence(self) -> None:
        self._start("evidence")

    @_slot
    def onSegment(self) -> None:
        self._start("segmentation")

    @_slot
    def onCancel(self) -> None:
        self._preencode.stop()
        self.logic.session.cancel()
        self.ui.statusLabel.text = _("Cancelling...")

    @_slot
    def onAddBox(self) -> None:
        """"Draw evidence box" / "Add box on this slice": a box on the Red view's slice, to drag onto the target.
        Nothing runs until the user moves it (the drag ends -> the segment follows)."""
        try:
            roi = self.logic.addBox(self._parameterNode.inputVolume)
        except MedVolR1Error as exc:
            slicer.util.errorDisplay(str(exc), windowTitle=_("MedVol-R1"))
            return
        self._watcher.add(roi)
        self._refreshEvidenceList()
        self.ui.statusLabel.text = _("Drag the box's handles around the target on this slice; then press Segment (or, "
                                     "once there is a segment, it follows when you let go)")

    @_slot
    def onRemoveBox(self) -> None:
        roi = self._selectedRoi()
        try:
            remaining = self.logic.removeBox(self._parameterNode.inputVolume, roi)
        except MedVolR1Error as exc:
            slicer.util.errorDisplay(str(exc), windowTitle=_("MedVol-R1"))
            return
        self._refreshEvidenceList()
        if remaining:
            self._evidenceChanged(remaining[0], _("Box removed: updating the segment..."))
        else:
            self.ui.statusLabel.text = _("No evidence boxes left; the segment was left as it is")

    @_slot
    def onLimitExtent(self, side: str) -> None:
        node = self._parameterNode.inputVolume
        try:
            self.logic.limitExtent(node, side)
        except MedVolR1Error as exc:
            slicer.util.errorDisplay(str(exc), windowTitle=_("MedVol-R1: extent limit not changed"))
            return
        self._updateButtons()
        self._evidenceChanged(None, _("Extent limited: updating the segment..."))

    @_slot
    def onClearLimits(self) -> None:
        evidence_edits.set_extent_limit(self._parameterNode.inputVolume, None)
        self._updateButtons()
        self._evidenceChanged(None, _("Extent limits cleared: updating the segment..."))

    @_slot
    def onUndo(self) -> None:
        self._useSelectedSegmentation()
        try:
            rois = self.logic.undo(self._parameterNode.inputVolume)
        except (ValueError, MedVolR1Error) as exc:
            self.ui.statusLabel.text = str(exc)
            return
        self._watcher.watch(rois)
        self._refreshEvidenceList()
        self.ui.statusLabel.text = _("Undone: the previous boxes, limits and segment are back")

    def _evidenceChanged(self, roi, message: str) -> None:
        """Boxes or limits changed: re-propagate when a segment exists (cached image features, no model call)."""
        node = self._parameterNode.inputVolume
        rois = mm.evidence_rois(slicer.mrmlScene, node)
        if not rois:
            return
        self._useSelectedSegmentation()
        try:
            job = self.logic.session.on_roi_edited(roi if roi is not None else rois[0], self.logic.settingsFrom(self._parameterNode))
        except MedVolR1Error as exc:
            slicer.util.errorDisplay(str(exc), windowTitle=_("MedVol-R1"))
            return
        if job is not None or self.logic.session.busy:
            self._setBusy(True, message)

    @_slot
    def onEvidenceEdited(self, roi) -> None:
        """End of a user drag (debounced): re-propagate from the moved evidence."""
        self._refreshEvidenceList()
        self._useSelectedSegmentation()
        try:
            job = self.logic.session.on_roi_edited(roi, self.logic.settingsFrom(self._parameterNode))
        except MedVolR1Error as exc:
            self.ui.statusLabel.text = str(exc)
            return
        if job is not None or self.logic.session.busy:
            self._setBusy(True, _("Updating the segment from the moved box..."))

    @_slot
    def onPoll(self) -> None:
        state = self.logic.session.progress()
        if state is not None and not state.done:
            self.ui.progressBar.setValue(int(100 * state.fraction))
            self.ui.progressBar.setFormat(f"%p%  {state.message}")
            return
        outcome = self.logic.session.poll()
        if outcome is not None:
            if outcome.status == "ok":  # the worker is up again (a Cancel stopped it and the encoding with it)
                self._preencode.resume()
            self._showOutcome(outcome)
        self._setBusy(self.logic.session.busy)  # a queued re-propagation may have started

    # ----------------------------------------------------------------------------------- background encoding
    def _setupPreEncoding(self) -> None:
        """The worker encodes the input volume's slices while the user reads it, nearest the Red view's slice first;
        a quiet line under the panel says how many are ready."""
        self._preencode = BackgroundEncoding(self.logic.session, _QtSingleShot())
        self.logic.session.background = self._preencode
        self._preencodeLabel = qt.QLabel()
        self._preencodeLabel.setStyleSheet("color: gray")
        self._preencodeLabel.toolTip = _("The model worker prepares the scan's slices in the background, nearest "
                                           "the slice you are looking at first; a Segment on prepared slices is fast")
        self.layout.addWidget(self._preencodeLabel)
        redNode = self.logic.redSliceNode()
        if redNode is not None:
            self.addObserver(redNode, vtk.vtkCommand.ModifiedEvent, self.onRedSliceModified)
        self._preencodeTimer = qt.QTimer()
        self._preencodeTimer.setInterval(PREENCODE_POLL_MS)
        self._preencodeTimer.connect("timeout()", self.onPreEncodePoll)
        self._preencodeTimer.start()

    def _followInputVolume(self, node, settings) -> None:
        """A new input volume (or new propagator settings): the worker starts on it; none: the old one is closed.
        Typing a question or an evidence model's path changes nothing here (the worker shares the propagator)."""
        if self._preencode is None or settings is None:
            return
        followed = (node, settings.propagator, settings.sam_checkpoint, settings.device, settings.python_executable,
                    settings.server_url, settings.server_token_file)
        if followed == self._preencodeInput:
            return
        self._preencodeInput = followed
        if node is None:
            self._preencode.close()
            return
        self._preencode.select(node, settings, self.logic.redSliceNode())

    @_slot
    def onRedSliceModified(self, caller, event) -> None:
        self._preencode.slice_changed(caller)

    @_slot
    def onPreEncodePoll(self) -> None:
        self._preencodeLabel.text = self._preencode.poll()

    def _showOutcome(self, outcome: Outcome) -> None:
        self.ui.statusLabel.text = outcome.message
        if outcome.status == "failed":
            shown = outcome.raw_text
            self.ui.reasoningTextEdit.setPlainText(
                _("The model's answer could not be used:\n\n") + shown if shown else outcome.message
            )
            if outcome.error is not None and not isinstance(outcome.error, MedVolR1Error):
                logging.error("MedVol-R1 run failed", exc_info=outcome.error)
            slicer.util.errorDisplay(outcome.message, windowTitle=_("MedVol-R1: the run failed"), detailedText=shown or None)
            return
        if outcome.status != "ok":
            return
        if outcome.reasoning or outcome.raw_text:
            self.ui.reasoningTextEdit.setPlainText(outcome.reasoning or outcome.raw_text)
        self._watcher.watch(outcome.rois)
        volumeNode = self._parameterNode.inputVolume
        if outcome.kind == "evidence":  # new evidence from the model: limits set for the old evidence no longer apply
            evidence_edits.set_extent_limit(volumeNode, None)
        if outcome.key_ras is not None:
            self.logic.showKeySlice(volumeNode, outcome.key_ras, outcome.segmentation_node)
        if outcome.segmentation_node is not None:
            self._parameterNode.outputSegmentation = outcome.segmentation_node
        self._refreshEvidenceList()


#
# Logic
#


class MedVolR1Logic(ScriptedLoadableModuleLogic):
    """Slicer-side logic; the scene work itself is MedVolR1SlicerGlue (Qt-free, tested on slicer-core)."""

    def __init__(self, pipelineFactory=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._pipelineFactory = pipelineFactory or default_pipeline_factory
        self.userStore = _ApplicationSettings()
        self.session = self._newSession()

    def _newSession(self, runner=None) -> EvidenceSession:
        """Scans go to a server only once the user agreed for that server (remembered in the application settings)."""
        return EvidenceSession(slicer.mrmlScene, self._pipelineFactory, runner=runner,
                               upload_allowed=lambda url: panel_settings.upload_approved(self.userStore, url))

    def getParameterNode(self):
        return MedVolR1ParameterNode(super().getParameterNode())

    def resetSession(self) -> None:
        self.session.cancel()  # the warm model worker is kept: its caches are keyed by volume, not by scene
        self.session = self._newSession(runner=self.session.runner)

    def shutdown(self) -> None:
        """Stop the model worker process (module cleanup); the next run starts a fresh one."""
        self.session.cancel()
        self.session.runner.shutdown()

    def settingsFrom(self, parameterNode) -> PanelSettings:
        """Model choices from the scene's parameter node; worker Python, server and token file from this user's
        application settings (whatever a loaded scene's XML says about those is ignored)."""
        return panel_settings.panel_settings(panel_settings.scene_values(parameterNode.parameterNode),
                                             panel_settings.load_user_settings(self.userStore))

    # ------------------------------------------------------------------------------------------ dependencies
    def ensureDependencies(self, settings: PanelSettings, confirm: bool = True) -> bool:
        """Install what this run's mode needs in Slicer's Python, after the user agrees; never downloads in tests.

        The plan (deps.dependency_plan) is decided first: a Slicer too old for the packages, or a Mac whose
        Slicer Python cannot get PyTorch, is refused with what to do before anything is downloaded; server and
        worker-Python modes install nothing.  The installed torch is checked against what sam2/transformers need
        (a wrong torch cannot be fixed by pip while Slicer has it loaded).  pip failures come back as one
        readable RuntimeError with pip's own last lines.  When pip replaced a package this Slicer had already
        imported (not one installed for the first time), the user is told to restart.
        """
        withModel = has_evidence_model(settings)
        mode = deps.run_mode(settings.server_url, settings.python_executable)
        plan = deps.dependency_plan(mode, settings.propagator, settings.sam_checkpoint, evidence_model=withModel)
        if plan.refusal:
            raise deps.UnsupportedPython(plan.refusal)
        missing = plan.install
        if not missing:
            return True
        problem = deps.check_torch(settings.propagator, settings.sam_checkpoint)
        if problem:
            raise RuntimeError(problem)
        names = ", ".join(r.import_name for r in missing)
        if slicer.app.testingEnabled():
            raise RuntimeError(f"MedVol-R1 test needs these Python packages installed beforehand: {names}")
        if confirm and not slicer.util.confirmOkCancelDisplay(
            _("MedVol-R1 needs these Python packages, which will be downloaded and installed now "
              "(this can take several minutes):\n\n") + "\n".join(f"{r.import_name}: {r.why}" for r in missing),
            windowTitle=_("MedVol-R1: install dependencies"),
        ):
            return False
        before = deps.installed_versions()
        with slicer.util.WaitCursor():
            for requirement in missing:
                try:
                    if requirement is deps.TORCH:
                        self._installTorch()
                    else:
                        self._pipInstall(requirement)
                except subprocess.CalledProcessError as exc:
                    raise RuntimeError(deps.pip_failure_message(requirement.import_name, exc)) from exc
        importlib.invalidate_caches()  # packages installed by a subprocess are found by find_spec at once
        changed = deps.restart_needed(before, deps.installed_versions())
        if changed:
            slicer.util.warningDisplay(
                _("These packages were updated but older versions are already loaded. Restart Slicer, then run again:\n\n")
                + "\n".join(changed), windowTitle=_("MedVol-R1: restart Slicer"))
            return False
        return not deps.dependency_plan(mode, settings.propagator, settings.sam_checkpoint, evidence_model=withModel).install

    @staticmethod
    def _pipInstall(requirement) -> None:
        """pip in Slicer's Python, through launchConsoleProcess (no console window on Windows), its output echoed
        to the Python console and kept, so a failure shows pip's own words."""
        python = shutil.which("PythonSlicer") or sys.executable
        environment = dict(requirement.environment)
        deps.run_pip(deps.pip_command(python, requirement),
                     lambda args: slicer.util.launchConsoleProcess(args, useStartupEnvironment=False, updateEnvironment=environment or None))

    @staticmethod
    def _installTorch() -> None:
        try:
            import PyTorchUtils
        except ModuleNotFoundError as exc:
            raise RuntimeError("MedVol-R1 needs the PyTorch extension: install 'PyTorch' from the Extensions Manager") from exc
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            # PyTorchUtilsLogic.installTorch(askConfirmation, forceComputationBackend, torchVersionRequirement,
            # torchvisionVersionRequirement): light-the-torch picks the build matching the NVIDIA driver.
            torch = torchLogic.installTorch(
                askConfirmation=False,
                torchVersionRequirement=deps.TORCH_VERSION_REQUIREMENT,
                torchvisionVersionRequirement=deps.TORCHVISION_VERSION_REQUIREMENT,
            )
            if torch is None:
                raise RuntimeError("PyTorch was not installed; MedVol-R1 cannot run without it")

    # ------------------------------------------------------------------------------------------- corrections
    @staticmethod
    def redSliceNode():
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None and layoutManager.sliceWidget("Red") is not None:
            return layoutManager.sliceWidget("Red").mrmlSliceNode()
        return slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed")

    def currentSlice(self, volume):
        """(canonical slice index, view centre RAS) of the Red view; the volume's middle slice without one."""
        redNode = self.redSliceNode()
        if redNode is None:
            return volume.num_slices // 2, None
        return mm.slice_index_of_view(redNode, volume), mm.view_center_ras(redNode)

    def addBox(self, volumeNode, sliceIndex=None, box=None):
        """A new evidence box on the Red view's slice (or `sliceIndex`): a new anchor unless one is there."""
        volume = mm.volume_from_node(volumeNode)
        shown, center = self.currentSlice(volume)
        return evidence_edits.add_box(slicer.mrmlScene, volumeNode, volume, shown if sliceIndex is None else sliceIndex, box, center)

    def removeBox(self, volumeNode, roi) -> list:
        return evidence_edits.remove_box(slicer.mrmlScene, volumeNode, roi)

    def limitExtent(self, volumeNode, side: str, sliceIndex=None):
        volume = mm.volume_from_node(volumeNode)
        shown, _center = self.currentSlice(volume)
        return evidence_edits.limit_extent(slicer.mrmlScene, volumeNode, volume, shown if sliceIndex is None else sliceIndex, side)

    def undo(self, volumeNode) -> list:
        rois, _segmentId = evidence_edits.undo(self.session, volumeNode)
        return rois

    @staticmethod
    def extentText(volumeNode) -> str:
        """Redrawn on every parameter change (each keystroke): the node's cached grid, never a voxel copy."""
        labels = evidence_edits.extent_labels(volumeNode)
        if labels is None:
            return _("Extent: whole scan")
        low, high = labels
        return _("Extent: from {low} up to {high}").format(low=low, high=high)

    # ------------------------------------------------------------------------------------------------- views
    @staticmethod
    def jumpAllSlices(ras) -> None:
        """Centre every slice view on `ras` (Slicer's JumpSlicesToLocation where available)."""
        markups = getattr(slicer.modules, "markups", None)
        markupsLogic = markups.logic() if markups is not None else None
        if markupsLogic is not None and hasattr(markupsLogic, "JumpSlicesToLocation"):
            markupsLogic.JumpSlicesToLocation(float(ras[0]), float(ras[1]), float(ras[2]), True)
            return
        for sliceNode in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
            mm.jump_slice_node(sliceNode, ras)

    def showKeySlice(self, volumeNode, ras, segmentationNode=None) -> None:
        """Show the volume and jump all slice views to the key slice; no-op without a layout (batch mode)."""
        if slicer.app.layoutManager() is None:
            return
        slicer.util.setSliceViewerLayers(background=volumeNode, fit=False)
        self.jumpAllSlices(ras)
        if segmentationNode is not None and segmentationNode.GetDisplayNode() is not None:
            segmentationNode.GetDisplayNode().SetVisibility(True)

    # ------------------------------------------------------------------------------- scripting convenience
    def findEvidence(self, volumeNode, query: str, settings: PanelSettings = PanelSettings(), timeout: float = 3600.0) -> Outcome:
        """Blocking version for the Python console and tests: evidence ROIs on the key slice."""
        self.session.start_find_evidence(volumeNode, query, settings)
        return self.session.wait(timeout)

    def segment(self, volumeNode, query: str = "", settings: PanelSettings = PanelSettings(), timeout: float = 3600.0) -> Outcome:
        """Blocking: segment from the evidence ROIs if present, else from the query."""
        self.session.start_segment(volumeNode, query, settings)
        return self.session.wait(timeout)


#
# Test
#


class MedVolR1Test(ScriptedLoadableModuleTest):
    """Runs in real Slicer (`Slicer --testing`), offline, on a synthetic phantom.

    test_scene_logic needs no model and no torch (runs on any factory build): evidence boxes added on two
    slices, an extent limit refused and then set, a box removed, a click on a handle that triggers nothing,
    and undo bringing back the previous boxes and segment.  test_evidence_segment_and_edit goes through the
    panel's whole path (query -> Find evidence -> evidence ROIs -> Segment -> the user drags an ROI -> one
    re-propagation) and is skipped where torch, transformers or sam2 are not installed.

    The VLM is the tiny local Qwen2.5-VL *taught one answer* for this phantom and query
    (MedVolR1Lib.fixtures.answering_qwen, seconds on CPU): a wiring fixture that says what it was told, so the
    valid-answer path runs end to end; it says nothing about real grounding quality.  The propagator is a
    micro random-weight SAM2 through the MedSAM2 code path, whose features are all encoded up front, so the
    re-propagation can be checked to re-use them.  Packages must already be installed: tests never download.
    """

    QUERY = "segment the bright organ"
    NUM_VIEWS = 4
    IMAGE_SIZE = 112

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        """"Reload and Test" calls this directly (ctest runs the test_ methods through unittest)."""
        self.setUp()
        self.test_scene_logic()
        self.setUp()
        try:
            self.test_evidence_segment_and_edit()
        except unittest.SkipTest as skipped:
            self.delayDisplay(f"Full-flow test skipped: {skipped}")

    def _phantom(self):
        import numpy as np

        k, j, i = np.mgrid[0:24, 0:64, 0:64]
        array = np.full((24, 64, 64), -1000, dtype=np.int16)
        array[((j - 32) / 28.0) ** 2 + ((i - 32) / 30.0) ** 2 <= 1.0] = 20  # body
        organ = ((k - 12) / 8.0) ** 2 + ((j - 30) / 9.0) ** 2 + ((i - 40) / 7.0) ** 2 <= 1.0
        array[organ] = 250  # a bright ellipsoid right of centre in the image = patient's left
        ijkToRAS = np.array([[-1.5, 0, 0, 40.0], [0, -1.5, 0, 30.0], [0, 0, 2.5, -20.0], [0, 0, 0, 1.0]])  # LPS-like grid
        return slicer.util.addVolumeFromArray(array, ijkToRAS=ijkToRAS, name="MedVolR1 phantom")

    def _pipelineFactory(self, workdir, volume, answer):
        from MedVolR1Lib.fixtures.answering_qwen import build_answering_tiny_qwen
        from MedVolR1Lib.fixtures.micro_sam2 import build_micro_sam2_checkpoint
        from MedVolR1Lib.pipeline import Pipeline, PipelineConfig

        model = build_answering_tiny_qwen(os.path.join(workdir, "answering_qwen"), volume=volume, query=self.QUERY,
                                          answer_text=answer, num_views=self.NUM_VIEWS, image_size=self.IMAGE_SIZE)
        checkpoint = os.path.join(workdir, "micro_sam2.pt")
        overrides = build_micro_sam2_checkpoint(checkpoint)
        config = PipelineConfig(model=str(model), propagator="medsam2", sam_checkpoint=checkpoint, sam_overrides=tuple(overrides),
                                device="cpu", num_views=self.NUM_VIEWS, image_size=self.IMAGE_SIZE)
        return lambda settings: Pipeline(config)

    def test_scene_logic(self):
        import numpy as np

        from MedVolR1Lib.anchor import VoxelBox

        self.delayDisplay("Evidence boxes, extent limits, remove and undo (no model)")
        volumeNode = self._phantom()
        volume = mm.volume_from_node(volumeNode)
        logic = MedVolR1Logic()
        box = VoxelBox.from_voxels(33, 21, 46, 38)
        first = logic.addBox(volumeNode, sliceIndex=12, box=box)
        logic.addBox(volumeNode, sliceIndex=12, box=VoxelBox.from_voxels(10, 10, 20, 20))
        upper = logic.addBox(volumeNode, sliceIndex=16, box=box)
        evidence = evidence_edits.scene_evidence(slicer.mrmlScene, volumeNode, volume)
        self.assertEqual(evidence.anchor_slices, (12, 16))
        self.assertEqual(len(evidence.anchors[0].boxes), 2)
        with self.assertRaises(AnchorError):  # the box on slice 16 lies above the new top: nothing changes
            logic.limitExtent(volumeNode, "top", sliceIndex=14)
        self.assertIsNone(evidence_edits.extent_limit(volumeNode))
        logic.removeBox(volumeNode, upper)
        self.assertEqual(logic.limitExtent(volumeNode, "top", sliceIndex=14), (0, 14))
        self.assertEqual(evidence_edits.scene_evidence(slicer.mrmlScene, volumeNode, volume).z_range, (0, 14))

        edits = []
        watcher = RoiEditWatcher(edits.append, _QtSingleShot(), delay_ms=0)
        watcher.watch([first])
        first.InvokeEvent(first.PointStartInteractionEvent)
        first.InvokeEvent(first.PointEndInteractionEvent)  # a click on a handle, no move
        slicer.app.processEvents()
        self.assertEqual(edits, [])
        watcher.clear()

        # Two versions written as a run would write them; undo brings back the first boxes, limit and mask.
        session = logic.session
        older = evidence_edits.scene_evidence(slicer.mrmlScene, volumeNode, volume)
        olderMask = (volume.array > 200).astype(np.uint8)
        session.history.record(volume, older, olderMask)
        logic.addBox(volumeNode, sliceIndex=8, box=box)
        evidence_edits.set_extent_limit(volumeNode, None)
        newer = evidence_edits.scene_evidence(slicer.mrmlScene, volumeNode, volume)
        newerMask = np.zeros_like(olderMask)
        newerMask[10:14] = olderMask[10:14]
        segmentationNode, segmentId, _note = session.guard.write(slicer.mrmlScene, volumeNode, volume, newerMask, "MedVol-R1 target")
        session.segmentation_node = segmentationNode
        session.history.record(volume, newer, newerMask)
        logic.undo(volumeNode)
        self.assertEqual(evidence_edits.scene_evidence(slicer.mrmlScene, volumeNode, volume), older)
        restored = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        self.assertEqual(int(restored.sum()), int(olderMask.sum()))
        self.delayDisplay("Scene logic passed")

    def test_evidence_segment_and_edit(self):
        missing = [name for name in ("torch", "transformers", "sam2") if importlib.util.find_spec(name) is None]
        if missing:
            self.skipTest(f"needs {', '.join(missing)} (install them from the module once; tests never download)")

        from MedVolR1Lib.anchor import parse_answer
        from MedVolR1Lib.fixtures.answering_qwen import answer_for_mask
        from MedVolR1Lib.views import ViewGeometry

        self.delayDisplay("Building the phantom, a tiny local VLM taught one answer, and a micro SAM2 (offline)")
        volumeNode = self._phantom()
        volume = mm.volume_from_node(volumeNode)
        organ = volume.array > 200  # canonical order, as the model sees it
        answer = answer_for_mask(volume, organ, num_views=self.NUM_VIEWS, image_size=self.IMAGE_SIZE, think="bright organ")
        expected = ViewGeometry.for_volume(volume, self.IMAGE_SIZE).anchor_from_answer(parse_answer(answer), volume.num_slices)
        workdir = tempfile.mkdtemp(prefix="medvolr1_selftest_")
        try:  # not addCleanup: "Reload and Test" calls runTest directly, where cleanups never run
            self._evidenceSegmentAndEdit(workdir, volumeNode, volume, answer, expected)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _evidenceSegmentAndEdit(self, workdir, volumeNode, volume, answer, expected):
        logic = MedVolR1Logic(self._pipelineFactory(workdir, volume, answer))
        try:
            self._runFlow(logic, volumeNode, volume, expected, answer)
        finally:
            logic.shutdown()  # the worker holds files in workdir open

    def _runFlow(self, logic, volumeNode, volume, expected, answer):
        import time

        import numpy as np

        from MedVolR1Lib.anchor import box_ras_bounds
        from MedVolR1Lib.pipeline import target_name_from_query

        settings = PanelSettings()

        # 1. Find evidence: the model's answer becomes the reasoning text and one ROI per box on the key slice.
        self.delayDisplay("Find evidence")
        outcome = logic.findEvidence(volumeNode, self.QUERY, settings)
        self.assertEqual(outcome.status, "ok", outcome.message)
        self.assertEqual(outcome.raw_text, answer)
        self.assertEqual(outcome.reasoning, "bright organ")
        self.assertEqual(outcome.anchor, expected)
        rois = mm.evidence_rois(slicer.mrmlScene, volumeNode)
        self.assertEqual([r.GetName() for r in rois], [f"Evidence {n + 1}" for n in range(len(expected.boxes))])
        for roi, box in zip(rois, expected.boxes):
            lo, hi = box_ras_bounds(volume.ijk_to_ras, expected.slice_index, box)
            bounds = [0.0] * 6
            roi.GetRASBounds(bounds)
            np.testing.assert_allclose(bounds, [lo[0], hi[0], lo[1], hi[1], lo[2], hi[2]], atol=1e-4)
        logic.showKeySlice(volumeNode, outcome.key_ras)
        redNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        self.assertAlmostEqual(redNode.GetSliceOffset(), volume.ras_from_ijk([0, 0, expected.slice_index])[2], places=3)

        # 2. Segment from the evidence ROIs: a segment named after the target, voxel for voxel the pipeline's mask.
        self.delayDisplay("Segment")
        watcher = RoiEditWatcher(logic.session.on_roi_edited, _QtSingleShot(), delay_ms=0)
        watcher.watch(outcome.rois)  # as the panel does after each outcome
        outcome = logic.segment(volumeNode, self.QUERY, settings)
        self.assertEqual(outcome.status, "ok", outcome.message)
        segmentation = outcome.segmentation_node.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 1)
        self.assertEqual(segmentation.GetSegment(outcome.segment_id).GetName(), target_name_from_query(self.QUERY))
        segmentArray = slicer.util.arrayFromSegmentBinaryLabelmap(outcome.segmentation_node, outcome.segment_id, volumeNode)
        self.assertEqual(int(segmentArray.sum()), logic.session.result.voxel_count)
        self.assertEqual(outcome.voxels, logic.session.result.voxel_count)
        encoded = logic.session.worker_stats(settings)["encoded_slices"]

        # 3. The user drags Evidence 1 one slice up (end of interaction, through the real Qt timer): one re-propagation.
        self.delayDisplay("Moving the evidence box: re-propagation")
        center, _size = mm.roi_center_size(rois[0])
        rois[0].SetCenter(center[0], center[1], center[2] + volume.spacing[2])
        rois[0].InvokeEvent(rois[0].PointEndInteractionEvent)
        deadline = time.time() + 30.0
        while logic.session.reprop_requests == 0 and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.01)
        self.assertEqual(logic.session.reprop_requests, 1)
        outcome = logic.session.wait(3600)
        self.assertEqual(outcome.status, "ok", outcome.message)
        self.assertEqual(logic.session.result.anchor.slice_index, expected.slice_index + 1)
        self.assertEqual(logic.session.worker_stats(settings)["encoded_slices"], encoded)  # cached features re-used
        self.assertEqual(segmentation.GetNumberOfSegments(), 1)
        segmentArray = slicer.util.arrayFromSegmentBinaryLabelmap(outcome.segmentation_node, outcome.segment_id, volumeNode)
        self.assertEqual(int(segmentArray.sum()), logic.session.result.voxel_count)
        for _attempt in range(5):  # our own ROI update after the run must not look like another drag
            slicer.app.processEvents()
            time.sleep(0.01)
        self.assertEqual(logic.session.reprop_requests, 1)
        self.assertFalse(logic.session.busy)
        watcher.clear()
        self.delayDisplay("MedVol-R1 self-test passed")
