"""The evidence anchor (key axial slice + 2D boxes) and the model's answer formats.

Two answer schemas, both read by `parse_answer`:
- ``medvolr1``: ``<think>...</think><answer>{"slice": k, "boxes": [[x1, y1, x2, y2], ...]}</answer>``;
- ``paper`` (the MedVol-R1 release): ``<answer>[{"slice": k, "bbox_2d_list": [[x1, y1, x2, y2], ...]}]</answer>``.
Box numbers are in the checkpoint's coordinate convention (`AnswerFormat.coordinates`: rendered-view
pixels, or 0-1000 normalised as Qwen3-VL grounds); `parse_model_answer` converts them to rendered
pixels, the one convention everything downstream uses.  `parse_answer` turns any text into either a
`ParsedAnswer` or a `ParseFailure` (it never raises: rewards and the UI get model garbage too).  An
inference-only lenient mode also reads the family's native grounding JSON
(``[{"bbox_2d": [...], "label": ...}]``) so an off-the-shelf Instruct model can be tried; rewards
never use it.  `EvidenceAnchor` holds the same evidence in voxel units of the canonical volume, which
is what the propagators and the Slicer markups use.

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
_FENCE_RE = re.compile(r"```(?:json)?\s*(?P<body>.*?)```", re.DOTALL)
_SLICE_MENTION_RE = re.compile(r"\bslice\s*(?:k\s*=\s*)?(\d{1,6})\b", re.IGNORECASE)

SCHEMAS = ("medvolr1", "paper")
MAX_NUMBER = 1e9  # larger box coordinates or slice numbers are nonsense: a parse failure, never an overflow
MAX_PARSED_BOXES = 64  # more boxes than any anatomy needs: refused before any reward or propagation sees them


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
class AnswerFormat:
    """How a checkpoint writes its answer: the schema and the box-coordinate convention.

    coordinates "pixels": rendered-view pixels (Qwen2.5-VL, absolute pixels of its frame);
    "norm1000": 0-1000 of the view's width and height (Qwen3-VL's grounding convention).
    """

    schema: str = "medvolr1"
    coordinates: str = "pixels"

    def __post_init__(self) -> None:
        if self.schema not in SCHEMAS:
            raise ValueError(f"answer schema must be one of {SCHEMAS}, got {self.schema!r}")
        if self.coordinates not in ("pixels", "norm1000"):
            raise ValueError(f"coordinates must be 'pixels' or 'norm1000', got {self.coordinates!r}")

    @property
    def spec(self) -> str:
        """'schema:coordinates', e.g. 'paper:norm1000' (one JSON-friendly string for records and manifests)."""
        return f"{self.schema}:{self.coordinates}"

    @classmethod
    def from_spec(cls, spec: Optional[str]) -> "AnswerFormat":
        if not spec:
            return cls()
        schema, _, coordinates = str(spec).partition(":")
        return cls(schema, coordinates or "pixels")

    def _scale(self, image_size: int) -> float:
        return 1.0 if self.coordinates == "pixels" else float(image_size) / 1000.0

    def to_pixels(self, box: Sequence[float], image_size: int) -> PixelBox:
        scale = self._scale(image_size)
        return tuple(float(v) * scale for v in box)  # type: ignore[return-value]

    def from_pixels(self, box: Sequence[float], image_size: int) -> PixelBox:
        scale = self._scale(image_size)
        return tuple(float(v) / scale for v in box)  # type: ignore[return-value]


@dataclass(frozen=True)
class ParsedAnswer:
    """A syntactically valid answer: key slice and boxes (x right, y down).

    `boxes` are in the coordinates the text used until `parse_model_answer` (or
    `AnswerFormat.to_pixels`) turns them into rendered-image pixels.  `schema` says which form was
    read: "medvolr1", "paper" or (lenient mode only) "native".
    """

    slice_index: int
    boxes: tuple[PixelBox, ...]
    think: str = ""
    has_think: bool = True
    schema: str = "medvolr1"


@dataclass(frozen=True)
class ParseFailure:
    """Why a model output is not a valid answer; keeps the raw text for the user."""

    reason: str
    raw: str
    partial_slice: Optional[int] = None
    details: dict = field(default_factory=dict)


ParseResult = Union[ParsedAnswer, ParseFailure]


def _is_number(value: object) -> bool:
    """A finite JSON number of sane size (huge ints would overflow float(); bool is not a number)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -MAX_NUMBER <= value <= MAX_NUMBER
    return isinstance(value, float) and math.isfinite(value) and abs(value) <= MAX_NUMBER


