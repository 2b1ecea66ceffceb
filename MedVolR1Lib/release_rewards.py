"""The MedVol-R1 release's GRPO rewards (`reward_mode: release`), written from its definitions.

The release scores a completion with four terms (its CT-ORG reward) or three (its KiTS23 reward, which
has no MedSAM2 term).  Where they differ from ours (`rewards.py`), on purpose:

- format: the mean of four 0/1-ish checks on the raw text: the whole text is `<think>..</think>
  <answer>..</answer>`; the think is not empty; the answer holds JSON that reads as a non-empty list;
  the fraction of the first item's `bbox_2d_list` entries that are 4 numbers in 0-1000 with x1 < x2 and
  y1 < y2.  Our format reward grades parse / think / shown slice / usable boxes 0.4 / 0.1 / 0.2 / 0.3.
- time (our "slice"): the GT area on the answered slice divided by the largest GT area within +-5 slices
  of it (0 when that window holds no target).  A local area maximum therefore scores 1 even when another
  part of the target is larger; ours divides by the maximum over all shown slices (or an oracle curve).
  Any slice of the volume counts, shown or not.  In the CT-ORG variant an answer without boxes scores 0
  (the release computes time and consistency together and needs boxes for both).
- space (our "grounding"): Hungarian-matched box IoU summed and divided by max(N, M), always against the
  GT key slice's boxes, whatever slice the answer named.  Ours scores against the boxes of the named slice.
  Boxes are integer pixels, counted inclusively, as the release maps 0-1000 onto its canvas.
- consistency (our "coherence", CT-ORG only): Dice between the frozen propagator's mask started from the
  answer's boxes on the answered slice and the GT, both cut to +-5 slices.  An empty prediction against an
  empty GT window scores 1, as in the release; ours scores 0 whenever the window misses the target.

The release runs on 512 x 512 slices; here the canvas is the rendered view (`RewardTarget.image_size`)
and GT boxes are the view's, snapped outward to whole pixels.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .anchor import AnswerFormat, EvidenceAnchor, VoxelBox
from .errors import DataError
from .propagation.base import Propagator
from .rewards import (CoherenceScorer, RewardTarget, RewardWeights, Resolver, _check_lengths, _TargetCache, completion_text,
                      matched_box_score)

RELEASE_WINDOW = 5  # +-slices of the time and consistency rewards (LOCAL_RADIUS in the release's reward files)
VARIANTS = ("ctorg", "kits23")
COMPONENTS = ("format", "time", "space", "consistency")
IntBox = tuple[int, int, int, int]

_THINK = re.compile(r"<think>\s*(.*?)\s*</think>", re.DOTALL | re.IGNORECASE)
_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL | re.IGNORECASE)
_STRICT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL | re.IGNORECASE)
_TAG_SPACING = [(re.compile(p, re.IGNORECASE), t) for p, t in (
    (r"<\s*think\s*>", "<think>"), (r"<\s*/\s*think\s*>", "</think>"),
    (r"<\s*answer\s*>", "<answer>"), (r"<\s*/\s*answer\s*>", "</answer>"),
)]


# ----------------------------------------------------------------------------------------------------
# reading the text as the release does


def normalize_tags(text: str) -> str:
    """`< think >`, `</ answer >` ... -> the plain tags (the release does this before every check)."""
    for pattern, tag in _TAG_SPACING:
        text = pattern.sub(tag, text)
    return text


def _first_balanced(payload: str) -> Optional[str]:
    """The first {...} or [...] span, by counting only the opening bracket's kind (quotes are not special)."""
    starts = [(i, c) for i, c in ((payload.find("{"), "{"), (payload.find("["), "[")) if i != -1]
    if not starts:
        return None
    start, opener = min(starts)
    closer = "}" if opener == "{" else "]"
    depth = 0
    for i in range(start, len(payload)):
        if payload[i] == opener:
            depth += 1
        elif payload[i] == closer and depth:
            depth -= 1
            if not depth:
                return payload[start : i + 1]
    return None


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def answer_items(text: str) -> Optional[list]:
    """The answer's JSON as a list: a list as is, {"entities": [...]} as that list, another dict as [dict].

    JSON that does not parse is retried on its first bracketed span; None when nothing reads."""
    match = _ANSWER.search(text)
    if match is None:
        return None
    payload = match.group(1).strip()
    data = _loads(payload)
    if data is None:
        span = _first_balanced(payload)
        data = None if span is None else _loads(span)
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        return data["entities"] if isinstance(data.get("entities"), list) else [data]
    return None


