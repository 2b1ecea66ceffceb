"""CT-ORG as the MedVol-R1 release prepares it: raw NIfTI in HU, the WC40/WW400 window, 512 x 512 slices.

M3D-Seg's CT-ORG arrays are z-scored and carry no voxel size.  The release instead converts the raw
CT-ORG download itself (its ``data_preparation/ctorg/convert_volumes.py``): every ``volume-N.nii(.gz)``
with its ``labels-N.nii(.gz)``, slices resized to 512 x 512 (linear for the CT, nearest for the labels,
the slice count unchanged), intensities windowed at level 40 / width 400 HU into [0, 1], six channels
for the label values 1..6 (liver, bladder, lungs, kidneys, bone, brain).

Here the scan stays in HU with its real geometry (so NSD is in mm) and the release's window is the
record's view window ("abdomen" = W400/L40): the rendered slice is the release's [0, 1] image.  The
resize keeps the first and last voxel centres where they were (scipy's zoom does the same), so the new
in-plane spacing is old spacing x (n - 1) / (size - 1).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import DataError
from .volume import Volume

RELEASE_WINDOW = "abdomen"  # windowing.CT_PRESETS: level 40, width 400 HU, the release's WC40/WW400
RELEASE_SIZE = 512
CTORG_LABELS = ("liver", "bladder", "lungs", "kidneys", "bone", "brain")  # label value c + 1
CTORG_DATASET = "ctorg_hu"  # the dataset code of these records (evaluation groups and titles by it)
CTORG_TITLE = "CT-ORG (raw HU, WC40/WW400, 512 px)"
_NUMBER = re.compile(r"(\d+)$")


@dataclass(frozen=True)
class CTORGPair:
    """One raw CT-ORG case: its number and the scan and label files."""

    number: str
    volume: Path
    labels: Path

    @property
    def case_id(self) -> str:
        return f"{CTORG_DATASET}/volume-{self.number}"


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _by_number(folder: Path, prefix: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.glob(f"{prefix}*.nii*")):
        match = _NUMBER.search(_stem(path))
        if match is None:
            continue
        number = str(int(match.group(1)))
        if number not in found or path.name.endswith(".nii.gz"):  # both .nii and .nii.gz: the compressed one
            found[number] = path
    return found


def find_ctorg_pairs(root: str | os.PathLike) -> tuple[list[CTORGPair], list[dict]]:
    """Pairs volume-N with labels-N under ``root`` (or its volumes/ and labels/ folders), sorted by N.

    Returns (pairs, problems): a scan without labels or labels without a scan is a reported problem.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"CT-ORG folder {root} not found")
    volume_dir = root / "volumes" if (root / "volumes").is_dir() else root
    label_dir = root / "labels" if (root / "labels").is_dir() else root
    volumes, labels = _by_number(volume_dir, "volume"), _by_number(label_dir, "labels")
    numbers = sorted(set(volumes) & set(labels), key=int)
    problems = [{"case": f"{CTORG_DATASET}/volume-{n}", "target": "*", "reason": f"scan {volumes[n].name} has no labels-{n} file"}
                for n in sorted(set(volumes) - set(labels), key=int)]
    problems += [{"case": f"{CTORG_DATASET}/volume-{n}", "target": "*", "reason": f"labels {labels[n].name} have no volume-{n} scan"}
                 for n in sorted(set(labels) - set(volumes), key=int)]
    return [CTORGPair(n, volumes[n], labels[n]) for n in numbers], problems


def read_ctorg_split(path: str | os.PathLike) -> dict[str, list[str]]:
    """A split file ``{"train": [...], "test": [...]}`` of case numbers (136, "136" or "volume-136").

    The release's own split files are not public, so the split is the user's to give.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"CT-ORG split file {path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(raw, dict) or not all(isinstance(raw.get(s, []), list) for s in ("train", "test")):
        raise DataError(f"CT-ORG split file {path}: expected {{\"train\": [case numbers], \"test\": [case numbers]}}")
    out: dict[str, list[str]] = {}
    for split in ("train", "test"):
        numbers = []
        for entry in raw.get(split, []):
            match = _NUMBER.search(_stem(Path(str(entry))))
            if match is None:
                raise DataError(f"CT-ORG split file {path}: {split} entry {entry!r} names no case number")
            numbers.append(str(int(match.group(1))))
        out[split] = numbers
    both = set(out["train"]) & set(out["test"])
    if both:
        raise DataError(f"CT-ORG split file {path}: cases {sorted(both, key=int)} are in both train and test")
    return out


def resize_in_plane(volume: Volume, labels: np.ndarray, size: int = RELEASE_SIZE) -> tuple[Volume, np.ndarray]:
    """Slices to size x size (linear for the scan, nearest for the labels); slice count and corners kept."""
    from scipy import ndimage

    k, j, i = volume.shape
    if size == 0 or (j, i) == (size, size):  # 0: keep the scan's own matrix
        return volume, labels
    if size < 2:
        raise DataError(f"resize target {size} must be at least 2 pixels")
    factors = (1.0, size / j, size / i)
    array = ndimage.zoom(volume.array.astype(np.float32), factors, order=1).astype(np.float32)
    label_map = ndimage.zoom(np.asarray(labels, dtype=np.int32), factors, order=0).astype(np.int32)
    affine = volume.ijk_to_ras.copy()
    affine[:3, 0] *= (i - 1) / (size - 1)
    affine[:3, 1] *= (j - 1) / (size - 1)
    return Volume(array, affine, modality=volume.modality, name=volume.name), label_map


def load_ctorg_case(volume_path: str | os.PathLike, label_path: str | os.PathLike, *, size: int = RELEASE_SIZE,
                    name: Optional[str] = None) -> tuple[Volume, np.ndarray]:
    """A raw CT-ORG case in HU on the release's 512 x 512 grid: (Volume, int32 label map (K, J, I))."""
    from .readers import load_label_map, load_volume

    volume = load_volume(volume_path, modality="CT")
    labels = load_label_map(label_path, volume)
    unknown = sorted(set(np.unique(labels).tolist()) - set(range(len(CTORG_LABELS) + 1)))
    if unknown:
        raise DataError(f"{label_path}: label values {unknown} are not CT-ORG's 1..{len(CTORG_LABELS)}")
    volume, labels = resize_in_plane(volume, labels, size)
    if name:
        volume.name = name
    return volume, labels
