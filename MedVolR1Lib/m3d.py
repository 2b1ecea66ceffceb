"""M3D-Seg reader: one case folder -> canonical `Volume` + per-channel boolean masks, and the split lists.

Published layout (BAAI-DCAI/M3D, ``Data/process/m3d_seg_data_prepare.py``; SegVol's format)::

    M3D_Seg/                       <- root
      0003/                        <- dataset code (AbdomenCT-1K)
        0003.json                  <- {"labels": {"0": "background", "1": "liver", ...}?, "train": [...], "test": [...]}
        <case>/image.npy           <- float (1, a, b, c) in the source NIfTI's storage order, foreground z-scored (not HU)
        <case>/mask_(C, X, Y, Z).npz   <- scipy.sparse matrix (C, X*Y*Z) of the one-hot labels; channel c = label c+1

Split entries are ``{"image": "0003/<case>/image.npy", "label": "0003/<case>/mask_(...).npz"}`` relative to the
root (we also accept paths relative to the dataset folder).  The json's ``labels`` field is optional here: when
absent we use the label table below (from the source datasets' documentation).

What the files do NOT store, and what we assume (all overridable):
- No affine: voxel spacing is unknown, so we use 1 mm (NSD/HD95 on M3D-Seg are then in voxels, not mm).
- Axis order: SegVol's script loaded each NIfTI without reorienting it, so the arrays keep their source file's
  storage order: (X, Y, Z) for most datasets, but KiTS19 (and probably KiTS23) stores (slices, height, width).
  The axial axis is detected per case (`detect_axial_axis`: the axis outside the square in-plane matrix, else the
  axis whose end faces the body fills) and recorded; a case where neither tells is refused, never assumed.
- Orientation: the array axes, reordered to (X, Y, Z), are taken to point toward the axis codes of `M3DDatasetInfo.orientation`
  ("RAS": X -> Right, Y -> Anterior, Z -> Superior, nibabel convention).  This is an assumption, not a verified
  fact, so every dataset ships with ``orientation_verified=False`` and the VRS sample builder must not generate
  laterality queries ("left kidney") for it until someone checks a case visually and flips the flag.
- Modality "ZSCORE": never HU presets; the default window is the fixed z window `m3d_abdomen` (docs/m3d_windows.md).
"""

from __future__ import annotations

import ast
import json
import os
import re
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

from .errors import DataError
from .volume import Volume, volume_from_array

_MASK_RE = re.compile(r"^mask_\((?P<shape>[0-9,\s]+)\)\.npz$")
_AXIS_CODES = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


@dataclass(frozen=True)
class M3DDatasetInfo:
    """What we know (and assume) about one M3D-Seg dataset code."""

    code: str
    name: str
    labels: tuple[str, ...]  # channel c -> label c+1
    orientation: str = "RAS"
    orientation_verified: bool = False
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # unknown in M3D-Seg; used for NSD tolerance only
    # a dataset json's short names -> the names the query table knows ("tumor" in KiTS23 is the kidney tumour,
    # not the generic "lesion" target; "cyst" would otherwise match no target at all)
    aliases: tuple[tuple[str, str], ...] = ()

    def canonical_name(self, name: str) -> str:
        from .queries import normalise_name

        key = normalise_name(name)
        return dict(self.aliases).get(key, key)


_KITS_ALIASES = (
    ("tumor", "kidney_tumor"), ("renal_tumor", "kidney_tumor"), ("kidney_tumour", "kidney_tumor"), ("mass", "kidney_tumor"),
    ("cyst", "kidney_cyst"), ("renal_cyst", "kidney_cyst"), ("kidneys", "kidney"),
)

DATASETS: dict[str, M3DDatasetInfo] = {
    "0003": M3DDatasetInfo("0003", "AbdomenCT-1K", ("liver", "kidney", "spleen", "pancreas")),
    "0004": M3DDatasetInfo("0004", "KiTS23", ("kidney", "kidney_tumor", "kidney_cyst"), aliases=_KITS_ALIASES),
    "0012": M3DDatasetInfo("0012", "CT-ORG", ("liver", "bladder", "lungs", "kidneys", "bone", "brain")),
}


class AxialAxis(NamedTuple):
    """Which stored array axis is axial, how that was decided and why (recorded per case)."""

    axis: int  # index into the stored (a, b, c) array
    storage_shape: tuple[int, int, int]
    method: str  # "square in-plane matrix" | "body cut by the end faces" | "given"
    reason: str

    def to_xyz(self) -> tuple[int, int, int]:
        """Transpose of the stored array to (X, Y, Z) = (columns, rows, slices).

        Axial last: stored (X, Y, Z) as NIfTI writes it.  Axial first: KiTS's (slices, height, width), so
        width -> X and height -> Y.  Axial in the middle has no known source: (a, c) -> (X, Y) by convention.
        """
        return {2: (0, 1, 2), 0: (2, 1, 0), 1: (0, 2, 1)}[self.axis]

    def as_dict(self) -> dict:
        return {"axial_axis": self.axis, "storage_shape": list(self.storage_shape), "method": self.method, "reason": self.reason}


