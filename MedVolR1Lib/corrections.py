"""A segment under correction: the user edits the evidence, the mask follows, one step back restores both.

`CorrectionSession` is the library's undo point for the CLI, the Slicer worker and the simulated user: it
owns an `EvidenceHistory` and a `Pipeline` (whose propagator keeps the volume's image features and the
walks already tracked, so a correction re-tracks only the slices it affects).  Every edit is validated
before anything runs; a bad edit raises AnchorError and leaves the evidence, the mask and the history as
they were.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

from .anchor import EvidenceAnchor, VoxelBox
from .evidence import Evidence, EvidencePoint
from .evidence_history import EvidenceHistory
from .errors import AnchorError
from .pipeline import Pipeline, SegmentationResult
from .progress import ProgressCallback
from .volume import Volume


def with_anchor(evidence: Evidence, anchor: EvidenceAnchor) -> Evidence:
    """Add an anchor, or replace the boxes of the anchor already on that slice."""
    others = tuple(a for a in evidence.anchors if a.slice_index != anchor.slice_index)
    return replace(evidence, anchors=(*others, anchor))


def without_anchor(evidence: Evidence, slice_index: int) -> Evidence:
    """Remove the anchor on a slice (and the points on it); the last anchor cannot go."""
    if int(slice_index) not in evidence.anchor_slices:
        raise AnchorError(f"slice {slice_index} has no anchor to remove (anchors: {list(evidence.anchor_slices)})")
    if len(evidence.anchors) == 1:
        raise AnchorError("the last anchor cannot be removed: the evidence needs at least one box")
    return replace(evidence, anchors=tuple(a for a in evidence.anchors if a.slice_index != int(slice_index)),
                   points=tuple(p for p in evidence.points if p.slice_index != int(slice_index)))


def extent_with(current: Optional[tuple[int, int]], num_slices: Optional[int], lowest: Optional[int] = None,
                highest: Optional[int] = None) -> tuple[int, int]:
    """The extent after setting its lowest and/or highest slice; an unset side keeps `current` (else the volume's end)."""
    low, high = current or (0, (num_slices - 1) if num_slices else None)
    low = int(lowest) if lowest is not None else low
    high = int(highest) if highest is not None else high
    if high is None:
        raise AnchorError("give num_slices (or both limits) to set only the lowest slice")
    return low, high


def with_extent(evidence: Evidence, lowest: Optional[int] = None, highest: Optional[int] = None,
                num_slices: Optional[int] = None) -> Evidence:
    """Set the lowest and/or highest slice the mask may reach (the other side keeps its limit, if any)."""
    return replace(evidence, z_range=extent_with(evidence.z_range, num_slices, lowest, highest))


def parse_z_range_spec(text: str) -> tuple[int, int]:
    """``K0:K1`` -> (K0, K1), the lowest and highest slice (inclusive)."""
    low, sep, high = str(text).strip().partition(":")
    try:
        if not sep:
            raise ValueError
        return int(low), int(high)
    except ValueError:
        raise AnchorError(f"extent {text!r}: expected K0:K1 (lowest and highest slice, whole numbers)") from None


def parse_point_spec(text: str) -> tuple[int, float, float, bool]:
    """``K:x,y`` or ``K:x,y:neg`` -> (K, x, y, positive); units are the caller's (--box-units)."""
    parts = str(text).strip().split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2].strip().lower() not in ("neg", "pos")):
        raise AnchorError(f"point {text!r}: expected K:x,y or K:x,y:neg")
    try:
        k = int(parts[0])
        x, y = (float(v) for v in parts[1].split(","))
    except ValueError:
        raise AnchorError(f"point {text!r}: expected a whole slice number and two numbers x,y") from None
    return k, x, y, not (len(parts) == 3 and parts[2].strip().lower() == "neg")


