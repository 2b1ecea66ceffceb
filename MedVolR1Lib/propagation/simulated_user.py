"""Simulated user: start from the GT anchor, then correct the evidence where the mask is most wrong.

The protocol of docs/corrections_litemedsam.md (in the spirit of the CVPR 2025 interactive challenge, a box
then up to 5 corrections, scored as a curve):

- correction 0 is the oracle anchor (max-area slice, GT component boxes, as `oracle.py`);
- each correction looks at the slice with the most wrong voxels (missed + leaked) that has no anchor yet:
  if the target is on that slice, the user draws its GT boxes there (a new anchor); if not (a leak past the
  target's end), the user limits the extent on that side at the target's last slice;
- optionally the first correction is the extent limit from the GT's z-range (`extent_first`);
- the curve's limit, a user who boxed every slice of the target (`every_slice_scores`), is reported beside it:
  what box corrections can reach with this segmenter at all.

Everything is in canonical voxels; masks are compared with the reference labels at native resolution.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

from ..anchor import EvidenceAnchor
from ..evidence import Evidence
from ..metrics import array_spacing, score_masks
from ..progress import ProgressCallback, report
from ..targets import TargetProfile
from ..volume import Volume
from .base import Propagator
from .oracle import gt_profile


@dataclass(frozen=True)
class CorrectionCurve:
    """Scores after 0, 1, ... corrections of one target (a list entry per step; shorter when nothing is left)."""

    target: str
    extent_first: bool
    actions: tuple[str, ...]  # what each correction did, e.g. "box on 84", "extent top 103"
    dice: tuple[float, ...]
    nsd: tuple[float, ...]
    seconds: tuple[float, ...]  # propagate() time of each step (step 0 includes encoding the visited slices)

    def at(self, corrections: int, metric: str = "dice") -> float:
        """Score after `corrections` corrections (the last one when the user had nothing left to correct)."""
        values = getattr(self, metric)
        return float(values[min(corrections, len(values) - 1)])

    def as_dict(self) -> dict:
        return asdict(self)


def next_correction(evidence: Evidence, pred: np.ndarray, profile: TargetProfile) -> Optional[tuple[Evidence, str]]:
    """The simulated user's next edit of `evidence`, or None when no slice without an anchor is wrong."""
    gt = profile.mask
    errors = np.count_nonzero(pred != gt, axis=(1, 2))
    errors[list(evidence.anchor_slices)] = 0
    if evidence.z_range is not None:
        errors[: evidence.z_range[0]] = 0
        errors[evidence.z_range[1] + 1 :] = 0
    k = int(np.argmax(errors))
    if errors[k] == 0:
        return None
    gt_z = np.flatnonzero(profile.areas)
    boxes = tuple(profile.boxes(k)) if profile.areas[k] > 0 else ()
    if boxes:
        anchors = tuple(sorted((*evidence.anchors, EvidenceAnchor(k, boxes)), key=lambda a: a.slice_index))
        return Evidence(anchors, evidence.z_range, evidence.points), f"box on {k}"
    lo, hi = evidence.z_range if evidence.z_range is not None else (0, len(errors) - 1)
    if k > gt_z[-1]:
        return Evidence(evidence.anchors, (lo, int(gt_z[-1])), evidence.points), f"extent top {int(gt_z[-1])}"
    return Evidence(evidence.anchors, (int(gt_z[0]), hi), evidence.points), f"extent bottom {int(gt_z[0])}"


def correction_curve(
    propagator: Propagator,
    volume: Volume,
    profile: TargetProfile,
    *,
    corrections: int = 5,
    extent_first: bool = False,
    tolerance_mm: float = 2.0,
) -> CorrectionCurve:
    """Run the protocol for one target on a prepared propagator; scores after each of 0..`corrections` steps."""
    spacing = array_spacing(volume)
    k = profile.key_slice
    evidence = Evidence.single(EvidenceAnchor(k, tuple(profile.boxes(k))))
    actions: list[str] = []
    dice, nsd, seconds = [], [], []
    for step in range(corrections + 1):
        if step > 0:
            if step == 1 and extent_first:
                gt_z = np.flatnonzero(profile.areas)
                edit = (Evidence(evidence.anchors, (int(gt_z[0]), int(gt_z[-1])), evidence.points),
                        f"extent {int(gt_z[0])}-{int(gt_z[-1])}")
            else:
                edit = next_correction(evidence, pred, profile)
            if edit is None:
                break
            evidence, action = edit
            actions.append(action)
        t0 = time.perf_counter()
        pred = np.asarray(propagator.propagate(evidence)) > 0
        seconds.append(time.perf_counter() - t0)
        scores = score_masks(pred, profile.mask, spacing, tolerance_mm)
        dice.append(float(scores.dice))
        nsd.append(float(scores.nsd))
    return CorrectionCurve(profile.name, extent_first, tuple(actions), tuple(dice), tuple(nsd), tuple(seconds))


def correction_curves(
    propagator: Propagator,
    volume: Volume,
    labels: np.ndarray,
    label_names: dict[int, str],
    targets: Sequence[str],
    *,
    corrections: int = 5,
    extent_first: bool = False,
    progress: Optional[ProgressCallback] = None,
) -> list[CorrectionCurve]:
    """One curve per target; all targets share the propagator's embedding cache."""
    ids = {name: value for value, name in label_names.items()}
    propagator.prepare(volume)
    curves = []
    for n, name in enumerate(targets):
        if name not in ids:
            raise KeyError(f"unknown target {name!r}; the label map has e.g. {sorted(ids)[:8]} ...")
        curve = correction_curve(propagator, volume, gt_profile(labels, ids[name], name),
                                 corrections=corrections, extent_first=extent_first)
        curves.append(curve)
        report(progress, (n + 1) / len(targets), f"{name}: Dice " + " ".join(f"{d:.3f}" for d in curve.dice))
    return curves


def boxed_every_slice(profile: TargetProfile) -> Evidence:
    """The GT boxes on every slice the target is on, and its GT extent: the evidence box corrections tend to."""
    slices = [int(k) for k in np.flatnonzero(profile.areas)]
    anchors = tuple(EvidenceAnchor(k, tuple(profile.boxes(k))) for k in slices if profile.boxes(k))
    return Evidence(anchors, (slices[0], slices[-1]))


def every_slice_scores(propagator: Propagator, volume: Volume, profile: TargetProfile, *,
                       tolerance_mm: float = 2.0) -> tuple[float, float]:
    """(Dice, NSD) of `boxed_every_slice` on a prepared propagator: every slice is an anchor, so each keeps the
    segmenter's mask for its own GT boxes, and the score is the ceiling of the correction curve."""
    pred = np.asarray(propagator.propagate(boxed_every_slice(profile))) > 0
    scores = score_masks(pred, profile.mask, array_spacing(volume), tolerance_mm)
    return float(scores.dice), float(scores.nsd)
