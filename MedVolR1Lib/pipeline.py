"""Query -> evidence anchor -> 3D mask: the product's core job, shared by the CLI and the Slicer module.

The grounder and the propagator are loaded lazily (the first is not needed for a manual anchor) and
kept, so a second query or an edited box on the same volume reuses both the models and the cached
image features.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

from .anchor import EvidenceAnchor
from .evidence import Evidence
from .errors import AnchorError
from .progress import ProgressCallback, report
from .propagation.base import Propagator
from .volume import Volume, check_segmentable


@dataclass
class PipelineConfig:
    """User settings; the same fields appear as CLI flags and in the Slicer panel."""

    model: Optional[str] = None  # Qwen2.5-VL hub id or local folder; None: manual anchors only
    adapter: Optional[str] = None  # PEFT LoRA adapter folder from training
    propagator: str = "auto"  # "auto" | "litemedsam" | "medsam2"
    sam_checkpoint: Optional[str] = None  # MedSAM2_latest.pt
    sam_overrides: tuple[str, ...] = ()  # hydra overrides (micro test models)
    device: str = "auto"
    num_views: int = 16
    image_size: int = 448
    window: Optional[str] = None  # CT preset name or "percentile"; default by modality
    lenient: bool = False  # grounder also reads native grounding JSON (off-the-shelf Instruct models)
    encoder: str = "auto"  # LiteMedSAM's encoder path (propagation.lite_encoder.ENCODERS); auto: this CPU's fastest
    slice_stride: int = 1  # LiteMedSAM: encode every n-th slice on scans with slices <= 1.5 mm apart (docs/benchmarks.md)


@dataclass
class SegmentationResult:
    """Everything the user sees and every output file is written from."""

    volume: Volume
    anchor: EvidenceAnchor  # the first anchor (the VLM's, or the user's first box)
    mask: np.ndarray  # canonical (K, J, I) uint8
    query: Optional[str] = None
    grounding: Optional[object] = None  # grounder.GroundingResult when a VLM chose the anchor
    timings: dict[str, float] = field(default_factory=dict)
    target_name: str = "target"
    evidence: Optional[Evidence] = None  # every anchor, extent limit and point (None: just `anchor`)

    def __post_init__(self) -> None:
        if self.evidence is None:
            self.evidence = Evidence.single(self.anchor)

    @property
    def voxel_count(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def volume_ml(self) -> float:
        return self.voxel_count * float(np.prod(self.volume.spacing)) / 1000.0


def target_name_from_query(query: Optional[str]) -> str:
    """A short segment name from the query ("segment the left kidney" -> "left kidney")."""
    if not query:
        return "target"
    text = query.strip().rstrip("?.!").strip()
    lowered = text.lower()
    for prefix in ("please ", "segment ", "show me ", "show ", "find ", "where is ", "which is ", "the "):
        if lowered.startswith(prefix):
            text, lowered = text[len(prefix):], lowered[len(prefix):]
    return (text.strip() or "target")[:60]


class Pipeline:
    """Ground a query on a volume, propagate the evidence to 3D, re-propagate after edits."""

    def __init__(self, config: Optional[PipelineConfig] = None, *, grounder=None, propagator: Optional[Propagator] = None):
        self.config = config or PipelineConfig()
        self._grounder = grounder
        self._propagator = propagator
        self._segmentable: set[str] = set()  # fingerprints already checked: a drag's re-propagation skips the full scan

    def _check_segmentable(self, volume: Volume) -> None:
        """`check_segmentable` once per volume (its fingerprint is computed anyway: the feature caches use it)."""
        if volume.fingerprint not in self._segmentable:
            check_segmentable(volume)
            self._segmentable.add(volume.fingerprint)

    @property
    def grounder(self):
        if self._grounder is None:
            if not self.config.model:
                raise ValueError("no vision-language model configured: set a model id or folder (--model)")
            from .grounder import GenerationSettings, Grounder

            self._grounder = Grounder.from_pretrained(self.config.model, adapter=self.config.adapter, device=self.config.device,
                                                      settings=GenerationSettings(lenient=self.config.lenient))
        return self._grounder

    @property
    def propagator(self) -> Propagator:
        if self._propagator is None:
            from .propagation.factory import build_propagator

            self._propagator = build_propagator(
                self.config.propagator,
                sam_checkpoint=self.config.sam_checkpoint,
                device=self.config.device,
                window=self.config.window,
                sam_overrides=self.config.sam_overrides,
                encoder=self.config.encoder,
                slice_stride=self.config.slice_stride,
            )
        return self._propagator

    def describe(self) -> dict:
        """The models loaded so far, with checkpoint hashes, for evidence.json's provenance."""
        record: dict = {}
        if self._grounder is not None:
            record["grounder"] = self._grounder.describe()
        if self._propagator is not None:
            record["propagator"] = self._propagator.describe()
        return record

    def ground(self, volume: Volume, query: str, progress: Optional[ProgressCallback] = None):
        """Ask the VLM for the evidence anchor; raises GroundingError (with the raw text) on garbage."""
        if not (query or "").strip():
            raise ValueError("the query is empty: type a clinical question, e.g. 'segment the liver'")
        self._check_segmentable(volume)
        return self.grounder.ground(
            volume,
            query,
            num_views=self.config.num_views,
            image_size=self.config.image_size,
            window=self.config.window,
            progress=progress,
        )

    def segment(self, volume: Volume, query: str, progress: Optional[ProgressCallback] = None) -> SegmentationResult:
        start = time.perf_counter()
        report(progress, 0.0, "finding the evidence slice and boxes")
        grounding = self.ground(volume, query, progress=_scaled(progress, 0.0, 0.4))
        grounded = time.perf_counter()
        result = self.propagate(volume, grounding.anchor, progress=_scaled(progress, 0.4, 1.0), query=query)
        result.grounding = grounding
        result.timings = {"grounding_s": grounded - start, **result.timings}
        return result

    def propagate(
        self,
        volume: Volume,
        evidence: "Evidence | EvidenceAnchor",
        progress: Optional[ProgressCallback] = None,
        query: Optional[str] = None,
    ) -> SegmentationResult:
        """Segment from given evidence (the VLM's anchor or the user's corrections); no VLM involved."""
        if evidence is None:
            raise AnchorError("no evidence anchor to propagate")
        self._check_segmentable(volume)  # NaN/Inf or constant scans: an error, never a silent mask
        evidence = Evidence.coerce(evidence).validate(volume.shape).clipped(volume.shape)
        propagator = self.propagator
        start = time.perf_counter()
        propagator.prepare(volume, progress=_scaled(progress, 0.0, 0.3))
        prepared = time.perf_counter()
        if len(evidence.anchors) == 1 and not evidence.points:  # one anchor: the form every backend has always taken
            given, slice_range = evidence.primary, evidence.z_range
        else:  # the propagator shares the slices between anchors and honours the extent limit and points
            given, slice_range = evidence, None
        mask = propagator.propagate(given, merge=True, slice_range=slice_range, progress=_scaled(progress, 0.3, 1.0))
        done = time.perf_counter()
        report(progress, 1.0, "done")
        return SegmentationResult(
            volume=volume,
            anchor=evidence.primary,
            mask=np.asarray(mask, dtype=np.uint8),
            query=query,
            timings={"prepare_s": prepared - start, "propagation_s": done - prepared},
            target_name=target_name_from_query(query),
            evidence=evidence,
        )

    def repropagate(
        self, result: SegmentationResult, evidence: "Evidence | EvidenceAnchor", progress: Optional[ProgressCallback] = None
    ) -> SegmentationResult:
        """After the user edits the evidence: same volume, cached features, new evidence."""
        updated = self.propagate(result.volume, evidence, progress=progress, query=result.query)
        return replace(updated, grounding=result.grounding, target_name=result.target_name)


def _scaled(progress: Optional[ProgressCallback], low: float, high: float) -> Optional[ProgressCallback]:
    """Map a sub-step's [0, 1] progress into [low, high] of the caller's bar."""
    if progress is None:
        return None
    return lambda fraction, message: progress(low + (high - low) * fraction, message)