def _is_slice(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_NUMBER


def _boxes(value: object, text: str, slice_value: int) -> Union[list[PixelBox], ParseFailure]:
    if not isinstance(value, list) or not value:
        return ParseFailure("no_boxes", text, partial_slice=slice_value)
    if len(value) > MAX_PARSED_BOXES:
        return ParseFailure("too_many_boxes", text, partial_slice=slice_value)
    boxes: list[PixelBox] = []
    for box in value:
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            return ParseFailure("box_not_four_numbers", text, partial_slice=slice_value)
        boxes.append(tuple(float(v) for v in box))  # type: ignore[arg-type]
    return boxes


def _read_ours(payload: dict, text: str) -> Union[tuple[int, list[PixelBox]], ParseFailure]:
    slice_value = payload.get("slice")
    if not _is_slice(slice_value):
        return ParseFailure("slice_not_integer", text)
    boxes = _boxes(payload.get("boxes"), text, slice_value)  # type: ignore[arg-type]
    return boxes if isinstance(boxes, ParseFailure) else (slice_value, boxes)  # type: ignore[return-value]


def _read_paper(payload: list, text: str) -> Union[tuple[int, list[PixelBox]], ParseFailure]:
    """``[{"slice": k, "bbox_2d_list": [...]}]``: one key slice (several entries must name the same slice)."""
    if not payload or not all(isinstance(item, dict) for item in payload):
        return ParseFailure("answer_not_object", text)
    if len(payload) > MAX_PARSED_BOXES:
        return ParseFailure("too_many_boxes", text)
    slices = [item.get("slice") for item in payload]
    if not all(_is_slice(k) for k in slices):
        return ParseFailure("slice_not_integer", text)
    if len(set(slices)) > 1:
        return ParseFailure("several_slices", text, partial_slice=slices[0])
    boxes: list[PixelBox] = []
    for item in payload:
        part = _boxes(item.get("bbox_2d_list"), text, slices[0])
        if isinstance(part, ParseFailure):
            return part
        boxes.extend(part)
    if len(boxes) > MAX_PARSED_BOXES:
        return ParseFailure("too_many_boxes", text, partial_slice=slices[0])
    return slices[0], boxes


def _read_payload(payload: object, text: str, schema: Optional[str]) -> Union[tuple[int, list[PixelBox], str], ParseFailure]:
    found = "medvolr1" if isinstance(payload, dict) else "paper" if isinstance(payload, list) else None
    if found is None or (schema is not None and found != schema):
        return ParseFailure("answer_not_object" if found is None else "wrong_schema", text)
    read = _read_ours(payload, text) if found == "medvolr1" else _read_paper(payload, text)  # type: ignore[arg-type]
    return read if isinstance(read, ParseFailure) else (*read, found)


def _loads(body: str) -> object:
    """json.loads that returns `_INVALID` instead of raising (bad JSON, ints over 4300 digits, deep nesting)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return _INVALID


_INVALID = object()


def parse_answer(text: object, *, require_think: bool = False, schema: Optional[str] = None, lenient: bool = False) -> ParseResult:
    """Parse `<think>...</think><answer>{json}</answer>` in either schema; never raises.

    `schema` ("medvolr1" | "paper") restricts the accepted schema (None: either).  `lenient=True`
    (inference only, never in rewards) also reads `_parse_lenient`'s forms.  Boxes come back in the
    text's own coordinates.
    """
    if not isinstance(text, str):
        return ParseFailure("not_text", repr(text)[:2000])
    match = _ANSWER_RE.match(text)
    if match is None:
        if lenient:
            return _parse_lenient(text, schema)
        reason = "missing_answer_tags" if "<answer>" not in text or "</answer>" not in text else "malformed_tags"
        return ParseFailure(reason, text)
    think = match.group("think")
    if require_think and think is None:
        return ParseFailure("missing_think", text)
    if "<answer>" in match.group("answer") or "<think>" in match.group("answer"):
        return ParseFailure("malformed_tags", text)
    body = match.group("answer")
    if lenient:
        fenced = _FENCE_RE.search(body)
        body = fenced.group("body") if fenced else body
    payload = _loads(body)
    if payload is _INVALID:
        return ParseFailure("invalid_json", text)
    read = _read_payload(payload, text, schema)
    if isinstance(read, ParseFailure) and lenient:
        return _parse_lenient(text, schema)
    if isinstance(read, ParseFailure):
        return read
    slice_value, boxes, found = read
    return ParsedAnswer(slice_value, tuple(boxes), think=(think or "").strip(), has_think=think is not None, schema=found)


def _parse_lenient(text: str, schema: Optional[str]) -> ParseResult:
    """What an off-the-shelf Instruct model tends to write instead of our tags.

    Reads the first JSON value in a ```json fence, or the text from its first '[' or '{': either
    schema without tags, or Qwen's native grounding list ``[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]``.
    The native list names no slice: an item's "slice" key, else the one slice number the text
    mentions ("slice 40"), else it fails with reason "no_slice".
    """
    fenced = _FENCE_RE.search(text)
    candidates = [fenced.group("body")] if fenced else []
    starts = [i for i in (text.find("["), text.find("{")) if i >= 0]
    if starts:
        start = min(starts)
        closing = "]" if text[start] == "[" else "}"
        candidates.append(text[start : text.rfind(closing) + 1])
    think_match = re.search(r"<think>(.*?)</think>", text, re.DOTALL)
    think = think_match.group(1).strip() if think_match else ""
    for body in candidates:
        payload = _loads(body)
        if payload is _INVALID:
            continue
        if isinstance(payload, dict):
            payload = [payload] if "bbox_2d" in payload else payload
        if isinstance(payload, list) and payload and all(isinstance(i, dict) and "bbox_2d" in i for i in payload):
            return _read_native(payload, text, body, think)
        read = _read_payload(payload, text, schema)
        if not isinstance(read, ParseFailure):
            return ParsedAnswer(read[0], tuple(read[1]), think=think, has_think=think_match is not None, schema=read[2])
    return ParseFailure("no_answer_found", text)


def _read_native(payload: list, text: str, body: str, think: str) -> ParseResult:
    if len(payload) > MAX_PARSED_BOXES:
        return ParseFailure("too_many_boxes", text)
    boxes: list[PixelBox] = []
    for item in payload:
        part = _boxes([item.get("bbox_2d")], text, -1)
        if isinstance(part, ParseFailure):
            return ParseFailure("box_not_four_numbers", text)
        boxes.extend(part)
    given = [item.get("slice") for item in payload if "slice" in item]
    if not all(_is_slice(k) for k in given):
        return ParseFailure("slice_not_integer", text)
    named = set(given)
    if not named:
        outside = text.replace(body, " ")
        named = {int(m) for m in _SLICE_MENTION_RE.findall(outside)}
        named |= {int(m) for item in payload for m in _SLICE_MENTION_RE.findall(str(item.get("label", "")))}
    if len(named) != 1:
        return ParseFailure("no_slice" if not named else "several_slices", text)
    return ParsedAnswer(int(next(iter(named))), tuple(boxes), think=think, has_think=bool(think), schema="native")


def parse_model_answer(
    text: object,
    answer_format: AnswerFormat,
    image_size: int,
    *,
    require_think: bool = False,
    strict_schema: bool = True,
    lenient: bool = False,
) -> ParseResult:
    """Parse in a checkpoint's answer format and return the boxes in rendered-view pixels.

    `strict_schema` accepts only the configured schema (rewards); the grounder reads either.
    """
    parsed = parse_answer(text, require_think=require_think, schema=answer_format.schema if strict_schema else None, lenient=lenient)
    if isinstance(parsed, ParseFailure):
        return parsed
    boxes = tuple(answer_format.to_pixels(b, image_size) for b in parsed.boxes)
    return ParsedAnswer(parsed.slice_index, boxes, parsed.think, parsed.has_think, parsed.schema)


@dataclass(frozen=True)
class AnswerRules:
    """What a well-formed answer must also satisfy for one prompt."""

    image_size: int
    shown_slices: tuple[int, ...]
    max_boxes: int = 4


def answer_problems(answer: ParsedAnswer, rules: AnswerRules) -> list[str]:
    """Semantic checks beyond syntax (boxes in rendered pixels); an empty list means the answer is usable as is."""
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


def format_answer(
    slice_index: int,
    boxes: Iterable[Sequence[float]],
    think: Optional[str] = None,
    *,
    answer_format: Optional[AnswerFormat] = None,
    image_size: Optional[int] = None,
) -> str:
    """The target text for SFT (and what a perfect model would say), in the given answer format.

    `boxes` are rendered-view pixels; without `answer_format` they are written as given (medvolr1
    schema).  Numbers are rounded to whole units of the output convention.
    """
    fmt = answer_format or AnswerFormat()
    if fmt.coordinates != "pixels" and image_size is None:
        raise ValueError("image_size is needed to write boxes in normalised coordinates")
    written = [[int(round(v)) for v in fmt.from_pixels(box, image_size or 1)] for box in boxes]
    if fmt.schema == "paper":
        payload: object = [{"slice": int(slice_index), "bbox_2d_list": written}]
    else:
        payload = {"slice": int(slice_index), "boxes": written}
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


def box_iou_matrix(pred: Sequence[Sequence[float]], gt: Sequence[Sequence[float]]) -> np.ndarray:
    """IoU of every predicted box with every GT box, (N, M); inverted boxes have zero area."""
    with np.errstate(all="ignore"):  # absurd (1e300) model boxes overflow to inf; they score 0, silently
        return _box_iou_matrix(np.asarray(pred, dtype=float).reshape(-1, 4), np.asarray(gt, dtype=float).reshape(-1, 4))


def _box_iou_matrix(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    area_p = np.clip(p[:, 2] - p[:, 0], 0, None) * np.clip(p[:, 3] - p[:, 1], 0, None)
    area_g = np.clip(g[:, 2] - g[:, 0], 0, None) * np.clip(g[:, 3] - g[:, 1], 0, None)
    w = np.clip(np.minimum(p[:, None, 2], g[None, :, 2]) - np.maximum(p[:, None, 0], g[None, :, 0]), 0, None)
    h = np.clip(np.minimum(p[:, None, 3], g[None, :, 3]) - np.maximum(p[:, None, 1], g[None, :, 1]), 0, None)
    inter = w * h
    union = area_p[:, None] + area_g[None, :] - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return np.nan_to_num(iou, nan=0.0, posinf=0.0, neginf=0.0)
