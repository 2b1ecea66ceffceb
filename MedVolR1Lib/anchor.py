"""The evidence anchor (key axial slice + 2D boxes) and the model's answer format.

The grounder answers ``<think>...</think><answer>{"slice": k, "boxes": [[x1, y1, x2, y2], ...]}</answer>``
with boxes in pixels of the rendered view of slice k.  `parse_answer` turns any text into either a
`ParsedAnswer` or a `ParseFailure` (it never raises: rewards and the UI get model garbage too).
`EvidenceAnchor` holds the same evidence in voxel units of the canonical volume, which is what the
propagators and the Slicer markups use.

Voxel boxes use *edge* coordinates: voxel (j, i) covers [i, i+1) x [j, j+1), so the box of voxels
i_min..i_max is ``VoxelBox(i_min, j_min, i_max + 1, j_max + 1)``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from .errors import AnchorError

PixelBox = tuple[float, float, float, float]

_ANSWER_RE = re.compile(
    r"^\s*(?:<think>(?P<think>.*?)</think>)?\s*<answer>(?P<answer>.*?)</answer>\s*$", re.DOTALL
)


@dataclass(frozen=True)
class VoxelBox:
    """A 2D box on one axial slice, in voxel edge coordinates of the canonical volume."""

    i0: float
    j0: float
    i1: float
    j1: float

    @classmethod
    def from_voxels(cls, i_min: int, j_min: int, i_max: int, j_max: int) -> "VoxelBox":
        """Box that exactly covers voxels i_min..i_max, j_min..j_max (inclusive)."""
        return cls(float(i_min), float(j_min), float(i_max + 1), float(j_max + 1))

    def voxel_range(self, shape_ji: Sequence[int]) -> tuple[int, int, int, int]:
        """Inclusive voxel index range (i_min, j_min, i_max, j_max) touched by the box, clipped to the slice."""
        rows, cols = int(shape_ji[0]), int(shape_ji[1])
        i_min = int(np.clip(math.floor(self.i0 + 1e-6), 0, cols - 1))
        j_min = int(np.clip(math.floor(self.j0 + 1e-6), 0, rows - 1))
        i_max = int(np.clip(math.ceil(self.i1 - 1e-6) - 1, i_min, cols - 1))
        j_max = int(np.clip(math.ceil(self.j1 - 1e-6) - 1, j_min, rows - 1))
        return i_min, j_min, i_max, j_max

    def as_list(self) -> list[float]:
        return [self.i0, self.j0, self.i1, self.j1]

    @property
    def area(self) -> float:
        return max(0.0, self.i1 - self.i0) * max(0.0, self.j1 - self.j0)


@dataclass(frozen=True)
class EvidenceAnchor:
    """Key axial slice k (canonical index) and one or more boxes on it."""

    slice_index: int
    boxes: tuple[VoxelBox, ...]

    def validate(self, shape_kji: Sequence[int]) -> "EvidenceAnchor":
        """Raise AnchorError unless the slice is in range and every box is a proper box inside the slice."""
        num_slices, rows, cols = (int(n) for n in shape_kji)
        if isinstance(self.slice_index, bool) or not isinstance(self.slice_index, (int, np.integer)):
            raise AnchorError(f"slice index must be an integer, got {self.slice_index!r}")
        if not 0 <= int(self.slice_index) < num_slices:
            raise AnchorError(f"slice {self.slice_index} is out of range: the volume has slices 0..{num_slices - 1}")
        if not self.boxes:
            raise AnchorError("the evidence has no boxes: give at least one box on the key slice")
        for n, box in enumerate(self.boxes, start=1):
            values = box.as_list()
            if not all(math.isfinite(v) for v in values):
                raise AnchorError(f"box {n} has a non-finite coordinate: {values}")
            if not (box.i0 < box.i1 and box.j0 < box.j1):
                raise AnchorError(f"box {n} is empty or inverted (need i0 < i1 and j0 < j1): {values}")
            if box.i1 <= 0 or box.j1 <= 0 or box.i0 >= cols or box.j0 >= rows:
                raise AnchorError(f"box {n} lies outside the {cols}x{rows} slice: {values}")
        return self

    def clipped(self, shape_kji: Sequence[int]) -> "EvidenceAnchor":
        """Same anchor with boxes clipped to the slice (after `validate`, for boxes that stick out)."""
        _, rows, cols = (int(n) for n in shape_kji)
        boxes = tuple(
            VoxelBox(max(0.0, b.i0), max(0.0, b.j0), min(float(cols), b.i1), min(float(rows), b.j1)) for b in self.boxes
        )
        return EvidenceAnchor(int(self.slice_index), boxes)

    def to_dict(self) -> dict:
        return {"slice": int(self.slice_index), "boxes_voxel": [b.as_list() for b in self.boxes]}


@dataclass(frozen=True)
class ParsedAnswer:
    """A syntactically valid answer: key slice and boxes in rendered-image pixels (x right, y down)."""

    slice_index: int
    boxes: tuple[PixelBox, ...]
    think: str = ""
    has_think: bool = True


@dataclass(frozen=True)
class ParseFailure:
    """Why a model output is not a valid answer; keeps the raw text for the user."""

    reason: str
    raw: str
    partial_slice: Optional[int] = None
    details: dict = field(default_factory=dict)


ParseResult = Union[ParsedAnswer, ParseFailure]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_answer(text: object, *, require_think: bool = False) -> ParseResult:
    """Strictly parse `<think>...</think><answer>{json}</answer>`; never raises."""
    if not isinstance(text, str):
        return ParseFailure("not_text", repr(text)[:2000])
    match = _ANSWER_RE.match(text)
    if match is None:
        reason = "missing_answer_tags" if "<answer>" not in text or "</answer>" not in text else "malformed_tags"
        return ParseFailure(reason, text)
    think = match.group("think")
    if require_think and think is None:
        return ParseFailure("missing_think", text)
    if "<answer>" in match.group("answer") or "<think>" in match.group("answer"):
        return ParseFailure("malformed_tags", text)
    try:
        payload = json.loads(match.group("answer"))
    except (ValueError, RecursionError):
        return ParseFailure("invalid_json", text)
    if not isinstance(payload, dict):
        return ParseFailure("answer_not_object", text)
    slice_value = payload.get("slice")
    if not (isinstance(slice_value, int) and not isinstance(slice_value, bool)):
        return ParseFailure("slice_not_integer", text)
    if abs(slice_value) > 10**9:
        return ParseFailure("slice_not_integer", text)
    boxes_value = payload.get("boxes")
    if not isinstance(boxes_value, list) or not boxes_value:
        return ParseFailure("no_boxes", text, partial_slice=slice_value)
    boxes: list[PixelBox] = []
    for box in boxes_value:
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            return ParseFailure("box_not_four_numbers", text, partial_slice=slice_value)
        boxes.append(tuple(float(v) for v in box))  # type: ignore[arg-type]
    return ParsedAnswer(
        slice_index=slice_value,
        boxes=tuple(boxes),
        think=(think or "").strip(),
        has_think=think is not None,
    )


@dataclass(frozen=True)
class AnswerRules:
    """What a well-formed answer must also satisfy for one prompt."""

    image_size: int
    shown_slices: tuple[int, ...]
    max_boxes: int = 4


def answer_problems(answer: ParsedAnswer, rules: AnswerRules) -> list[str]:
    """Semantic checks beyond syntax; an empty list means the answer is usable as is."""
    problems: list[str] = []
    if answer.slice_index not in rules.shown_slices:
        problems.append(f"slice {answer.slice_index} was not among the slices shown")
    if len(answer.boxes) > rules.max_boxes:
        problems.append(f"{len(answer.boxes)} boxes, at most {rules.max_boxes} allowed")
    size = rules.image_size
    for n, (x1, y1, x2, y2) in enumerate(answer.boxes, start=1):
        if not (x1 < x2 and y1 < y2):
            problems.append(f"box {n} is empty or inverted")
        if min(x1, y1) < 0 or max(x2, y2) > size:
            problems.append(f"box {n} leaves the {size}x{size} image")
    return problems


def format_answer(slice_index: int, boxes: Iterable[Sequence[float]], think: Optional[str] = None) -> str:
    """The target text for SFT (and what a perfect model would say); boxes rounded to whole pixels."""
    payload = {"slice": int(slice_index), "boxes": [[int(round(v)) for v in box] for box in boxes]}
    answer = f"<answer>{json.dumps(payload, separators=(', ', ': '))}</answer>"
    return f"<think>{think}</think>{answer}" if think is not None else answer


def box_ras_bounds(ijk_to_ras: np.ndarray, slice_index: int, box: VoxelBox) -> tuple[np.ndarray, np.ndarray]:
    """RAS corners of a box one slice thick: (min corner, max corner) in mm, axis-aligned in RAS.

    Exact for axis-aligned scans (the usual case); for oblique scans it is the RAS bounding box.
    """
    corners = []
    for i in (box.i0, box.i1):
        for j in (box.j0, box.j1):
            for k in (slice_index, slice_index + 1):
                corners.append((i - 0.5, j - 0.5, k - 0.5))
    corners_arr = np.asarray(corners)
    ras = corners_arr @ np.asarray(ijk_to_ras)[:3, :3].T + np.asarray(ijk_to_ras)[:3, 3]
    return ras.min(axis=0), ras.max(axis=0)


def box_from_ras_bounds(ijk_to_ras: np.ndarray, ras_min: Sequence[float], ras_max: Sequence[float]) -> tuple[VoxelBox, int]:
    """Inverse of `box_ras_bounds`: an axis-aligned RAS box -> (voxel box, slice index)."""
    inverse = np.linalg.inv(np.asarray(ijk_to_ras, dtype=np.float64))
    corners = np.array([[x, y, z, 1.0] for x in (ras_min[0], ras_max[0]) for y in (ras_min[1], ras_max[1]) for z in (ras_min[2], ras_max[2])])
    ijk = (corners @ inverse.T)[:, :3] + 0.5
    lo, hi = ijk.min(axis=0), ijk.max(axis=0)
    slice_index = int(math.floor((lo[2] + hi[2]) / 2.0))
    return VoxelBox(float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])), slice_index