def _first_item(items: Optional[list]) -> dict:
    return items[0] if items and isinstance(items[0], dict) else {}


def _as_ints(box: Any) -> Optional[list[int]]:
    """Four numbers rounded to integers (strings of numbers count, as float() reads them); None otherwise."""
    if not isinstance(box, list) or len(box) != 4:
        return None
    try:
        return [int(round(float(v))) for v in box]
    except (TypeError, ValueError, OverflowError):
        return None


def format_checks(text: str) -> tuple[float, float, float, float]:
    """(strict tags, non-empty think, JSON list, fraction of valid boxes); the format reward is their mean."""
    text = normalize_tags(text)
    strict = 1.0 if _STRICT.fullmatch(text) and text.lower().find("<think>") < text.lower().find("<answer>") else 0.0
    think = _THINK.search(text)
    has_think = 1.0 if think is not None and think.group(1).strip() else 0.0
    items = answer_items(text)
    if not items:
        return strict, has_think, 0.0, 0.0
    boxes = _first_item(items).get("bbox_2d_list")
    valid_fraction = 0.0
    if isinstance(boxes, list) and boxes:
        valid = 0
        for box in boxes:
            v = _as_ints(box)
            if v is not None and all(0 <= c <= 1000 for c in v) and v[0] < v[2] and v[1] < v[3]:
                valid += 1
        valid_fraction = valid / len(boxes)
    return strict, has_think, 1.0, valid_fraction


def format_score(text: str) -> float:
    return float(sum(format_checks(text)) / 4.0)


def answered_slice(text: str) -> Optional[int]:
    """int() of the first item's "slice" (12.7 -> 12, "12" -> 12); None when absent or not a number."""
    value = _first_item(answer_items(normalize_tags(text))).get("slice")
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None


def answered_boxes(text: str, image_size: int, coordinates: str = "norm1000") -> list[IntBox]:
    """The first item's boxes as inclusive integer pixels of the canvas; unreadable entries are dropped.

    norm1000: each value rounded, clamped to 0-1000 and mapped to round(v / 1000 * (size - 1)).
    pixels: each value rounded.  Then clamped to the canvas, corners sorted, a zero width or height widened
    to one pixel (so every readable box is kept, valid or not)."""
    raw = _first_item(answer_items(normalize_tags(text))).get("bbox_2d_list")
    if not isinstance(raw, list):
        return []
    last = int(image_size) - 1
    out: list[IntBox] = []
    for box in raw:
        v = _as_ints(box)
        if v is None:
            continue
        if coordinates == "norm1000":
            v = [int(round(min(1000, max(0, c)) / 1000.0 * last)) for c in v]
        out.append(_ordered(v, last))
    return out


def _ordered(v: Sequence[int], last: int) -> IntBox:
    x1, y1, x2, y2 = (min(last, max(0, int(c))) for c in v)
    x1, x2 = min(x1, x2), max(x1, x2)
    y1, y2 = min(y1, y2), max(y1, y2)
    if x2 <= x1:
        x2 = min(last, x1 + 1)
    if y2 <= y1:
        y2 = min(last, y1 + 1)
    return x1, y1, x2, y2


def gt_pixel_box(box: Sequence[float], image_size: int) -> IntBox:
    """A view's GT box (pixel edges) as the inclusive integer pixels it covers."""
    x1, y1, x2, y2 = (float(c) for c in box)
    return _ordered((int(np.floor(x1)), int(np.floor(y1)), int(np.ceil(x2)) - 1, int(np.ceil(y2)) - 1), int(image_size) - 1)


# ----------------------------------------------------------------------------------------------------
# components


