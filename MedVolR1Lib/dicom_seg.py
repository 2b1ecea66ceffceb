"""DICOM Segmentation (SEG) of a result, for a PACS or Slicer's DICOM module, written with highdicom.

The SEG is derived from the source series: it carries its patient and study, references every
source instance, and places each frame on the source instance at the same position, so any SEG
viewer overlays it on the series.  Only slices that hold the mask become frames (an empty mask: every slice, as highdicom does, since a SEG
cannot have zero frames).

Where the evidence goes: the standard has no evidence attribute, so
  * each segment's Segment Description (0062,0006, ST, 1024 chars, a standard attribute in the
    Segment Sequence) holds the query, the key slice and the boxes in RAS mm, readable in viewers
    that show segment details;
  * the Algorithm Identification's Algorithm Parameters (0066,0032) name the models and their
    checkpoint hashes, next to Algorithm Name "MedVol-R1" and its version;
  * Content Description says where the full record is (evidence.json beside the SEG).
No private tags are used.

For a scan that is not DICOM (NIfTI, NRRD), `placeholder_series` builds a CT/MR series from the scan
with clearly fake patient and study data, so the SEG has instances to reference and overlay.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from .errors import DataError, VolumeError
from .seg_nrrd import source_ijk_to_lps
from .volume import Volume

if TYPE_CHECKING:  # pydicom is imported only when a SEG is written (the `clinical` extra)
    from .segment_codes import SegmentTerm

ALGORITHM_NAME = "MedVol-R1"
MANUFACTURER = "MedVol-R1 project"
PLACEHOLDER_PATIENT_NAME = "PLACEHOLDER^MEDVOLR1"
PLACEHOLDER_PATIENT_ID = "MEDVOLR1-PLACEHOLDER"
_ST_LIMIT, _LO_LIMIT, _POSITION_TOLERANCE = 1024, 64, 0.05  # voxel units


@dataclass(frozen=True)
class SegSegment:
    """One segment to encode: canonical (K, J, I) mask, its coded meaning, and the evidence text."""

    mask: np.ndarray
    term: SegmentTerm
    description: str = ""


def source_path(volume: Volume) -> Optional[Path]:
    return Path(volume.source.path) if volume.source is not None and volume.source.path else None


def is_dicom_input(volume: Volume) -> bool:
    """Whether the scan was read from a DICOM series folder (so a SEG can reference its instances)."""
    path = source_path(volume)
    return path is not None and path.is_dir() and not (path / "image.npy").exists()  # M3D-Seg case folders are not DICOM


def is_single_dicom_file(volume: Volume) -> bool:
    path = source_path(volume)
    return path is not None and path.is_file() and path.suffix.lower() == ".dcm"


def _read_headers(files: Sequence[Path]) -> list:
    import pydicom
    from pydicom.errors import InvalidDicomError

    headers = []
    for path in files:
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            dataset = pydicom.dcmread(path, stop_before_pixels=True, force=True)  # no preamble: read as the volume reader did
        except OSError:
            continue  # not DICOM (a README, a thumbnail): the series reader skips it too
        if "ImagePositionPatient" in dataset and "SeriesInstanceUID" in dataset:
            headers.append(dataset)
    return headers


def _identify(dataset, path: Path) -> None:
    """Fill an empty SOP Class / Instance UID from the file meta (as anonymisers and exports leave them), or refuse.

    Why: highdicom finds the source's modules by its SOP Class; an empty one ended the whole run with
    `KeyError: ''`.  The File Meta Information's Media Storage SOP Class/Instance UID name the same thing.
    """
    try:  # a private helper of highdicom (its module moved between versions); without it, highdicom itself checks
        from highdicom._standard_utils import get_sop_class_iod_map
    except ImportError:
        get_sop_class_iod_map = None

    meta = getattr(dataset, "file_meta", None)
    for own, stored in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        if not str(dataset.get(own, "") or "").strip():
            value = str(getattr(meta, stored, "") or "").strip() if meta is not None else ""
            if not value:
                raise DataError(f"{path.name}: no {own} in the instance nor in its file meta; a DICOM SEG cannot reference it")
            setattr(dataset, own, value)
    if get_sop_class_iod_map is not None and str(dataset.SOPClassUID) not in get_sop_class_iod_map():
        raise DataError(f"{path.name}: SOP Class {dataset.SOPClassUID} is not an image storage class a DICOM SEG can reference")


def source_series(volume: Volume) -> list:
    """The source series' instances (headers), one per source slice, in the source file's k order.

    The instances are those the volume was read from (`volume.dicom_series`, the chosen and checked
    series).  Each is matched to a slice by its Image Position (Patient) on the scan's grid, so the
    frames written for slice k lie exactly where the viewer draws instance k.  An empty Slice Thickness
    is set (in memory only) to the slice spacing, which the SEG's pixel measures need; an empty SOP
    Class or Instance UID is taken from the file meta.
    """
    folder = source_path(volume)
    if folder is None or not folder.is_dir():
        raise VolumeError(f"{folder}: a DICOM SEG needs the source DICOM series folder; this scan was not read from one")
    series = volume.dicom_series
    if series is None:  # a Volume built elsewhere from a folder: the folder must hold exactly one series
        from .dicom_input import choose_series

        series = choose_series(folder)
    instances = _read_headers([Path(f) for f in series.files])
    if not instances:
        raise VolumeError(f"{folder}: no DICOM image instances found")
    for dataset in instances:
        _identify(dataset, Path(dataset.filename))
    to_voxel = np.linalg.inv(source_ijk_to_lps(volume))
    depth = volume.source.shape_kji[0] if volume.source else volume.shape[0]
    placed: dict[int, object] = {}
    for dataset in instances:
        i, j, k = (to_voxel @ np.r_[np.asarray(dataset.ImagePositionPatient, dtype=float), 1.0])[:3]
        slice_k = int(round(k))
        if max(abs(i), abs(j), abs(k - slice_k)) > _POSITION_TOLERANCE or not 0 <= slice_k < depth or slice_k in placed:
            raise DataError(
                f"{folder}: instance {dataset.SOPInstanceUID} at {list(dataset.ImagePositionPatient)} mm does not sit on "
                f"one slice of the scan's grid; cannot place SEG frames on the source series"
            )
        placed[slice_k] = dataset
        if getattr(dataset, "SliceThickness", None) in (None, ""):  # Type 2, may be empty; the SEG's pixel measures need a value
            dataset.SliceThickness = round(float(np.linalg.norm(source_ijk_to_lps(volume)[:3, 2])), 6)
    if len(placed) != depth:
        raise DataError(f"{folder}: the series has {len(placed)} instances for {depth} slices; cannot reference every slice")
    return [placed[k] for k in range(depth)]


def _pixel_encoding(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Stored pixels + (slope, intercept): integers as they are, anything else rescaled into uint16."""
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if np.array_equal(values, np.round(values)) and low >= -32768 and high <= 32767:
        return values.astype(np.int16), 1.0, 0.0
    slope = (high - low) / 65535.0 or 1.0
    return np.round((np.nan_to_num(values, nan=low) - low) / slope).astype(np.uint16), slope, low


