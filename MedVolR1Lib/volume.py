"""One in-memory scan type for every source (NIfTI, NRRD, MHA, DICOM, M3D-Seg, Slicer node).

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
from typing import Optional, Sequence

import numpy as np

from .errors import VolumeError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Canonical axis c points toward these RAS directions: i -> Left (-x), j -> Posterior (-y), k -> Superior (+z).
_CANONICAL_SIGNS = np.array([-1.0, -1.0, 1.0])
MODALITIES = ("CT", "MR", "ZSCORE")
READABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


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
        points = np.asarray(ijk, dtype=np.float64)
        return points @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]

    def ijk_from_ras(self, ras: Sequence[float] | np.ndarray) -> np.ndarray:
        points = np.asarray(ras, dtype=np.float64) - self.ijk_to_ras[:3, 3]
        return points @ np.linalg.inv(self.ijk_to_ras[:3, :3]).T

    def to_source_array(self, canonical: np.ndarray) -> np.ndarray:
        """Map a canonical (k, j, i) array (e.g. a mask) back to the source file's voxel order."""
        if canonical.shape != self.array.shape:
            raise VolumeError(f"{self.name}: array shape {canonical.shape} does not match volume {self.array.shape}")
        if self.source is None:
            return canonical
        return self.source.reorientation.to_source(canonical)


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
) -> Volume:
    """Build a canonical Volume from an array in its own (k, j, i) order and its IJK->RAS matrix.

    This is the entry point for Slicer volume nodes (``arrayFromVolume`` + ``GetIJKToRASMatrix``).
    """
    array_kji = np.asarray(array_kji)
    if array_kji.ndim != 3:
        raise VolumeError(f"{path or name}: expected a 3D image, got {array_kji.ndim}D with shape {array_kji.shape}")
    if min(array_kji.shape) < 2:
        raise VolumeError(f"{path or name}: a 3D volume needs at least 2 voxels along every axis, got shape {array_kji.shape}")
    ijk_to_ras = np.asarray(ijk_to_ras, dtype=np.float64)
    if ijk_to_ras.shape != (4, 4) or abs(np.linalg.det(ijk_to_ras[:3, :3])) < 1e-12:
        raise VolumeError(f"{path or name}: IJK->RAS matrix is not an invertible 4x4 matrix")
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
    affine = _reoriented_affine(ijk_to_ras, array_kji.shape, reo)
    return Volume(
        array=canonical,
        ijk_to_ras=affine,
        modality=modality or guess_modality(canonical),
        name=name,
        source=source,
    )


def _check_path(path: Path) -> None:
    if not path.exists():
        raise VolumeError(f"{path}: file or folder not found")
    name = path.name
    if name.endswith(".nii.gz"):
        sibling = path.with_name(name[: -len(".gz")])
        if sibling.exists():
            raise VolumeError(
                f"{path}: a file {sibling.name} sits beside it; SimpleITK would silently read {sibling.name} "
                f"instead. Move or rename one of the two."
            )


def _read_dicom_series(folder: Path):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder)) or ()
    if not series:
        raise VolumeError(f"{folder}: folder holds no DICOM series")
    files_per_series = {sid: reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series}
    chosen = max(files_per_series, key=lambda sid: len(files_per_series[sid]))
    reader.SetFileNames(files_per_series[chosen])
    return reader.Execute()


def load_volume(path: str | os.PathLike, *, modality: Optional[str] = None) -> Volume:
    """Read a NIfTI / NRRD / MHA file, a DICOM series folder or an M3D-Seg case folder."""
    import SimpleITK as sitk

    path = Path(path)
    _check_path(path)
    if path.is_dir() and (path / "image.npy").exists() or path.name == "image.npy":
        from .m3d import load_m3d_image

        return load_m3d_image(path if path.is_dir() else path.parent)
    try:
        image = _read_dicom_series(path) if path.is_dir() else sitk.ReadImage(str(path))
    except VolumeError:
        raise
    except Exception as exc:  # SimpleITK raises RuntimeError with a long ITK trace
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VolumeError(f"{path}: cannot read as a medical image ({first_line})") from exc
    return volume_from_sitk(image, path=str(path), modality=modality)


def volume_from_sitk(image, *, path: Optional[str] = None, modality: Optional[str] = None) -> Volume:
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


def load_label_map(path: str | os.PathLike, volume: Volume) -> np.ndarray:
    """Read a label image on the same grid as `volume` and return it in canonical (k, j, i) order."""
    labels = load_volume(path, modality="MR")
    if labels.source is None or volume.source is None or labels.source.shape_kji != volume.source.shape_kji:
        raise VolumeError(f"{path}: label map grid {labels.shape} does not match scan {volume.shape}")
    if not np.allclose(labels.ijk_to_ras, volume.ijk_to_ras, atol=1e-3):
        raise VolumeError(f"{path}: label map geometry (origin/spacing/direction) differs from the scan's")
    return np.rint(labels.array).astype(np.int32)