class M3DCase(NamedTuple):
    """One loaded case; unpacks as ``volume, masks, label_names, axes``."""

    volume: Volume
    masks: np.ndarray  # bool (C, K, J, I), canonical order like volume.array
    label_names: tuple[str, ...]
    axes: AxialAxis


@dataclass(frozen=True)
class M3DCaseRef:
    """One entry of a split list, resolved to files on disk."""

    dataset: str
    case_id: str  # "<code>/<case folder>", unique across datasets
    folder: Path
    image_path: Path
    label_path: Path


def orientation_affine(orientation: str, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """IJK->RAS for array axes (X, Y, Z) pointing toward the three axis codes (e.g. "RAS", "LPS")."""
    codes = orientation.upper()
    if len(codes) != 3 or any(c not in _AXIS_CODES for c in codes) or len({_AXIS_CODES[c][0] for c in codes}) != 3:
        raise DataError(f"orientation {orientation!r} is not three distinct axis codes from R/L, A/P, S/I (e.g. 'RAS')")
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for axis, code in enumerate(codes):
        ras_dim, sign = _AXIS_CODES[code]
        affine[ras_dim, axis] = sign * float(spacing[axis])
    return affine


def dataset_info_for(folder: Path) -> Optional[M3DDatasetInfo]:
    """Known dataset of a case folder (its parent is named by the dataset code), else None."""
    return DATASETS.get(Path(folder).resolve().parent.name)


def mask_shape_from_name(path: Path) -> tuple[int, ...]:
    match = _MASK_RE.match(Path(path).name)
    if match is None:
        raise DataError(f"{path}: mask file name must look like 'mask_(C, X, Y, Z).npz'")
    shape = tuple(int(v) for v in ast.literal_eval("(" + match.group("shape") + ")"))
    if len(shape) != 4 or min(shape) < 1:
        raise DataError(f"{path}: mask shape {shape} in the file name is not (C, X, Y, Z)")
    return shape


def find_mask_file(folder: Path) -> Path:
    folder = Path(folder)
    candidates = sorted(p for p in folder.glob("mask_*.npz") if _MASK_RE.match(p.name))
    if not candidates:
        raise DataError(f"case {folder}: no 'mask_(C, X, Y, Z).npz' file in the folder")
    if len(candidates) > 1:
        raise DataError(f"case {folder}: several mask files ({[p.name for p in candidates]}); expected one")
    return candidates[0]


def _case_name(folder: Path) -> str:
    folder = Path(folder).resolve()
    return f"{folder.parent.name}/{folder.name}"


def _read_image(folder: Path) -> np.ndarray:
    path = Path(folder) / "image.npy"
    if not path.exists():
        raise DataError(f"case {_case_name(folder)}: {path} not found")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # truncated or not an .npy file
        raise DataError(f"case {_case_name(folder)}: cannot read {path.name} ({type(exc).__name__}: {exc})") from exc
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or min(array.shape) < 2:
        raise DataError(f"case {_case_name(folder)}: {path.name} has shape {array.shape}; expected (1, X, Y, Z)")
    if not np.issubdtype(array.dtype, np.number):
        raise DataError(f"case {_case_name(folder)}: {path.name} has dtype {array.dtype}; expected numbers")
    if not np.isfinite(array).all():
        raise DataError(f"case {_case_name(folder)}: {path.name} contains NaN or infinite values")
    return array


def _end_face_body_fraction(array: np.ndarray) -> list[float]:
    """Per axis, the mean fraction of body voxels on its first and last slab (SegVol's foreground: above the mean).

    The scan cuts the body along the axial axis, so its end faces are full of body; the in-plane borders
    are mostly air around the body's outline.
    """
    body = array > float(array.mean())
    fractions = []
    for axis in range(3):
        faces = np.take(body, [0, body.shape[axis] - 1], axis=axis)
        fractions.append(float(faces.mean()))
    return fractions


def segvol_normalise(array: np.ndarray) -> np.ndarray:
    """M3D-Seg's intensities from HU (SegVol's data_process/train_data_process.py, which M3D-Seg used).

    Foreground = voxels above the volume's mean; clip to its 0.05 / 99.95 percentiles; z-score with its
    mean and std.  Used to measure what M3D-Seg's normalisation costs the propagators (docs/m3d_windows.md).
    """
    a = np.asarray(array, dtype=np.float32)
    foreground = a[a > a.mean()]
    low, high = np.percentile(foreground, [0.05, 99.95])
    mean, std = float(foreground.mean()), float(foreground.std())
    return ((np.clip(a, low, high) - mean) / max(std, 1e-8)).astype(np.float32)


def detect_axial_axis(array: np.ndarray, *, margin: float = 0.2) -> AxialAxis:
    """The axial axis of a stored (a, b, c) array, never assumed: DataError when the data cannot tell.

    1. Shape: CT in-plane matrices are square (512 x 512): when exactly two sizes are equal, the third axis
       is axial.  A cube (all equal) or three different sizes (cropped, resampled) says nothing.
    2. Otherwise content: the axis whose end faces the body fills (fraction higher than the runner-up by
       `margin`).  When the two disagree, the shape wins and the reason says so.
    """
    shape = tuple(int(n) for n in array.shape)
    faces = _end_face_body_fraction(array)
    order = sorted(range(3), key=lambda a: -faces[a])
    by_faces = order[0] if faces[order[0]] - faces[order[1]] >= margin else None
    face_text = "body fraction on the end faces " + ", ".join(f"axis {a}: {f:.2f}" for a, f in enumerate(faces))
    pairs = [(a, b) for a in range(3) for b in range(a + 1, 3) if shape[a] == shape[b]]
    if len(pairs) == 1:
        axis = ({0, 1, 2} - set(pairs[0])).pop()
        reason = f"axes {pairs[0][0]} and {pairs[0][1]} form the square {shape[pairs[0][0]]}x{shape[pairs[0][0]]} in-plane matrix; {face_text}"
        if by_faces is not None and by_faces != axis:
            reason += f" (content points to axis {by_faces}; the shape wins)"
        return AxialAxis(axis, shape, "square in-plane matrix", reason)
    if by_faces is not None:
        why = "a cube" if len(set(shape)) == 1 else "no square in-plane pair"
        return AxialAxis(by_faces, shape, "body cut by the end faces", f"shape {shape} is {why}; {face_text}")
    raise DataError(f"cannot tell the axial axis of an array of shape {shape}: no square in-plane pair and {face_text} "
                    f"(no axis leads by {margin}); pass axial_axis explicitly after looking at the case")


def _given_axis(axial_axis: int, shape: tuple[int, int, int]) -> AxialAxis:
    if axial_axis not in (0, 1, 2):
        raise DataError(f"axial_axis must be 0, 1 or 2, got {axial_axis!r}")
    return AxialAxis(int(axial_axis), shape, "given", "set by the caller")


def load_m3d_image(
    folder: str | os.PathLike,
    *,
    orientation: Optional[str] = None,
    spacing: Optional[Sequence[float]] = None,
    axial_axis: Optional[int] = None,
) -> Volume:
    """Read ``image.npy`` of a case folder as a canonical Volume (modality ZSCORE, assumed geometry)."""
    return _load_image(Path(folder), orientation, spacing, axial_axis)[0]


def _load_image(folder: Path, orientation, spacing, axial_axis) -> tuple[Volume, AxialAxis]:
    info = dataset_info_for(folder)
    orientation = orientation or (info.orientation if info else "RAS")
    spacing = tuple(spacing) if spacing is not None else (info.spacing if info else (1.0, 1.0, 1.0))
    stored = _read_image(folder)
    try:
        axes = detect_axial_axis(stored) if axial_axis is None else _given_axis(axial_axis, stored.shape)
    except DataError as exc:
        raise DataError(f"case {_case_name(folder)}: {exc}") from exc
    xyz = np.transpose(stored, axes.to_xyz())
    # (X, Y, Z) is (i, j, k) of the source grid; volume_from_array wants (k, j, i).
    array_kji = np.transpose(xyz, (2, 1, 0)).astype(np.float32, copy=False)
    volume = volume_from_array(
        array_kji,
        orientation_affine(orientation, spacing),
        modality="ZSCORE",
        name=_case_name(folder).replace("/", "_"),
        path=str(folder / "image.npy"),
    )
    return volume, axes


def _read_masks(label_path: Path, case: str, storage_shape: tuple[int, int, int]) -> np.ndarray:
    """Sparse (C, a*b*c) one-hot -> dense bool (C, a, b, c) in the image's storage order, one channel at a time."""
    from scipy import sparse

    shape = mask_shape_from_name(label_path)
    if tuple(shape[1:]) != tuple(storage_shape):
        raise DataError(f"case {case}: mask grid {shape[1:]} (from {label_path.name}) differs from image grid {storage_shape}")
    try:
        matrix = sparse.load_npz(label_path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"case {case}: cannot read {label_path.name} ({type(exc).__name__}: {exc})") from exc
    channels, voxels = shape[0], int(np.prod(shape[1:]))
    if matrix.shape != (channels, voxels):
        raise DataError(f"case {case}: sparse mask has shape {matrix.shape}; its name promises {(channels, voxels)}")
    matrix = matrix.tocsr()
    masks = np.zeros((channels, voxels), dtype=bool)
    for c in range(channels):
        start, end = matrix.indptr[c], matrix.indptr[c + 1]
        columns = matrix.indices[start:end][matrix.data[start:end] != 0]
        masks[c, columns] = True
    return masks.reshape(shape)


def _json_labels(dataset_folder: Path) -> Optional[tuple[str, ...]]:
    json_path = dataset_folder / f"{dataset_folder.name}.json"
    if not json_path.exists():
        return None
    try:
        labels = json.loads(json_path.read_text()).get("labels")
    except (ValueError, OSError, AttributeError):
        return None
    if not isinstance(labels, dict):
        return None
    named = {int(k): str(v) for k, v in labels.items() if str(k).isdigit() and int(k) > 0}
    if not named:
        return None
    return tuple(named.get(c, f"label_{c}").strip().lower().replace(" ", "_") for c in range(1, max(named) + 1))


def channel_label_names(folder: Path, channels: int) -> tuple[str, ...]:
    """Names for channels 0..C-1: the dataset json's ``labels``, else the built-in table, else label_{c+1}.

    A known dataset's short json names are mapped to the names its targets use (KiTS23's "tumor" and "cyst"
    -> kidney_tumor, kidney_cyst), so those channels become their targets instead of a generic one or none.
    """
    folder = Path(folder).resolve()
    info = DATASETS.get(folder.parent.name)
    names = _json_labels(folder.parent)
    if names is None:
        names = info.labels if info else ()
    elif info is not None:
        names = tuple(info.canonical_name(n) for n in names)
    return tuple(names[c] if c < len(names) else f"label_{c + 1}" for c in range(channels))


def load_m3d_case(
    folder: str | os.PathLike,
    *,
    orientation: Optional[str] = None,
    spacing: Optional[Sequence[float]] = None,
    label_path: Optional[str | os.PathLike] = None,
    axial_axis: Optional[int] = None,
) -> M3DCase:
    """Read a case folder: canonical Volume, bool masks (C, K, J, I) on the same grid, channel names, axis decision."""
    folder = Path(folder)
    case = _case_name(folder)
    volume, axes = _load_image(folder, orientation, spacing, axial_axis)
    label_path = Path(label_path) if label_path is not None else find_mask_file(folder)
    assert volume.source is not None
    masks_stored = _read_masks(label_path, case, axes.storage_shape)
    reo = volume.source.reorientation
    masks = np.stack([reo.to_canonical(np.transpose(np.transpose(m, axes.to_xyz()), (2, 1, 0))) for m in masks_stored]).astype(bool)
    return M3DCase(volume, masks, channel_label_names(folder, masks.shape[0]), axes)


def read_split(root: str | os.PathLike, code: str, split: str = "train") -> list[M3DCaseRef]:
    """Cases of one released split (`train` or `test`) of dataset `code`, paths resolved and checked."""
    root = Path(root)
    json_path = root / code / f"{code}.json"
    if not json_path.exists():
        raise DataError(f"dataset {code}: split file {json_path} not found")
    try:
        meta = json.loads(json_path.read_text())
    except (ValueError, OSError) as exc:
        raise DataError(f"dataset {code}: cannot parse {json_path} ({exc})") from exc
    if not isinstance(meta, dict) or split not in meta:
        keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"dataset {code}: {json_path.name} has no {split!r} list (keys: {keys})")
    refs: list[M3DCaseRef] = []
    for n, entry in enumerate(meta[split]):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(f"dataset {code}: {split} entry {n} lacks 'image'/'label': {entry!r}")
        image = _resolve(root, code, entry["image"])
        label = _resolve(root, code, entry["label"])
        folder = image.parent
        refs.append(M3DCaseRef(code, _case_name(folder), folder, image, label))
    return refs


def _resolve(root: Path, code: str, relative: str) -> Path:
    for base in (root, root / code):
        candidate = base / relative
        if candidate.exists():
            return candidate
    return root / relative  # missing: the loader raises DataError naming the case


def laterality_allowed(case_folder: str | os.PathLike) -> bool:
    """Only datasets whose orientation someone verified may get left/right queries."""
    info = dataset_info_for(Path(case_folder))
    return bool(info and info.orientation_verified)


def with_orientation(code: str, orientation: str, verified: bool) -> M3DDatasetInfo:
    """Register a checked orientation for a dataset code (e.g. from a config) and return the new info."""
    orientation_affine(orientation)  # validates
    info = replace(DATASETS[code], orientation=orientation, orientation_verified=verified)
    DATASETS[code] = info
    return info