def placeholder_series(volume: Volume, description: str) -> list:
    """A CT (or MR) image series of `volume` in its source voxel order, with placeholder patient and study.

    For inputs that are not DICOM: the SEG then references these instances, which are written beside it.
    """
    from highdicom import UID
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

    lps = source_ijk_to_lps(volume)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir, col_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    pixels, slope, intercept = _pixel_encoding(volume.to_source_array(volume.array))
    is_ct = volume.modality == "CT"
    sop_class = CTImageStorage if is_ct else MRImageStorage
    study, series, frame_of_reference = UID(), UID(), UID()
    now = datetime.datetime.now()
    instances = []
    for k in range(pixels.shape[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.TransferSyntaxUID = sop_class, ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, UID()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = PLACEHOLDER_PATIENT_NAME, PLACEHOLDER_PATIENT_ID, "", "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "MEDVOLR1", "", ""
        ds.StudyDescription = "PLACEHOLDER study: input was not DICOM"
        ds.SeriesDescription = description[:_LO_LIMIT]
        ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = ("CT" if is_ct else "MR"), MANUFACTURER, 1, k + 1
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.PositionReferenceIndicator, ds.AcquisitionNumber = "", 1
        ds.PatientPosition, ds.Laterality = "", ""  # Type 2C: unknown for a non-DICOM input, so present and empty
        if is_ct:
            ds.KVP = ""
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "RM", "NONE", "", ""
            ds.EchoTime, ds.EchoTrainLength, ds.RepetitionTime = "", "", ""
        ds.ImagePositionPatient = [round(float(v), 6) for v in (lps @ [0.0, 0.0, k, 1.0])[:3]]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [round(float(spacing[1]), 6), round(float(spacing[0]), 6)]  # row spacing (j), column spacing (i)
        ds.SliceThickness = round(float(spacing[2]), 6)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(pixels.shape[1]), int(pixels.shape[2])
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, int(pixels.dtype == np.int16)
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
        if is_ct:
            ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(pixels[k]).tobytes()
        instances.append(ds)
    return instances


def write_series(instances: Sequence, folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for number, dataset in enumerate(instances, start=1):
        dataset.save_as(folder / f"IM{number:05d}.dcm", enforce_file_format=True)
    return folder


def algorithm_parameters(provenance: dict) -> dict[str, str]:
    """Model names and checkpoint hashes from the provenance record, flat, for Algorithm Parameters."""
    grounder, propagator = provenance.get("grounder") or {}, provenance.get("propagator") or {}
    values = {
        "grounder": grounder.get("model"),
        "grounder_fingerprint": grounder.get("model_fingerprint"),
        "adapter": grounder.get("adapter"),
        "adapter_fingerprint": grounder.get("adapter_fingerprint"),
        "propagator": propagator.get("name"),
        "propagator_checkpoint_sha256": propagator.get("sha256"),
    }
    return {k: str(v) for k, v in values.items() if v}


def build_segmentation(
    volume: Volume,
    segments: Sequence[SegSegment],
    sources: Sequence,
    *,
    provenance: dict,
    version: str,
    series_description: str,
):
    """highdicom Segmentation over `sources` (one instance per source slice, in source k order)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not segments:
        raise ValueError("a DICOM SEG needs at least one segment")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=codes.cid7162.ArtificialIntelligence,
        version=version,
        source=ALGORITHM_NAME,
        parameters=algorithm_parameters(provenance) or None,
    )
    descriptions, frames = [], []
    for number, segment in enumerate(segments, start=1):
        term = segment.term
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=term.label[:_LO_LIMIT],
            segmented_property_category=term.category,
            segmented_property_type=term.type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id=f"MedVol-R1 {term.label}"[:_LO_LIMIT],
            anatomic_regions=[term.anatomic_region] if term.anatomic_region is not None else None,
            display_color=hd.color.CIELabColor.from_rgb(*term.colour),
        )
        if term.modifier is not None:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept.from_code(term.modifier)
            ]
        if segment.description:
            description.SegmentDescription = segment.description[:_ST_LIMIT]
        descriptions.append(description)
        frames.append(volume.to_source_array((np.asarray(segment.mask) > 0).astype(np.uint8)))
    pixel_array = frames[0] if len(frames) == 1 else np.stack(frames, axis=-1)
    if pixel_array.shape[:3] != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise DataError(f"mask grid {pixel_array.shape[:3]} does not match the source series ({len(sources)} x {sources[0].Rows} x {sources[0].Columns})")
    return hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=max(int(getattr(sources[0], "SeriesNumber", 0) or 0), 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=version,
        device_serial_number="none",
        content_description="MedVol-R1 result; full evidence in evidence.json"[:_LO_LIMIT],
        content_label="MEDVOLR1",
        content_creator_name="MedVol-R1^",
        series_description=series_description[:_LO_LIMIT],
        omit_empty_frames=True,
    )
