"""The radiologist's corrections as scene edits: evidence ROIs and extent limits <-> `Evidence` versions.

Each evidence box is an ROI one slice thick (mrml_mapping).  Boxes of one anchor share a slice and an
anchor number (ROI attribute), so "Add box on this slice" on a new slice adds an anchor, and dragging
one box of an anchor to another slice takes the anchor (its other boxes follow after the run).  The
extent limits (lowest/highest slice the mask may reach) are an attribute of the volume node, so they
are saved with the scene.  Every successful propagation is a version (evidence + mask) in a history,
and Undo puts the previous version back: its ROIs, its limits and its mask.

Slice numbers here are canonical (k grows toward superior, volume.py): "top" is the highest k.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import numpy as np

from MedVolR1Lib.anchor import EvidenceAnchor, VoxelBox
from MedVolR1Lib.corrections import extent_with
from MedVolR1Lib.errors import AnchorError
from MedVolR1Lib.evidence import Evidence
from MedVolR1Lib.evidence_history import DEFAULT_MAX_BYTES, EvidenceHistory, EvidenceVersion
from MedVolR1Lib.user_input import require_inside_volume
from MedVolR1Lib.volume import Volume

from . import mrml_mapping as mm

EXTENT_LIMIT_ATTRIBUTE = "MedVolR1.ExtentLimit"  # on the volume node: "lowest,highest" canonical slices
DEFAULT_BOX_FRACTION = 0.25  # a new box spans this fraction of the slice's width and height


# ------------------------------------------------------------------------------------------------ extent limits


def extent_limit(volume_node) -> Optional[tuple[int, int]]:
    """The (lowest, highest) canonical slices the mask may reach, or None when unlimited."""
    text = volume_node.GetAttribute(EXTENT_LIMIT_ATTRIBUTE) if volume_node is not None else None
    if not text:
        return None
    low, high = (int(v) for v in text.split(","))
    return low, high


def set_extent_limit(volume_node, z_range: Optional[Sequence[int]]) -> None:
    if z_range is None:
        volume_node.RemoveAttribute(EXTENT_LIMIT_ATTRIBUTE)
    else:
        volume_node.SetAttribute(EXTENT_LIMIT_ATTRIBUTE, f"{int(z_range[0])},{int(z_range[1])}")


def limited_extent(current: Optional[tuple[int, int]], num_slices: int, slice_index: int, side: str) -> tuple[int, int]:
    """The extent after "Limit extent here": `side` 'top' sets the highest slice, 'bottom' the lowest."""
    if side == "top":
        return extent_with(current, num_slices, highest=slice_index)
    if side == "bottom":
        return extent_with(current, num_slices, lowest=slice_index)
    raise ValueError(f"side must be 'top' or 'bottom', got {side!r}")


# -------------------------------------------------------------------------------------------- ROIs -> Evidence


def evidence_from_rois(volume: Volume, rois: Sequence, key_roi=None, z_range: Optional[Sequence[int]] = None) -> Evidence:
    """The evidence the scene shows now: one anchor per anchor number, on the slice of its boxes.

    The anchor holding `key_roi` (the box the user moved last) takes that box's slice; its other boxes
    follow.  Two anchors that end on one slice become one.  Raises AnchorError (changing nothing) when
    a box or limit does not fit the volume (boxes are user input: checked strictly, as on the command line).
    """
    if not rois:
        raise AnchorError("no evidence boxes: run 'Find evidence', or draw a box on the key slice")
    read = [(mm.anchor_number(roi), roi, *mm.box_from_roi(volume, roi)) for roi in rois]
    slices: dict[int, int] = {}
    for number, _roi, _box, k in read:
        slices.setdefault(number, k)
    for number, roi, _box, k in read:
        if roi is key_roi:
            slices[number] = k
    boxes: dict[int, list[VoxelBox]] = {}
    for number in sorted(slices):  # anchor numbers in order: the first is the VLM's or the user's first
        boxes.setdefault(slices[number], [])
    for number, _roi, box, _k in sorted(read, key=lambda item: item[0]):
        boxes[slices[number]].append(box)
    anchors = tuple(EvidenceAnchor(k, tuple(b)) for k, b in boxes.items())
    evidence = Evidence(anchors, tuple(int(v) for v in z_range) if z_range is not None else None)  # type: ignore[arg-type]
    return require_inside_volume(evidence, volume.shape)  # a box dragged off the scan is an error, never clipped


def extent_labels(volume_node) -> Optional[tuple]:
    """(lowest, highest) extent limit as Slicer names the slices, or None: from the node's cached grid, so the
    panel's redraw on each keystroke copies no voxels."""
    limit = extent_limit(volume_node)
    if limit is None:
        return None
    grid = mm.grid_of_node(volume_node)
    return tuple(mm.slice_label(volume_node, grid, k) for k in limit)


def evidence_list(scene, volume_node) -> list[tuple]:
    """[(ROI, its slice as Slicer names it)] for the panel's box list; grid only, no voxel copy."""
    rois = mm.evidence_rois(scene, volume_node)
    if not rois:
        return []
    grid = mm.grid_of_node(volume_node)
    return [(roi, mm.slice_label(volume_node, grid, mm.box_from_roi(grid, roi)[1])) for roi in rois]


def scene_evidence(scene, volume_node, volume: Volume, key_roi=None) -> Evidence:
    """Evidence from this volume's ROIs and its extent limit."""
    return evidence_from_rois(volume, mm.evidence_rois(scene, volume_node), key_roi, extent_limit(volume_node))


# --------------------------------------------------------------------------------------------- the three edits


