"""KiTS23 lesions one at a time: each tumour or cyst is its own target, named by what sets it apart.

The public MedVol-R1 release segments one lesion per query ("the largest tumour in the right kidney", "the
only cyst"), so its KiTS23 score measures something else than a union of all tumours.  M3D-Seg stores
KiTS23 as three channels (kidney, tumour, cyst) without instance ids, so instances are recovered here:

- a lesion instance is a 3D connected component (26-connected) of the tumour or the cyst channel;
- the kidneys are the two largest components of kidney + tumour + cyst (a tumour grows out of its kidney,
  so the union keeps each kidney in one piece with its lesions); a lesion belongs to the kidney whose
  component holds it, or to the nearer kidney (centroid distance) when it lies outside both;
- attributes: how many of its kind the case holds (only / several), its volume rank and its height rank
  (centroid along the superior axis), both among its kind in the case and in its own kidney, and the
  kidney's side where the orientation is verified (a side stays unknown otherwise and is never said).

A rank is only stated when it is strict: two equal-sized tumours are neither "the larger".  Instances
are numbered 1.. per channel in a fixed order (most voxels first, then first voxel in array order), and a
record's ground truth names one as the label value ``INSTANCE_BASE * channel_label + number``, which
`instance_mask` turns back into the mask, so rewards and evaluation resolve it like any label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage

from .errors import DataError
from .queries import FRAMES, Query, normalise_name

INSTANCE_BASE = 1000  # label value of instance n of channel label c: INSTANCE_BASE * c + n
LESION_KINDS = {"kidney_tumor": "tumor", "kidney_cyst": "cyst"}  # channel name -> lesion kind
INSTANCE_TARGETS = {"tumor": "kidney_tumor_instance", "cyst": "kidney_cyst_instance"}
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def instance_value(label: int, number: int) -> int:
    """The label value that names instance `number` (1-based) of channel `label`."""
    if not 1 <= number < INSTANCE_BASE or label < 1:
        raise DataError(f"instance {number} of label {label} cannot be encoded (1 <= number < {INSTANCE_BASE})")
    return INSTANCE_BASE * int(label) + int(number)


def decode_instance(value: int) -> Optional[tuple[int, int]]:
    """(channel label, instance number) for an instance value, None for a plain label value."""
    value = int(value)
    return (value // INSTANCE_BASE, value % INSTANCE_BASE) if value >= INSTANCE_BASE else None


def labelled_components(mask: np.ndarray) -> tuple[np.ndarray, list[int], list[int]]:
    """26-connected components of a 3D mask: (label array, component ids in the fixed instance order, their voxel
    counts).  The order is most voxels first, ties by the first voxel in array order; masks are made only on demand,
    so a scan with many specks costs one label array, not one volume per speck."""
    labelled, count = ndimage.label(np.asarray(mask) != 0, structure=_CONNECTIVITY)
    if count == 0:
        return labelled, [], []
    flat = labelled.ravel()
    sizes = np.bincount(flat, minlength=count + 1)[1:]
    nonzero = np.flatnonzero(flat)
    first = np.full(count, flat.size, dtype=np.int64)
    np.minimum.at(first, flat[nonzero] - 1, nonzero)
    order = sorted(range(count), key=lambda n: (-int(sizes[n]), int(first[n])))
    return labelled, [n + 1 for n in order], [int(sizes[n]) for n in order]


def instance_mask(label_map: np.ndarray, value: int) -> np.ndarray:
    """Mask of an instance value (or of a plain label value) on a (K, J, I) label map; DataError if absent."""
    decoded = decode_instance(value)
    if decoded is None:
        return np.asarray(label_map) == int(value)
    label, number = decoded
    labelled, ids, _ = labelled_components(np.asarray(label_map) == label)
    if number > len(ids):
        raise DataError(f"label {label} has {len(ids)} connected instances; instance {number} does not exist")
    return labelled == ids[number - 1]


@dataclass
class Kidney:
    number: int  # 1 = more voxels
    mask: np.ndarray
    side: Optional[str]  # "right" | "left" | None (orientation not verified)


@dataclass
class LesionInstance:
    """One tumour or cyst and what sets it apart from the others of its kind."""

    kind: str  # "tumor" | "cyst"
    label: int  # the channel's label value
    number: int  # 1-based, in `components` order
    mask: np.ndarray = field(repr=False)
    voxels: int
    height: float  # mean k (superior axis) of its voxels
    kidney: Optional[int] = None  # Kidney.number
    side: Optional[str] = None
    count_in_case: int = 0  # of its kind
    count_in_kidney: int = 0
    size_rank: dict = field(default_factory=dict)  # {"case": "largest"/"smallest", "kidney": ...} when strict
    height_rank: dict = field(default_factory=dict)  # {"case": "uppermost"/"lowermost", ...} when strict

    @property
    def value(self) -> int:
        return instance_value(self.label, self.number)

    @property
    def target(self) -> str:
        return INSTANCE_TARGETS[self.kind]

    def describe(self) -> dict:
        return {"kind": self.kind, "number": self.number, "voxels": self.voxels, "kidney": self.kidney, "side": self.side,
                "count_in_case": self.count_in_case, "count_in_kidney": self.count_in_kidney,
                "size_rank": dict(self.size_rank), "height_rank": dict(self.height_rank)}


@dataclass
class LesionSurvey:
    instances: list[LesionInstance]
    kidneys: list[Kidney]
    skipped: list[tuple[str, str]]  # (target, reason): specks and lesions that cannot be told apart


def _ranks(members: Sequence[LesionInstance], key, high: str, low: str) -> dict[int, str]:
    """Instance id -> `high` / `low` for the strict extremes of `key` among `members` (two or more)."""
    if len(members) < 2:
        return {}
    ordered = sorted(members, key=key)
    out: dict[int, str] = {}
    if key(ordered[-1]) > key(ordered[-2]):
        out[id(ordered[-1])] = high
    if key(ordered[0]) < key(ordered[1]):
        out[id(ordered[0])] = low
    return out


def _sides(kidneys: list[np.ndarray]) -> list[Optional[str]]:
    """Canonical i points to the patient's left: the kidney with the larger mean i is the left one."""
    if len(kidneys) != 2:
        return [None] * len(kidneys)
    centres = [float(np.nonzero(k)[2].mean()) for k in kidneys]
    if centres[0] == centres[1]:
        return [None, None]
    return ["left", "right"] if centres[0] > centres[1] else ["right", "left"]


