"""Exact mapping between MRML nodes and MedVolR1Lib types: volume node <-> Volume, anchor <-> ROI nodes,
canonical mask -> segment on the volume's own grid.

Why here and not in MedVolR1Lib: it needs MRML classes; why not in MedVolR1.py: it must run (and be
tested) without Qt or the Slicer application, e.g. with the `slicer-core` wheel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from MedVolR1Lib.anchor import EvidenceAnchor, VoxelBox, box_from_ras_bounds, box_ras_bounds
from MedVolR1Lib.errors import AnchorError, VolumeError
from MedVolR1Lib.evidence import Evidence
from MedVolR1Lib.volume import CanonicalGrid, Volume, canonical_grid, volume_from_array

EVIDENCE_ATTRIBUTE = "MedVolR1.Evidence"  # value: ID of the volume node the ROI belongs to
EVIDENCE_INDEX_ATTRIBUTE = "MedVolR1.EvidenceIndex"
EVIDENCE_ANCHOR_ATTRIBUTE = "MedVolR1.EvidenceAnchor"  # 1-based anchor (slice group) the box belongs to
# ROI -> volume as a node reference: Slicer rewrites references when a saved scene is loaded into another
# scene and node IDs change; an ID stored in an attribute would then point at the wrong volume (or none).
VOLUME_REFERENCE_ROLE = "MedVolR1.Volume"
EVIDENCE_NAME = "Evidence {n}"
_DECIMALS = 6  # rounding of voxel coordinates read back from ROIs: kills float noise, keeps sub-voxel edits


def _slicer():
    import slicer  # real Slicer or the slicer-core wheel

    return slicer


def matrix_to_numpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def numpy_to_matrix(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijk_to_ras_of(volume_node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix_to_numpy(matrix)


def array_from_volume_node(volume_node) -> np.ndarray:
    """Voxel array (K, J, I) copied out of the node, like slicer.util.arrayFromVolume but without the app.

    Copied so the worker thread never reads memory the GUI thread may replace.
    """
    from vtk.util import numpy_support

    image = volume_node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise VolumeError(f"{volume_node.GetName()}: the volume node holds no image data")
    scalars = image.GetPointData().GetScalars()
    components = scalars.GetNumberOfComponents()
    if components != 1:
        raise VolumeError(
            f"{volume_node.GetName()}: has {components} values per voxel (a vector, RGB or 4D volume); "
            "choose a single 3D scalar volume (for a 4D series, pick one frame in the Sequences module)"
        )
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(scalars).reshape(dims[2], dims[1], dims[0]).copy()


def volume_from_node(volume_node, *, modality: Optional[str] = None) -> Volume:
    """A canonical Volume from a scalar volume node; raises VolumeError with a message for the user."""
    if volume_node is None:
        raise VolumeError("No input volume selected: load a CT or MR scan and pick it as the input volume")
    slicer = _slicer()
    if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise VolumeError(f"{volume_node.GetName()}: is a {volume_node.GetClassName()}; choose a scalar (grayscale) volume")
    if volume_node.GetParentTransformNode() is not None:
        raise VolumeError(
            f"{volume_node.GetName()}: is under a transform; harden it (Data module, right-click, Harden transform) "
            "so the evidence boxes and the segmentation stay on the scan's voxels"
        )
    del slicer
    array = array_from_volume_node(volume_node)
    if array.ndim != 3 or min(array.shape) < 2:
        raise VolumeError(
            f"{volume_node.GetName()}: is a 2D image or single slice (size {tuple(array.shape[::-1])} voxels); "
            "MedVol-R1 needs a 3D volume"
        )
    return volume_from_array(array, ijk_to_ras_of(volume_node), modality=modality, name=volume_node.GetName())


class GridCache:
    """Canonical grid of each volume node, recomputed only when its image or geometry changed.

    The panel names slices and lists boxes on every parameter change (each keystroke in the question field):
    that needs the grid, never the voxels, so no copy of the volume is made (`volume_from_node` is for runs)."""

    def __init__(self) -> None:
        self._grids: dict[str, tuple[tuple, CanonicalGrid]] = {}
        self.computed = 0  # grids computed (tests: typing reuses one)

    def grid(self, volume_node) -> CanonicalGrid:
        if volume_node is None:
            raise VolumeError("No input volume selected: load a CT or MR scan and pick it as the input volume")
        image = volume_node.GetImageData()
        if image is None:
            raise VolumeError(f"{volume_node.GetName()}: the volume node holds no image data")
        ijk_to_ras = ijk_to_ras_of(volume_node)
        dims = image.GetDimensions()
        key = (tuple(dims), tuple(np.round(ijk_to_ras, 9).ravel()))
        cached = self._grids.get(volume_node.GetID())
        if cached is not None and cached[0] == key:
            return cached[1]
        grid = canonical_grid((dims[2], dims[1], dims[0]), ijk_to_ras)
        self._grids[volume_node.GetID()] = (key, grid)
        self.computed += 1
        return grid

    def clear(self) -> None:
        self._grids.clear()


GRIDS = GridCache()


def grid_of_node(volume_node) -> CanonicalGrid:
    """The node's canonical grid (shape, voxel -> RAS) without copying its voxels; cached per node."""
    return GRIDS.grid(volume_node)


