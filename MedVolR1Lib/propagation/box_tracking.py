"""Slice-by-slice box tracking: turn a 2D box-prompted segmenter into a 3D one.

The key slice is segmented from the anchor's box; every neighbouring slice is then prompted with the
previous slice's mask box plus a margin, walking up and down until the mask vanishes.  A naive walk
leaks (the mask fills its box, the box grows by the margin, the next mask fills the larger box ...)
or drifts onto a neighbour, so each step passes a few guards, all in `TrackingRules`.  The segmenter
is a callback, so this module knows nothing about LiteMedSAM and is testable with a toy segmenter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np

from ..anchor import VoxelBox

# segment(slice_index, box, previous_logits) -> (mask bool (J, I), logits float (J, I) or None, score float)
SegmentFn = Callable[[int, VoxelBox, Optional[np.ndarray]], tuple[np.ndarray, Optional[np.ndarray], float]]


@dataclass(frozen=True)
class TrackingRules:
    """Guards of the slice-to-slice walk (defaults measured on the sample CT, see docs/oracle_litemedsam.md).

    margin_fraction / margin_min: the next box is the previous mask's box grown by this fraction of its
        size on each side, at least `margin_min` voxels.
    max_growth: the next box's width and height may not exceed the previous *box's* by more than this
        fraction (stops the fill-the-box-then-grow leak).
    max_area_ratio: a mask more than this many times the previous slice's area ends the walk (a jump
        onto a neighbouring structure), and is dropped.
    min_overlap: a mask whose overlap with the previous mask (intersection / own area) is below this
        ends the walk (drift), and is dropped.
    min_area: a mask smaller than this (voxels) counts as vanished.
    min_score: the segmenter's own quality score below this ends the walk (<= 0 disables).
    clip_to_box: keep only the part of each mask inside its prompt box.
    use_mask_prompt: pass the previous slice's logits to the segmenter.
    """

    margin_fraction: float = 0.1
    margin_min: float = 1.0
    max_growth: Optional[float] = None
    max_area_ratio: Optional[float] = 2.0
    min_overlap: float = 0.7
    min_area: int = 5
    min_score: float = 0.6
    clip_to_box: bool = False
    use_mask_prompt: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def mask_box(mask: np.ndarray) -> Optional[VoxelBox]:
    """Tight edge-coordinate box of a 2D mask, None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return VoxelBox.from_voxels(int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))


def next_box(mask: np.ndarray, previous_box: VoxelBox, rules: TrackingRules, shape_ji: tuple[int, int]) -> Optional[VoxelBox]:
    """Prompt for the next slice: the mask's box plus margin, growth-limited, clipped to the slice."""
    tight = mask_box(mask)
    if tight is None:
        return None
    w, h = tight.i1 - tight.i0, tight.j1 - tight.j0
    mi = max(rules.margin_min, rules.margin_fraction * w)
    mj = max(rules.margin_min, rules.margin_fraction * h)
    i0, j0, i1, j1 = tight.i0 - mi, tight.j0 - mj, tight.i1 + mi, tight.j1 + mj
    if rules.max_growth is not None:
        i0, i1 = _limit(i0, i1, previous_box.i1 - previous_box.i0, rules.max_growth)
        j0, j1 = _limit(j0, j1, previous_box.j1 - previous_box.j0, rules.max_growth)
    rows, cols = shape_ji
    return VoxelBox(max(0.0, i0), max(0.0, j0), min(float(cols), i1), min(float(rows), j1))


def _limit(lo: float, hi: float, previous_size: float, growth: float) -> tuple[float, float]:
    """Shrink [lo, hi] about its centre to at most previous_size * (1 + growth)."""
    allowed = previous_size * (1.0 + growth)
    if hi - lo <= allowed:
        return lo, hi
    centre = 0.5 * (lo + hi)
    return centre - 0.5 * allowed, centre + 0.5 * allowed


def box_mask(box: VoxelBox, shape_ji: tuple[int, int]) -> np.ndarray:
    i_min, j_min, i_max, j_max = box.voxel_range(shape_ji)
    out = np.zeros(shape_ji, dtype=bool)
    out[j_min : j_max + 1, i_min : i_max + 1] = True
    return out


@dataclass
class TrackResult:
    """Masks per visited slice for one object, and why each direction stopped (for diagnostics)."""

    masks: dict[int, np.ndarray]
    stop_up: str = ""
    stop_down: str = ""


def track_object(
    segment: SegmentFn,
    key_slice: int,
    box: VoxelBox,
    shape_kji: tuple[int, int, int],
    rules: TrackingRules,
    slice_range: tuple[int, int],
    on_slice: Optional[Callable[[int], None]] = None,
) -> TrackResult:
    """Segment `box` on `key_slice`, then walk up (k+1 ...) and down (k-1 ...) within `slice_range`."""
    shape_ji = (int(shape_kji[1]), int(shape_kji[2]))
    key_mask, key_logits, _ = segment(key_slice, box, None)
    if rules.clip_to_box:
        key_mask = key_mask & box_mask(box, shape_ji)
    result = TrackResult(masks={})
    if int(key_mask.sum()) < rules.min_area:
        result.stop_up = result.stop_down = "empty key slice"
        return result
    result.masks[key_slice] = key_mask
    if on_slice:
        on_slice(key_slice)
    lo, hi = slice_range
    for step in (+1, -1):
        prev_mask, prev_logits, prev_box = key_mask, key_logits, box
        k = key_slice + step
        reason = "volume edge"
        while lo <= k <= hi:
            prompt = next_box(prev_mask, prev_box, rules, shape_ji)
            if prompt is None:
                reason = "vanished"
                break
            mask, logits, score = segment(k, prompt, prev_logits if rules.use_mask_prompt else None)
            if rules.clip_to_box:
                mask = mask & box_mask(prompt, shape_ji)
            area = int(mask.sum())
            if on_slice:
                on_slice(k)
            if area < rules.min_area:
                reason = "vanished"
                break
            if rules.min_score > 0 and score < rules.min_score:
                reason = f"low score {score:.2f}"
                break
            prev_area = int(prev_mask.sum())
            if rules.max_area_ratio is not None and area > rules.max_area_ratio * prev_area:
                reason = f"area jump {area}/{prev_area}"
                break
            if rules.min_overlap > 0 and (mask & prev_mask).sum() < rules.min_overlap * area:
                reason = "drift"
                break
            result.masks[k] = mask
            prev_mask, prev_logits, prev_box = mask, logits, prompt
            k += step
        if k > hi or k < lo:
            reason = "range edge" if (lo, hi) != (0, int(shape_kji[0]) - 1) else "volume edge"
        if step > 0:
            result.stop_up = reason
        else:
            result.stop_down = reason
    return result
