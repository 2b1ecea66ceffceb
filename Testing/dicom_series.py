"""Write a SimpleITK image as a DICOM series (one file per slice) with GDCM, as a scanner export would look.

Shared by the tests that read DICOM folders and the DICOM SEG acceptance tests; written by GDCM, not
by the library, so the library's readers and SEG writer are checked against an independent writer.
"""

from __future__ import annotations

import locale
from pathlib import Path

import SimpleITK as sitk

UID_ROOT = "1.2.826.0.1.3680043.2.1125"


def write_dicom_series(image: sitk.Image, folder: Path, *, modality: str = "CT", uid_root: str = UID_ROOT) -> dict[str, str]:
    """One file per slice with the image's own geometry; returns the study, series and frame-of-reference UIDs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"study": f"{uid_root}.2", "series": f"{uid_root}.1", "frame_of_reference": f"{uid_root}.4"}
    d = image.GetDirection()
    orientation = "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))  # row (i) then column (j) direction
    saved_locale = locale.setlocale(locale.LC_ALL)  # GDCM's writer leaves the process in the "C" locale
    try:
        _write_slices(image, folder, uids, orientation, modality, uid_root)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)
    return uids


def _write_slices(image: sitk.Image, folder: Path, uids: dict, orientation: str, modality: str, uid_root: str) -> None:
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(image.GetSize()[2]):
        plane = image[:, :, z]
        tags = {
            "0020|000d": uids["study"],
            "0020|000e": uids["series"],
            "0020|0052": uids["frame_of_reference"],
            "0008|0018": f"{uid_root}.3.{z + 1}",
            "0020|0032": "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, z))),
            "0020|0037": orientation,
            "0020|0013": str(z + 1),
            "0020|0011": "7",
            "0008|0060": modality,
            "0010|0010": "TEST^SAMPLE",
            "0010|0020": "SAMPLE-CT",
            "0008|103e": "sample CT series",
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(plane)
