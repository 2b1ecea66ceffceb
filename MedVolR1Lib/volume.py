"""One in-memory scan type for every source (NIfTI, NRRD, MHA, DICOM, M3D-Seg, Slicer node).

Reading files is readers.py's job (it picks the reader by what the path is); this module only builds and
checks Volumes from arrays, so the file readers (readers.py, m3d.py) depend on it and never the reverse.

Every `Volume` holds its voxels in one canonical order, whatever the file's orientation:
``array[k, j, i]`` with i increasing toward the patient's LEFT, j toward POSTERIOR and k toward
SUPERIOR (DICOM "LPS" index order).  So ``array[k]`` drawn with rows = j and columns = i is an
axial slice in radiological convention (anterior at the top, patient's right on the image's left),
as Slicer and every PACS show it.  The way back to the file's own voxel order and geometry is kept in
`SourceGeometry`, so masks are written on the exact grid of the input scan.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from .errors import VolumeError

if TYPE_CHECKING:
    from .dicom_input import DicomSeries

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Canonical axis c points toward these RAS directions: i -> Left (-x), j -> Posterior (-y), k -> Superior (+z).
_CANONICAL_SIGNS = np.array([-1.0, -1.0, 1.0])
MODALITIES = ("CT", "MR", "ZSCORE")
# A grid whose far corner lies more than this many voxels off the nearest axis-aligned grid is oblique.
OBLIQUE_TOLERANCE_VOXELS = 0.5


@dataclass(frozen=True)
class Reorientation:
    """Axis permutation and flips taking a source ijk array to the canonical one.

    Canonical axis c is source axis ``perm[c]``, reversed when ``flips[c]``.
    """

    perm: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[bool, bool, bool] = (False, False, False)

    def to_canonical(self, array_kji: np.ndarray, dtype=None) -> np.ndarray:
        """Canonical copy of a source-order array, converted to `dtype` in the same single copy."""
        ijk = np.transpose(array_kji, (2, 1, 0)).transpose(self.perm)
        for axis, flip in enumerate(self.flips):
            if flip:
                ijk = np.flip(ijk, axis)
        return np.array(np.transpose(ijk, (2, 1, 0)), dtype=dtype, order="C")

    def to_source(self, array_kji: np.ndarray) -> np.ndarray:
        ijk = np.transpose(array_kji, (2, 1, 0))
        for axis, flip in enumerate(self.flips):
            if flip:
                ijk = np.flip(ijk, axis)
        ijk = ijk.transpose(np.argsort(self.perm))
        return np.ascontiguousarray(np.transpose(ijk, (2, 1, 0)))

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flips)


@dataclass(frozen=True)
class SourceGeometry:
    """The input scan's own grid, so outputs overlay it exactly in any viewer."""

    shape_kji: tuple[int, int, int]
    ijk_to_ras: np.ndarray
    reorientation: Reorientation
    # SimpleITK's exact values when read from a file (LPS, as ITK stores them); derived otherwise.
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    path: Optional[str] = None