def survey_lesions(
    label_map: np.ndarray,
    label_names: Mapping[int, str],
    *,
    laterality: bool = False,
    min_voxels: int = 10,
) -> LesionSurvey:
    """All tumour and cyst instances of a KiTS23 label map with their attributes.

    `laterality=False` (orientation unverified) leaves every side unknown.  Components under `min_voxels`
    are specks of the annotation, not lesions: reported in `skipped`, never described.
    """
    label_map = np.asarray(label_map)
    by_name = {normalise_name(n): int(v) for v, n in label_names.items()}
    lesion_labels = {kind: by_name[name] for name, kind in LESION_KINDS.items() if name in by_name}
    kidney_label = by_name.get("kidney")
    organ = np.isin(label_map, [v for v in [kidney_label, *lesion_labels.values()] if v is not None])
    organ_labels, organ_ids, _ = labelled_components(organ)
    kidney_masks = [organ_labels == n for n in organ_ids[:2]]
    del organ_labels
    sides = _sides(kidney_masks) if laterality else [None] * len(kidney_masks)
    kidneys = [Kidney(n + 1, m, s) for n, (m, s) in enumerate(zip(kidney_masks, sides))]
    centroids = [np.argwhere(k.mask).mean(axis=0) for k in kidneys]
    instances: list[LesionInstance] = []
    skipped: list[tuple[str, str]] = []
    for kind, label in lesion_labels.items():
        labelled, ids, sizes = labelled_components(label_map == label)
        for number, (component, voxels) in enumerate(zip(ids, sizes), start=1):
            if voxels < min_voxels:
                skipped.append((INSTANCE_TARGETS[kind], f"{kind} instance {number}: a speck of {voxels} voxels (< {min_voxels}), not a lesion"))
                continue
            mask = labelled == component
            coords = np.argwhere(mask)
            inst = LesionInstance(kind, label, number, mask, voxels, float(coords[:, 0].mean()))
            holders = [k for k in kidneys if (k.mask & mask).any()]
            if holders:
                inst.kidney = holders[0].number
            elif kidneys:
                centre = coords.mean(axis=0)
                inst.kidney = kidneys[int(np.argmin([np.linalg.norm(centre - c) for c in centroids]))].number
            inst.side = next((k.side for k in kidneys if k.number == inst.kidney), None)
            instances.append(inst)
    for kind in LESION_KINDS.values():
        same = [i for i in instances if i.kind == kind]
        for scope, groups in (("case", [same]), ("kidney", [[i for i in same if i.kidney == k.number] for k in kidneys])):
            for group in groups:
                sizes = _ranks(group, lambda i: i.voxels, "largest", "smallest")
                # higher k is more superior: the uppermost lesion has the largest mean k
                heights = _ranks(group, lambda i: i.height, "uppermost", "lowermost")
                for inst in group:
                    if scope == "case":
                        inst.count_in_case = len(group)
                    else:
                        inst.count_in_kidney = len(group)
                    if id(inst) in sizes:
                        inst.size_rank[scope] = sizes[id(inst)]
                    if id(inst) in heights:
                        inst.height_rank[scope] = heights[id(inst)]
    return LesionSurvey(instances, kidneys, skipped)