def default_box(volume: Volume, center_ras: Optional[Sequence[float]] = None) -> VoxelBox:
    """A box to start from: a quarter of the slice wide and high, centred where the view is (or the slice centre)."""
    _, rows, cols = volume.shape
    if center_ras is not None:
        ci, cj, _ = (float(v) for v in volume.ijk_from_ras(center_ras))
    else:
        ci, cj = (cols - 1) / 2.0, (rows - 1) / 2.0
    half_i, half_j = max(1.0, cols * DEFAULT_BOX_FRACTION / 2.0), max(1.0, rows * DEFAULT_BOX_FRACTION / 2.0)
    ci, cj = float(np.clip(ci, half_i - 0.5, cols - half_i - 0.5)), float(np.clip(cj, half_j - 0.5, rows - half_j - 0.5))
    edges = (ci + 0.5 - half_i, cj + 0.5 - half_j, ci + 0.5 + half_i, cj + 0.5 + half_j)
    return VoxelBox(*(float(round(v)) for v in edges))


def add_box(scene, volume_node, volume: Volume, slice_index: int, box: Optional[VoxelBox] = None, center_ras=None):
    """"Add box on this slice" (also the no-model path's "Draw evidence box"): a new evidence ROI on
    `slice_index`, joining the anchor already on that slice or starting a new one.  Returns the ROI."""
    box = box if box is not None else default_box(volume, center_ras)
    EvidenceAnchor(int(slice_index), (box,)).validate(volume.shape)
    rois = mm.evidence_rois(scene, volume_node)
    on_slice = [mm.anchor_number(roi) for roi in rois if mm.box_from_roi(volume, roi)[1] == int(slice_index)]
    number = on_slice[0] if on_slice else max((mm.anchor_number(roi) for roi in rois), default=0) + 1
    index = max((int(roi.GetAttribute(mm.EVIDENCE_INDEX_ATTRIBUTE) or 0) for roi in rois), default=0) + 1
    geometry = mm.roi_geometry(volume, int(slice_index), box)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", mm.EVIDENCE_NAME.format(n=index))
    roi.CreateDefaultDisplayNodes()
    mm.tag_evidence_roi(roi, volume_node, index, number)
    roi.SetCenter(*geometry.center)
    roi.SetSize(*geometry.size)
    return roi


def remove_box(scene, volume_node, roi) -> list:
    """"Remove": delete one evidence ROI, renumber the rest ("Evidence 1.." and anchors 1..). Returns them."""
    if roi is None or mm.volume_of_roi(scene, roi) is not volume_node:
        raise AnchorError("select one of this scan's evidence boxes to remove")
    scene.RemoveNode(roi)
    rois = mm.evidence_rois(scene, volume_node)
    numbers = {n: new for new, n in enumerate(sorted({mm.anchor_number(r) for r in rois}), start=1)}
    for index, remaining in enumerate(rois, start=1):
        mm.tag_evidence_roi(remaining, volume_node, index, numbers[mm.anchor_number(remaining)])
    return rois


def limit_extent(scene, volume_node, volume: Volume, slice_index: int, side: str) -> tuple[int, int]:
    """"Limit extent here (top/bottom)": checked against the boxes first, so a bad limit changes nothing."""
    z_range = limited_extent(extent_limit(volume_node), volume.num_slices, slice_index, side)
    rois = mm.evidence_rois(scene, volume_node)
    if rois:
        evidence_from_rois(volume, rois, z_range=z_range)  # raises AnchorError, e.g. a box above the new top
    else:
        Evidence((EvidenceAnchor(int(slice_index), (default_box(volume),)),), z_range).validate(volume.shape)
    set_extent_limit(volume_node, z_range)
    return z_range


# ----------------------------------------------------------------------------------------------------- history


class VolumeHistory(EvidenceHistory):
    """EvidenceHistory of one scan: a result on another scan starts a fresh history (undo never crosses scans)."""

    def __init__(self, limit: int = 20, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__(limit, max_bytes)
        self._keep = (int(limit), int(max_bytes))
        self.volume_fingerprint: Optional[str] = None

    def record(self, volume: Volume, evidence: Evidence, mask: np.ndarray) -> EvidenceVersion:
        if volume.fingerprint != self.volume_fingerprint:
            super().__init__(*self._keep)  # empty again
            self.volume_fingerprint = volume.fingerprint
        return self.push(evidence, np.asarray(mask, dtype=np.uint8))


def restore_version(session, volume_node, version: EvidenceVersion) -> tuple[list, str]:
    """Put a version back into the scene: its ROIs, its extent limit and its mask (into the segment we last
    wrote, unless the user changed that segment: then into a new one).  Returns (ROIs, segment id)."""
    scene = session.scene
    volume = mm.volume_from_node(volume_node)
    rois = mm.place_evidence_rois(scene, volume_node, volume, version.evidence, mm.evidence_rois(scene, volume_node))
    set_extent_limit(volume_node, version.evidence.z_range)
    result = session.result
    name = (getattr(result, "target_name", "") or "MedVol-R1 target").strip()
    target_node = session.segmentation_node if session.segmentation_node is not None and scene.IsNodePresent(session.segmentation_node) else None
    mask = version.mask  # unpacked once
    segmentation_node, segment_id, _note = session.guard.write(scene, volume_node, volume, mask, name, target_node)
    session.segmentation_node = segmentation_node
    if result is not None:
        session.result = replace(result, anchor=version.evidence.primary, mask=mask, evidence=version.evidence)
    session.anchor = version.evidence.primary
    return rois, segment_id


def undo(session, volume_node) -> tuple[list, str]:
    """Step back one propagation; ValueError when there is nothing to undo."""
    if session.busy:
        raise AnchorError("a run is in progress: wait for it to finish (or Cancel) before undoing")
    version = session.history.undo()
    return restore_version(session, volume_node, version)