@dataclass
class Volume:
    """A 3D scan in canonical (k, j, i) order with its voxel -> RAS mapping."""

    array: np.ndarray
    ijk_to_ras: np.ndarray
    modality: str = "CT"
    name: str = "volume"
    source: Optional[SourceGeometry] = None
    # What was changed on reading, for evidence.json (e.g. {"nonfinite_filled": {...}}); empty when nothing.
    adjustments: dict = field(default_factory=dict)
    # The DICOM series read (identity, files in slice order, what was regularised); None for other inputs.
    dicom_series: Optional["DicomSeries"] = None
    _fingerprint: Optional[str] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise VolumeError(f"{self.name}: expected a 3D array (k, j, i), got shape {self.array.shape}")
        if self.modality not in MODALITIES:
            raise VolumeError(f"{self.name}: modality must be one of {MODALITIES}, got {self.modality!r}")
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=np.float64)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(K, J, I): number of axial slices, rows, columns."""
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def num_slices(self) -> int:
        return int(self.array.shape[0])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (i, j, k)."""
        return tuple(float(v) for v in np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def fingerprint(self) -> str:
        """Content hash of voxels and geometry: caches (features, oracle curves) are keyed by it."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=16)
            digest.update(str(self.array.shape).encode())
            digest.update(str(self.array.dtype).encode())
            digest.update(np.ascontiguousarray(self.array).tobytes())
            digest.update(np.round(self.ijk_to_ras, 6).tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def ras_from_ijk(self, ijk: Sequence[float] | np.ndarray) -> np.ndarray:
        """Continuous voxel index (i, j, k), voxel centres at integers -> RAS mm. Accepts (..., 3)."""
        return _ras_from_ijk(self.ijk_to_ras, ijk)

    def ijk_from_ras(self, ras: Sequence[float] | np.ndarray) -> np.ndarray:
        return _ijk_from_ras(self.ijk_to_ras, ras)

    def to_source_array(self, canonical: np.ndarray) -> np.ndarray:
        """Map a canonical (k, j, i) array (e.g. a mask) back to the source file's voxel order."""
        if canonical.shape != self.array.shape:
            raise VolumeError(f"{self.name}: array shape {canonical.shape} does not match volume {self.array.shape}")
        if self.source is None:
            return canonical
        return self.source.reorientation.to_source(canonical)


def _ras_from_ijk(ijk_to_ras: np.ndarray, ijk) -> np.ndarray:
    points = np.asarray(ijk, dtype=np.float64)
    return points @ ijk_to_ras[:3, :3].T + ijk_to_ras[:3, 3]


def _ijk_from_ras(ijk_to_ras: np.ndarray, ras) -> np.ndarray:
    points = np.asarray(ras, dtype=np.float64) - ijk_to_ras[:3, 3]
    return points @ np.linalg.inv(ijk_to_ras[:3, :3]).T


@dataclass(frozen=True)
class CanonicalGrid:
    """A Volume's canonical shape and voxel -> RAS mapping without its voxels: enough to name slices and map
    boxes (the Slicer panel redraws these on every keystroke; copying the voxels each time made typing lag)."""

    shape: tuple[int, int, int]
    ijk_to_ras: np.ndarray

    @property
    def num_slices(self) -> int:
        return int(self.shape[0])

    def ras_from_ijk(self, ijk: Sequence[float] | np.ndarray) -> np.ndarray:
        return _ras_from_ijk(self.ijk_to_ras, ijk)

    def ijk_from_ras(self, ras: Sequence[float] | np.ndarray) -> np.ndarray:
        return _ijk_from_ras(self.ijk_to_ras, ras)


def canonical_grid(shape_kji: Sequence[int], ijk_to_ras: np.ndarray) -> CanonicalGrid:
    """The grid `volume_from_array` would give an array of `shape_kji` with this IJK->RAS, computed without it."""
    ijk_to_ras = np.asarray(ijk_to_ras, dtype=np.float64)
    reo = _choose_reorientation(ijk_to_ras)
    sizes_ijk = list(shape_kji)[::-1]
    shape = tuple(int(sizes_ijk[reo.perm[c]]) for c in (2, 1, 0))
    return CanonicalGrid(shape, _reoriented_affine(ijk_to_ras, shape_kji, reo))  # type: ignore[arg-type]


def _choose_reorientation(ijk_to_ras: np.ndarray) -> Reorientation:
    """Closest axis permutation + flips taking the source axes to (Left, Posterior, Superior)."""
    directions = ijk_to_ras[:3, :3] / np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    best: tuple[float, tuple[int, int, int]] = (-1.0, (0, 1, 2))
    for perm in itertools.permutations(range(3)):
        # canonical axis c (RAS dim c) is served by source axis perm[c]
        score = sum(abs(directions[c, perm[c]]) for c in range(3))
        if score > best[0] + 1e-9:
            best = (score, perm)  # type: ignore[assignment]
    perm = best[1]
    flips = tuple(bool(np.sign(directions[c, perm[c]]) != _CANONICAL_SIGNS[c]) for c in range(3))
    return Reorientation(perm=perm, flips=flips)  # type: ignore[arg-type]


def _reoriented_affine(ijk_to_ras: np.ndarray, shape_kji: Sequence[int], reo: Reorientation) -> np.ndarray:
    sizes_ijk = list(shape_kji)[::-1]
    out = np.eye(4)
    origin = ijk_to_ras[:3, 3].copy()
    for c in range(3):
        column = ijk_to_ras[:3, reo.perm[c]]
        if reo.flips[c]:
            origin = origin + column * (sizes_ijk[reo.perm[c]] - 1)
            column = -column
        out[:3, c] = column
    out[:3, 3] = origin
    return out


def _sitk_geometry_from_affine(ijk_to_ras: np.ndarray) -> tuple[tuple, tuple, tuple]:
    lps = LPS_TO_RAS @ ijk_to_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return tuple(map(float, spacing)), tuple(map(float, lps[:3, 3])), tuple(map(float, direction.ravel()))


def oblique_angle_deg(ijk_to_ras: np.ndarray) -> float:
    """Largest angle between a voxel axis and the patient axis nearest to it (0 for an axis-aligned grid)."""
    directions = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    directions = directions / np.linalg.norm(directions, axis=0)
    cosines = np.clip(np.abs(directions).max(axis=0), -1.0, 1.0)
    return float(np.degrees(np.arccos(cosines)).max())


def oblique_offset_voxels(ijk_to_ras: np.ndarray, shape_kji: Sequence[int]) -> float:
    """How far (in voxels) the grid's corners lie from the nearest axis-aligned grid of the same spacing."""
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    aligned = np.zeros_like(matrix)
    for axis in range(3):
        dim = int(np.argmax(np.abs(matrix[:, axis])))
        aligned[dim, axis] = np.sign(matrix[dim, axis]) * spacing[axis]
    extent = np.array([n - 1 for n in list(shape_kji)[::-1]], dtype=np.float64)  # (i, j, k) sizes
    corners = np.array(list(itertools.product(*[(0.0, e) for e in extent])))
    offset_mm = corners @ (matrix - aligned).T  # (8, 3) RAS mm
    # express the offsets in voxels of the aligned grid (RAS dim d is served by the axis with spacing there)
    dim_spacing = np.abs(aligned).sum(axis=1)
    return float(np.abs(offset_mm / dim_spacing).max())


def check_not_oblique(ijk_to_ras: np.ndarray, shape_kji: Sequence[int], label: str) -> None:
    """Refuse an oblique grid, naming the angle.

    Why refuse rather than resample: masks are written on the input's own grid (NIfTI, DICOM SEG frames that
    reference the source instances); resampling would put them on another grid, or need a second, lossy
    resampling back.  The user resamples once, knowingly, and then sees the scan the mask belongs to.
    Direction-cosine noise (grids within half a voxel of axis-aligned everywhere) is accepted.
    """
    offset = oblique_offset_voxels(ijk_to_ras, shape_kji)
    if offset > OBLIQUE_TOLERANCE_VOXELS:
        angle = oblique_angle_deg(ijk_to_ras)
        raise VolumeError(
            f"{label}: the scan is oblique (a voxel axis is {angle:.2f} degrees off the patient axes, its far corner "
            f"{offset:.1f} voxels off an axis-aligned grid); resample it to an axis-aligned grid first "
            f"(Slicer: Crop Volume with interpolation, or SimpleITK Resample) so slices are true axial planes"
        )


def fill_nonfinite(array: np.ndarray, label: str, fill: bool) -> dict:
    """Refuse NaN/Inf voxels, naming how many; with `fill`, replace them in place by the scan's minimum.

    Returns the record for `Volume.adjustments` ({} when every voxel is finite).
    """
    if not np.issubdtype(array.dtype, np.floating):
        return {}
    finite = np.isfinite(array)
    count = int(finite.size - np.count_nonzero(finite))
    if count == 0:
        return {}
    nan_count = int(np.count_nonzero(np.isnan(array)))
    if not fill:
        raise VolumeError(
            f"{label}: {count} voxels are not finite ({nan_count} NaN, {count - nan_count} infinite) of {array.size}; "
            f"fix the scan, or pass --fill-nonfinite to replace them with the scan's minimum"
        )
    if count == array.size:
        raise VolumeError(f"{label}: all {count} voxels are NaN or infinite; there is no image to fill from")
    value = float(array[finite].min())
    array[~finite] = value
    return {"nonfinite_filled": {"count": count, "nan": nan_count, "infinite": count - nan_count, "value": value}}


def check_segmentable(volume: "Volume") -> None:
    """Refuse a scan no mask can honestly come from: non-finite voxels, or one value everywhere.

    Called by the pipeline before any model runs, so a blank export never yields a silent (empty) mask.
    """
    array = volume.array
    if np.issubdtype(array.dtype, np.floating) and not all(np.isfinite(plane).all() for plane in array):  # slice by slice: no full-size mask
        fill_nonfinite(array, volume.name, fill=False)  # raises, naming the count
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise VolumeError(f"{volume.name}: every voxel has the value {low:g}; a constant image has nothing to segment (blank or failed export?)")


def guess_modality(array: np.ndarray) -> str:
    """CT when air (about -1000 HU) is present, otherwise MR; callers can override."""
    return "CT" if float(np.min(array)) < -500.0 else "MR"


def volume_from_array(
    array_kji: np.ndarray,
    ijk_to_ras: np.ndarray,
    *,
    modality: Optional[str] = None,
    name: str = "volume",
    path: Optional[str] = None,
    sitk_geometry: Optional[tuple[tuple, tuple, tuple]] = None,
    fill_nonfinite_voxels: bool = False,
) -> Volume:
    """Build a canonical Volume from an array in its own (k, j, i) order and its IJK->RAS matrix.

    This is the entry point for Slicer volume nodes (``arrayFromVolume`` + ``GetIJKToRASMatrix``).
    Oblique grids and NaN/Inf voxels are refused (VolumeError); `fill_nonfinite_voxels` replaces the
    latter by the scan's minimum instead and records it in `Volume.adjustments`.
    """
    array_kji = np.asarray(array_kji)
    if array_kji.ndim != 3:
        raise VolumeError(f"{path or name}: expected a 3D image, got {array_kji.ndim}D with shape {array_kji.shape}")
    if min(array_kji.shape) < 2:
        raise VolumeError(f"{path or name}: a 3D volume needs at least 2 voxels along every axis, got shape {array_kji.shape}")
    ijk_to_ras = np.asarray(ijk_to_ras, dtype=np.float64)
    if ijk_to_ras.shape != (4, 4) or abs(np.linalg.det(ijk_to_ras[:3, :3])) < 1e-12:
        raise VolumeError(f"{path or name}: IJK->RAS matrix is not an invertible 4x4 matrix")
    check_not_oblique(ijk_to_ras, array_kji.shape, path or name)
    reo = _choose_reorientation(ijk_to_ras)
    spacing, origin, direction = sitk_geometry or _sitk_geometry_from_affine(ijk_to_ras)
    source = SourceGeometry(
        shape_kji=tuple(int(n) for n in array_kji.shape),  # type: ignore[arg-type]
        ijk_to_ras=ijk_to_ras.copy(),
        reorientation=reo,
        spacing=spacing,
        origin=origin,
        direction=direction,
        path=path,
    )
    canonical = reo.to_canonical(array_kji, dtype=np.float32)
    adjustments = fill_nonfinite(canonical, path or name, fill_nonfinite_voxels)
    affine = _reoriented_affine(ijk_to_ras, array_kji.shape, reo)
    return Volume(
        array=canonical,
        ijk_to_ras=affine,
        modality=modality or guess_modality(canonical),
        name=name,
        source=source,
        adjustments=adjustments,
    )


def volume_from_sitk(image, *, path: Optional[str] = None, modality: Optional[str] = None, fill_nonfinite_voxels: bool = False) -> Volume:
    import SimpleITK as sitk

    label = path or "image"
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{label}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar scan")
    if image.GetDimension() != 3:
        raise VolumeError(f"{label}: is a {image.GetDimension()}D image of size {image.GetSize()}; expected 3D")
    array = sitk.GetArrayViewFromImage(image)  # no copy: the canonical float32 copy is the only one
    spacing = tuple(float(v) for v in image.GetSpacing())
    origin = tuple(float(v) for v in image.GetOrigin())
    direction = tuple(float(v) for v in image.GetDirection())
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction).reshape(3, 3) * np.asarray(spacing)
    lps[:3, 3] = origin
    name = Path(path).name.split(".")[0] if path else "image"
    return volume_from_array(
        array,
        LPS_TO_RAS @ lps,
        modality=modality,
        name=name,
        path=path,
        sitk_geometry=(spacing, origin, direction),
        fill_nonfinite_voxels=fill_nonfinite_voxels,
    )


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def mask_to_sitk(mask: np.ndarray, volume: Volume):
    """Canonical (k, j, i) mask -> SimpleITK image on the source scan's exact grid."""
    import SimpleITK as sitk

    if mask.shape != volume.shape:
        raise VolumeError(f"{volume.name}: mask shape {mask.shape} does not match volume shape {volume.shape}")
    source_order = volume.to_source_array(np.asarray(mask))
    dtype = np.uint8 if source_order.max(initial=0) < 256 else np.uint16
    image = sitk.GetImageFromArray(source_order.astype(dtype))
    if volume.source is not None:
        spacing, origin, direction = volume.source.spacing, volume.source.origin, volume.source.direction
    else:
        spacing, origin, direction = _sitk_geometry_from_affine(volume.ijk_to_ras)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def save_mask(mask: np.ndarray, volume: Volume, path: str | os.PathLike) -> Path:
    """Write a label mask aligned to the input scan (same size, spacing, origin, direction), atomically."""
    import SimpleITK as sitk

    image = mask_to_sitk(mask, volume)
    return atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, useCompression=True))
