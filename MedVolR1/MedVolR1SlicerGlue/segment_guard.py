"""Edits are never lost: a result only overwrites a segment that MedVol-R1 wrote and nobody changed since.

After each write we keep a hash of the segment's labelmap (exported on the volume's grid).  Before the
next write to that segment we hash it again: a different hash means the user changed it in Segment
Editor (painted, erased, smoothed), so the new result goes into a new segment ("left kidney 2") and
the user's segment stays as they left it.  A segment of the target's name that we never wrote (the
user's own, in a segmentation they picked) is treated the same way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from MedVolR1Lib.volume import Volume

from . import mrml_mapping as mm


def labelmap_digest(array: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(array.shape).encode())
    digest.update(np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def free_segment_name(segmentation, name: str) -> str:
    """`name` if no segment has it, else "name 2", "name 3", ..."""
    if not segmentation.GetSegmentIdBySegmentName(name):
        return name
    n = 2
    while segmentation.GetSegmentIdBySegmentName(f"{name} {n}"):
        n += 1
    return f"{name} {n}"


@dataclass(frozen=True)
class WrittenSegment:
    segment_id: str
    digest: str


class SegmentGuard:
    """Remembers, per (segmentation node, target), the segment we last wrote and its labelmap hash."""

    def __init__(self) -> None:
        self._written: dict[tuple[str, str], WrittenSegment] = {}

    def segment_for(self, scene, segmentation_node, target: str, volume_node) -> Optional[str]:
        """The segment a new result for `target` may overwrite: ours and unchanged; else None (write a new one)."""
        if segmentation_node is None:
            return None
        written = self._written.get((segmentation_node.GetID(), target))
        if written is None or segmentation_node.GetSegmentation().GetSegment(written.segment_id) is None:
            return None
        current = labelmap_digest(mm.segment_array(scene, segmentation_node, written.segment_id, volume_node))
        return written.segment_id if current == written.digest else None

    def record(self, scene, segmentation_node, segment_id: str, target: str, volume_node) -> None:
        array = mm.segment_array(scene, segmentation_node, segment_id, volume_node)
        self._written[(segmentation_node.GetID(), target)] = WrittenSegment(segment_id, labelmap_digest(array))

    def write(self, scene, volume_node, volume: Volume, mask: np.ndarray, target: str, segmentation_node=None) -> tuple:
        """Write `mask` for `target` without losing a user's edit.  Returns (segmentation node, segment id,
        note); the note is "" or a sentence for the status line saying where the result went and why."""
        note = ""
        name = target
        if segmentation_node is not None:
            segmentation = segmentation_node.GetSegmentation()
            ours = self.segment_for(scene, segmentation_node, target, volume_node)
            if ours is not None:
                name = segmentation.GetSegment(ours).GetName()
            else:
                previous = self._written.get((segmentation_node.GetID(), target))
                kept_id = previous.segment_id if previous is not None and segmentation.GetSegment(previous.segment_id) else ""
                kept_id = kept_id or segmentation.GetSegmentIdBySegmentName(target)
                if kept_id:
                    kept = segmentation.GetSegment(kept_id).GetName()
                    name = free_segment_name(segmentation, target)
                    note = f"'{kept}' was changed by hand (or is not MedVol-R1's), so it was kept and this result is in '{name}'"
        segmentation_node, segment_id = mm.write_mask_segment(scene, volume_node, volume, mask, name, segmentation_node)
        self.record(scene, segmentation_node, segment_id, target, volume_node)
        return segmentation_node, segment_id, note
