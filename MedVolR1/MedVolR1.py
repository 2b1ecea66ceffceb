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
import sys
import tempfile

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
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

from MedVolR1Lib.errors import MedVolR1Error  # noqa: E402
from MedVolR1SlicerGlue import deps  # noqa: E402
from MedVolR1SlicerGlue import mrml_mapping as mm  # noqa: E402
from MedVolR1SlicerGlue.edits import RoiEditWatcher  # noqa: E402
from MedVolR1SlicerGlue.session import EvidenceSession, Outcome, default_pipeline_factory  # noqa: E402
from MedVolR1SlicerGlue.settings import DEVICE_CHOICES, PROPAGATOR_CHOICES, PanelSettings, detect_devices  # noqa: E402

EDIT_DEBOUNCE_MS = 400
POLL_INTERVAL_MS = 100


#
# Module
#


class MedVolR1(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedVol-R1")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedVol-R1 contributors"]
        self.parent.helpText = _(
            "Ask a clinical question about a CT/MR volume. A vision-language model (Qwen2.5-VL) picks the key axial "
            "slice and draws evidence boxes; a frozen promptable segmenter (MedSAM2 on GPU, LiteMedSAM on CPU) "
            "propagates them to a 3D segment. Move or resize an evidence box and the segment follows."
        )
        self.parent.acknowledgementText = _(
            "Uses Qwen2.5-VL (Alibaba), SAM2 (Meta), MedSAM2 and LiteMedSAM (Bo Wang lab), and the TotalSegmentator "
            "example CT (Wasserthal et al.) for the sample data."
        )


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
        devices = detect_devices()
        self.ui.deviceComboBox.addItems([d for d in DEVICE_CHOICES if d in devices.choices])
        self.ui.deviceLabel.text = devices.summary
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setEnabled(False)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.findEvidenceButton.connect("clicked(bool)", self.onFindEvidence)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.propagatorComboBox.connect("currentIndexChanged(int)", self.onPropagatorChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.modelBrowseButton.connect("clicked(bool)", lambda: self._browse(self.ui.modelLineEdit, folder=True))
        self.ui.adapterBrowseButton.connect("clicked(bool)", lambda: self._browse(self.ui.adapterLineEdit, folder=True))
        self.ui.samCheckpointBrowseButton.connect("clicked(bool)", lambda: self._browse(self.ui.samCheckpointLineEdit, folder=False))

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self.logic is not None:
            self.logic.session.cancel()
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

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.session.cancel()
        self._watcher.clear()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        self.logic.resetSession()
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

    def onPropagatorChanged(self, _index=None) -> None:
        if self._parameterNode and not self._syncingCombos and self._parameterNode.propagator != self.ui.propagatorComboBox.currentText:
            self._parameterNode.propagator = self.ui.propagatorComboBox.currentText

    def onDeviceChanged(self, _index=None) -> None:
        if self._parameterNode and not self._syncingCombos and self._parameterNode.device != self.ui.deviceComboBox.currentText:
            self._parameterNode.device = self.ui.deviceComboBox.currentText

    def _updateButtons(self, caller=None, event=None) -> None:
        busy = self.logic is not None and self.logic.session.busy
        hasVolume = bool(self._parameterNode and self._parameterNode.inputVolume)
        hasQuery = bool(self._parameterNode and self._parameterNode.query.strip())
        hasEvidence = hasVolume and bool(mm.evidence_rois(slicer.mrmlScene, self._parameterNode.inputVolume))
        self.ui.findEvidenceButton.enabled = not busy and hasVolume and hasQuery
        self.ui.segmentButton.enabled = not busy and hasVolume and (hasQuery or hasEvidence)
        self.ui.cancelButton.enabled = busy
        self.ui.findEvidenceButton.toolTip = _("Ask the model for the key slice and evidence boxes") if hasQuery else _("Type a query first")

    def _browse(self, lineEdit, folder: bool) -> None:
        start = lineEdit.text or os.path.expanduser("~")
        if folder:
            path = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Choose a folder"), start)
        else:
            path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Choose the MedSAM2 checkpoint"), start, "PyTorch checkpoint (*.pt *.pth)")
        if path:
            lineEdit.text = path  # emits textChanged, which QLineEditToStrConnector observes

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
        try:
            installed = self.logic.ensureDependencies(settings)
        except (RuntimeError, deps.UnsupportedPython) as exc:  # pip/light-the-torch failure, Python too old
            slicer.util.errorDisplay(str(exc), windowTitle=_("MedVol-R1: install dependencies"))
            return
        if not installed:
            self.ui.statusLabel.text = _("Missing Python packages: not installed, nothing was run")
            return
        volumeNode, query = self._parameterNode.inputVolume, self._parameterNode.query
        try:
            if action == "evidence":
                self.logic.session.start_find_evidence(volumeNode, query, settings)
            else:
                self.logic.session.start_segment(volumeNode, query, settings)
        except (MedVolR1Error, ValueError) as exc:
            slicer.util.errorDisplay(str(exc), windowTitle=_("MedVol-R1"))
            return
        self._setBusy(True, _("Finding evidence...") if action == "evidence" else _("Segmenting..."))

    def onFindEvidence(self) -> None:
        self._start("evidence")

    def onSegment(self) -> None:
        self._start("segmentation")

    def onCancel(self) -> None:
        self.logic.session.cancel()
        self.ui.statusLabel.text = _("Cancelling...")

    def onEvidenceEdited(self, roi) -> None:
        """End of a user drag (debounced): re-propagate from the moved evidence."""
        try:
            job = self.logic.session.on_roi_edited(roi, self.logic.settingsFrom(self._parameterNode))
        except MedVolR1Error as exc:
            self.ui.statusLabel.text = str(exc)
            return
        if job is not None or self.logic.session.busy:
            self._setBusy(True, _("Re-propagating from the edited evidence..."))

    def onPoll(self) -> None:
        state = self.logic.session.progress()
        if state is not None and not state.done:
            self.ui.progressBar.setValue(int(100 * state.fraction))
            self.ui.progressBar.setFormat(f"%p%  {state.message}")
            return
        outcome = self.logic.session.poll()
        if outcome is not None:
            self._showOutcome(outcome)
        self._setBusy(self.logic.session.busy)  # a queued re-propagation may have started

    def _showOutcome(self, outcome: Outcome) -> None:
        self.ui.statusLabel.text = outcome.message
        if outcome.status == "failed":
            shown = outcome.raw_text
            self.ui.reasoningTextEdit.setPlainText(
                _("The model's answer could not be used:\n\n") + shown if shown else outcome.message
            )
            if outcome.error is not None and not isinstance(outcome.error, MedVolR1Error):
                logging.error("MedVol-R1 run failed", exc_info=outcome.error)
            return
        if outcome.status != "ok":
            return
        if outcome.reasoning or outcome.raw_text:
            self.ui.reasoningTextEdit.setPlainText(outcome.reasoning or outcome.raw_text)
        self._watcher.watch(outcome.rois)
        volumeNode = self._parameterNode.inputVolume
        if outcome.key_ras is not None:
            self.logic.showKeySlice(volumeNode, outcome.key_ras, outcome.segmentation_node)
        if outcome.segmentation_node is not None:
            self._parameterNode.outputSegmentation = outcome.segmentation_node


#
# Logic
#


class MedVolR1Logic(ScriptedLoadableModuleLogic):
    """Slicer-side logic; the scene work itself is MedVolR1SlicerGlue.session.EvidenceSession (Qt-free)."""

    def __init__(self, pipelineFactory=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._pipelineFactory = pipelineFactory or default_pipeline_factory
        self.session = EvidenceSession(slicer.mrmlScene, self._pipelineFactory)

    def getParameterNode(self):
        return MedVolR1ParameterNode(super().getParameterNode())

    def resetSession(self) -> None:
        self.session.cancel()
        self.session = EvidenceSession(slicer.mrmlScene, self._pipelineFactory)

    @staticmethod
    def settingsFrom(parameterNode) -> PanelSettings:
        return PanelSettings(
            model=parameterNode.model,
            adapter=parameterNode.adapter,
            propagator=parameterNode.propagator,
            sam_checkpoint=parameterNode.samCheckpoint,
            device=parameterNode.device,
        )

    # ------------------------------------------------------------------------------------------ dependencies
    def ensureDependencies(self, settings: PanelSettings, confirm: bool = True) -> bool:
        """Install what is missing after the user agrees; never downloads during tests."""
        missing = deps.missing_requirements(settings.propagator, settings.sam_checkpoint)
        if not missing:
            return True
        names = ", ".join(r.import_name for r in missing)
        if slicer.app.testingEnabled():
            raise RuntimeError(f"MedVol-R1 test needs these Python packages installed beforehand: {names}")
        if confirm and not slicer.util.confirmOkCancelDisplay(
            _("MedVol-R1 needs these Python packages, which will be downloaded and installed now "
              "(this can take several minutes):\n\n") + "\n".join(f"{r.import_name}: {r.why}" for r in missing),
            windowTitle=_("MedVol-R1: install dependencies"),
        ):
            return False
        with slicer.util.WaitCursor():
            for requirement in missing:
                if requirement is deps.TORCH:
                    self._installTorch()
                    continue
                saved = {key: os.environ.get(key) for key in requirement.environment}
                os.environ.update(requirement.environment)
                try:
                    slicer.util.pip_install(requirement.pip_args)
                finally:
                    for key, value in saved.items():
                        if value is None:
                            os.environ.pop(key, None)
                        else:
                            os.environ[key] = value
        importlib.invalidate_caches()  # packages installed by a subprocess are found by find_spec at once
        return not deps.missing_requirements(settings.propagator, settings.sam_checkpoint)

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

    # ------------------------------------------------------------------------------------------------- views
    @staticmethod
    def showKeySlice(volumeNode, ras, segmentationNode=None) -> None:
        """Show the volume and jump the Red (axial) view to the key slice; no-op without a layout (batch mode)."""
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        slicer.util.setSliceViewerLayers(background=volumeNode, fit=False)
        sliceWidget = layoutManager.sliceWidget("Red")
        if sliceWidget is not None:
            mm.jump_slice_node(sliceWidget.mrmlSliceNode(), ras)
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
    """Runs in real Slicer (`Slicer --testing`), offline, through the panel's whole path: a synthetic phantom;
    query -> Find evidence -> evidence ROIs -> Segment -> the user drags an ROI -> one re-propagation.

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
        self.setUp()
        self.test_evidence_segment_and_edit()

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

    def test_evidence_segment_and_edit(self):
        import time

        import numpy as np

        from MedVolR1Lib.anchor import box_ras_bounds, parse_answer
        from MedVolR1Lib.fixtures.answering_qwen import answer_for_mask
        from MedVolR1Lib.pipeline import target_name_from_query
        from MedVolR1Lib.views import ViewGeometry

        self.delayDisplay("Building the phantom, a tiny local VLM taught one answer, and a micro SAM2 (offline)")
        volumeNode = self._phantom()
        volume = mm.volume_from_node(volumeNode)
        organ = volume.array > 200  # canonical order, as the model sees it
        answer = answer_for_mask(volume, organ, num_views=self.NUM_VIEWS, image_size=self.IMAGE_SIZE, think="bright organ")
        expected = ViewGeometry.for_volume(volume, self.IMAGE_SIZE).anchor_from_answer(parse_answer(answer), volume.num_slices)
        workdir = tempfile.mkdtemp(prefix="medvolr1_selftest_")
        logic = MedVolR1Logic(self._pipelineFactory(workdir, volume, answer))
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
        propagator = logic.session._pipeline(settings).propagator
        encoded = propagator.encoded_frames

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
        self.assertEqual(propagator.encoded_frames, encoded)  # cached image features re-used, nothing re-encoded
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
