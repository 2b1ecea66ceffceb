"""VRS samples: (volume, target, queries, GT key slice and boxes) built from a label map.

A sample holds plain types only (JSON round-trip), never rendered images: views are rendered lazily
from the case and `shown_slices` when a dataset row is used.  Targets that cannot become samples
(absent from the scan, not on any shown slice, too small there, no query templates) are returned in
`SampleSet.skipped` with the reason, so a data report can say what was left out and why.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .anchor import format_answer
from .errors import DataError
from .queries import ENTRIES, Query, TargetEntry, _vertebra_entry, get_entry, known_label, mentions_side, normalise_name
from .rewards import RewardTarget
from .targets import BoxRules, profile_labels
from .views import DEFAULT_IMAGE_SIZE, DEFAULT_NUM_VIEWS, ViewGeometry, select_slices
from .volume import Volume


@dataclass
class VRSSample:
    """One target in one case with its queries and the GT evidence anchor (voxels and rendered pixels)."""

    case_id: str
    target: str
    label_names: list[str]
    label_values: list[int]
    parts: list[list[int]]
    queries: list[Query]
    shown_slices: list[int]
    image_size: int
    geometry: dict
    key_slice: int
    boxes_voxel: list[list[float]]
    boxes_pixel: list[list[float]]
    boxes_pixel_by_slice: dict[int, list[list[float]]]
    slice_areas: list[int]
    spacing: list[float] = field(default_factory=list)
    modality: str = "CT"

    def queries_for(self, split: str) -> list[Query]:
        return [q for q in self.queries if q.split == split]

    def answer_text(self, think: Optional[str] = None) -> str:
        """The GT answer in the model's format (SFT target)."""
        return format_answer(self.key_slice, self.boxes_pixel, think)

    def view_geometry(self) -> ViewGeometry:
        return ViewGeometry(**{**self.geometry, "shape_ji": tuple(int(n) for n in self.geometry["shape_ji"])})

    def reward_target(self, *, max_boxes: int = 4, oracle: Optional[Mapping[int, float]] = None) -> RewardTarget:
        return RewardTarget(
            case_id=self.case_id,
            labels=list(self.label_values),
            shown_slices=list(self.shown_slices),
            image_size=self.image_size,
            geometry=dict(self.geometry),
            slice_areas=list(self.slice_areas),
            gt_boxes={k: v for k, v in self.boxes_pixel_by_slice.items()},
            max_boxes=max_boxes,
            target=self.target,
            oracle=dict(oracle) if oracle is not None else None,
            key_slice=self.key_slice,
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["queries"] = [q.to_dict() for q in self.queries]
        data["boxes_pixel_by_slice"] = {str(k): v for k, v in self.boxes_pixel_by_slice.items()}
        data["geometry"] = {**self.geometry, "shape_ji": list(self.geometry["shape_ji"])}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VRSSample":
        try:
            values = {k: data[k] for k in data if k in cls.__dataclass_fields__}
            values["queries"] = [Query.from_dict(q) for q in data["queries"]]
            values["boxes_pixel_by_slice"] = {int(k): [list(map(float, b)) for b in v] for k, v in data["boxes_pixel_by_slice"].items()}
            values["geometry"] = {**data["geometry"], "shape_ji": [int(n) for n in data["geometry"]["shape_ji"]]}
            return cls(**values)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"VRS sample is incomplete or malformed: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "VRSSample":
        try:
            return cls.from_dict(json.loads(text))
        except ValueError as exc:
            raise DataError(f"VRS sample is not valid JSON: {exc}") from exc


@dataclass(frozen=True)
class SkippedTarget:
    """A target (or label) that produced no sample, and why."""

    target: str
    reason: str


@dataclass
class SampleSet:
    samples: list[VRSSample]
    skipped: list[SkippedTarget]


def _names_by_label(label_names: Mapping[int, str]) -> dict[str, list[int]]:
    by_name: dict[str, list[int]] = {}
    for value, name in label_names.items():
        by_name.setdefault(normalise_name(name), []).append(int(value))
    return by_name


def _geometry_dict(geometry: ViewGeometry) -> dict:
    data = asdict(geometry)
    data["shape_ji"] = list(geometry.shape_ji)
    return data


def build_samples(
    volume: Volume,
    label_map: np.ndarray,
    label_names: Mapping[int, str],
    *,
    case_id: Optional[str] = None,
    targets: Optional[Sequence[str]] = None,
    shown_slices: Optional[Sequence[int]] = None,
    num_views: int = DEFAULT_NUM_VIEWS,
    image_size: int = DEFAULT_IMAGE_SIZE,
    rules: BoxRules = BoxRules(),
    min_key_voxels: int = 10,
    strict: bool = False,
    allow_laterality: bool = True,
) -> SampleSet:
    """One sample per target found in the label map (or per requested target).

    `targets`: target keys or label names (e.g. "kidneys", "liver", "bladder"); an unknown one is a
    DataError naming it.  Without `targets`, every entry of the query table whose labels exist is
    tried, and label names no entry knows are reported as skipped (or a DataError with `strict`).
    `allow_laterality=False` (datasets whose orientation nobody verified, see `m3d.laterality_allowed`)
    drops every query that says left or right; a target left without queries is skipped.
    """
    label_map = np.asarray(label_map)
    if label_map.shape != volume.shape:
        raise DataError(f"{volume.name}: label map shape {label_map.shape} differs from the volume's {volume.shape}")
    case_id = case_id or volume.name
    by_name = _names_by_label(label_names)
    present = {int(v) for v in np.unique(label_map) if v != 0}
    shown = tuple(int(k) for k in (shown_slices if shown_slices is not None else select_slices(volume, num_views)))
    if not shown or min(shown) < 0 or max(shown) >= volume.num_slices:
        raise DataError(f"{case_id}: shown slices {shown} are not within 0..{volume.num_slices - 1}")
    geometry = ViewGeometry.for_volume(volume, image_size)
    skipped: list[SkippedTarget] = []

    entries: list[TargetEntry] = []
    if targets is not None:
        for name in targets:
            entries.append(get_entry(name))
    else:
        entries = list(ENTRIES) + [e for e in (_vertebra_entry(n) for n in sorted(by_name)) if e is not None]
        for name in sorted(by_name):
            if not known_label(name):
                if strict:
                    raise DataError(f"{case_id}: unknown label name '{name}' (no query templates)")
                skipped.append(SkippedTarget(name, "unknown label name: no query templates"))

    samples: list[VRSSample] = []
    seen: set[str] = set()
    for entry in entries:
        if entry.key in seen:
            continue
        seen.add(entry.key)
        parts = entry.resolve(by_name)
        if parts is None:
            if targets is not None:
                skipped.append(SkippedTarget(entry.key, "no label of this target in the label names"))
            continue
        values = sorted({v for part in parts for v in part})
        if not any(v in present for v in values):
            skipped.append(SkippedTarget(entry.key, f"absent: labels {values} have no voxels in {case_id}"))
            continue
        queries = [q for q in entry.queries() if allow_laterality or not mentions_side(q)]
        if not queries:
            skipped.append(SkippedTarget(entry.key, "only laterality queries, and laterality is not allowed for this case"))
            continue
        profile = profile_labels(label_map, parts, entry.key, rules=rules, box_per_part=True if entry.one_box else None)
        names = [label_names[v] for v in values if v in label_names]
        made = _sample_from_profile(profile, volume, geometry, case_id=case_id, target=entry.key, values=values, parts=parts,
                                    names=names, queries=queries, shown=shown, image_size=image_size, min_key_voxels=min_key_voxels)
        (samples if isinstance(made, VRSSample) else skipped).append(made)
    return SampleSet(samples=samples, skipped=skipped)


def _sample_from_profile(profile, volume: Volume, geometry: ViewGeometry, *, case_id: str, target: str, values: list[int],
                         parts: list[list[int]], names: list[str], queries: list[Query], shown: Sequence[int], image_size: int,
                         min_key_voxels: int):
    """A VRSSample from a profiled target mask, or the SkippedTarget saying why the shown slices cannot carry it."""
    shown = list(shown)
    shown_areas = profile.areas[shown]
    if shown_areas.max() == 0:
        return SkippedTarget(target, "not on any shown slice")
    if shown_areas.max() < min_key_voxels:
        return SkippedTarget(target, f"too small on the shown slices ({int(shown_areas.max())} voxels < {min_key_voxels})")
    key = profile.key_slice_among(shown)
    boxes_by_slice = profile.boxes_for(shown)
    pixel_by_slice = {k: [list(geometry.to_pixel_box(b)) for b in boxes] for k, boxes in boxes_by_slice.items()}
    return VRSSample(
        case_id=case_id,
        target=target,
        label_names=names,
        label_values=values,
        parts=[list(p) for p in parts],
        queries=queries,
        shown_slices=shown,
        image_size=image_size,
        geometry=_geometry_dict(geometry),
        key_slice=key,
        boxes_voxel=[b.as_list() for b in boxes_by_slice[key]],
        boxes_pixel=pixel_by_slice[key],
        boxes_pixel_by_slice=pixel_by_slice,
        slice_areas=[int(a) for a in profile.areas],
        spacing=list(volume.spacing),
        modality=volume.modality,
    )


def build_lesion_samples(
    volume: Volume,
    label_map: np.ndarray,
    label_names: Mapping[int, str],
    *,
    case_id: str,
    shown_slices: Sequence[int],
    image_size: int = DEFAULT_IMAGE_SIZE,
    kinds: Sequence[str] = ("tumor", "cyst"),
    rules: BoxRules = BoxRules(),
    min_key_voxels: int = 10,
    min_lesion_voxels: int = 10,
    allow_laterality: bool = False,
) -> SampleSet:
    """One sample per KiTS23 lesion instance (`kits_lesions`): the target is that tumour or cyst alone.

    Every instance that yields no sample is in `skipped` with the reason: a speck, no query that tells it
    apart from its kind (equal sizes and heights, or only a side that is not allowed), not on the shown
    slices, too small there.  A kind without any instance is reported absent.
    """
    from .kits_lesions import INSTANCE_TARGETS, instance_queries, survey_lesions
    from .targets import profile_target

    label_map = np.asarray(label_map)
    if label_map.shape != volume.shape:
        raise DataError(f"{volume.name}: label map shape {label_map.shape} differs from the volume's {volume.shape}")
    survey = survey_lesions(label_map, label_names, laterality=allow_laterality, min_voxels=min_lesion_voxels)
    geometry = ViewGeometry.for_volume(volume, image_size)
    samples: list[VRSSample] = []
    skipped = [SkippedTarget(t, r) for t, r in survey.skipped if any(INSTANCE_TARGETS[k] == t for k in kinds)]
    for kind in kinds:
        if not any(i.kind == kind for i in survey.instances) and not any(t == INSTANCE_TARGETS[kind] for t, _ in survey.skipped):
            skipped.append(SkippedTarget(INSTANCE_TARGETS[kind], f"absent: no {kind} in {case_id}"))
    for inst in survey.instances:
        if inst.kind not in kinds:
            continue
        label = f"{inst.kind} instance {inst.number}"
        queries = [q for q in instance_queries(inst) if allow_laterality or not mentions_side(q)]
        if not queries:
            skipped.append(SkippedTarget(inst.target, f"{label}: nothing tells it apart from the other {inst.count_in_case - 1} "
                                                      f"{inst.kind}(s) (equal size and height, or only its side, which is not allowed)"))
            continue
        profile = profile_target(inst.mask, inst.target, rules=rules)
        made = _sample_from_profile(profile, volume, geometry, case_id=case_id, target=inst.target, values=[inst.value],
                                    parts=[[inst.value]], names=[label_names.get(inst.label, str(inst.label))], queries=queries,
                                    shown=shown_slices, image_size=image_size, min_key_voxels=min_key_voxels)
        if isinstance(made, SkippedTarget):
            skipped.append(SkippedTarget(inst.target, f"{label}: {made.reason}"))
        else:
            samples.append(made)
    return SampleSet(samples=samples, skipped=skipped)


def target_mask(label_map: np.ndarray, sample: VRSSample) -> np.ndarray:
    """The sample's GT mask (bool K, J, I), e.g. for a coherence `resolve` callable or evaluation."""
    return np.isin(np.asarray(label_map), np.asarray(sample.label_values))


def label_map_from_masks(masks: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, dict[int, str]]:
    """One-hot channel masks (C, K, J, I), as M3D-Seg stores them, -> (int32 label map, {c+1: name}).

    Where channels overlap, the later channel wins (lesion channels follow their organ in M3D-Seg).
    """
    masks = np.asarray(masks)
    if masks.ndim != 4 or masks.shape[0] != len(names):
        raise DataError(f"expected masks (C, K, J, I) with C = {len(names)} names, got shape {masks.shape}")
    label_map = np.zeros(masks.shape[1:], dtype=np.int32)
    for c in range(masks.shape[0]):
        label_map[masks[c] != 0] = c + 1
    return label_map, {c + 1: str(name) for c, name in enumerate(names)}


def sample_rows(samples: Sequence[VRSSample], split: str, *, think: Optional[str] = None, max_boxes: int = 4) -> list[dict]:
    """One plain dataset row per (sample, query of `split`): what SFT and GRPO datasets need, no images.

    Keys: case_id, target, query, kind, split, shown_slices, image_size, answer (the GT answer text for
    SFT), reward_target (JSON string for the reward functions).  Images are rendered later from
    case_id + shown_slices, so rows stay small.
    """
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    rows: list[dict] = []
    for sample in samples:
        reward_target = sample.reward_target(max_boxes=max_boxes).to_json()
        answer = sample.answer_text(think)
        for query in sample.queries_for(split):
            rows.append(
                {
                    "case_id": sample.case_id,
                    "target": sample.target,
                    "query": query.text,
                    "kind": query.kind,
                    "split": query.split,
                    "shown_slices": list(sample.shown_slices),
                    "image_size": sample.image_size,
                    "answer": answer,
                    "reward_target": reward_target,
                }
            )
    return rows
