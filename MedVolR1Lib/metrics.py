"""Segmentation metrics at native resolution: Dice, IoU, normalised surface Dice (NSD) and HD95.

Distances are in mm: `spacing` is the voxel size along each ARRAY axis, so for a canonical (K, J, I)
volume it is (sk, sj, si) = `array_spacing(volume)` (note `Volume.spacing` is (si, sj, sk)).
Surface voxels are mask voxels with a face neighbour (6-connectivity in 3D) outside the mask or
outside the array; surface-to-surface distances are between voxel centres, from exact Euclidean
distance transforms with `sampling=spacing`.

Empty masks, defined explicitly: both empty -> Dice 1, IoU 1, NSD 1, HD95 0 (nothing to find, nothing
found); exactly one empty -> Dice 0, IoU 0, NSD 0, HD95 inf.
HD95 is the larger of the two directed 95th percentiles (as MONAI computes it).

Units: with a spacing, distances and the NSD tolerance are in mm.  Without one (`spacing=None`: the scan
stores no voxel size, as M3D-Seg's arrays do) they are in voxels, and `SegmentationScores.unit` says so,
so a "2 mm" NSD is never reported for what was really 2 voxels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from .volume import Volume


def array_spacing(volume: Volume) -> tuple[float, float, float]:
    """Voxel size per array axis (k, j, i) of a canonical volume, for the metrics here."""
    si, sj, sk = volume.spacing
    return (sk, sj, si)


def _binary_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(pred) != 0, np.asarray(gt) != 0
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground truth shape {g.shape}")
    return p, g


def _spacing(spacing: Optional[Sequence[float]], ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be {ndim} positive numbers (one per array axis), got {spacing}")
    return values


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    p, g = _binary_pair(pred, gt)
    total = int(p.sum()) + int(g.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(p, g).sum()) / total


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    p, g = _binary_pair(pred, gt)
    union = int(np.logical_or(p, g).sum())
    return 1.0 if union == 0 else int(np.logical_and(p, g).sum()) / union


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface voxels: in the mask with a face neighbour outside it (the array border counts as outside)."""
    m = np.asarray(mask) != 0
    structure = ndimage.generate_binary_structure(m.ndim, 1)
    return m & ~ndimage.binary_erosion(m, structure=structure, border_value=0)


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: Optional[Sequence[float]] = None) -> tuple[np.ndarray, np.ndarray]:
    """(distance of each pred surface voxel to the GT surface, of each GT surface voxel to the pred surface), mm.

    Both masks must be non-empty.
    """
    p, g = _binary_pair(pred, gt)
    if not p.any() or not g.any():
        raise ValueError("surface distances need two non-empty masks")
    sampling = _spacing(spacing, p.ndim)
    sp, sg = surface(p), surface(g)
    to_gt = ndimage.distance_transform_edt(~sg, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=sampling)
    return to_gt[sp], to_pred[sg]


def nsd(pred: np.ndarray, gt: np.ndarray, spacing: Optional[Sequence[float]] = None, tolerance_mm: float = 2.0) -> float:
    """Normalised surface Dice: fraction of both surfaces within `tolerance_mm` of the other surface."""
    p, g = _binary_pair(pred, gt)
    if not p.any() and not g.any():
        return 1.0
    if not p.any() or not g.any():
        return 0.0
    d_pred, d_gt = surface_distances(p, g, spacing)
    return float((np.count_nonzero(d_pred <= tolerance_mm) + np.count_nonzero(d_gt <= tolerance_mm)) / (d_pred.size + d_gt.size))


normalized_surface_dice = nsd


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Optional[Sequence[float]] = None) -> float:
    """95th-percentile Hausdorff distance in mm (max of both directed 95th percentiles)."""
    p, g = _binary_pair(pred, gt)
    if not p.any() and not g.any():
        return 0.0
    if not p.any() or not g.any():
        return float("inf")
    d_pred, d_gt = surface_distances(p, g, spacing)
    return float(max(np.percentile(d_pred, 95), np.percentile(d_gt, 95)))


@dataclass(frozen=True)
class SegmentationScores:
    dice: float
    iou: float
    nsd: float
    hd95: float
    tolerance_mm: float  # the NSD tolerance, in `unit`
    unit: str = "mm"  # "mm" when a spacing was given, "voxels" when not

    def as_dict(self) -> dict:
        return {"dice": self.dice, "iou": self.iou, "nsd": self.nsd, "hd95": self.hd95, "tolerance_mm": self.tolerance_mm, "unit": self.unit}


def distance_unit(spacing: Optional[Sequence[float]]) -> str:
    """"mm" when distances are scaled by a voxel spacing, "voxels" when none is known."""
    return "voxels" if spacing is None else "mm"


def score_masks(pred: np.ndarray, gt: np.ndarray, spacing: Optional[Sequence[float]] = None, tolerance_mm: float = 2.0) -> SegmentationScores:
    """All four metrics; the surface distances are computed once.  `spacing=None`: distances in voxels."""
    p, g = _binary_pair(pred, gt)
    unit = distance_unit(spacing)
    if p.any() and g.any():
        d_pred, d_gt = surface_distances(p, g, spacing)
        within = (np.count_nonzero(d_pred <= tolerance_mm) + np.count_nonzero(d_gt <= tolerance_mm)) / (d_pred.size + d_gt.size)
        return SegmentationScores(dice(p, g), iou(p, g), float(within), float(max(np.percentile(d_pred, 95), np.percentile(d_gt, 95))), tolerance_mm, unit)
    return SegmentationScores(dice(p, g), iou(p, g), nsd(p, g, spacing, tolerance_mm), hd95(p, g, spacing), tolerance_mm, unit)