def evidence_from_specs(
    *,
    to_voxel_box,
    to_voxel_point,
    key: Optional[tuple[int, Sequence[Sequence[float]]]] = None,
    anchors: Sequence[str] = (),
    z_range: Optional[str] = None,
    points: Sequence[str] = (),
) -> Evidence:
    """Evidence from command-line specs; `to_voxel_box` / `to_voxel_point` convert from the user's units.

    `key` is the one-anchor shorthand (--slice/--box); it comes first, then every `K:x1,y1,x2,y2[;...]`."""
    from .evidence import parse_anchor_spec

    specs = [key] if key is not None else []
    specs += [parse_anchor_spec(a) for a in anchors]
    if not specs:
        raise AnchorError("no anchor: give --slice K --box x1,y1,x2,y2 or --anchor K:x1,y1,x2,y2")
    built = tuple(EvidenceAnchor(int(k), tuple(to_voxel_box(b) for b in boxes)) for k, boxes in specs)
    clicks = []
    for spec in points:
        k, x, y, positive = parse_point_spec(spec)
        i, j = to_voxel_point(x, y)
        clicks.append(EvidencePoint(k, float(i), float(j), positive))
    return Evidence(built, parse_z_range_spec(z_range) if z_range else None, tuple(clicks))


class CorrectionSession:
    """Evidence versions of one segment on one volume, with their masks."""

    def __init__(self, pipeline: Pipeline, volume: Volume, *, query: Optional[str] = None, history_limit: int = 20):
        self.pipeline = pipeline
        self.volume = volume
        self.query = query
        self.history = EvidenceHistory(history_limit)
        self._result: Optional[SegmentationResult] = None

    @classmethod
    def from_result(cls, pipeline: Pipeline, result: SegmentationResult, *, history_limit: int = 20) -> "CorrectionSession":
        """Continue from a result the pipeline already produced (e.g. the VLM's anchor)."""
        session = cls(pipeline, result.volume, query=result.query, history_limit=history_limit)
        session._result = result
        session.history.push(result.evidence, result.mask)
        return session

    @property
    def result(self) -> SegmentationResult:
        if self._result is None:
            raise AnchorError("no evidence yet: start the session with a first anchor")
        return self._result

    @property
    def evidence(self) -> Evidence:
        return self.result.evidence

    def apply(self, evidence: "Evidence | EvidenceAnchor", progress: Optional[ProgressCallback] = None) -> SegmentationResult:
        """Propagate new evidence and make it the current version (nothing changes if it is refused)."""
        evidence = Evidence.coerce(evidence).validate(self.volume.shape)
        if self._result is None:
            result = self.pipeline.propagate(self.volume, evidence, progress=progress, query=self.query)
        else:
            result = self.pipeline.repropagate(self._result, evidence, progress=progress)
        self.history.push(result.evidence, result.mask)
        self._result = result
        return result

    def add_anchor(self, slice_index: int, boxes: Sequence[VoxelBox], progress: Optional[ProgressCallback] = None) -> SegmentationResult:
        anchor = EvidenceAnchor(int(slice_index), tuple(boxes))
        if self._result is None:
            return self.apply(anchor, progress)
        return self.apply(with_anchor(self.evidence, anchor), progress)

    def remove_anchor(self, slice_index: int, progress: Optional[ProgressCallback] = None) -> SegmentationResult:
        return self.apply(without_anchor(self.evidence, slice_index), progress)

    def limit_extent(self, lowest: Optional[int] = None, highest: Optional[int] = None,
                     progress: Optional[ProgressCallback] = None) -> SegmentationResult:
        return self.apply(with_extent(self.evidence, lowest, highest, self.volume.num_slices), progress)

    def add_point(self, point: EvidencePoint, progress: Optional[ProgressCallback] = None) -> SegmentationResult:
        return self.apply(replace(self.evidence, points=(*self.evidence.points, point)), progress)

    def undo(self) -> SegmentationResult:
        """Step back one version: the previous evidence and its mask, without propagating again."""
        try:
            version = self.history.undo()
        except ValueError as exc:
            raise AnchorError(str(exc)) from None
        self._result = replace(self.result, evidence=version.evidence, anchor=version.evidence.primary, mask=version.mask,
                               timings={})
        return self._result