# ----------------------------------------------------------------------------------------------- anchors <-> ROIs


@dataclass(frozen=True)
class RoiGeometry:
    """Centre and size in RAS mm of one evidence box, one slice thick."""

    center: tuple[float, float, float]
    size: tuple[float, float, float]


def roi_geometry(volume: Volume, slice_index: int, box: VoxelBox) -> RoiGeometry:
    lo, hi = box_ras_bounds(volume.ijk_to_ras, slice_index, box)
    center = (lo + hi) / 2.0
    return RoiGeometry(tuple(float(v) for v in center), tuple(float(v) for v in hi - lo))  # type: ignore[arg-type]


def roi_center_size(roi_node) -> tuple[np.ndarray, np.ndarray]:
    """ROI centre and size in RAS mm (the node's own frame: evidence ROIs are never transformed)."""
    center = np.zeros(3)
    roi_node.GetCenter(center)
    return center, np.array(roi_node.GetSize(), dtype=np.float64)


def box_from_roi(volume: "Volume | CanonicalGrid", roi_node) -> tuple[VoxelBox, int]:
    """(voxel box, slice index) covered by an ROI node, in canonical voxel edge coordinates."""
    center, size = roi_center_size(roi_node)
    box, k = box_from_ras_bounds(volume.ijk_to_ras, center - size / 2.0, center + size / 2.0)
    rounded = VoxelBox(*(round(v, _DECIMALS) + 0.0 for v in box.as_list()))
    return rounded, k


def volume_of_roi(scene, roi_node):
    """The volume node an evidence ROI belongs to (node reference; the ID attribute of older scenes as fallback)."""
    if roi_node is None:
        return None
    volume_node = roi_node.GetNodeReference(VOLUME_REFERENCE_ROLE)
    if volume_node is None:
        volume_id = roi_node.GetAttribute(EVIDENCE_ATTRIBUTE)
        volume_node = scene.GetNodeByID(volume_id) if volume_id else None
    return volume_node


def evidence_rois(scene, volume_node) -> list:
    """The evidence ROIs of this volume, in their index order ("Evidence 1", "Evidence 2", ...)."""
    if scene is None or volume_node is None:
        return []
    found = []
    nodes = scene.GetNodesByClass("vtkMRMLMarkupsROINode")
    for n in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(n)
        if node.GetAttribute(EVIDENCE_ATTRIBUTE) is not None and volume_of_roi(scene, node) is volume_node:
            found.append(node)
    return sorted(found, key=lambda node: int(node.GetAttribute(EVIDENCE_INDEX_ATTRIBUTE) or 0))


def anchor_number(roi_node) -> int:
    """The 1-based anchor (slice group) of an evidence ROI; ROIs from before anchors existed are anchor 1."""
    return int(roi_node.GetAttribute(EVIDENCE_ANCHOR_ATTRIBUTE) or 1)