# ---------------------------------------------------------------------------------------------- queries
#
# Words per split; train and held-out never share a noun, an attribute word or a sentence frame, so the
# held-out queries measure new wording.  "paraphrase" nouns never name the lesion (Table 1's paraphrased
# KiTS23 column): what it looks like, not what it is called.

NOUNS: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {
    "tumor": {
        "lesion": {"train": ("kidney tumour", "renal mass"), "held_out": ("renal tumour", "kidney neoplasm")},
        "paraphrase": {"train": ("solid renal growth", "enhancing kidney nodule"), "held_out": ("solid renal lump",)},
    },
    "cyst": {
        "lesion": {"train": ("kidney cyst", "cystic renal lesion"), "held_out": ("renal cyst",)},
        "paraphrase": {"train": ("fluid-filled renal sac", "water-density kidney pocket"), "held_out": ("watery renal pouch",)},
    },
}
# attribute -> split -> (word for a pair, word for three or more)
RANK_WORDS: dict[str, dict[str, tuple[str, str]]] = {
    "largest": {"train": ("larger", "largest"), "held_out": ("bigger", "biggest")},
    "smallest": {"train": ("smaller", "smallest"), "held_out": ("tinier", "tiniest")},
    "uppermost": {"train": ("upper", "uppermost"), "held_out": ("higher", "highest")},
    "lowermost": {"train": ("lower", "lowermost"), "held_out": ("more caudal", "most caudal")},
}
ONLY_WORDS = {"train": "only", "held_out": "single"}
IN_KIDNEY = {"train": "in the {side} kidney", "held_out": "of the patient's {side} kidney"}


def instance_phrases(inst: LesionInstance, split: str, kind: str) -> list[str]:
    """Noun phrases that pick out exactly this instance, in one split's words (empty if none does)."""
    nouns = NOUNS[inst.kind][kind][split]
    phrases: list[str] = []
    for noun in nouns:
        if inst.count_in_case == 1:
            phrases.append(f"the {ONLY_WORDS[split]} {noun}")
            continue
        for rank in (inst.size_rank.get("case"), inst.height_rank.get("case")):
            if rank:
                phrases.append(f"the {RANK_WORDS[rank][split][inst.count_in_case > 2]} {noun}")
        if inst.side is None:
            continue
        where = IN_KIDNEY[split].format(side=inst.side)
        if inst.count_in_kidney == 1:
            phrases.append(f"the {noun} {where}")
        elif inst.count_in_kidney < inst.count_in_case:  # a rank in the kidney that the case-wide rank does not say
            for rank in (inst.size_rank.get("kidney"), inst.height_rank.get("kidney")):
                if rank:
                    phrases.append(f"the {RANK_WORDS[rank][split][inst.count_in_kidney > 2]} {noun} {where}")
    return phrases


def instance_queries(inst: LesionInstance) -> list[Query]:
    """Every query of both splits for one instance; deterministic order."""
    out: list[Query] = []
    for split in ("train", "held_out"):
        for kind in ("lesion", "paraphrase"):
            for phrase in instance_phrases(inst, split, kind):
                out += [Query(frame.format(x=phrase), kind, split) for frame in FRAMES[split]]
    return out
