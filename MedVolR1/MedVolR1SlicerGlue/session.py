"""What the panel does, as plain Python over an MRML scene: the Logic of the module without Qt.

Model work runs in a `BackgroundJob`; every scene change happens in `poll()`, which the GUI thread
calls (a QTimer in Slicer; directly in tests).  A failed or cancelled run leaves the scene as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from MedVolR1Lib.anchor import EvidenceAnchor
from MedVolR1Lib.errors import MedVolR1Error
from MedVolR1Lib.volume import Volume

from . import evidence_edits
from . import mrml_mapping as mm
from .jobs import BackgroundJob, JobState
from .segment_guard import SegmentGuard
from .settings import PanelSettings, check_settings


class QueryError(MedVolR1Error):
    """The clinical query is missing or unusable."""


class BusyError(MedVolR1Error):
    """A run is in progress; wait for it or press Cancel."""


PipelineFactory = Callable[[PanelSettings], Any]


def default_pipeline_factory(settings: PanelSettings):
    from MedVolR1Lib.pipeline import Pipeline

    return Pipeline(settings.to_config())


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
    kind: str
    job: BackgroundJob
    volume_node: Any
    volume: Volume
    query: str


class EvidenceSession:
    """State of one panel: volume, evidence ROIs, last result, the running job and a queued re-propagation."""

    def __init__(self, scene, pipeline_factory: PipelineFactory = default_pipeline_factory, *, check=check_settings) -> None:
        self.scene = scene
        self._factory = pipeline_factory
        self._check = check
        self._pipelines: dict[PanelSettings, Any] = {}
        self._run: Optional[_Run] = None
        self._queued_edit: Optional[tuple[Any, PanelSettings]] = None
        self.settings = PanelSettings()
        self.grounding: Any = None
        self.result: Any = None  # last SegmentationResult (its cached features make re-propagation cheap)
        self.segmentation_node: Any = None
        self.anchor: Optional[EvidenceAnchor] = None
        self.reprop_requests = 0
        # Edits never lost: each result is a version (undo), and only overwrites a segment nobody changed.
        self.history = evidence_edits.VolumeHistory()
        self.guard = SegmentGuard()

    # ------------------------------------------------------------------------------------------- GUI-thread API
    @property
    def busy(self) -> bool:
        return self._run is not None

    def progress(self) -> Optional[JobState]:
        return self._run.job.poll() if self._run else None

    def cancel(self) -> None:
        self._queued_edit = None
        if self._run:
            self._run.job.cancel()

    def start_find_evidence(self, volume_node, query: str, settings: PanelSettings) -> BackgroundJob:
        volume, query = self._prepare(volume_node, query, settings, need_query=True)
        return self._start("evidence", volume_node, volume, query, lambda p: self._pipeline(settings).ground(volume, query, progress=p))

    def start_segment(self, volume_node, query: str, settings: PanelSettings) -> BackgroundJob:
        """Segment from the evidence ROIs on screen if there are any (the user may have fixed them), else from the query."""
        rois = mm.evidence_rois(self.scene, volume_node)
        volume, query = self._prepare(volume_node, query, settings, need_query=not rois)
        if rois:
            evidence = evidence_edits.evidence_from_rois(volume, rois, z_range=evidence_edits.extent_limit(volume_node))
            work = lambda p: self._pipeline(settings).propagate(volume, evidence, progress=p, query=query or None)  # noqa: E731
        else:
            work = lambda p: self._pipeline(settings).segment(volume, query, progress=p)  # noqa: E731
        return self._start("segmentation", volume_node, volume, query, work)

    def on_roi_edited(self, roi, settings: Optional[PanelSettings] = None) -> Optional[BackgroundJob]:
        """A user drag ended (after debounce): re-propagate if a segmentation exists, else just record the anchor."""
        settings = settings or self.settings
        volume_node = mm.volume_of_roi(self.scene, roi)
        if volume_node is None:
            return None
        if self._run is not None:
            self._queued_edit = (roi, settings)
            if self._run.kind == "repropagation":
                self._run.job.cancel()  # superseded by the newer edit
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
        return self._start(
            "repropagation", volume_node, volume, query, lambda p: self._pipeline(settings).repropagate(result, evidence, progress=p)
        )

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

    # ----------------------------------------------------------------------------------------------- internals
    def _prepare(self, volume_node, query: str, settings: PanelSettings, *, need_query: bool) -> tuple[Volume, str]:
        if self._run is not None:
            raise BusyError("a run is in progress: wait for it to finish or press Cancel")
        query = (query or "").strip()
        volume = mm.volume_from_node(volume_node)
        if need_query and not query:
            raise QueryError("Type a clinical query first, e.g. 'segment the left kidney'")
        self._check(settings)
        self.settings = settings
        return volume, query

    def _pipeline(self, settings: PanelSettings):
        if settings not in self._pipelines:  # worker thread; only one job runs at a time
            self._pipelines[settings] = self._factory(settings)
        return self._pipelines[settings]

    def _start(self, kind, volume_node, volume, query, work) -> BackgroundJob:
        job = BackgroundJob(work, name=kind).start()
        self._run = _Run(kind, job, volume_node, volume, query)
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
            grounding = result
            anchor = grounding.anchor.clipped(volume.shape) if grounding.anchor is not None else None
            if anchor is None:
                raise MedVolR1Error("the model gave no usable evidence")
            rois = mm.place_evidence_rois(self.scene, volume_node, volume, anchor, mm.evidence_rois(self.scene, volume_node))
            self.grounding, self.anchor = grounding, anchor
            return Outcome(
                "evidence", "ok", f"Key {mm.slice_label(volume_node, volume, anchor.slice_index)}, {len(anchor.boxes)} box(es)",
                reasoning=getattr(grounding, "reasoning", "") or "", raw_text=getattr(grounding, "raw_text", "") or "",
                anchor=anchor, rois=rois, key_ras=mm.key_point_ras(volume, anchor),
            )
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
