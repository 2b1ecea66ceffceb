"""Boxes a person typed or drew are checked strictly; boxes a model produced are clipped, and that is recorded.

A user's box that reaches outside the rendered image or the scan (a typo, the wrong --image-size, an ROI
dragged off the scan) is a mistake to report in one line, never something to repair silently: the CLI's
--box, a batch manifest's `anchor` and the Slicer panel's ROIs (`require_inside_volume`) all come here.
A model's box that sticks out is still clipped (views.ViewGeometry.anchor_from_answer) and the clipping is
listed in evidence.json, under provenance.input_adjustments, with what the scan reader changed.
"""

from __future__ import annotations

from typing import Sequence

from .anchor import EvidenceAnchor, VoxelBox
from .errors import AnchorError
from .evidence import Evidence
from .views import ViewGeometry
from .volume import Volume

TOLERANCE = 1e-3  # voxels / pixels: rounding of coordinates printed with 3 decimals, not a user's slack


def _fmt(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def scan_region_pixels(geometry: ViewGeometry) -> tuple[float, float, float, float]:
    """Where the scan lies in the rendered image (x1, y1, x2, y2); the rest is black padding."""
    rows, cols = geometry.shape_ji
    return geometry.to_pixel_box(VoxelBox(0.0, 0.0, float(cols), float(rows)))


def require_boxes_in_image(pixel_boxes: Sequence[Sequence[float]], geometry: ViewGeometry) -> None:
    """AnchorError naming the image size when a pixel box reaches outside the rendered image or the scan in it."""
    size = geometry.image_size
    x_lo, y_lo, x_hi, y_hi = scan_region_pixels(geometry)
    for n, box in enumerate(pixel_boxes, start=1):
        x1, y1, x2, y2 = (float(v) for v in box)
        if min(x1, y1) < -TOLERANCE or max(x2, y2) > size + TOLERANCE:
            raise AnchorError(f"box {n} ({_fmt(box)}) reaches outside the {size}x{size} rendered image; user boxes are not clipped")
        if x1 < x_lo - TOLERANCE or y1 < y_lo - TOLERANCE or x2 > x_hi + TOLERANCE or y2 > y_hi + TOLERANCE:
            raise AnchorError(
                f"box {n} ({_fmt(box)}) reaches outside the scan, which fills pixels {_fmt(round(v, 2) for v in (x_lo, y_lo, x_hi, y_hi))} "
                f"of the {size}x{size} rendered image; user boxes are not clipped"
            )


def require_inside_volume(evidence: "Evidence | EvidenceAnchor", shape_kji: Sequence[int]) -> Evidence:
    """Validate user evidence strictly: every box lies inside its slice (nothing is clipped).

    For user input from any front end; the Slicer panel calls it on the anchor its ROIs give, so an ROI
    dragged partly off the scan is an error naming the slice size instead of a silently smaller box.
    """
    evidence = Evidence.coerce(evidence).validate(shape_kji)
    _, rows, cols = (int(n) for n in shape_kji)
    for anchor in evidence.anchors:
        for n, box in enumerate(anchor.boxes, start=1):
            if box.i0 < -TOLERANCE or box.j0 < -TOLERANCE or box.i1 > cols + TOLERANCE or box.j1 > rows + TOLERANCE:
                raise AnchorError(
                    f"box {n} on slice {anchor.slice_index} ({_fmt(box.as_list())} voxels) reaches outside the "
                    f"{cols}x{rows}-voxel slice; user boxes are not clipped"
                )
    return evidence.clipped(shape_kji)  # removes only the rounding tolerance


def user_anchor(
    volume: Volume, slice_index: int, boxes: Sequence[Sequence[float]], *, units: str = "pixels", image_size: int = 448
) -> EvidenceAnchor:
    """A typed anchor (CLI --slice/--box, manifest `anchor`) in rendered pixels or canonical voxels, checked strictly."""
    if units == "pixels":
        geometry = ViewGeometry.for_volume(volume, image_size)
        require_boxes_in_image(boxes, geometry)
        anchor = EvidenceAnchor(int(slice_index), tuple(geometry.to_voxel_box(b) for b in boxes))
    elif units == "voxels":
        anchor = EvidenceAnchor(int(slice_index), tuple(VoxelBox(*(float(v) for v in b)) for b in boxes))
    else:
        raise AnchorError(f"box units {units!r}: expected 'pixels' or 'voxels'")
    return require_inside_volume(anchor, volume.shape).primary


def model_box_clipping(grounding) -> list[dict]:
    """Which of the model's boxes were clipped to the scan, in pixels before and after (empty when none)."""
    answer, anchor = getattr(grounding, "answer", None), getattr(grounding, "anchor", None)
    geometry = getattr(grounding, "geometry", None)
    if answer is None or anchor is None or geometry is None:
        return []
    clipped = []
    for n, (raw, kept) in enumerate(zip(answer.boxes, anchor.boxes), start=1):
        after = geometry.to_pixel_box(kept)
        if max(abs(float(a) - float(b)) for a, b in zip(raw, after)) > TOLERANCE:
            clipped.append({"box": n, "model_pixels": [float(v) for v in raw], "clipped_pixels": [round(v, 3) for v in after],
                            "image_size": geometry.image_size})
    return clipped


def input_adjustments(result) -> dict:
    """What was changed on the way in (filled voxels, clipped model boxes), for evidence.json; {} when nothing."""
    record = dict(getattr(result.volume, "adjustments", {}) or {})
    clipping = model_box_clipping(result.grounding)
    if clipping:
        record["model_boxes_clipped"] = clipping
    return record

