"""The evidence a mask is propagated from: one or more anchors, optional extent limits, optional points.

The VLM gives one anchor (key slice + boxes); a radiologist's corrections add anchors on other slices,
limit where the organ may extend (lowest/highest slice), or add positive/negative points (MedSAM2).
Everything is in canonical voxel units (see volume.py); conversions to rendered pixels, source voxels
and RAS live in views.py / anchor.py.  `Evidence` is immutable: an edit makes a new version, so the
history of versions (evidence_history.py) can step back.

`parse_anchor_spec` reads the command-line / batch-manifest syntax ``K:x1,y1,x2,y2[;x1,y1,x2,y2...]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from .anchor import EvidenceAnchor, VoxelBox
from .errors import AnchorError

DEFAULT_MAX_BOXES = 8


@dataclass(frozen=True)
class EvidencePoint:
    """A click on one axial slice, canonical voxel centre coordinates (i, j); positive = "this is the target"."""

    slice_index: int
    i: float
    j: float
    positive: bool = True

    def to_dict(self) -> dict:
        return {"slice": int(self.slice_index), "i": float(self.i), "j": float(self.j), "positive": bool(self.positive)}

    @classmethod
    def from_dict(cls, data: dict) -> "EvidencePoint":
        return cls(int(data["slice"]), float(data["i"]), float(data["j"]), bool(data.get("positive", True)))


@dataclass(frozen=True)
class Evidence:
    """One or more anchors (first = the VLM's or the user's first), optional inclusive z-limits and points."""

    anchors: tuple[EvidenceAnchor, ...]
    z_range: Optional[tuple[int, int]] = None  # inclusive (lowest, highest) canonical slice the mask may reach
    points: tuple[EvidencePoint, ...] = ()

    @classmethod
    def single(cls, anchor: EvidenceAnchor) -> "Evidence":
        return cls((anchor,))

    @classmethod
    def coerce(cls, value: "Evidence | EvidenceAnchor") -> "Evidence":
        """Accept either type at API boundaries, so one-anchor callers need not change."""
        if isinstance(value, Evidence):
            return value
        if isinstance(value, EvidenceAnchor):
            return cls.single(value)
        raise AnchorError(f"expected evidence or an anchor, got {type(value).__name__}")

    @property
    def primary(self) -> EvidenceAnchor:
        return self.anchors[0]

    @property
    def anchor_slices(self) -> tuple[int, ...]:
        return tuple(int(a.slice_index) for a in self.anchors)

    def validate(self, shape_kji: Sequence[int], max_boxes: int = DEFAULT_MAX_BOXES) -> "Evidence":
        """Raise AnchorError (changing nothing) unless every anchor, limit and point fits the volume."""
        num_slices, rows, cols = (int(n) for n in shape_kji)
        if not self.anchors:
            raise AnchorError("the evidence has no anchor: give at least one slice with a box")
        seen: set[int] = set()
        for anchor in self.anchors:
            anchor.validate(shape_kji)
            if len(anchor.boxes) > max_boxes:
                raise AnchorError(f"slice {anchor.slice_index} has {len(anchor.boxes)} boxes; at most {max_boxes} are allowed")
            if int(anchor.slice_index) in seen:
                raise AnchorError(f"slice {anchor.slice_index} has two anchors; put all its boxes in one anchor")
            seen.add(int(anchor.slice_index))
        if self.z_range is not None:
            lo, hi = (int(v) for v in self.z_range)
            if lo > hi:
                raise AnchorError(f"the extent limit is inverted: lowest slice {lo} is above highest slice {hi}")
            if lo < 0 or hi > num_slices - 1:
                raise AnchorError(f"the extent limit [{lo}, {hi}] leaves the volume's slices 0..{num_slices - 1}")
            outside = [k for k in seen if not lo <= k <= hi]
            if outside:
                raise AnchorError(f"anchor slice(s) {sorted(outside)} lie outside the extent limit [{lo}, {hi}]")
        for n, point in enumerate(self.points, start=1):
            if not (math.isfinite(point.i) and math.isfinite(point.j)):
                raise AnchorError(f"point {n} has a non-finite coordinate")
            if int(point.slice_index) not in seen:
                raise AnchorError(f"point {n} is on slice {point.slice_index}, which has no anchor; add a box there first")
            if not (0 <= point.i < cols and 0 <= point.j < rows):
                raise AnchorError(f"point {n} ({point.i}, {point.j}) lies outside the {cols}x{rows} slice")
        return self

    def clipped(self, shape_kji: Sequence[int]) -> "Evidence":
        return Evidence(tuple(a.clipped(shape_kji) for a in self.anchors), self.z_range, self.points)

    def to_dict(self) -> dict:
        return {
            "anchors": [a.to_dict() for a in self.anchors],
            "z_range": list(self.z_range) if self.z_range is not None else None,
            "points": [p.to_dict() for p in self.points],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Evidence":
        """Inverse of `to_dict`; raises AnchorError on a malformed record (never KeyError/TypeError)."""
        try:
            anchors = tuple(
                EvidenceAnchor(int(a["slice"]), tuple(VoxelBox(*(float(v) for v in box)) for box in a["boxes_voxel"]))
                for a in data["anchors"]
            )
            z_range = data.get("z_range")
            points = tuple(EvidencePoint.from_dict(p) for p in data.get("points") or ())
            return cls(anchors, (int(z_range[0]), int(z_range[1])) if z_range is not None else None, points)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise AnchorError(f"malformed evidence record: {exc}") from None


def parse_anchor_spec(text: str) -> tuple[int, tuple[tuple[float, float, float, float], ...]]:
    """``K:x1,y1,x2,y2[;x1,y1,x2,y2...]`` -> (K, boxes); units are the caller's (--box-units)."""
    slice_text, sep, boxes_text = str(text).strip().partition(":")
    if not sep:
        raise AnchorError(f"anchor {text!r}: expected K:x1,y1,x2,y2[;x1,y1,x2,y2...]")
    try:
        slice_index = int(slice_text)
    except ValueError:
        raise AnchorError(f"anchor {text!r}: the slice {slice_text!r} is not a whole number") from None
    boxes = []
    for part in boxes_text.split(";"):
        if not part.strip():
            continue
        try:
            values = tuple(float(v) for v in part.split(","))
        except ValueError:
            raise AnchorError(f"anchor {text!r}: box {part!r} is not four numbers x1,y1,x2,y2") from None
        if len(values) != 4 or not all(math.isfinite(v) for v in values):
            raise AnchorError(f"anchor {text!r}: box {part!r} is not four finite numbers x1,y1,x2,y2")
        boxes.append(values)
    if not boxes:
        raise AnchorError(f"anchor {text!r}: no box after the slice number")
    return slice_index, tuple(boxes)  # type: ignore[return-value]
