"""Per-segment measurements a report quotes: volume, voxel count, intensity, extent and key-slice height.

Intensities are the scan's own values as read (Hounsfield units for CT; DICOM rescale already
applied by the reader), never the windowed grey levels the models see.  Extent is the size of the
segment's bounding box in RAS millimetres, voxel edges included, so a one-voxel segment is one voxel
wide rather than zero.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

from .volume import Volume

CSV_COLUMNS = (
    "segment", "voxels", "volume_ml", "intensity_mean", "intensity_std", "intensity_unit",
    "extent_x_mm", "extent_y_mm", "extent_z_mm", "key_slice_z_mm",
)


@dataclass(frozen=True)
class SegmentStatistics:
    """One segment's numbers; intensity and extent are None for an empty segment."""

    segment: str
    voxels: int
    volume_ml: float
    intensity_mean: Optional[float]
    intensity_std: Optional[float]
    intensity_unit: str
    extent_mm: Optional[tuple[float, float, float]]  # RAS x (left-right), y (ant-post), z (inf-sup)
    key_slice_z_mm: float

    def to_dict(self) -> dict:
        return asdict(self) | {"extent_mm": list(self.extent_mm) if self.extent_mm else None}

    def csv_row(self) -> dict:
        extent = self.extent_mm or (None, None, None)
        row = {k: v for k, v in self.to_dict().items() if k != "extent_mm"}
        return row | {"extent_x_mm": extent[0], "extent_y_mm": extent[1], "extent_z_mm": extent[2]}


def key_slice_z_mm(volume: Volume, slice_index: int) -> float:
    """Superior coordinate (RAS z, mm) of a canonical axial slice."""
    return float(volume.ras_from_ijk([0, 0, slice_index])[2])


def ras_extent_mm(volume: Volume, mask: np.ndarray) -> Optional[tuple[float, float, float]]:
    """Size of the RAS bounding box of the mask's voxels (edges included); None when empty."""
    where = np.nonzero(mask)
    if where[0].size == 0:
        return None
    low = np.array([where[2].min(), where[1].min(), where[0].min()], dtype=float) - 0.5  # (i, j, k) voxel edges
    high = np.array([where[2].max(), where[1].max(), where[0].max()], dtype=float) + 0.5
    corners = np.array([[a[0], b[1], c[2]] for a in (low, high) for b in (low, high) for c in (low, high)])
    ras = volume.ras_from_ijk(corners)
    return tuple(round(float(v), 3) for v in ras.max(axis=0) - ras.min(axis=0))  # type: ignore[return-value]


def segment_statistics(volume: Volume, mask: np.ndarray, name: str, slice_index: int) -> SegmentStatistics:
    """Statistics of one binary canonical (K, J, I) mask on `volume`."""
    inside = np.asarray(mask) > 0
    values = volume.array[inside].astype(np.float64)
    count = int(values.size)
    return SegmentStatistics(
        segment=name,
        voxels=count,
        volume_ml=round(count * float(np.prod(volume.spacing)) / 1000.0, 4),
        intensity_mean=round(float(values.mean()), 3) if count else None,
        intensity_std=round(float(values.std()), 3) if count else None,
        intensity_unit="HU" if volume.modality == "CT" else "scanner units",
        extent_mm=ras_extent_mm(volume, inside),
        key_slice_z_mm=round(key_slice_z_mm(volume, slice_index), 3),
    )


def statistics_csv(rows: Sequence[SegmentStatistics]) -> str:
    """statistics.csv text: one row per segment, empty cells where a value does not exist."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.csv_row().items()})
    return buffer.getvalue()