def space_score(pred: Sequence[IntBox], gt: Sequence[IntBox]) -> float:
    """Sum of Hungarian-matched IoUs / max(N, M); 0 when either side has no box.  The boxes are inclusive pixel
    ranges (a box [x, y, x, y] is one pixel), i.e. the half-open boxes [x1, y1, x2 + 1, y2 + 1] our own
    grounding reward matches."""
    return matched_box_score([_half_open(box) for box in pred], [_half_open(box) for box in gt])


def _half_open(box: IntBox) -> IntBox:
    return box[0], box[1], box[2] + 1, box[3] + 1


def window(k: int, num_slices: int, radius: int = RELEASE_WINDOW) -> tuple[int, int]:
    return max(0, k - radius), min(num_slices - 1, k + radius)


def time_score(k: Optional[int], areas: Sequence[float], radius: int = RELEASE_WINDOW) -> float:
    """GT area on slice k / the largest GT area within k +- radius; 0 off the volume or for an empty window."""
    if k is None or not 0 <= k < len(areas):
        return 0.0
    z0, z1 = window(k, len(areas), radius)
    best = float(max(areas[z0 : z1 + 1]))
    return float(min(1.0, max(0.0, areas[k] / best))) if best > 0 else 0.0


def window_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """The release's Dice: 1 when both are empty, else 2|P & G| / (|P| + |G| + 1e-8)."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return float(min(1.0, 2.0 * int(np.logical_and(pred, gt).sum()) / (total + 1e-8)))


def key_boxes(target: RewardTarget) -> list[IntBox]:
    """The GT key slice's boxes (what the release's space reward always compares with)."""
    if target.key_slice is None:
        raise DataError(f"{target.case_id}: the reward target names no GT key slice (prepare the data again)")
    return [gt_pixel_box(b, target.image_size) for b in target.gt_boxes.get(int(target.key_slice), [])]


def _coordinates(target: RewardTarget) -> str:
    return AnswerFormat.from_spec(target.answer_format).coordinates


class ConsistencyScorer(CoherenceScorer):
    """The release's consistency term through our frozen propagator: the answer's boxes on the answered slice
    are propagated within k +- window, and Dice is taken against the GT cut to the same slices.

    No answered slice, a slice off the volume or no boxes score 0 without propagating.  Boxes that fall
    wholly outside the scan (the view's padding) are dropped; if none is left the prediction is empty."""

    def __init__(self, propagator: Propagator, resolve: Resolver, *, window: int = RELEASE_WINDOW) -> None:
        super().__init__(propagator, resolve, window=window)

    def score_texts(self, texts: Sequence[str], targets: Sequence[RewardTarget]) -> list[float]:
        scores = [0.0] * len(texts)
        jobs: list[tuple[int, Any, np.ndarray, Optional[EvidenceAnchor], tuple[int, int]]] = []
        for n, (text, target) in enumerate(zip(texts, targets)):
            k = answered_slice(text)
            boxes = answered_boxes(text, target.image_size, _coordinates(target))
            if k is None or not boxes or not 0 <= k < target.num_slices:
                continue
            volume, gt = self._volume(target)
            anchor = _anchor(k, boxes, target)
            jobs.append((n, volume, gt, anchor, window(k, volume.num_slices, int(self.window or 0))))
        for n, _, gt, anchor, (z0, z1) in jobs:
            if anchor is None:  # nothing to propagate: an empty prediction
                scores[n] = window_dice(np.zeros_like(gt[z0 : z1 + 1]), gt[z0 : z1 + 1])
        jobs = [j for j in jobs if j[3] is not None]
        for n, pred, gt in self._propagate_by_volume(jobs):
            scores[n] = window_dice(pred != 0, gt)
        return scores


def _anchor(k: int, boxes: Sequence[IntBox], target: RewardTarget) -> Optional[EvidenceAnchor]:
    """Inclusive pixel boxes -> voxel boxes on slice k, clipped to the slice; None when none touches it."""
    geometry = target.view_geometry()
    rows, cols = (int(n) for n in geometry.shape_ji)
    kept = []
    for x1, y1, x2, y2 in boxes:
        b = geometry.to_voxel_box((x1, y1, x2 + 1, y2 + 1))
        b = VoxelBox(max(0.0, b.i0), max(0.0, b.j0), min(float(cols), b.i1), min(float(rows), b.j1))
        if b.i1 > b.i0 and b.j1 > b.j0:
            kept.append(b)
    return EvidenceAnchor(int(k), tuple(kept)) if kept else None


# ----------------------------------------------------------------------------------------------------
# batch API and trl reward functions


def _targets(reward_target: Sequence[Any]) -> list[RewardTarget]:
    cache = _TargetCache()
    return [cache.get(t) for t in reward_target]


def _time(text: str, target: RewardTarget, variant: str, radius: int = RELEASE_WINDOW) -> float:
    if variant == "ctorg" and not answered_boxes(text, target.image_size, _coordinates(target)):
        return 0.0
    return time_score(answered_slice(text), target.slice_areas, radius)


def _space(text: str, target: RewardTarget) -> float:
    return space_score(answered_boxes(text, target.image_size, _coordinates(target)), key_boxes(target))


def compute_release_rewards(
    completions: Sequence[Any],
    targets: Sequence[Any],
    weights: RewardWeights = RewardWeights(0.25, 0.25, 0.25, 0.25),
    consistency: Optional[ConsistencyScorer] = None,
    *,
    variant: str = "ctorg",
    window: int = RELEASE_WINDOW,
) -> dict[str, list[float]]:
    """Every term per completion and the weighted "total" (clamped to 0-1 as the release does); `window` is the
    time term's +-radius (the consistency scorer has its own)."""
    _check_variant(variant)
    _check_lengths(completions, targets)
    resolved = _targets(targets)
    texts = [completion_text(c) for c in completions]
    out = {
        "format": [format_score(t) for t in texts],
        "time": [_time(t, r, variant, window) for t, r in zip(texts, resolved)],
        "space": [_space(t, r) for t, r in zip(texts, resolved)],
    }
    w = {"format": weights.format, "time": weights.slice, "space": weights.grounding, "consistency": weights.coherence}
    if consistency is not None:
        out["consistency"] = consistency.score_texts(texts, resolved)
    out["total"] = [
        float(min(1.0, max(0.0, sum(w[c] * out[c][n] for c in COMPONENTS if c in out)))) for n in range(len(texts))
    ]
    return out


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"release reward variant must be one of {VARIANTS}, got {variant!r}")


