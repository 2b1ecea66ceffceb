"""VRS records on disk: one JSON line per (case, target, query), light enough to keep thousands in RAM.

A record names its case and the slices shown; images are rendered lazily from the case (see
`store.VolumeStore.views`).  It carries all ground truth the rewards and the evaluation need:
the GT key slice among the shown slices, GT boxes (rendered pixels) on every shown slice where the
target appears, per-slice areas over the whole volume, and optionally the oracle curve Q(z).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from ..errors import DataError
from ..volume import atomic_write


@dataclass
class VRSRecord:
    id: str
    case_id: str
    dataset: str
    target: str
    parts: list[list[str]]  # label channel names per part (one part per side for paired organs)
    labels: list[int]  # the same channels as indices in the case's channel order (RewardTarget.labels)
    query: str
    query_kind: str
    query_split: str  # "train" phrasing or "held_out" phrasing
    slices: list[int]  # the slices shown, ascending
    image_size: int
    window: Optional[str]
    gt_slice: int
    gt_boxes: list[list[float]]  # pixel boxes on gt_slice
    boxes_by_slice: dict[str, list[list[float]]]  # str(k) -> pixel boxes, shown slices only ([] where absent)
    areas: list[int]  # target voxels per slice, all K slices
    geometry: dict = field(default_factory=dict)  # views.ViewGeometry fields (pixel <-> voxel map)
    oracle: dict[str, float] = field(default_factory=dict)  # str(k) -> 3D Dice from the GT box on k

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> "VRSRecord":
        missing = [k for k in ("id", "case_id", "target", "query", "slices", "gt_slice", "gt_boxes") if k not in data]
        if missing:
            raise DataError(f"record {data.get('id', '?')}: missing fields {missing}")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def reward_target(self, max_boxes: int = 4, answer_format=None):
        """The rewards' ground truth for this prompt (one JSON column of the GRPO dataset).

        `answer_format` (anchor.AnswerFormat) is how the policy answers; default our schema in pixels.
        """
        from ..anchor import AnswerFormat
        from ..rewards import RewardTarget

        return RewardTarget(
            case_id=self.case_id,
            labels=list(self.labels),
            shown_slices=list(self.slices),
            image_size=self.image_size,
            geometry=dict(self.geometry),
            slice_areas=list(self.areas),
            gt_boxes={int(k): v for k, v in self.boxes_by_slice.items()},
            max_boxes=max_boxes,
            target=self.target,
            oracle={int(k): float(v) for k, v in self.oracle.items()} or None,
            answer_format=(answer_format or AnswerFormat()).spec,
            key_slice=self.gt_slice,
        )

    def answer_text(self, think: Optional[str] = None, answer_format=None) -> str:
        """The SFT target: the GT anchor in the policy's answer format (optional short templated think)."""
        from ..anchor import format_answer

        return format_answer(self.gt_slice, self.gt_boxes, think=think, answer_format=answer_format, image_size=self.image_size)


def write_records(path: str | os.PathLike, records: Iterable[VRSRecord]) -> Path:
    lines = "".join(r.to_json() + "\n" for r in records)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(lines))


def read_records(path: str | os.PathLike) -> list[VRSRecord]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: VRS records not found (run Training/prepare_data.py first)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(VRSRecord.from_dict(json.loads(line)))
        except (ValueError, TypeError) as exc:
            raise DataError(f"{path}:{n}: not a VRS record ({exc})") from exc
    return records
