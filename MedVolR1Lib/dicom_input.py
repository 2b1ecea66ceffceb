"""Which DICOM series in a folder becomes the volume, and whether its slices make a true 3D grid.

Why this exists: SimpleITK's series reader takes the largest series silently, averages the slice spacing
over a missing instance (2.11 mm instead of 2.0 mm, with a silent gap), and ignores a tilted gantry or a
localizer mixed into the series.  Every such volume has wrong positions, volumes in mL and extents.  So
the folder's headers are read here first (pydicom, no pixels), one series is chosen, and its slices are
checked as a clinical reader would (docs/dicom_input.md):

  refused, one line naming the problem and where: several series and no `--series`, an unknown
      `--series`, a gap (missing instances), uneven spacing, two instances at one position, a tilted
      gantry (slices shifted within their plane), a varying orientation, image size or pixel spacing,
      a multi-frame instance inside a series, an instance with no position or orientation;
  regularised, with a statement on the console and in evidence.json: localizer (scout) images mixed
      into the series are left out.

Only the chosen, checked files go to SimpleITK, in slice order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import VolumeError

# Slices must be this evenly spaced: the larger of an absolute 0.01 mm (rounding in exported positions)
# and 1% of the spacing.  Positions further off mean a gap, a tilt or a mixed acquisition.
SPACING_TOLERANCE_MM = 0.01
SPACING_TOLERANCE_FRACTION = 0.01
ORIENTATION_TOLERANCE = 1e-4  # direction cosines
LISTED_SERIES = 6  # series named in a "several series" refusal before "... and N more"


@dataclass(frozen=True)
class DicomInstance:
    """One image file's header: what is needed to group, order and check it (no pixels read)."""

    path: str
    series_instance_uid: str
    study_instance_uid: str
    series_description: str
    instance_number: Optional[int]
    position: Optional[tuple[float, float, float]]
    orientation: Optional[tuple[float, ...]]
    rows: int
    columns: int
    pixel_spacing: Optional[tuple[float, float]]
    frames: int
    image_type: tuple[str, ...]

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type

    def label(self) -> str:
        number = f"instance {self.instance_number} " if self.instance_number is not None else ""
        return f"{number}({Path(self.path).name})"


@dataclass(frozen=True)
class DicomSeries:
    """The series chosen and checked: its identity, files in slice order and what was regularised."""

    folder: str
    series_instance_uid: str
    study_instance_uid: str
    description: str
    files: tuple[str, ...]  # ascending along the slice normal
    slice_spacing_mm: float
    left_out: tuple[str, ...] = ()  # files of the series not used (localizers), named in `statements`
    statements: tuple[str, ...] = ()  # what was regularised, for the console and evidence.json
    other_series: int = 0  # series in the folder that were not chosen (only with --series)

    def to_record(self) -> dict:
        """The `scan.dicom_series` block of evidence.json."""
        return {
            "series_instance_uid": self.series_instance_uid,
            "study_instance_uid": self.study_instance_uid,
            "series_description": self.description,
            "instances_used": len(self.files),
            "slice_spacing_mm": round(self.slice_spacing_mm, 6),
            "instances_left_out": [Path(p).name for p in self.left_out],
            "regularised": list(self.statements),
            "other_series_in_folder": self.other_series,
        }


def _text(dataset, keyword: str) -> str:
    value = dataset.get(keyword, "")
    return "" if value is None else str(value).strip()


def _floats(dataset, keyword: str, count: int) -> Optional[tuple[float, ...]]:
    value = dataset.get(keyword)
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None


def _int(dataset, keyword: str, default: Optional[int] = None) -> Optional[int]:
    try:
        return int(dataset.get(keyword))
    except (TypeError, ValueError):
        return default


