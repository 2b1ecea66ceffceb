"""Slice-by-slice box tracking: turn a 2D box-prompted segmenter into a 3D one.

The key slice is segmented from the anchor's box; every neighbouring slice is then prompted with the
previous slice's mask box plus a margin, walking up and down until the mask vanishes.  A naive walk
leaks (the mask fills its box, the box grows by the margin, the next mask fills the larger box ...)
or drifts onto a neighbour, so each step passes a few guards, all in `TrackingRules`.  The segmenter
is a callback, so this module knows nothing about LiteMedSAM and is testable with a toy segmenter.

Several objects (the boxes of an anchor, the anchors of a corrected evidence, the rollouts of a GRPO
group) are tracked in lockstep (`track_walks`): each step asks the segmenter for all of them at once,
so a batched segmenter decodes them in one call.  Several anchors split the slices between them
(`anchor_ranges`, `compose`): each walk restarts from its own anchor's box, a slice between two anchors takes
both anchors' walks (by default their union), and a gap neither walk crossed is bridged (`gap_prompts`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from ..anchor import VoxelBox, box_iou_matrix

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
    key_box_drift: on the first step from an anchor, measure drift against the anchor's box instead of the
        key slice's mask (the box is the user's evidence; the key mask may hold only part of what it frames, as
        the sacrum's does in the bone window).  Chosen on 17 structures outside the reported table
        (docs/corrections_litemedsam.md).
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
    key_box_drift: bool = True

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
    scores: dict[int, float] = field(default_factory=dict)  # the segmenter's own quality score per kept mask


EDGE_REASONS = ("range edge", "volume edge")


@dataclass(frozen=True)
class SegmentRequest:
    """One box prompt on one slice.  `step` (+1 up, -1 down, 0 key slice) and `bound` (the last slice the
    walk may reach in that direction) let the segmenter prefetch the embeddings the walk will need next."""

    slice_index: int
    box: VoxelBox
    previous_logits: Optional[np.ndarray] = None
    step: int = 0
    bound: Optional[int] = None


# segment_many(requests) -> one (mask bool (J, I), logits or None, score) per request, in order
BatchSegmentFn = Callable[[Sequence[SegmentRequest]], list[tuple[np.ndarray, Optional[np.ndarray], float]]]


@dataclass(frozen=True)
class Walk:
    """One object tracked from one anchor: its box on the key slice and the inclusive slices it may visit."""

    key_slice: int
    box: VoxelBox
    slice_range: tuple[int, int]


@dataclass
class _Front:
    """Where one direction of one walk stands: the next slice to visit and the last accepted step."""

    walk: int
    step: int
    k: int
    mask: np.ndarray
    logits: Optional[np.ndarray]
    box: VoxelBox


def track_walks(
    segment_many: BatchSegmentFn,
    walks: Sequence[Walk],
    shape_kji: tuple[int, int, int],
    rules: TrackingRules,
    on_slice: Optional[Callable[[int], None]] = None,
) -> list[TrackResult]:
    """Track every walk in lockstep: one `segment_many` call per step for all walks and both directions.

    Each walk follows exactly the rules of a walk on its own (the guards only look at that walk's previous
    slice), so the result equals tracking the walks one by one; only the segmenter sees them batched.
    """
    shape_ji = (int(shape_kji[1]), int(shape_kji[2]))
    num_slices = int(shape_kji[0])
    results = [TrackResult(masks={}) for _ in walks]
    if not walks:
        return results
    keys = segment_many([SegmentRequest(w.key_slice, w.box) for w in walks])
    fronts: list[_Front] = []
    for n, (walk, (mask, logits, score)) in enumerate(zip(walks, keys)):
        if rules.clip_to_box:
            mask = mask & box_mask(walk.box, shape_ji)
        if on_slice:
            on_slice(walk.key_slice)
        if int(mask.sum()) < rules.min_area:
            results[n].stop_up = results[n].stop_down = "empty key slice"
            continue
        results[n].masks[walk.key_slice] = mask
        results[n].scores[walk.key_slice] = float(score)
        fronts += [_Front(n, step, walk.key_slice + step, mask, logits, walk.box) for step in (+1, -1)]

    def finish(front: _Front, reason: str) -> None:
        if front.step > 0:
            results[front.walk].stop_up = reason
        else:
            results[front.walk].stop_down = reason

    while fronts:
        live: list[tuple[_Front, VoxelBox]] = []
        requests: list[SegmentRequest] = []
        for front in fronts:
            lo, hi = walks[front.walk].slice_range
            if not lo <= front.k <= hi:
                finish(front, "volume edge" if not 0 <= front.k < num_slices else "range edge")
                continue
            prompt = next_box(front.mask, front.box, rules, shape_ji)
            if prompt is None:
                finish(front, "vanished")
                continue
            logits = front.logits if rules.use_mask_prompt else None
            requests.append(SegmentRequest(front.k, prompt, logits, front.step, hi if front.step > 0 else lo))
            live.append((front, prompt))
        if not requests:
            break
        outputs = segment_many(requests)
        fronts = []
        for (front, prompt), (mask, logits, score) in zip(live, outputs):
            if rules.clip_to_box:
                mask = mask & box_mask(prompt, shape_ji)
            if on_slice:
                on_slice(front.k)
            first_step = front.k - front.step == walks[front.walk].key_slice
            drift_reference = box_mask(front.box, shape_ji) if rules.key_box_drift and first_step else front.mask
            reason = _guard(mask, score, front.mask, rules, drift_reference)
            if reason:
                finish(front, reason)
                continue
            results[front.walk].masks[front.k] = mask
            results[front.walk].scores[front.k] = float(score)
            front.mask, front.logits, front.box = mask, logits, prompt
            front.k += front.step
            fronts.append(front)
    return results


def _guard(mask: np.ndarray, score: float, prev_mask: np.ndarray, rules: TrackingRules,
           drift_reference: np.ndarray) -> str:
    """Why this slice's mask ends the walk ("" when it is accepted); drift is measured against `drift_reference`
    (the previous mask, or the anchor's box on a walk's first step)."""
    area = int(mask.sum())
    if area < rules.min_area:
        return "vanished"
    if rules.min_score > 0 and score < rules.min_score:
        return f"low score {score:.2f}"
    prev_area = int(prev_mask.sum())
    if rules.max_area_ratio is not None and area > rules.max_area_ratio * prev_area:
        return f"area jump {area}/{prev_area}"
    if rules.min_overlap > 0 and (mask & drift_reference).sum() < rules.min_overlap * area:
        return "drift"
    return ""


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

    def segment_many(requests: Sequence[SegmentRequest]):
        return [segment(r.slice_index, r.box, r.previous_logits) for r in requests]

    return track_walks(segment_many, [Walk(key_slice, box, slice_range)], shape_kji, rules, on_slice)[0]


def truncate(result: TrackResult, walk_range: tuple[int, int], new_range: tuple[int, int]) -> Optional[TrackResult]:
    """`result` (tracked within `walk_range`) as it would be within `new_range`, or None when it cannot say.

    A walk is deterministic and each step looks only at the slice before it, so inside a narrower range it
    visits the same slices and stops at the new edge; it also stands for a wider range in a direction where
    it stopped on its own (not at the range edge)."""
    (lo, hi), (new_lo, new_hi) = walk_range, new_range
    if new_lo < lo and result.stop_down in EDGE_REASONS:
        return None
    if new_hi > hi and result.stop_up in EDGE_REASONS:
        return None
    masks = {k: m for k, m in result.masks.items() if new_lo <= k <= new_hi}
    down = "range edge" if any(k < new_lo for k in result.masks) else result.stop_down
    up = "range edge" if any(k > new_hi for k in result.masks) else result.stop_up
    return TrackResult(masks, stop_up=up, stop_down=down, scores={k: v for k, v in result.scores.items() if k in masks})


# ---------------------------------------------------------------------------------------------------------
# several anchors: which slices each anchor's walks cover, and how their masks combine

BETWEEN_MODES = ("nearest", "nearest_reached", "best_score", "union", "linked_union")


def anchor_ranges(anchor_slices: Sequence[int], lo: int, hi: int, between: str = "nearest") -> list[tuple[int, int]]:
    """Inclusive slice range each anchor's walks may cover, anchors sorted by slice, inside [lo, hi].

    nearest: a slice between two anchors belongs to the nearer one (a tie to the lower), so the walks stop
        half-way and each slice is tracked once.
    nearest_reached: walks run up to the next anchor; `compose` then gives each slice the nearest anchor
        whose walk reached it (fills a gap where the nearer walk stopped early, at the cost of tracking it twice).
    best_score: the ranges of nearest_reached; where both neighbouring anchors' walks reached a slice, `compose`
        takes the one whose masks the segmenter scores higher there (its own IoU estimate).
    union: the ranges of nearest_reached; a slice between two anchors takes the union of both anchors' masks
        there (an anchor's own slice keeps its own masks).
    linked_union: the ranges of nearest_reached; a slice between two anchors takes the nearer anchor's masks plus
        the parts of the farther anchor's masks that touch them (a walk that ran onto a neighbouring structure,
        such as the next vertebra's body, adds nothing there).
    """
    if between not in BETWEEN_MODES:
        raise ValueError(f"between must be one of {BETWEEN_MODES}, got {between!r}")
    ks = [int(k) for k in anchor_slices]
    if ks != sorted(set(ks)):
        raise ValueError("anchor slices must be distinct and sorted")
    ranges = []
    for n, k in enumerate(ks):
        below = ks[n - 1] if n > 0 else None
        above = ks[n + 1] if n + 1 < len(ks) else None
        if between == "nearest":
            low = lo if below is None else (below + k) // 2 + 1
            high = hi if above is None else (k + above) // 2
        else:  # nearest_reached, best_score, union, linked_union
            low = lo if below is None else below + 1
            high = hi if above is None else above - 1
        ranges.append((low, high))
    return ranges


def compose(
    anchor_slices: Sequence[int],
    tracks: Sequence[Sequence[TrackResult]],
    shape_kji: tuple[int, int, int],
    *,
    merge: bool = True,
    between: str = "nearest",
) -> np.ndarray:
    """One uint8 mask from the walks of each anchor (tracks[n][b]: box b of the n-th anchor, sorted by slice),
    for the `between` mode whose `anchor_ranges` the walks ran in.

    Each slice takes the masks of the nearest anchor (a tie to the lower one) that has a mask there ("nearest",
    "nearest_reached"; under "nearest" only one anchor can have one).  "best_score": the anchor whose masks there
    have the highest mean segmenter score instead (nearest on a tie); "union": every anchor's masks there, except
    on an anchor's own slice; "linked_union": the nearest anchor's masks and the connected parts of farther anchors'
    masks that touch them (8-connected, one voxel apart at most).  Value 1 when `merge`, else b + 1 (later boxes of
    the chosen anchor win overlaps; under the unions the nearest anchor's)."""
    if between not in BETWEEN_MODES:
        raise ValueError(f"between must be one of {BETWEEN_MODES}, got {between!r}")
    out = np.zeros(shape_kji, dtype=np.uint8)
    ks = [int(k) for k in anchor_slices]
    covered = sorted({k for boxes in tracks for track in boxes for k in track.masks})
    for k in covered:
        candidates = []
        for n in sorted(range(len(ks)), key=lambda n: (abs(ks[n] - k), ks[n])):
            present = [(b, track.masks[k], track.scores.get(k, 0.0)) for b, track in enumerate(tracks[n]) if k in track.masks]
            if present:
                candidates.append(present)
                if between in ("nearest", "nearest_reached") or k == ks[n]:
                    break
        if not candidates:
            continue
        if between == "union" and k not in ks:
            chosen = [item for present in reversed(candidates) for item in present]
        elif between == "linked_union" and k not in ks:
            chosen = _linked_parts(candidates)
        elif between == "best_score":
            chosen = max(candidates, key=lambda p: sum(s for _, _, s in p) / len(p))
        else:
            chosen = candidates[0]
        for b, mask, _ in chosen:
            out[k][mask] = 1 if merge else b + 1
    return out


_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def _linked_parts(candidates: list[list[tuple[int, np.ndarray, float]]]) -> list[tuple[int, np.ndarray, float]]:
    """The nearest anchor's masks (candidates[0]) and, anchor by anchor outward, the connected parts of each
    farther mask that touch (within one voxel) everything kept so far; ordered so that the nearest anchor's masks
    are painted last."""
    from scipy import ndimage

    chosen = list(candidates[0])
    kept = np.logical_or.reduce([mask for _, mask, _ in chosen])
    for present in candidates[1:]:
        reach = ndimage.binary_dilation(kept, structure=_EIGHT_NEIGHBOURS)
        added = []
        for b, mask, score in present:
            parts, count = ndimage.label(mask, structure=_EIGHT_NEIGHBOURS)
            touching = np.unique(parts[reach & (parts > 0)]) if count else ()
            if len(touching):
                linked = np.isin(parts, touching)
                added.append((b, linked, score))
                kept = kept | linked
        chosen = added + chosen
    return chosen


# ---------------------------------------------------------------------------------------------------------
# bridging: two anchors say the object spans the slices between them, so a gap no walk crossed is filled

@dataclass(frozen=True)
class GapPrompt:
    """A box interpolated across a gap between two anchors' walks; its mask goes to anchor `owner`, box `box_index`."""

    slice_index: int
    box: VoxelBox
    owner: int
    box_index: int


def pair_boxes(lower: Sequence[VoxelBox], upper: Sequence[VoxelBox]) -> list[tuple[int, int]]:
    """One-to-one pairs (lower index, upper index) of boxes that overlap in the slice plane, greedy by IoU.

    Two anchors' boxes of the same structure overlap (one kidney above the other); boxes that overlap
    nothing on the other anchor (a second kidney drawn on one slice only) are not bridged."""
    if not lower or not upper:
        return []
    iou = box_iou_matrix([b.as_list() for b in lower], [b.as_list() for b in upper])
    scored = sorted(((float(iou[n, m]), n, m) for n in range(len(lower)) for m in range(len(upper))), reverse=True)
    used_low, used_up, pairs = set(), set(), []
    for iou, n, m in scored:
        if iou <= 0.0:
            break
        if n not in used_low and m not in used_up:
            used_low.add(n)
            used_up.add(m)
            pairs.append((n, m))
    return sorted(pairs)


def _interpolate(a: VoxelBox, b: VoxelBox, t: float) -> VoxelBox:
    return VoxelBox(*((1.0 - t) * x + t * y for x, y in zip(a.as_list(), b.as_list())))


def gap_prompts(
    anchors: Sequence[tuple[int, Sequence[VoxelBox]]],
    tracks: Sequence[Sequence[TrackResult]],
    shape_kji: tuple[int, int, int],
    rules: TrackingRules,
) -> list[GapPrompt]:
    """Prompts for the slices between two neighbouring anchors that neither anchor's walk reached.

    anchors: (slice, boxes) sorted by slice; tracks[n][b]: the walk of box b of anchor n.  For each pair of
    overlapping boxes (`pair_boxes`) the gap runs from the lower walk's highest mask to the upper walk's lowest;
    each gap slice gets the box interpolated linearly between the prompts those two end masks would give
    (mask box plus margin, as the walk's next step).  A walk that kept going needs no bridge; a gap is owned
    slice by slice by the nearer anchor (a tie to the lower).  Its masks pass no guard but `min_area`: the two
    anchors already say the object is there."""
    shape_ji = (int(shape_kji[1]), int(shape_kji[2]))
    prompts: list[GapPrompt] = []
    for n in range(len(anchors) - 1):
        (k_low, boxes_low), (k_up, boxes_up) = anchors[n], anchors[n + 1]
        for b_low, b_up in pair_boxes(boxes_low, boxes_up):
            low, up = tracks[n][b_low], tracks[n + 1][b_up]
            reached_low = [k for k in low.masks if k_low <= k < k_up]
            reached_up = [k for k in up.masks if k_low < k <= k_up]
            if not reached_low or not reached_up:
                continue  # an empty key slice: nothing to bridge from
            start, end = max(reached_low), min(reached_up)
            if end - start < 2:
                continue
            box_start = next_box(low.masks[start], boxes_low[b_low], rules, shape_ji)
            box_end = next_box(up.masks[end], boxes_up[b_up], rules, shape_ji)
            for k in range(start + 1, end):
                t = (k - start) / (end - start)
                owner = n if (k - k_low) <= (k_up - k) else n + 1
                prompts.append(GapPrompt(k, _interpolate(box_start, box_end, t), owner, b_low if owner == n else b_up))
    return prompts


def add_gap_masks(
    tracks: Sequence[Sequence[TrackResult]],
    prompts: Sequence[GapPrompt],
    outputs: Sequence[tuple[np.ndarray, Optional[np.ndarray], float]],
    rules: TrackingRules,
) -> list[list[TrackResult]]:
    """Copies of `tracks` with each decoded gap mask added to its owner's walk (masks under `min_area` dropped)."""
    out = [[TrackResult(dict(t.masks), t.stop_up, t.stop_down, dict(t.scores)) for t in boxes] for boxes in tracks]
    for prompt, (mask, _, score) in zip(prompts, outputs):
        if rules.clip_to_box:
            mask = mask & box_mask(prompt.box, mask.shape)
        if int(mask.sum()) >= rules.min_area:
            out[prompt.owner][prompt.box_index].masks[prompt.slice_index] = mask
            out[prompt.owner][prompt.box_index].scores[prompt.slice_index] = float(score)
    return out
