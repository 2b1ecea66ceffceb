"""Write a SimpleITK image as a DICOM series (one file per slice) with GDCM, as a scanner export would look.

Shared by the tests that read DICOM folders and the DICOM SEG acceptance tests; written by GDCM, not
by the library, so the library's readers and SEG writer are checked against an independent writer.
`vendorise` then edits the files with pydicom the way real exports differ (empty SOP Class UID with a
valid file meta, vendor-private tags); `seg_frames_on_grid` places a SEG's frames back on a grid.
"""

from __future__ import annotations

import locale
from pathlib import Path

import numpy as np
import SimpleITK as sitk

UID_ROOT = "1.2.826.0.1.3680043.2.1125"


def write_dicom_series(image: sitk.Image, folder: Path, *, modality: str = "CT", uid_root: str = UID_ROOT,
                       prefix: str = "slice", description: str = "sample CT series", study_uid: str = "") -> dict[str, str]:
    """One file per slice with the image's own geometry; returns the study, series and frame-of-reference UIDs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"study": study_uid or f"{uid_root}.2", "series": f"{uid_root}.1", "frame_of_reference": f"{uid_root}.4"}
    d = image.GetDirection()
    orientation = "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))  # row (i) then column (j) direction
    saved_locale = locale.setlocale(locale.LC_ALL)  # GDCM's writer leaves the process in the "C" locale
    try:
        _write_slices(image, folder, uids, orientation, modality, uid_root, prefix, description)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)
    return uids


def _write_slices(image: sitk.Image, folder: Path, uids: dict, orientation: str, modality: str, uid_root: str,
                  prefix: str, description: str) -> None:
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
            "0008|103e": description,
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{z:03d}.dcm"))
        writer.Execute(plane)


def vendorise(folder: Path) -> None:
    """Make each instance look like an anonymised scanner export: an empty SOP Class UID (the file meta keeps
    the right one), Siemens-style private blocks, ORIGINAL/PRIMARY/AXIAL image type."""
    import pydicom

    for path in sorted(Path(folder).glob("*.dcm")):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.MediaStorageSOPClassUID == pydicom.uid.CTImageStorage
        ds.SOPClassUID = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.private_block(0x0019, "SIEMENS CT VA0  COAD", create=True).add_new(0x90, "DS", "0.5")
        ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True).add_new(0x10, "OB", b"SV10\x04\x03\x02\x01" + bytes(24))
        ds.private_block(0x0051, "SIEMENS CT VA0  IDE", create=True).add_new(0x0C, "LO", "FoV 300*300")
        ds.save_as(path, enforce_file_format=False)


def seg_frames_on_grid(seg, image: sitk.Image) -> np.ndarray:
    """Every SEG frame placed at its own Image Position (Patient) on `image`'s grid (source k, j, i order)."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    row_spacing, col_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    direction = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    to_index = np.linalg.inv(direction)
    rows, cols = np.meshgrid(np.arange(seg.Rows), np.arange(seg.Columns), indexing="ij")
    placed = np.zeros(image.GetSize()[::-1], dtype=np.uint8)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    for frame, group in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        origin = np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        points = origin + cols[..., None] * col_spacing * orientation[:3] + rows[..., None] * row_spacing * orientation[3:]
        ijk = np.rint((points - np.asarray(image.GetOrigin())) @ to_index.T).astype(int)
        assert (ijk >= 0).all() and (ijk < np.asarray(image.GetSize())).all()
        placed[ijk[..., 2], ijk[..., 1], ijk[..., 0]] |= frame.astype(np.uint8)
    return placed