def read_instance(path: Path) -> Optional[DicomInstance]:
    """The header of an image instance; None for what is not a DICOM image (a README, a DICOMDIR, an SR)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:  # no preamble (older exports): accept only what reads as an image header
            dataset = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        if "SeriesInstanceUID" not in dataset or "Rows" not in dataset or "Columns" not in dataset:
            return None
        image_type = dataset.get("ImageType") or ()
        image_type = tuple(str(v).strip().upper() for v in ((image_type,) if isinstance(image_type, str) else image_type))
        return DicomInstance(
            path=str(path),
            series_instance_uid=_text(dataset, "SeriesInstanceUID"),
            study_instance_uid=_text(dataset, "StudyInstanceUID"),
            series_description=_text(dataset, "SeriesDescription"),
            instance_number=_int(dataset, "InstanceNumber"),
            position=_floats(dataset, "ImagePositionPatient", 3),  # type: ignore[arg-type]
            orientation=_floats(dataset, "ImageOrientationPatient", 6),
            rows=_int(dataset, "Rows", 0) or 0,
            columns=_int(dataset, "Columns", 0) or 0,
            pixel_spacing=_floats(dataset, "PixelSpacing", 2),  # type: ignore[arg-type]
            frames=_int(dataset, "NumberOfFrames", 1) or 1,
            image_type=image_type,
        )
    except Exception:  # noqa: BLE001 - a file pydicom cannot parse is not part of any series; GDCM would skip it too
        return None


def not_an_image(path: str | os.PathLike) -> Optional[str]:
    """Why a DICOM file is no scan ('an RT Plan Storage object without image pixels'); None if it is not DICOM
    or looks like an image.  For refusals that name the file's kind instead of an ITK exception text."""
    import pydicom

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - not DICOM (or unreadable): the caller's own message stands
        return None
    if "Rows" in dataset and "Columns" in dataset:
        return None
    sop_class = dataset.get("SOPClassUID") or getattr(getattr(dataset, "file_meta", None), "MediaStorageSOPClassUID", "")
    name = getattr(sop_class, "name", "") or str(sop_class) or "DICOM"
    return f"a {name} object without image pixels, not a scan"


def read_folder(folder: str | os.PathLike) -> dict[str, list[DicomInstance]]:
    """The image instances of a folder (not its subfolders), grouped by Series Instance UID."""
    folder = Path(folder)
    groups: dict[str, list[DicomInstance]] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        instance = read_instance(path)
        if instance is not None:
            groups.setdefault(instance.series_instance_uid, []).append(instance)
    return groups


def describe_series(groups: dict[str, list[DicomInstance]]) -> str:
    """'UID "description" (N instances); ...' for a refusal that lists the series of a folder."""
    ordered = sorted(groups.items(), key=lambda item: -len(item[1]))
    parts = [f'{uid} "{items[0].series_description}" ({len(items)} instance{"s" * (len(items) != 1)})' for uid, items in ordered[:LISTED_SERIES]]
    if len(ordered) > LISTED_SERIES:
        parts.append(f"... and {len(ordered) - LISTED_SERIES} more")
    return "; ".join(parts)


def choose_series(folder: str | os.PathLike, series_uid: Optional[str] = None) -> DicomSeries:
    """The one series to read from `folder`, checked; VolumeError (one line) for what cannot be a volume."""
    folder = Path(folder)
    groups = read_folder(folder)
    if not groups:
        raise VolumeError(f"{folder}: folder holds no DICOM image series")
    if series_uid:
        if series_uid not in groups:
            raise VolumeError(f"{folder}: no series with UID {series_uid}; the folder holds {describe_series(groups)}")
        chosen = series_uid
    elif len(groups) > 1:
        raise VolumeError(
            f"{folder}: the folder holds {len(groups)} series; choose one with --series UID "
            f"(batch: a `series` column): {describe_series(groups)}"
        )
    else:
        chosen = next(iter(groups))
    return check_series(folder, groups[chosen], other_series=len(groups) - 1)


def _fmt_mm(value: float) -> str:
    return f"{value:.2f} mm"