def tag_evidence_roi(roi, volume_node, index: int, anchor: int) -> None:
    """Name an ROI "Evidence <index>" and link it to its volume and anchor (no geometry change)."""
    roi.SetName(EVIDENCE_NAME.format(n=index))
    roi.SetAttribute(EVIDENCE_ATTRIBUTE, volume_node.GetID())
    roi.SetAttribute(EVIDENCE_INDEX_ATTRIBUTE, str(index))
    roi.SetAttribute(EVIDENCE_ANCHOR_ATTRIBUTE, str(anchor))
    roi.SetNodeReferenceID(VOLUME_REFERENCE_ROLE, volume_node.GetID())


def place_evidence_rois(scene, volume_node, volume: Volume, evidence: "Evidence | EvidenceAnchor", existing: Sequence = ()) -> list:
    """Create or update one ROI per box ("Evidence n"), one slice thick, on its anchor's slice.

    Takes one anchor (the VLM's) or whole evidence (every anchor the user added).  Existing ROIs are
    reused (their observers survive) and surplus ones removed.  Setting geometry from code fires only
    ModifiedEvent, never PointEndInteractionEvent, so no edit loop can start.
    """
    evidence = Evidence.coerce(evidence)
    for anchor in evidence.anchors:
        anchor.validate(volume.shape)
    existing = list(existing)
    rois = []
    boxes = [(number, anchor, box) for number, anchor in enumerate(evidence.anchors, start=1) for box in anchor.boxes]
    for n, (number, anchor, box) in enumerate(boxes, start=1):
        geometry = roi_geometry(volume, int(anchor.slice_index), box)
        if existing:
            roi = existing.pop(0)
        else:
            roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", EVIDENCE_NAME.format(n=n))
            roi.CreateDefaultDisplayNodes()
        was_modifying = roi.StartModify()
        tag_evidence_roi(roi, volume_node, n, number)
        roi.SetCenter(*geometry.center)
        roi.SetSize(*geometry.size)
        roi.EndModify(was_modifying)
        rois.append(roi)
    for surplus in existing:
        scene.RemoveNode(surplus)
    return rois


def key_point_ras(volume: Volume, anchor: EvidenceAnchor) -> tuple[float, float, float]:
    """RAS point at the centre of the first box on the key slice: where the slice views jump to."""
    box = anchor.boxes[0]
    ijk = ((box.i0 + box.i1) / 2.0 - 0.5, (box.j0 + box.j1) / 2.0 - 0.5, float(anchor.slice_index))
    return tuple(float(v) for v in volume.ras_from_ijk(ijk))  # type: ignore[return-value]


def jump_slice_node(slice_node, ras: Sequence[float]) -> None:
    """Move a slice view (e.g. Red) so it shows the plane through `ras`, keeping its orientation."""
    slice_node.JumpSliceByOffsetting(float(ras[0]), float(ras[1]), float(ras[2]))


def slice_index_of_view(slice_node, volume: "Volume | CanonicalGrid") -> int:
    """Canonical axial slice shown at the centre of a slice view (e.g. Red), clipped into the volume."""
    slice_to_ras = matrix_to_numpy(slice_node.GetSliceToRAS())
    k = float(volume.ijk_from_ras(slice_to_ras[:3, 3])[2])
    return int(np.clip(round(k), 0, volume.num_slices - 1))


def view_center_ras(slice_node) -> np.ndarray:
    return matrix_to_numpy(slice_node.GetSliceToRAS())[:3, 3].copy()


@dataclass(frozen=True)
class SliceLabel:
    """A canonical slice as Slicer shows it: the volume's own K index (Data Probe's "(I, J, K)", 0-based,
    in the file's voxel order) and the axial offset in mm (the slice view slider's "S" value)."""

    source_index: int
    offset_mm: float
    axis: str = "S"

    def __str__(self) -> str:
        return f"slice {self.source_index} ({self.axis} {self.offset_mm:.1f} mm)"


