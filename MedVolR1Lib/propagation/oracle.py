"""Oracle rows: GT anchor (max-area slice, GT component boxes) -> propagator -> Dice / NSD vs the labels.

This is the ceiling a grounder can reach with a given propagator, and the "cross-slice coherence"
reward's best case.  All targets of one volume share the propagator's embedding cache, so a table
over many organs encodes each visited slice once.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

from ..anchor import EvidenceAnchor
from ..metrics import array_spacing, score_masks
from ..progress import ProgressCallback, report
from ..targets import TargetProfile, profile_labels
from ..volume import Volume
from .base import Propagator

# The sample CT's 14 reported targets (docs/oracle_litemedsam.md, docs/corrections_litemedsam.md).
SAMPLE_CT_TARGETS = ("liver", "spleen", "kidney_right", "kidney_left", "pancreas", "stomach", "gallbladder",
                     "urinary_bladder", "aorta", "vertebrae_L3", "inferior_vena_cava", "duodenum", "vertebrae_L1",
                     "sacrum")

# Targets whose 2D slices show separate pieces that are one object (a vertebra's body and arch).
ONE_BOX_TARGETS_PREFIX = ("vertebrae_", "sacrum")


def gt_profile(labels: np.ndarray, label_value: int, name: str) -> TargetProfile:
    """The target's GT profile (one box around all pieces for vertebrae and sacrum)."""
    return profile_labels(labels, [[label_value]], name, box_per_part=True if name.startswith(ONE_BOX_TARGETS_PREFIX) else None)


@dataclass(frozen=True)
class OracleRow:
    target: str
    label: int
    key_slice: int
    boxes: int
    gt_slices: tuple[int, int]
    pred_slices: Optional[tuple[int, int]]
    gt_voxels: int
    pred_voxels: int
    dice: float
    nsd: float
    seconds: float
    stops: str

    def as_dict(self) -> dict:
        return asdict(self)


def oracle_rows(
    propagator: Propagator,
    volume: Volume,
    labels: np.ndarray,
    label_names: dict[int, str],
    targets: Sequence[str],
    *,
    tolerance_mm: float = 2.0,
    progress: Optional[ProgressCallback] = None,
) -> list[OracleRow]:
    """One OracleRow per target name (names must exist in `label_names` and be non-empty in `labels`)."""
    ids = {name: value for value, name in label_names.items()}
    propagator.prepare(volume)
    spacing = array_spacing(volume)
    rows = []
    for n, name in enumerate(targets):
        if name not in ids:
            raise KeyError(f"unknown target {name!r}; the label map has e.g. {sorted(ids)[:8]} ...")
        profile = gt_profile(labels, ids[name], name)
        k = profile.key_slice
        anchor = EvidenceAnchor(k, tuple(profile.boxes(k)))
        t0 = time.perf_counter()
        mask = propagator.propagate(anchor) > 0
        seconds = time.perf_counter() - t0
        scores = score_masks(mask, profile.mask, spacing, tolerance_mm)
        gt_z = np.flatnonzero(profile.areas)
        pred_z = np.flatnonzero(mask.any(axis=(1, 2)))
        stops = "; ".join(f"down: {d}, up: {u}" for d, u in getattr(propagator, "last_stops", []))
        rows.append(OracleRow(
            target=name, label=int(ids[name]), key_slice=int(k), boxes=len(anchor.boxes),
            gt_slices=(int(gt_z[0]), int(gt_z[-1])),
            pred_slices=(int(pred_z[0]), int(pred_z[-1])) if pred_z.size else None,
            gt_voxels=int(profile.mask.sum()), pred_voxels=int(mask.sum()),
            dice=float(scores.dice), nsd=float(scores.nsd), seconds=seconds, stops=stops,
        ))
        report(progress, (n + 1) / len(targets), f"{name}: Dice {scores.dice:.3f}")
    return rows