def check_series(folder: Path, instances: Sequence[DicomInstance], other_series: int = 0) -> DicomSeries:
    """Order the instances along the slice normal and check they form an evenly spaced, untilted grid."""
    where = f"{folder}: series {instances[0].series_instance_uid}"
    localizers = [i for i in instances if i.is_localizer]
    slices = [i for i in instances if not i.is_localizer]
    statements = []
    if localizers and slices:
        statements.append(f"left out {len(localizers)} localizer image(s) mixed into the series: "
                          + ", ".join(i.label() for i in localizers))
    elif localizers:
        raise VolumeError(f"{where} holds only localizer (scout) images; choose the axial series")
    if len(slices) > 1 and any(i.frames > 1 for i in slices):
        multi = next(i for i in slices if i.frames > 1)
        raise VolumeError(f"{where}: {multi.label()} is a multi-frame instance inside a {len(slices)}-instance series; "
                          f"export the series as one file per slice")
    for instance in slices:
        if instance.position is None or instance.orientation is None:
            raise VolumeError(f"{where}: {instance.label()} has no Image Position/Orientation (Patient); cannot place it in 3D")
    _check_same(where, slices, lambda i: (i.rows, i.columns), "image size", lambda v: f"{v[1]}x{v[0]}")
    _check_same(where, slices, lambda i: i.pixel_spacing, "pixel spacing",
                lambda v: "none" if v is None else f"{v[0]:g}x{v[1]:g} mm", close=True)
    reference = np.asarray(slices[0].orientation)
    for instance in slices:
        if np.abs(np.asarray(instance.orientation) - reference).max() > ORIENTATION_TOLERANCE:
            raise VolumeError(f"{where}: the orientation varies: {slices[0].label()} has {_cosines(reference)}, "
                              f"{instance.label()} has {_cosines(instance.orientation)}")
    normal = np.cross(reference[:3], reference[3:])
    if np.linalg.norm(normal) < 0.5:
        raise VolumeError(f"{where}: Image Orientation (Patient) {_cosines(reference)} is not two perpendicular directions")
    normal /= np.linalg.norm(normal)
    distance = {id(i): float(np.dot(i.position, normal)) for i in slices}
    ordered = sorted(slices, key=lambda i: distance[id(i)])
    spacing = _check_spacing(where, ordered, distance, normal)
    return DicomSeries(
        folder=str(folder),
        series_instance_uid=instances[0].series_instance_uid,
        study_instance_uid=instances[0].study_instance_uid,
        description=instances[0].series_description,
        files=tuple(i.path for i in ordered),
        slice_spacing_mm=spacing,
        left_out=tuple(i.path for i in localizers) if slices else (),
        statements=tuple(statements),
        other_series=other_series,
    )


def _cosines(values) -> str:
    return "[" + ",".join(f"{float(v):.4g}" for v in values) + "]"


def _check_same(where: str, slices, key, what: str, show, close: bool = False) -> None:
    first = key(slices[0])
    for instance in slices[1:]:
        value = key(instance)
        same = (value == first) if not close or value is None or first is None else np.allclose(value, first, atol=1e-4)
        if not same:
            raise VolumeError(f"{where}: the {what} varies: {slices[0].label()} has {show(first)}, {instance.label()} has {show(value)}")


def _check_spacing(where: str, ordered: Sequence[DicomInstance], distance: dict, normal: np.ndarray) -> float:
    """The slice spacing; VolumeError naming the two instances around a duplicate, a gap, an uneven step or a tilt."""
    if len(ordered) < 2:
        return 0.0
    positions = np.asarray([i.position for i in ordered], dtype=float)
    steps = np.diff([distance[id(i)] for i in ordered])
    spacing = float(np.median(steps))
    tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_FRACTION * abs(spacing))
    for n, step in enumerate(steps):
        a, b = ordered[n], ordered[n + 1]
        between = f"between {a.label()} at {_fmt_mm(distance[id(a)])} and {b.label()} at {_fmt_mm(distance[id(b)])} along the slice normal"
        if step <= tolerance:
            raise VolumeError(f"{where}: two instances at the same position, {between}: several acquisitions or echoes in one series; "
                              f"split them and choose one")
        if abs(step - spacing) > tolerance:
            missing = round(step / spacing) - 1
            if missing >= 1 and abs(step - (missing + 1) * spacing) <= tolerance:
                raise VolumeError(f"{where}: {missing} instance(s) missing, a gap of {_fmt_mm(step)} {between} "
                                  f"(the series' spacing is {_fmt_mm(spacing)}); the volume would be wrong in position and size")
            raise VolumeError(f"{where}: uneven slice spacing, {_fmt_mm(step)} {between} (elsewhere {_fmt_mm(spacing)}); "
                              f"resample the series to even spacing first")
    shift = np.diff(positions, axis=0) - np.outer(steps, normal)  # movement within the image plane, per slice
    worst = int(np.argmax(np.linalg.norm(shift, axis=1)))
    if np.linalg.norm(shift[worst]) > tolerance:
        tilt = float(np.degrees(np.arctan2(np.linalg.norm(shift[worst]), steps[worst])))
        raise VolumeError(
            f"{where}: tilted gantry (or sheared stack): each slice shifts {_fmt_mm(float(np.linalg.norm(shift[worst])))} within its "
            f"plane ({tilt:.1f} degrees), first {ordered[worst].label()} to {ordered[worst + 1].label()}; resample it to a "
            f"rectilinear grid first (e.g. Slicer's DICOM import with gantry-tilt correction)"
        )
    return spacing
