"""Ground-truth evidence for one target: per-slice areas, the key slice and the boxes on a slice.

The model may only answer with a slice it was shown, so the key slice can be restricted to the shown
slices.  Boxes are the target's 2D connected components on a slice (one box per separate part: two
kidneys, several lesions), with specks dropped because a box around three stray voxels is not
evidence anyone would draw.  Paired organs given as one label per side get exactly one box per side,
even where the two sides touch on a slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from .anchor import VoxelBox
from .errors import DataError

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class BoxRules:
    """How GT boxes are drawn on a slice.

    A component is kept when it has at least `min_voxels` voxels and at least `min_fraction` of the
    largest component's voxels on that slice; at most `max_boxes` are kept, largest first.
    """

    min_voxels: int = 4
    min_fraction: float = 0.1
    max_boxes: int = 4


def slice_areas(mask: np.ndarray) -> np.ndarray:
    """Target voxels on each axial slice of a (K, J, I) mask, as int64 (K,)."""
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise DataError(f"target mask must be 3D (K, J, I), got shape {mask.shape}")
    return (mask != 0).reshape(mask.shape[0], -1).sum(axis=1).astype(np.int64)


def key_slice_from_areas(areas: Sequence[float], shown: Optional[Sequence[int]] = None, *, name: str = "target") -> int:
    """Slice with the largest target area (among `shown` if given); ties go to the lowest index.

    Raises DataError when the target has no voxels on any candidate slice.
    """
    areas = np.asarray(areas)
    candidates = np.arange(areas.shape[0]) if shown is None else np.asarray(sorted({int(k) for k in shown}), dtype=int)
    candidates = candidates[(candidates >= 0) & (candidates < areas.shape[0])]
    if candidates.size == 0 or float(areas[candidates].max()) <= 0:
        where = "in the volume" if shown is None else "on any of the shown slices"
        raise DataError(f"target '{name}' has no voxels {where}")
    return int(candidates[int(np.argmax(areas[candidates]))])


def _box_of(coords_j: np.ndarray, coords_i: np.ndarray) -> VoxelBox:
    return VoxelBox.from_voxels(int(coords_i.min()), int(coords_j.min()), int(coords_i.max()), int(coords_j.max()))


def _sorted_boxes(boxes: list[VoxelBox]) -> list[VoxelBox]:
    """Image order (left to right, then top to bottom), so the SFT target text is deterministic."""
    return sorted(boxes, key=lambda b: (b.i0, b.j0, b.i1, b.j1))


def _kept_components(plane: np.ndarray, rules: BoxRules) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(size, rows, cols) of the components that survive the speck rules, largest first."""
    labelled, count = ndimage.label(plane != 0, structure=_EIGHT_CONNECTED)
    if count == 0:
        return []
    sizes = np.bincount(labelled.ravel(), minlength=count + 1)[1:]
    threshold = max(float(rules.min_voxels), rules.min_fraction * float(sizes.max()))
    order = [int(n) for n in np.argsort(-sizes, kind="stable") if sizes[n] >= threshold]
    # the largest component is always kept, even when smaller than min_voxels: it is the whole target here
    if not order:
        order = [int(np.argmax(sizes))]
    kept = []
    objects = ndimage.find_objects(labelled)
    for n in order[: max(1, rules.max_boxes)]:
        rows, cols = np.nonzero(labelled[objects[n]] == n + 1)
        kept.append((int(sizes[n]), rows + objects[n][0].start, cols + objects[n][1].start))
    return kept


def component_boxes(plane: np.ndarray, rules: BoxRules = BoxRules()) -> list[VoxelBox]:
    """One box per connected component (8-connected) of a 2D (J, I) mask, specks dropped, in image order."""
    return _sorted_boxes([_box_of(rows, cols) for _, rows, cols in _kept_components(plane, rules)])


def part_boxes(part_planes: Sequence[np.ndarray], rules: BoxRules = BoxRules()) -> list[VoxelBox]:
    """One box per part (e.g. left and right kidney label) present on the slice.

    Each part's box covers that part's non-speck components, so touching sides stay two boxes and a
    side split in two pieces on one slice (lung lobes) stays one.  Parts beyond `max_boxes` are
    dropped smallest first.
    """
    found: list[tuple[int, VoxelBox]] = []
    per_part = BoxRules(rules.min_voxels, rules.min_fraction, max_boxes=1 << 20)
    for plane in part_planes:
        kept = _kept_components(plane, per_part)
        if not kept:
            continue
        rows = np.concatenate([r for _, r, _ in kept])
        cols = np.concatenate([c for _, _, c in kept])
        found.append((sum(size for size, _, _ in kept), _box_of(rows, cols)))
    found.sort(key=lambda item: -item[0])
    return _sorted_boxes([box for _, box in found[: max(1, rules.max_boxes)]])


