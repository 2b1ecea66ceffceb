"""Slicer segmentation file (`.seg.nrrd`): the mask as a named, coloured, coded segment.

Written with slicerio in Slicer's segmentation-file convention (`Segment{N}_Name`, `_Color`,
`_Tags` with the TerminologyEntry), on exactly the grid of `mask.nii.gz` (the input file's voxel
order, spacing, origin and direction), so Slicer shows it over the scan and lists the segment by
name and SNOMED CT term.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .volume import LPS_TO_RAS, Volume

if TYPE_CHECKING:  # pydicom (codes) is needed only when a file is written
    from .segment_codes import SegmentTerm


def source_ijk_to_lps(volume: Volume) -> np.ndarray:
    """4x4 matrix from the input file's own voxel (i, j, k) to LPS mm, from the values the reader kept."""
    if volume.source is None:
        return LPS_TO_RAS @ volume.ijk_to_ras
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(volume.source.direction).reshape(3, 3) * np.asarray(volume.source.spacing)
    matrix[:3, 3] = volume.source.origin
    return matrix


def write_seg_nrrd(volume: Volume, masks: Sequence[np.ndarray], terms: Sequence[SegmentTerm], path: str | os.PathLike) -> Path:
    """One segment per (canonical mask, term); overlapping segments go to separate layers, as Slicer does."""
    import slicerio

    if len(masks) != len(terms) or not masks:
        raise ValueError(f"need one term per mask, got {len(masks)} masks and {len(terms)} terms")
    segmentation = None
    for number, (mask, term) in enumerate(zip(masks, terms), start=1):
        voxels_ijk = volume.to_source_array(np.asarray(mask) > 0).transpose(2, 1, 0)  # slicerio writes (i, j, k), Fortran order
        if segmentation is None:
            segmentation = slicerio.create_segmentation(voxels_ijk.shape, source_ijk_to_lps(volume))
            segmentation["containedRepresentationNames"] = ["Binary labelmap"]
        slicerio.add_segment(
            segmentation,
            voxels_ijk,
            {
                "id": f"Segment_{number}",
                "name": term.label,
                "color": [round(c / 255.0, 6) for c in term.colour],
                "terminology": term.slicer_terminology(),
            },
        )
    slicerio.write_segmentation(str(path), segmentation)
    return Path(path)