def slice_label(volume_node, volume: "Volume | CanonicalGrid", slice_index: int) -> SliceLabel:
    """How Slicer would name canonical slice `slice_index` of `volume_node`."""
    ras = volume.ras_from_ijk([(volume.shape[2] - 1) / 2.0, (volume.shape[1] - 1) / 2.0, float(slice_index)])
    ijk_source = np.linalg.inv(ijk_to_ras_of(volume_node)) @ np.append(ras, 1.0)
    # The source axis that runs along superior-inferior is the one this axial slice index lives on.
    axis = int(np.argmax(np.abs(ijk_to_ras_of(volume_node)[2, :3])))
    return SliceLabel(int(round(float(ijk_source[axis]))), float(ras[2]))


# ------------------------------------------------------------------------------------------ mask -> segmentation


def ensure_segmentation_converters() -> None:
    """Register the labelmap <-> surface rules; the Segmentations module does this in the app, slicer-core does not."""
    slicer = _slicer()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    registered = {rule.GetClassName() for rule in (factory.GetConverterRules() or ())}
    for rule_class in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule, slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        if rule_class.__name__ not in registered:
            factory.RegisterConverterRule(rule_class())


def _oriented_image(array_kji: np.ndarray, ijk_to_ras: np.ndarray):
    import vtk
    from vtk.util import numpy_support

    slicer = _slicer()
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(int(array_kji.shape[2]), int(array_kji.shape[1]), int(array_kji.shape[0]))
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(array_kji.shape)[:] = array_kji
    image.SetImageToWorldMatrix(numpy_to_matrix(ijk_to_ras))
    return image


def write_mask_segment(
    scene,
    volume_node,
    volume: Volume,
    mask: np.ndarray,
    segment_name: str,
    segmentation_node=None,
    color: Optional[Sequence[float]] = None,
):
    """Put a canonical (K, J, I) mask into a segment named `segment_name` on the volume node's exact grid.

    Returns (segmentation node, segment id).  A segment of the same name is overwritten, so running
    "Segment" again replaces the result rather than piling up copies.
    """
    slicer = _slicer()
    mask = np.asarray(mask)
    if mask.shape != volume.shape:
        raise VolumeError(f"{volume.name}: mask shape {mask.shape} does not match volume shape {volume.shape}")
    ensure_segmentation_converters()
    source_order = (volume.to_source_array(mask) > 0).astype(np.uint8)
    if segmentation_node is None:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} MedVol-R1")
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation = segmentation_node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(segment_name)
    if not segment_id:
        segment_id = segmentation.AddEmptySegment("", segment_name, list(color) if color is not None else [0.9, 0.4, 0.1])
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    image = _oriented_image(source_order, ijk_to_ras_of(volume_node))
    if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE):
        raise VolumeError(f"could not write the mask into segment {segment_name!r} of {segmentation_node.GetName()}")
    return segmentation_node, segment_id


def segment_array(scene, segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """The segment as a 0/1 uint8 array (K, J, I) on the volume node's own grid (source order).

    Export through a temporary labelmap node, removed again, so the scene is left as found.
    """
    import vtk

    slicer = _slicer()
    ensure_segmentation_converters()
    before = set(node_ids(scene))
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__medvolr1_export__")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, volume_node):
            raise VolumeError(f"could not export segment {segment_id} of {segmentation_node.GetName()}")
        return (array_from_volume_node(labelmap) > 0).astype(np.uint8)
    finally:
        # The export adds a display node (and, without the app, a color table): remove all it added.
        remove_nodes(scene, [scene.GetNodeByID(i) for i in set(node_ids(scene)) - before])


def node_ids(scene) -> list[str]:
    """IDs of every node in the scene: tests and the Cancel path compare them before/after."""
    return sorted(scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes()))


def remove_nodes(scene, nodes: Iterable) -> None:
    for node in nodes:
        if node is not None and scene.IsNodePresent(node):
            scene.RemoveNode(node)