@dataclass
class TargetProfile:
    """Everything ground truth says about one target in one volume; boxes are computed per slice on demand."""

    name: str
    mask: np.ndarray  # bool (K, J, I): the union of all parts
    parts: Optional[list[np.ndarray]] = None  # bool (K, J, I) per side for paired organs
    rules: BoxRules = BoxRules()
    areas: np.ndarray = field(init=False)
    _boxes: dict[int, list[VoxelBox]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.areas = slice_areas(self.mask)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.mask.shape)  # type: ignore[return-value]

    @property
    def key_slice(self) -> int:
        """Max-area slice over the whole volume."""
        return key_slice_from_areas(self.areas, name=self.name)

    def key_slice_among(self, shown: Sequence[int]) -> int:
        """Max-area slice among the slices the model was shown (DataError if none shows the target)."""
        return key_slice_from_areas(self.areas, shown, name=self.name)

    def boxes(self, k: int) -> list[VoxelBox]:
        """GT boxes on slice k (empty list where the target is absent)."""
        k = int(k)
        if not 0 <= k < self.shape[0]:
            raise DataError(f"target '{self.name}': slice {k} is out of range 0..{self.shape[0] - 1}")
        if k not in self._boxes:
            if self.areas[k] == 0:
                self._boxes[k] = []
            elif self.parts is not None:
                self._boxes[k] = part_boxes([p[k] for p in self.parts], self.rules)
            else:
                self._boxes[k] = component_boxes(self.mask[k], self.rules)
        return list(self._boxes[k])

    def boxes_for(self, slices: Sequence[int]) -> dict[int, list[VoxelBox]]:
        return {int(k): self.boxes(k) for k in slices}


def profile_target(
    mask: np.ndarray,
    name: str,
    *,
    parts: Optional[Sequence[np.ndarray]] = None,
    rules: BoxRules = BoxRules(),
) -> TargetProfile:
    """Profile a binary (K, J, I) target mask; `parts` (same shape, one per side) give one box per side.

    Raises DataError naming the target when the mask is empty.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise DataError(f"target '{name}': mask must be 3D (K, J, I), got shape {mask.shape}")
    binary = mask != 0
    if not binary.any():
        raise DataError(f"target '{name}' is empty: its mask has no voxels")
    part_masks = None
    if parts is not None:
        part_masks = [np.asarray(p) != 0 for p in parts]
        for p in part_masks:
            if p.shape != binary.shape:
                raise DataError(f"target '{name}': part mask shape {p.shape} differs from the mask's {binary.shape}")
    return TargetProfile(name=name, mask=binary, parts=part_masks, rules=rules)


def profile_labels(
    label_map: np.ndarray,
    part_values: Sequence[Sequence[int]],
    name: str,
    *,
    rules: BoxRules = BoxRules(),
    box_per_part: Optional[bool] = None,
) -> TargetProfile:
    """Profile the union of label values; with two or more parts (one per side) boxes are drawn per part.

    `part_values=[[2], [3]]` (kidney_right, kidney_left) gives one box per kidney; `[[5]]` boxes the
    liver's connected components.  `box_per_part=True` with one part gives a single box around all of
    it (a vertebra whose body and arch are separate pieces on a slice); default: True iff >= 2 parts.
    """
    label_map = np.asarray(label_map)
    masks = [np.isin(label_map, np.asarray(list(values), dtype=label_map.dtype)) for values in part_values]
    if not masks:
        raise DataError(f"target '{name}': no label values given")
    union = np.logical_or.reduce(masks)
    per_part = len(masks) > 1 if box_per_part is None else bool(box_per_part)
    return profile_target(union, name, parts=masks if per_part else None, rules=rules)


@dataclass(frozen=True)
class PropagationSettings:
    """How a propagator should see and post-process one target: its CT window and whether to keep only the
    largest 3D connected component (MedSAM2's official script always does; that deletes the second kidney)."""

    window: Optional[str]
    largest_component: bool


def keeps_largest_component(target: Optional[str]) -> bool:
    """True for a known target that is one connected structure (liver, one kidney, one vertebra).

    False for paired or plural targets (kidneys, lungs, ribs), lesions (there may be several) and unknown
    names, where keeping one component would delete real parts."""
    from .queries import find_entry

    entry = find_entry(target) if target else None
    if entry is None or entry.plural or "lesion" in entry.phrases:
        return False
    return all(len(source) == 1 for source in entry.sources)


def propagation_settings(target: Optional[str], modality: str = "CT") -> PropagationSettings:
    """Window and largest-component choice for `target` (None: the modality defaults, no component step)."""
    from .windowing import window_for_target

    return PropagationSettings(window_for_target(target, modality), keeps_largest_component(target))
