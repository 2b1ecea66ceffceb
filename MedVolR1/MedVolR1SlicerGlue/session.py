"""What the panel does, as plain Python over an MRML scene: the Logic of the module without Qt.

Model work runs in a worker process (or on a `medvolr1 serve` server) through `jobs.ModelRunner`; every
scene change happens in `poll()`, which the GUI thread calls (a QTimer in Slicer; directly in tests).
A failed, cancelled or killed run leaves the scene as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from MedVolR1Lib.anchor import EvidenceAnchor
from MedVolR1Lib.errors import MedVolR1Error
from MedVolR1Lib.evidence import Evidence
from MedVolR1Lib.service import protocol as proto
from MedVolR1Lib.volume import Volume

from . import evidence_edits
from . import mrml_mapping as mm
from .jobs import Job, JobState, ModelRunner
from .segment_guard import SegmentGuard
from .settings import PanelSettings, check_settings


class QueryError(MedVolR1Error):
    """The clinical query is missing or unusable."""


class BusyError(MedVolR1Error):
    """A run is in progress; wait for it or press Cancel."""


class UploadNotApproved(MedVolR1Error):
    """The user has not agreed to send scans to this server."""


ConfigFactory = Callable[[PanelSettings], Any]  # -> PipelineConfig (or a Pipeline, whose config is used)


def default_config_factory(settings: PanelSettings):
    return settings.to_config()


default_pipeline_factory = default_config_factory  # the name MedVolR1.py imports


def _config_of(made) -> Any:
    """Only the configuration crosses to the worker: accept a PipelineConfig or anything holding one."""
    return getattr(made, "config", made)


@dataclass
class Outcome:
    """What the panel shows after a run: status line, reasoning, and what changed in the scene."""

    kind: str  # "evidence" | "segmentation"
    status: str  # "ok" | "cancelled" | "failed"
    message: str
    reasoning: str = ""
    raw_text: str = ""
    anchor: Optional[EvidenceAnchor] = None
    rois: list = field(default_factory=list)
    key_ras: Optional[tuple[float, float, float]] = None
    segmentation_node: Any = None
    segment_id: str = ""
    voxels: int = 0
    error: Optional[BaseException] = None


@dataclass
class _Run:
    kind: str  # "evidence" | "segmentation" | "repropagation"
    job: Job
    volume_node: Any
    volume: Volume
    query: str
    previous: Any = None  # the SegmentationResult a re-propagation refines (keeps its grounding and name)


class EvidenceSession:
    """State of one panel: volume, evidence ROIs, last result, the running job and a queued re-propagation."""

    def __init__(self, scene, config_factory: ConfigFactory = default_config_factory, *, check=check_settings,
                 runner: Optional[ModelRunner] = None, upload_allowed: Optional[Callable[[str], bool]] = None) -> None:
        """`upload_allowed(url)`: whether the user agreed to send scans to that server (the panel passes its
        remembered answers; None, for scripts, sends where the caller's settings say)."""
        self.scene = scene
        self.upload_allowed = upload_allowed
        self._config_factory = config_factory
        self._check = check
        self.runner = runner or ModelRunner()
        self._run: Optional[_Run] = None
        self._queued_edit: Optional[tuple[Any, PanelSettings]] = None
        self.settings = PanelSettings()
        self.grounding: Any = None  # last protocol.EvidenceFound (reasoning, raw_text, slices)
        self.result: Any = None  # last SegmentationResult (the worker keeps its features for re-propagation)
        self.segmentation_node: Any = None
        self.anchor: Optional[EvidenceAnchor] = None
        self.reprop_requests = 0
        # Edits never lost: each result is a version (undo), and only overwrites a segment nobody changed.
        self.history = evidence_edits.VolumeHistory()
        self.guard = SegmentGuard()
        self.background: Any = None  # preencode.BackgroundEncoding when the panel has one: shares the worker

    # ------------------------------------------------------------------------------------------- GUI-thread API
    @property
    def busy(self) -> bool:
        return self._run is not None

    def progress(self) -> Optional[JobState]:
        return self._run.job.poll() if self._run else None

    def cancel(self) -> None:
        """Stop the run now (the local worker process is stopped; the next run starts a new one)."""
        self._queued_edit = None
        if self._run:
            self._run.job.cancel()

    def start_find_evidence(self, volume_node, query: str, settings: PanelSettings) -> Job:
        volume, query = self._prepare(volume_node, query, settings, need_query=True)
        request = proto.FindEvidence(volume.fingerprint, query, self._config(settings))
        return self._start("evidence", volume_node, volume, query, request)

    def start_segment(self, volume_node, query: str, settings: PanelSettings) -> Job:
        """Segment from the evidence ROIs on screen if there are any (the user may have fixed them), else from the query."""
        rois = mm.evidence_rois(self.scene, volume_node)
        volume, query = self._prepare(volume_node, query, settings, need_query=not rois)
        if rois:
            evidence = evidence_edits.evidence_from_rois(volume, rois, z_range=evidence_edits.extent_limit(volume_node))
            request = proto.Propagate(volume.fingerprint, evidence.to_dict(), query, self._config(settings))
        else:
            request = proto.Segment(volume.fingerprint, query, self._config(settings))
        return self._start("segmentation", volume_node, volume, query, request)

    def on_roi_edited(self, roi, settings: Optional[PanelSettings] = None) -> Optional[Job]:
        """A user drag ended (after debounce): re-propagate if a segmentation exists, else just record the anchor.

        During a run the edit is queued and runs when it ends (a running re-propagation is not cancelled:
        that would stop the worker and drop the cached features the next one needs)."""
        settings = settings or self.settings
        volume_node = mm.volume_of_roi(self.scene, roi)
        if volume_node is None:
            return None
        if self._run is not None:
            self._queued_edit = (roi, settings)
            return None
        volume = mm.volume_from_node(volume_node)
        rois = mm.evidence_rois(self.scene, volume_node)
        evidence = evidence_edits.evidence_from_rois(volume, rois, key_roi=roi, z_range=evidence_edits.extent_limit(volume_node))
        self.anchor = evidence.primary
        result = self.result if self.result is not None and self.result.volume.fingerprint == volume.fingerprint else None
        if result is None:
            return None
        self.reprop_requests += 1
        query = result.query or ""
        request = proto.Propagate(volume.fingerprint, evidence.to_dict(), query, self._config(settings))
        return self._start("repropagation", volume_node, volume, query, request, previous=result)

    def poll(self) -> Optional[Outcome]:
        """Call on the GUI thread; returns an Outcome once the job ended (and applies it to the scene)."""
        if self._run is None or not self._run.job.poll().done:
            return None
        run, self._run = self._run, None
        outcome = self._apply(run, run.job.poll())
        if self._queued_edit is not None:
            roi, settings = self._queued_edit
            self._queued_edit = None
            if self.scene.IsNodePresent(roi):
                self.on_roi_edited(roi, settings)
        return outcome

    def wait(self, timeout: Optional[float] = None) -> Optional[Outcome]:
        """Block until the running job ends and apply it (scripting, self-test). Still GUI-thread only."""
        if self._run is None:
            return None
        self._run.job.wait(timeout)
        return self.poll()

    def worker_stats(self, settings: Optional[PanelSettings] = None) -> dict:
        """The worker's counters for these settings' models (encoded slices, VLM runs); blocks briefly, not while busy."""
        if self._run is not None:
            raise BusyError("a run is in progress: ask for statistics when it has finished")
        settings = settings or self.settings
        if self.background is not None:
            self.background.finish()
        return self.runner.stats(settings, self._config(settings))

    # ----------------------------------------------------------------------------------------------- internals
    def _prepare(self, volume_node, query: str, settings: PanelSettings, *, need_query: bool) -> tuple[Volume, str]:
        if self._run is not None:
            raise BusyError("a run is in progress: wait for it to finish or press Cancel")
        query = (query or "").strip()
        volume = mm.volume_from_node(volume_node)
        if need_query and not query:
            raise QueryError("Type a clinical query first, e.g. 'segment the left kidney'")
        if not settings.server_url.strip():  # a server checks its own models and devices
            self._check(settings)
        self.settings = settings
        return volume, query

    def _config(self, settings: PanelSettings) -> dict:
        return proto.config_to_dict(_config_of(self._config_factory(settings)))

    def _start(self, kind, volume_node, volume, query, request, previous=None) -> Job:
        url = self.settings.server_url.strip()
        if url and self.upload_allowed is not None and not self.upload_allowed(url):
            raise UploadNotApproved(f"Scans are not sent to {url} until you agree to it; nothing was sent")
        if self.background is not None:  # one request at a time per worker: let a pre-encoding request finish
            self.background.finish()
        job = self.runner.start(self.settings, volume, request, kind)
        self._run = _Run(kind, job, volume_node, volume, query, previous)
        return job

    def _apply(self, run: _Run, state: JobState) -> Outcome:
        kind = "evidence" if run.kind == "evidence" else "segmentation"
        if state.cancelled:
            return Outcome(kind, "cancelled", "Cancelled; the scene was left unchanged")
        if state.error is not None:
            error = state.error
            raw = getattr(error, "raw_text", "") or ""
            text = str(error) if isinstance(error, MedVolR1Error) else f"{type(error).__name__}: {error}"
            return Outcome(kind, "failed", text, raw_text=raw, error=error)
        if not self.scene.IsNodePresent(run.volume_node):
            return Outcome(kind, "failed", "The input volume was removed while the model was running")
        before = set(mm.node_ids(self.scene))
        try:
            return self._apply_result(run, state.result)
        except Exception as exc:  # roll back anything half-created, then report
            for node_id in set(mm.node_ids(self.scene)) - before:
                node = self.scene.GetNodeByID(node_id)
                if node is not None:
                    self.scene.RemoveNode(node)
            return Outcome(kind, "failed", f"{type(exc).__name__}: {exc}", error=exc)

    def _apply_result(self, run: _Run, result) -> Outcome:
        volume, volume_node = run.volume, run.volume_node
        if run.kind == "evidence":
            grounding = result  # protocol.EvidenceFound
            anchor = grounding.evidence_anchor.clipped(volume.shape) if grounding.anchor is not None else None
            if anchor is None:
                raise MedVolR1Error("the model gave no usable evidence")
            rois = mm.place_evidence_rois(self.scene, volume_node, volume, anchor, mm.evidence_rois(self.scene, volume_node))
            self.grounding, self.anchor = grounding, anchor
            return Outcome(
                "evidence", "ok", f"Key {mm.slice_label(volume_node, volume, anchor.slice_index)}, {len(anchor.boxes)} box(es)",
                reasoning=getattr(grounding, "reasoning", "") or "", raw_text=getattr(grounding, "raw_text", "") or "",
                anchor=anchor, rois=rois, key_ras=mm.key_point_ras(volume, anchor),
            )
        result = proto.segmentation_result(result, volume)
        if run.previous is not None:  # a re-propagation keeps the VLM's reasoning and the segment's name
            result.grounding, result.target_name = run.previous.grounding, run.previous.target_name
        evidence = result.evidence.clipped(volume.shape)
        anchor = evidence.primary
        # Programmatic update (ModifiedEvent only): snaps every box onto the slice of its anchor the run used.
        rois = mm.place_evidence_rois(self.scene, volume_node, volume, evidence, mm.evidence_rois(self.scene, volume_node))
        name = (getattr(result, "target_name", "") or run.query or "MedVol-R1 target").strip()
        segmentation_node = self.segmentation_node if self.segmentation_node is not None and self.scene.IsNodePresent(self.segmentation_node) else None
        segmentation_node, segment_id, kept_note = self.guard.write(self.scene, volume_node, volume, result.mask, name, segmentation_node)
        self.history.record(volume, evidence, result.mask)
        self.segmentation_node, self.result, self.anchor = segmentation_node, result, anchor
        grounding = getattr(result, "grounding", None)
        if grounding is not None:
            self.grounding = grounding
        voxels = int((result.mask > 0).sum())
        segment_name = segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()
        message = f"Segment '{segment_name}': {result.volume_ml:.1f} mL from key {mm.slice_label(volume_node, volume, anchor.slice_index)}"
        if voxels == 0:
            message += " (empty: move or enlarge the evidence box and the segment is redone)"
        if kept_note:
            message += f". {kept_note}"
        return Outcome(
            "segmentation", "ok", message,
            reasoning=getattr(grounding, "reasoning", "") if grounding is not None else "",
            raw_text=getattr(grounding, "raw_text", "") if grounding is not None else "",
            anchor=anchor, rois=rois, key_ras=mm.key_point_ras(volume, anchor),
            segmentation_node=segmentation_node, segment_id=segment_id, voxels=voxels,
        )
