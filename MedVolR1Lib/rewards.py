"""Verifiable rewards for GRPO: format, informative slice, 2D grounding and cross-slice coherence.

Every function returns one float per completion and never raises on model output (garbage, wrong
types, boxes outside the image all score 0 for the affected components).  Errors of the system itself
(a propagator that crashes, a `resolve` that returns the wrong volume) are not hidden.

What the rewards need per prompt travels in a `RewardTarget`, serialisable to one JSON string so it
fits a dataset column; trl hands that column to the reward functions as a keyword list.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
from scipy.optimize import linear_sum_assignment

from .anchor import (AnswerFormat, AnswerRules, EvidenceAnchor, ParsedAnswer, ParseFailure, VoxelBox, box_iou_matrix,
                     parse_model_answer)
from .errors import AnchorError, DataError
from .metrics import dice
from .propagation.base import Propagator
from .views import ViewGeometry
from .volume import Volume

COMPONENTS = ("format", "slice", "grounding", "coherence")


@dataclass
class RewardTarget:
    """Ground truth of one prompt, as plain types (JSON column of a training dataset).

    `gt_boxes` maps each shown slice to the GT pixel boxes on it (empty where the target is absent),
    so an answer on any shown slice can be graded.  `slice_areas` covers every slice of the volume.
    `oracle` (optional) is Q(z), the propagator's 3D Dice when started from the GT box on slice z,
    precomputed on some slices.  `answer_format` (AnswerFormat.spec) is the schema and box coordinates
    the policy answers in; completions are parsed strictly in it (never the lenient inference mode).
    `key_slice` is the GT key slice (the release's space reward always scores against its boxes).
    """

    case_id: str
    labels: list[int]
    shown_slices: list[int]
    image_size: int
    geometry: dict
    slice_areas: list[float]
    gt_boxes: dict[int, list[list[float]]]
    max_boxes: int = 4
    target: str = ""
    oracle: Optional[dict[int, float]] = None
    answer_format: str = "medvolr1:pixels"
    key_slice: Optional[int] = None

    def __post_init__(self) -> None:
        AnswerFormat.from_spec(self.answer_format)  # refuse an unknown schema or convention early
        self.labels = [int(v) for v in self.labels]
        self.shown_slices = [int(k) for k in self.shown_slices]
        self.gt_boxes = {int(k): [[float(v) for v in b] for b in boxes] for k, boxes in self.gt_boxes.items()}
        self.slice_areas = [float(a) for a in self.slice_areas]
        if self.oracle is not None:
            self.oracle = {int(k): float(v) for k, v in self.oracle.items()}
        if self.key_slice is not None:
            self.key_slice = int(self.key_slice)

    @property
    def num_slices(self) -> int:
        return len(self.slice_areas)

    def view_geometry(self) -> ViewGeometry:
        g = dict(self.geometry)
        g["shape_ji"] = tuple(int(n) for n in g["shape_ji"])
        return ViewGeometry(**g)

    def rules(self) -> AnswerRules:
        return AnswerRules(image_size=int(self.image_size), shown_slices=tuple(self.shown_slices), max_boxes=int(self.max_boxes))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["gt_boxes"] = {str(k): v for k, v in self.gt_boxes.items()}
        if self.oracle is not None:
            data["oracle"] = {str(k): v for k, v in self.oracle.items()}
        data["geometry"] = {**self.geometry, "shape_ji": list(self.geometry["shape_ji"])}
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RewardTarget":
        try:
            return cls(**{k: data[k] for k in data if k in cls.__dataclass_fields__})
        except (TypeError, KeyError, ValueError) as exc:
            raise DataError(f"reward target is incomplete or malformed: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> "RewardTarget":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise DataError(f"reward target is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def coerce(cls, value: Union["RewardTarget", str, Mapping[str, Any]]) -> "RewardTarget":
        if isinstance(value, RewardTarget):
            return value
        if isinstance(value, str):
            return cls.from_json(value)
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        raise DataError(f"reward target must be a RewardTarget, JSON string or dict, got {type(value).__name__}")


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the total reward (the coherence weight counts only when a coherence scorer is given)."""

    format: float = 0.25
    slice: float = 0.5
    grounding: float = 1.0
    coherence: float = 1.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------
# completions


def completion_text(completion: Any) -> str:
    """Text of a completion given as a string or as trl's conversational list of messages ('' if neither)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        completion = [completion]
    if isinstance(completion, (list, tuple)):
        texts: list[str] = []
        for message in completion:
            if not isinstance(message, Mapping) or message.get("role", "assistant") != "assistant":
                continue
            content = message.get("content")
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, (list, tuple)):
                texts.extend(
                    str(part.get("text", "")) for part in content if isinstance(part, Mapping) and part.get("type") == "text"
                )
        return "".join(texts)
    return ""


# ----------------------------------------------------------------------------------------------------
# components


def format_score(parsed: Union[ParsedAnswer, ParseFailure], target: RewardTarget) -> float:
    """Graded format credit: 0 when unparseable; 1 only for a think + answer the grounder accepts as is.

    0.4 for a parseable answer, 0.1 for a non-empty think, 0.2 for a shown slice, 0.3 scaled by the
    fraction of usable boxes (proper, inside the image and touching the scan, not only its black padding,
    which the grounder rejects) and by max_boxes / n when there are too many.  A score of 1 means exactly:
    think present, `anchor.answer_problems` finds nothing and every box touches the scan (tested).
    """
    if not isinstance(parsed, ParsedAnswer):
        return 0.0
    score = 0.4
    if parsed.has_think and parsed.think:
        score += 0.1
    if parsed.slice_index in target.shown_slices:
        score += 0.2
    size = float(target.image_size)
    geometry = target.view_geometry()
    boxes = parsed.boxes
    valid = sum(
        1 for x1, y1, x2, y2 in boxes
        if x1 < x2 and y1 < y2 and min(x1, y1) >= 0 and max(x2, y2) <= size and on_scan(geometry, (x1, y1, x2, y2))
    )
    n = len(boxes)
    score += 0.3 * (valid / n) * min(1.0, target.max_boxes / n)
    return float(min(1.0, score))


def on_scan(geometry: ViewGeometry, box: Sequence[float]) -> bool:
    """Whether the grounder would accept this pixel box: it must touch the scan, not lie in the padding only."""
    try:
        EvidenceAnchor(0, (geometry.to_voxel_box(box),)).validate((1, *geometry.shape_ji))
    except AnchorError:
        return False
    return True


def _oracle_at(oracle: Mapping[int, float], z: Sequence[int], areas: Sequence[float]) -> np.ndarray:
    """Q at slices z: linear between the precomputed slices, held at the end values over the rest of the
    slices that show the target (stride sampling rarely lands on its last slice), 0 where it is absent."""
    known = np.asarray(sorted(oracle), dtype=float)
    values = np.asarray([oracle[int(k)] for k in known], dtype=float)
    z = np.asarray(z, dtype=int)
    visible = np.asarray(areas, dtype=float)[z] > 0
    return np.where(visible, np.interp(z.astype(float), known, values), 0.0)


def slice_score(parsed: Union[ParsedAnswer, ParseFailure], target: RewardTarget, source: str = "auto") -> float:
    """A(k) / max A over the shown slices (or Q(k) / max Q with an oracle curve); 0 for unshown or missed slices.

    `source`: "area", "oracle", or "auto" (oracle when the target has one with a positive maximum).
    """
    if not isinstance(parsed, ParsedAnswer):
        return 0.0
    k = parsed.slice_index
    shown = target.shown_slices
    if k not in shown or not 0 <= k < target.num_slices:
        return 0.0
    if source in ("auto", "oracle") and target.oracle:
        curve = _oracle_at(target.oracle, shown, target.slice_areas)
        best = float(curve.max())
        if best > 0:
            return float(np.clip(curve[shown.index(k)] / best, 0.0, 1.0))
        if source == "oracle":
            return 0.0
    areas = np.asarray(target.slice_areas, dtype=float)
    best = float(areas[shown].max()) if shown else 0.0
    return float(areas[k] / best) if best > 0 else 0.0


def matched_box_score(pred: Sequence[Sequence[float]], gt: Sequence[Sequence[float]]) -> float:
    """Hungarian matching on IoU; sum of matched IoUs / max(N, M), so extra and missing boxes both cost."""
    n, m = len(pred), len(gt)
    if n == 0 or m == 0:
        return 0.0
    iou = box_iou_matrix(pred, gt)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return float(iou[rows, cols].sum() / max(n, m))


def grounding_score(parsed: Union[ParsedAnswer, ParseFailure], target: RewardTarget) -> float:
    """Matched box IoU against the GT boxes on the slice the answer chose (0 off the shown slices)."""
    if not isinstance(parsed, ParsedAnswer):
        return 0.0
    gt = target.gt_boxes.get(parsed.slice_index)
    if not gt:
        return 0.0
    return matched_box_score(parsed.boxes, gt)


Resolver = Callable[[str, Sequence[int]], tuple[Volume, np.ndarray]]


class CoherenceScorer:
    """Cross-slice coherence: propagate the answer's anchor over k±W with a frozen propagator, Dice vs GT there.

    `resolve(case_id, labels)` returns the volume and its GT mask (K, J, I); the last result is kept and
    `propagator.prepare` runs only when the volume changes, so the rollouts of one GRPO group (same
    prompt, consecutive) encode the volume once.  `window=None` scores the full volume.
    """

    def __init__(self, propagator: Propagator, resolve: Resolver, *, window: Optional[int] = 8) -> None:
        self.propagator = propagator
        self.resolve = resolve
        self.window = window
        self._resolved_key: Optional[tuple] = None
        self._resolved: Optional[tuple[Volume, np.ndarray]] = None
        self._prepared: Optional[str] = None
        self.prepare_calls = 0

    def _volume(self, target: RewardTarget) -> tuple[Volume, np.ndarray]:
        key = (target.case_id, tuple(target.labels))
        if key != self._resolved_key:
            volume, gt = self.resolve(target.case_id, target.labels)
            gt = np.asarray(gt) != 0
            if gt.shape != volume.shape:
                raise DataError(f"{target.case_id}: GT mask shape {gt.shape} differs from the volume's {volume.shape}")
            if volume.shape[0] != target.num_slices or tuple(volume.shape[1:]) != tuple(target.geometry["shape_ji"]):
                raise DataError(f"{target.case_id}: resolved volume {volume.shape} does not match the reward target's grid")
            self._resolved_key, self._resolved = key, (volume, gt)
        assert self._resolved is not None
        return self._resolved

    def score(self, parsed: Union[ParsedAnswer, ParseFailure], target: RewardTarget) -> float:
        return self.score_many([parsed], [target])[0]

    def score_many(self, parsed: Sequence[Union[ParsedAnswer, ParseFailure]], targets: Sequence[RewardTarget]) -> list[float]:
        """Score a batch (a GRPO group): the answers on one volume are propagated together with
        `propagate_many`, which a lockstep backend tracks with one decoder call per slice for all of them.
        An answer with more than the target's `max_boxes` boxes scores 0 without propagating."""
        scores = [0.0] * len(parsed)
        jobs: list[tuple[int, Volume, np.ndarray, EvidenceAnchor, tuple[int, int]]] = []
        for n, (answer, target) in enumerate(zip(parsed, targets)):
            if not isinstance(answer, ParsedAnswer) or answer.slice_index not in target.shown_slices:
                continue
            if len(answer.boxes) > int(target.max_boxes):
                continue
            try:
                anchor = target.view_geometry().anchor_from_answer(answer, target.num_slices)
            except (AnchorError, ValueError, OverflowError):
                continue
            volume, gt = self._volume(target)
            k, last = anchor.slice_index, volume.num_slices - 1
            z = (0, last) if self.window is None else (max(0, k - self.window), min(last, k + self.window))
            if gt[z[0] : z[1] + 1].any():  # a window that misses the target: an empty prediction must not score
                jobs.append((n, volume, gt, anchor, z))
        for n, pred, gt in self._propagate_by_volume(jobs):
            scores[n] = float(dice(pred, gt))
        return scores

    def _propagate_by_volume(self, jobs: list) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(n, prediction, GT) inside each job's slice window, for jobs (n, volume, gt, anchor, (z0, z1)):
        one `propagate_many` per volume (a lockstep backend tracks a group's answers together), and the
        volume's features prepared once however many groups follow on it."""
        while jobs:
            fingerprint = jobs[0][1].fingerprint
            batch = [j for j in jobs if j[1].fingerprint == fingerprint]
            jobs = [j for j in jobs if j[1].fingerprint != fingerprint]
            volume = batch[0][1]
            if self._prepared != fingerprint:
                self.propagator.prepare(volume)
                self._prepared = fingerprint
                self.prepare_calls += 1
            preds = self.propagator.propagate_many([j[3] for j in batch], merge=True, slice_ranges=[j[4] for j in batch])
            for (n, _, gt, _, (z0, z1)), pred in zip(batch, preds):
                pred = np.asarray(pred)
                if pred.shape != volume.shape:
                    raise ValueError(f"propagator {self.propagator.name} returned shape {pred.shape}, expected {volume.shape}")
                yield n, pred[z0 : z1 + 1], gt[z0 : z1 + 1]


def oracle_curve(
    propagator: Propagator,
    volume: Volume,
    gt_mask: np.ndarray,
    boxes_by_slice: Mapping[int, Sequence[VoxelBox]],
    *,
    window: Optional[int] = None,
) -> dict[int, float]:
    """Q(z): Dice of the propagator started from the GT boxes on slice z (0 where z has no boxes).

    Precompute on a few slices per sample (it costs one propagation each) and store in RewardTarget.oracle.
    """
    gt = np.asarray(gt_mask) != 0
    propagator.prepare(volume)
    curve: dict[int, float] = {}
    last = volume.num_slices - 1
    for z, boxes in sorted(boxes_by_slice.items()):
        if not boxes:
            curve[int(z)] = 0.0
            continue
        z0, z1 = (0, last) if window is None else (max(0, z - window), min(last, z + window))
        pred = np.asarray(propagator.propagate(EvidenceAnchor(int(z), tuple(boxes)), merge=True, slice_range=(z0, z1)))
        curve[int(z)] = dice(pred[z0 : z1 + 1], gt[z0 : z1 + 1])
    return curve


# ----------------------------------------------------------------------------------------------------
# batch API


class _TargetCache:
    """Parses each distinct JSON target once per call (a group's rollouts share one string)."""

    def __init__(self) -> None:
        self._by_text: dict[str, RewardTarget] = {}

    def get(self, value: Any) -> RewardTarget:
        if isinstance(value, str):
            if value not in self._by_text:
                self._by_text[value] = RewardTarget.from_json(value)
            return self._by_text[value]
        return RewardTarget.coerce(value)


def _parse_all(completions: Sequence[Any], targets: Sequence[RewardTarget]) -> list[Union[ParsedAnswer, ParseFailure]]:
    """Strict parse in each target's answer format, boxes converted to rendered pixels (lenient mode never)."""
    return [
        parse_model_answer(completion_text(c), AnswerFormat.from_spec(t.answer_format), t.image_size)
        for c, t in zip(completions, targets)
    ]


def _check_lengths(completions: Sequence[Any], targets: Sequence[Any]) -> None:
    if len(completions) != len(targets):
        raise ValueError(f"{len(completions)} completions but {len(targets)} reward targets")


def compute_rewards(
    completions: Sequence[Any],
    targets: Sequence[Union[RewardTarget, str, Mapping[str, Any]]],
    weights: RewardWeights = RewardWeights(),
    coherence: Optional[CoherenceScorer] = None,
    *,
    slice_source: str = "auto",
) -> dict[str, list[float]]:
    """All reward components per completion plus their weighted "total" ("coherence" only with a scorer)."""
    _check_lengths(completions, targets)
    cache = _TargetCache()
    resolved = [cache.get(t) for t in targets]
    parsed = _parse_all(completions, resolved)
    out: dict[str, list[float]] = {
        "format": [format_score(p, t) for p, t in zip(parsed, resolved)],
        "slice": [slice_score(p, t, slice_source) for p, t in zip(parsed, resolved)],
        "grounding": [grounding_score(p, t) for p, t in zip(parsed, resolved)],
    }
    if coherence is not None:
        out["coherence"] = coherence.score_many(parsed, resolved)
    w = weights.as_dict()
    out["total"] = [float(sum(w[name] * out[name][n] for name in COMPONENTS if name in out)) for n in range(len(parsed))]
    return out


# ----------------------------------------------------------------------------------------------------
# trl reward functions: f(prompts, completions, reward_target, **kwargs) -> list[float]


def _reward_function(name: str, score: Callable[[Union[ParsedAnswer, ParseFailure], RewardTarget], float]) -> Callable[..., list[float]]:
    def reward(prompts: Any = None, completions: Sequence[Any] = (), reward_target: Sequence[Any] = (), **kwargs: Any) -> list[float]:
        _check_lengths(completions, reward_target)
        cache = _TargetCache()
        targets = [cache.get(t) for t in reward_target]
        return [float(score(p, t)) for p, t in zip(_parse_all(completions, targets), targets)]

    reward.__name__ = reward.__qualname__ = name
    return reward


def make_format_reward() -> Callable[..., list[float]]:
    return _reward_function("format_reward", format_score)


def make_slice_reward(source: str = "auto") -> Callable[..., list[float]]:
    if source not in ("auto", "area", "oracle"):
        raise ValueError(f"slice reward source must be auto, area or oracle, got {source!r}")
    return _reward_function("slice_reward", lambda p, t: slice_score(p, t, source))


def make_grounding_reward() -> Callable[..., list[float]]:
    return _reward_function("grounding_reward", grounding_score)


def make_coherence_reward(propagator: Propagator, resolve: Resolver, *, window: Optional[int] = 8) -> Callable[..., list[float]]:
    scorer = CoherenceScorer(propagator, resolve, window=window)

    def coherence_reward(prompts: Any = None, completions: Sequence[Any] = (), reward_target: Sequence[Any] = (), **kwargs: Any) -> list[float]:
        _check_lengths(completions, reward_target)
        cache = _TargetCache()
        targets = [cache.get(t) for t in reward_target]
        return scorer.score_many(_parse_all(completions, targets), targets)

    coherence_reward.scorer = scorer  # type: ignore[attr-defined]
    return coherence_reward


REWARD_MODES = ("ours", "release")


def make_reward_functions(
    weights: RewardWeights = RewardWeights(),
    *,
    propagator: Optional[Propagator] = None,
    resolve: Optional[Resolver] = None,
    window: Optional[int] = 8,
    slice_source: str = "auto",
    mode: str = "ours",
    variant: str = "ctorg",
) -> tuple[list[Callable[..., list[float]]], list[float]]:
    """The reward functions and matching weights for GRPOConfig(reward_weights=...); coherence needs both
    a propagator and a resolver.

    `mode` "release" gives the MedVol-R1 release's definitions (`release_rewards`; `variant` "ctorg" or
    "kits23", the latter without a consistency term); `slice_source` is then unused."""
    if mode not in REWARD_MODES:
        raise ValueError(f"reward_mode must be one of {REWARD_MODES}, got {mode!r}")
    if mode == "release":
        from .release_rewards import RELEASE_WINDOW, make_release_reward_functions

        return make_release_reward_functions(
            weights, variant=variant, propagator=propagator, resolve=resolve, window=RELEASE_WINDOW if window is None else window
        )
    funcs = [make_format_reward(), make_slice_reward(slice_source), make_grounding_reward()]
    values = [weights.format, weights.slice, weights.grounding]
    if propagator is not None and resolve is not None:
        funcs.append(make_coherence_reward(propagator, resolve, window=window))
        values.append(weights.coherence)
    return funcs, values