def _text_reward(name: str, score: Callable[[str, RewardTarget], float]) -> Callable[..., list[float]]:
    def reward(prompts: Any = None, completions: Sequence[Any] = (), reward_target: Sequence[Any] = (), **kwargs: Any) -> list[float]:
        _check_lengths(completions, reward_target)
        return [float(score(completion_text(c), t)) for c, t in zip(completions, _targets(reward_target))]

    reward.__name__ = reward.__qualname__ = name
    return reward


def make_release_reward_functions(
    weights: RewardWeights,
    *,
    variant: str = "ctorg",
    propagator: Optional[Propagator] = None,
    resolve: Optional[Resolver] = None,
    window: int = RELEASE_WINDOW,
) -> tuple[list[Callable[..., list[float]]], list[float]]:
    """trl reward functions and weights in the release's definitions; consistency needs the CT-ORG variant,
    a propagator and a resolver (the KiTS23 variant has no consistency term). `window` is the +-radius of both
    the time and the consistency terms (5 in the release)."""
    _check_variant(variant)
    funcs = [
        _text_reward("release_format_reward", lambda text, _t: format_score(text)),
        _text_reward("release_time_reward", lambda text, t: _time(text, t, variant, window)),
        _text_reward("release_space_reward", _space),
    ]
    values = [weights.format, weights.slice, weights.grounding]
    if variant == "ctorg" and propagator is not None and resolve is not None:
        scorer = ConsistencyScorer(propagator, resolve, window=window)

        def release_consistency_reward(
            prompts: Any = None, completions: Sequence[Any] = (), reward_target: Sequence[Any] = (), **kwargs: Any
        ) -> list[float]:
            _check_lengths(completions, reward_target)
            return scorer.score_texts([completion_text(c) for c in completions], _targets(reward_target))

        release_consistency_reward.scorer = scorer  # type: ignore[attr-defined]
        funcs.append(release_consistency_reward)
        values.append(weights.coherence)
    return funcs, values
