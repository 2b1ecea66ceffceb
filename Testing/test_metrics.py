"""Metrics against an independent brute-force computation (explicit neighbour surfaces, pairwise distances)."""

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from MedVolR1Lib import metrics


def _brute_surface_points(mask: np.ndarray, spacing) -> np.ndarray:
    """Surface voxels by checking the 6 face neighbours one by one (outside the array counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    points = []
    for k, j, i in zip(*np.nonzero(mask)):
        pk, pj, pi = k + 1, j + 1, i + 1
        neighbours = (
            padded[pk - 1, pj, pi], padded[pk + 1, pj, pi], padded[pk, pj - 1, pi],
            padded[pk, pj + 1, pi], padded[pk, pj, pi - 1], padded[pk, pj, pi + 1],
        )
        if not all(neighbours):
            points.append((k, j, i))
    return np.asarray(points, dtype=float) * np.asarray(spacing, dtype=float)


def _brute(pred, gt, spacing, tol):
    sp, sg = _brute_surface_points(pred, spacing), _brute_surface_points(gt, spacing)
    d = cdist(sp, sg)
    d_pred, d_gt = d.min(axis=1), d.min(axis=0)
    nsd = (np.sum(d_pred <= tol) + np.sum(d_gt <= tol)) / (len(d_pred) + len(d_gt))
    hd95 = max(np.percentile(d_pred, 95), np.percentile(d_gt, 95))
    dice = 2 * np.sum(pred & gt) / (pred.sum() + gt.sum())
    return dice, nsd, hd95


def _random_blob(rng, shape):
    """A smoothed random blob: irregular but mostly one piece, with holes and bumps."""
    from scipy import ndimage

    noise = rng.normal(size=shape)
    smooth = ndimage.gaussian_filter(noise, sigma=1.2)
    return smooth > np.quantile(smooth, rng.uniform(0.55, 0.8))


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force_on_random_shapes_with_anisotropic_spacing(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(6, 14, size=3))
    spacing = tuple(float(s) for s in rng.uniform(0.4, 3.5, size=3))
    pred, gt = _random_blob(rng, shape), _random_blob(rng, shape)
    assert pred.any() and gt.any()
    tol = float(rng.uniform(0.5, 4.0))
    dice, nsd, hd95 = _brute(pred, gt, spacing, tol)
    assert metrics.dice(pred, gt) == pytest.approx(dice, abs=1e-12)
    assert metrics.nsd(pred, gt, spacing, tol) == pytest.approx(nsd, abs=1e-9)
    assert metrics.hd95(pred, gt, spacing) == pytest.approx(hd95, rel=1e-9, abs=1e-9)
    scores = metrics.score_masks(pred, gt, spacing, tol)
    assert (scores.dice, scores.nsd, scores.hd95) == pytest.approx((dice, nsd, hd95), rel=1e-9, abs=1e-9)
    assert scores.iou == pytest.approx(np.sum(pred & gt) / np.sum(pred | gt))


def test_spacing_order_matters():
    """A shift of one voxel along axis 0 costs spacing[0] mm, not spacing[2]."""
    gt = np.zeros((10, 10, 10), bool)
    gt[3:6, 3:6, 3:6] = True
    pred = np.roll(gt, 1, axis=0)
    assert metrics.hd95(pred, gt, (5.0, 1.0, 1.0)) == pytest.approx(5.0)
    assert metrics.hd95(pred, gt, (1.0, 1.0, 5.0)) == pytest.approx(1.0)
    assert metrics.nsd(pred, gt, (5.0, 1.0, 1.0), tolerance_mm=4.9) < 1.0
    assert metrics.nsd(pred, gt, (1.0, 1.0, 5.0), tolerance_mm=1.0) == 1.0


def test_identical_masks_are_perfect():
    gt = np.zeros((8, 9, 10), bool)
    gt[2:6, 1:7, 3:9] = True
    s = metrics.score_masks(gt, gt.copy(), (2.0, 1.0, 0.5))
    assert (s.dice, s.iou, s.nsd, s.hd95) == (1.0, 1.0, 1.0, 0.0)


def test_empty_mask_conventions():
    empty = np.zeros((4, 4, 4), bool)
    full = empty.copy()
    full[1:3, 1:3, 1:3] = True
    assert metrics.dice(empty, empty) == 1.0 and metrics.iou(empty, empty) == 1.0
    assert metrics.nsd(empty, empty) == 1.0 and metrics.hd95(empty, empty) == 0.0
    for a, b in ((empty, full), (full, empty)):
        assert metrics.dice(a, b) == 0.0 and metrics.iou(a, b) == 0.0
        assert metrics.nsd(a, b) == 0.0 and math.isinf(metrics.hd95(a, b))
    assert math.isinf(metrics.score_masks(empty, full).hd95)


def test_bad_input_is_rejected():
    a = np.zeros((3, 3, 3), bool)
    with pytest.raises(ValueError, match="shape"):
        metrics.dice(a, np.zeros((3, 3, 4), bool))
    a[1, 1, 1] = True
    with pytest.raises(ValueError, match="spacing"):
        metrics.nsd(a, a, (1.0, -1.0, 1.0))


def test_array_spacing_reverses_volume_spacing():
    from MedVolR1Lib.volume import Volume

    v = Volume(np.zeros((4, 5, 6), np.float32), np.diag([-0.5, -0.7, 2.5, 1.0]))
    assert v.spacing == pytest.approx((0.5, 0.7, 2.5))
    assert metrics.array_spacing(v) == pytest.approx((2.5, 0.7, 0.5))
