"""The Slicer module's MRML logic on a real vtkMRMLScene (slicer-core wheel, no Slicer app, no Qt).

Proves: volume nodes (read by Slicer's own NIfTI reader, and flipped / LPS / permuted copies) give the
same canonical Volume; anchors <-> evidence ROIs round-trip to the voxel; masks <-> segments are exact
on the node's grid; a user drag triggers exactly one re-propagation and code updates none; failures,
model garbage, Cancel and a killed worker leave the scene untouched; and the panel's whole flow (query -> Find evidence ->
ROIs -> Segment -> drag -> re-propagation) through the worker process on real models, with the tiny Qwen taught one answer
(fixtures/answering_qwen.py: a wiring fixture that says what it was told) and the micro SAM2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedVolR1"))

from MedVolR1SlicerGlue import evidence_edits  # noqa: E402
from MedVolR1SlicerGlue import mrml_mapping as mm  # noqa: E402
from MedVolR1SlicerGlue.edits import RoiEditWatcher  # noqa: E402
from MedVolR1SlicerGlue.session import BusyError, EvidenceSession, QueryError  # noqa: E402
from MedVolR1SlicerGlue.settings import PanelSettings, check_settings  # noqa: E402

from MedVolR1Lib.anchor import EvidenceAnchor, VoxelBox  # noqa: E402
from MedVolR1Lib.errors import AnchorError, CheckpointError, DeviceError, VolumeError  # noqa: E402
from MedVolR1Lib.fixtures.gil_main_thread import polls_until_done  # noqa: E402
from MedVolR1Lib.readers import load_volume  # noqa: E402


class ManualTimer:
    """Stands in for qt.QTimer (single shot): the test decides when time has passed."""

    def __init__(self):
        self.callback = None
        self.starts = 0

    def start(self, delay_ms, callback):
        self.callback = callback
        self.starts += 1

    def stop(self):
        self.callback = None

    def fire(self):
        callback, self.callback = self.callback, None
        if callback is not None:
            callback()


# ---------------------------------------------------------------------------------------------------- helpers


def _set_node_array(node, array_kji, ijk_to_ras):
    from vtk.util import numpy_support

    array_kji = np.ascontiguousarray(array_kji)
    image = vtk.vtkImageData()
    image.SetDimensions(array_kji.shape[2], array_kji.shape[1], array_kji.shape[0])
    image.AllocateScalars(numpy_support.get_vtk_array_type(array_kji.dtype), 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(array_kji.shape)[:] = array_kji
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(mm.numpy_to_matrix(ijk_to_ras))
    return node


def _read_with_slicer(scene, path, name, cls="vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(cls, name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer's reader could not read {path}"
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def _flip(array, matrix, axis_ijk):
    """Same anatomy stored with index axis `axis_ijk` (0=i) reversed."""
    out = matrix.copy()
    n = array.shape[2 - axis_ijk]
    out[:3, 3] = matrix[:3, 3] + matrix[:3, axis_ijk] * (n - 1)
    out[:3, axis_ijk] = -matrix[:3, axis_ijk]
    return np.flip(array, 2 - axis_ijk), out


def _swap_ij(array, matrix):
    out = matrix.copy()
    out[:, [0, 1]] = matrix[:, [1, 0]]
    return np.swapaxes(array, 1, 2), out


def _variants(array, matrix):
    lps_a, lps_m = _flip(*_flip(array, matrix, 0), 1)
    return {
        "as_read": (array, matrix),
        "flip_i": _flip(array, matrix, 0),
        "lps": (lps_a, lps_m),
        "flip_k": _flip(array, matrix, 2),
        "swap_ij": _swap_ij(array, matrix),
    }


@pytest.fixture(scope="module")
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture(scope="module")
def ct_nodes(scene, sample_ct):
    """The sample CT read by Slicer's reader, plus copies with flipped / permuted index axes."""
    read = _read_with_slicer(scene, sample_ct.ct_path, "ct")
    array, matrix = mm.array_from_volume_node(read), mm.ijk_to_ras_of(read)
    nodes = {"as_read": read}
    for name, (a, m) in _variants(array, matrix).items():
        if name != "as_read":
            nodes[name] = _set_node_array(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name), a, m)
    return nodes


# ----------------------------------------------------------------------------------------- volume node -> Volume


def test_volume_node_equals_file_loader(ct_nodes, sample_ct):
    from_node = mm.volume_from_node(ct_nodes["as_read"])
    from_file = load_volume(sample_ct.ct_path)
    assert from_node.shape == from_file.shape == (112, 101, 122)
    np.testing.assert_array_equal(from_node.array, from_file.array)
    np.testing.assert_allclose(from_node.ijk_to_ras, from_file.ijk_to_ras, atol=1e-4)


@pytest.mark.parametrize("variant", ["flip_i", "lps", "flip_k", "swap_ij"])
def test_flipped_and_permuted_nodes_give_the_same_canonical_volume(ct_nodes, variant):
    reference = mm.volume_from_node(ct_nodes["as_read"])
    other = mm.volume_from_node(ct_nodes[variant])
    assert not np.array_equal(mm.array_from_volume_node(ct_nodes[variant]).shape, ()) and other.shape == reference.shape
    np.testing.assert_array_equal(other.array, reference.array)
    np.testing.assert_allclose(other.ijk_to_ras, reference.ijk_to_ras, atol=1e-6)


# ------------------------------------------------------------------------------------------- anchor <-> ROI nodes

ANCHORS = [
    EvidenceAnchor(57, (VoxelBox.from_voxels(30, 40, 49, 61), VoxelBox.from_voxels(70, 41, 88, 60))),
    EvidenceAnchor(3, (VoxelBox(10.25, 7.5, 33.75, 20.125),)),  # sub-voxel edges as a VLM gives them
    EvidenceAnchor(111, (VoxelBox.from_voxels(0, 0, 121, 100),)),  # whole last slice
]


@pytest.mark.parametrize("variant", ["as_read", "lps", "swap_ij"])
@pytest.mark.parametrize("anchor", ANCHORS, ids=["two_boxes", "subvoxel", "full_slice"])
def test_anchor_roi_anchor_round_trip(scene, ct_nodes, variant, anchor):
    node = ct_nodes[variant]
    volume = mm.volume_from_node(node)
    rois = mm.place_evidence_rois(scene, node, volume, anchor, mm.evidence_rois(scene, node))
    assert [r.GetName() for r in rois] == [f"Evidence {n}" for n in range(1, len(anchor.boxes) + 1)]
    assert mm.evidence_rois(scene, node) == rois
    back = evidence_edits.evidence_from_rois(volume, rois).primary
    assert back.slice_index == anchor.slice_index
    for got, want in zip(back.boxes, anchor.boxes):
        np.testing.assert_allclose(got.as_list(), want.as_list(), atol=1e-6)
        assert got.voxel_range(volume.shape[1:]) == want.voxel_range(volume.shape[1:])
    # One slice thick, and the ROI holds exactly the box's voxel centres on slice k (none of slice k +- 1).
    center, size = mm.roi_center_size(rois[0])
    assert size[2] == pytest.approx(volume.spacing[2])
    lo, hi = center - size / 2, center + size / 2
    if not all(float(v).is_integer() for v in anchor.boxes[0].as_list()):
        return  # partial voxels: the voxel-centre check below is for whole-voxel boxes
    i_min, j_min, i_max, j_max = anchor.boxes[0].voxel_range(volume.shape[1:])
    k = anchor.slice_index
    inside = volume.ras_from_ijk([[i_min, j_min, k], [i_max, j_max, k]])
    assert np.all((inside > lo) & (inside < hi))
    outside = volume.ras_from_ijk([[i_min, j_min, k + 1], [i_min, j_min, k - 1], [i_max + 1, j_max, k]])
    assert not np.any(np.all((outside > lo) & (outside < hi), axis=1))


def test_rois_are_identical_in_ras_for_every_storage_order(scene, ct_nodes):
    """The same anatomy stored flipped gives the same ROIs in the patient's space."""
    anchor = ANCHORS[0]
    geometries = {}
    for variant in ("as_read", "flip_i", "lps", "flip_k", "swap_ij"):
        volume = mm.volume_from_node(ct_nodes[variant])
        geometries[variant] = [mm.roi_geometry(volume, anchor.slice_index, b) for b in anchor.boxes]
    for variant, geometry in geometries.items():
        for got, want in zip(geometry, geometries["as_read"]):
            np.testing.assert_allclose(got.center, want.center, atol=1e-6, err_msg=variant)
            np.testing.assert_allclose(got.size, want.size, atol=1e-6, err_msg=variant)


def test_edited_rois_move_to_the_key_roi_slice_and_off_scan_boxes_are_refused(scene, ct_nodes):
    node = ct_nodes["as_read"]
    volume = mm.volume_from_node(node)
    rois = mm.place_evidence_rois(scene, node, volume, ANCHORS[0], mm.evidence_rois(scene, node))
    center, _ = mm.roi_center_size(rois[1])
    rois[1].SetCenter(center[0], center[1], center[2] + 2 * volume.spacing[2])  # the user drags box 2 up 2 slices
    anchor = evidence_edits.evidence_from_rois(volume, rois, key_roi=rois[1]).primary
    assert anchor.slice_index == ANCHORS[0].slice_index + 2
    assert anchor.boxes[0].voxel_range(volume.shape[1:]) == ANCHORS[0].boxes[0].voxel_range(volume.shape[1:])
    box_center = volume.ras_from_ijk([0.0, 50.0, ANCHORS[0].slice_index])  # box 1 dragged half off the left edge
    rois[0].SetCenter(*box_center)
    with pytest.raises(AnchorError, match=rf"reaches outside the {volume.shape[2]}x{volume.shape[1]}-voxel slice"):
        evidence_edits.evidence_from_rois(volume, rois, key_roi=rois[1])  # user boxes are never clipped silently
    rois[0].SetCenter(*volume.ras_from_ijk([-500.0, -500.0, ANCHORS[0].slice_index]))  # dragged off the scan
    with pytest.raises(AnchorError, match="outside"):
        evidence_edits.evidence_from_rois(volume, rois, key_roi=rois[1])
    rois[1].SetCenter(*volume.ras_from_ijk([60.0, 50.0, -40.0]))
    with pytest.raises(AnchorError, match="out of range"):
        evidence_edits.evidence_from_rois(volume, rois, key_roi=rois[1])
    with pytest.raises(AnchorError, match="no evidence boxes"):
        evidence_edits.evidence_from_rois(volume, [])


# ------------------------------------------------------------------------------------------- mask <-> segment


@pytest.mark.parametrize("variant", ["as_read", "lps", "flip_k", "swap_ij"])
def test_mask_segment_array_identity(scene, ct_nodes, sample_labels, variant):
    node = ct_nodes[variant]
    volume = mm.volume_from_node(node)
    mask = (sample_labels == 3).astype(np.uint8)  # kidney_left, canonical order
    mask[0, 0, 0] = 1  # a corner voxel catches any off-by-one or flipped axis
    before = scene.GetNumberOfNodes()
    seg, segment_id = mm.write_mask_segment(scene, node, volume, mask, "kidney_left")
    assert scene.GetNumberOfNodes() == before + 2  # segmentation + its display node
    assert seg.GetSegmentation().GetSegment(segment_id).GetName() == "kidney_left"
    exported = mm.segment_array(scene, seg, segment_id, node)
    assert scene.GetNumberOfNodes() == before + 2  # the temporary export node is gone
    np.testing.assert_array_equal(exported, volume.to_source_array(mask))
    # Writing the same target again replaces the segment instead of adding one.
    mm.write_mask_segment(scene, node, volume, np.zeros_like(mask), "kidney_left", seg)
    assert seg.GetSegmentation().GetNumberOfSegments() == 1
    assert mm.segment_array(scene, seg, segment_id, node).sum() == 0
    mm.remove_nodes(scene, [seg.GetDisplayNode(), seg])


def test_segment_matches_the_label_file_read_by_slicer(scene, ct_nodes, sample_ct, sample_labels):
    """Independent check of placement: our segment equals the label file's voxels as Slicer reads them."""
    node = ct_nodes["as_read"]
    volume = mm.volume_from_node(node)
    labels_node = _read_with_slicer(scene, sample_ct.labels_path, "labels", "vtkMRMLLabelMapVolumeNode")
    raw = mm.array_from_volume_node(labels_node)
    seg, segment_id = mm.write_mask_segment(scene, node, volume, (sample_labels == 2).astype(np.uint8), "kidney_right")
    np.testing.assert_array_equal(mm.segment_array(scene, seg, segment_id, node), (raw == 2).astype(np.uint8))
    mm.remove_nodes(scene, [seg.GetDisplayNode(), seg, labels_node.GetStorageNode(), labels_node])


# ---------------------------------------------------------------------------------------------- bad volumes


def test_bad_volume_nodes_raise_clear_errors(scene):
    with pytest.raises(VolumeError, match="No input volume"):
        mm.volume_from_node(None)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(VolumeError, match="no image data"):
        mm.volume_from_node(empty)
    flat = _set_node_array(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "xray"), np.zeros((1, 20, 30), np.int16), np.eye(4))
    with pytest.raises(VolumeError, match="2D image"):
        mm.volume_from_node(flat)
    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "4d")
    image = vtk.vtkImageData()
    image.SetDimensions(8, 8, 8)
    image.AllocateScalars(vtk.VTK_FLOAT, 5)  # 5 frames per voxel, as a multivolume stores them
    vector.SetAndObserveImageData(image)
    with pytest.raises(VolumeError, match="5 values per voxel"):
        mm.volume_from_node(vector)
    label = _set_node_array(scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "lab"), np.zeros((4, 4, 4), np.int16), np.eye(4))
    with pytest.raises(VolumeError, match="scalar"):
        mm.volume_from_node(label)
    moved = _set_node_array(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moved"), np.zeros((4, 4, 4), np.int16), np.eye(4))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    moved.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(VolumeError, match="harden"):
        mm.volume_from_node(moved)
    mm.remove_nodes(scene, [empty, flat, vector, label, moved, transform])


def test_settings_checks_name_the_problem(tmp_path):
    with pytest.raises(DeviceError, match="CUDA"):
        check_settings(PanelSettings(device="cuda"), cuda_available=False)
    with pytest.raises(CheckpointError, match="MedSAM2_latest.pt"):
        check_settings(PanelSettings(propagator="medsam2"), cuda_available=False)
    with pytest.raises(CheckpointError, match="not found"):
        check_settings(PanelSettings(propagator="medsam2", sam_checkpoint=str(tmp_path / "missing.pt")), cuda_available=False)
    with pytest.raises(CheckpointError, match="adapter"):
        check_settings(PanelSettings(adapter=str(tmp_path / "nope")), cuda_available=False)
    with pytest.raises(CheckpointError, match="VLM folder"):
        check_settings(PanelSettings(model=str(tmp_path / "nope")), cuda_available=False)
    check_settings(PanelSettings(model="Qwen/Qwen2.5-VL-3B-Instruct"), cuda_available=False)  # a hub id is not a path


# ------------------------------------------------------------------- settings stay with the user; typing copies nothing


def test_a_scene_cannot_name_a_program_a_server_or_a_token(tmp_path):
    """A shared scene whose MedVol-R1 parameter node says where to run and where to send changes nothing: those
    come from the user's application settings only."""
    import ast

    from MedVolR1SlicerGlue import settings as panel_settings

    planted = {"serverUrl": "http://attacker.example:80", "serverTokenFile": "/home/u/.ssh/id_rsa",
               "pythonExecutable": "/tmp/evil.sh", "server_url": "http://attacker.example:80", "python_executable": "/tmp/evil.sh"}
    source = slicer.vtkMRMLScene()
    node = source.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "MedVolR1")
    node.SetAttribute("ModuleName", "MedVolR1")
    node.SetParameter("model", "Qwen/Qwen2.5-VL-3B-Instruct")
    node.SetParameter("device", "cpu")
    for key, value in planted.items():
        node.SetParameter(key, value)
        node.SetAttribute(key, value)
    path = tmp_path / "shared.mrml"
    source.SetURL(str(path))
    assert source.Commit()
    assert "attacker.example" in path.read_text()  # the scene file really carries them

    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(path))
    assert loaded.Connect()
    nodes = [n for n in (loaded.GetNthNodeByClass(i, "vtkMRMLScriptedModuleNode")
                         for i in range(loaded.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")))
             if n.GetAttribute("ModuleName") == "MedVolR1"]
    assert len(nodes) == 1 and nodes[0].GetParameter("serverUrl") == planted["serverUrl"]
    values = panel_settings.scene_values(nodes[0])
    assert values == {"model": "Qwen/Qwen2.5-VL-3B-Instruct", "device": "cpu"}
    for user in (panel_settings.UserSettings(), panel_settings.UserSettings("/opt/w/bin/python", "http://gpu.lab:8765", "/home/u/t")):
        store = panel_settings.MemoryStore()
        panel_settings.save_user_settings(store, user)
        settings = panel_settings.panel_settings(values, panel_settings.load_user_settings(store))
        assert (settings.python_executable, settings.server_url, settings.server_token_file) == (
            user.python_executable, user.server_url, user.server_token_file)
        assert settings.model == "Qwen/Qwen2.5-VL-3B-Instruct" and settings.device == "cpu"
    # ... and the parameter node class of the module declares no such field.
    tree = ast.parse((Path(__file__).resolve().parents[1] / "MedVolR1" / "MedVolR1.py").read_text())
    parameter_class = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "MedVolR1ParameterNode")
    fields = {stmt.target.id for stmt in parameter_class.body if isinstance(stmt, ast.AnnAssign)}
    assert not fields & {"serverUrl", "serverTokenFile", "pythonExecutable"}, fields
    assert set(panel_settings.SCENE_PARAMETERS.values()) <= fields


def test_a_scan_goes_to_a_server_only_after_the_user_agreed(scene):
    from MedVolR1SlicerGlue.session import UploadNotApproved

    rng = np.random.default_rng(3)
    node = _set_node_array(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "consent"),
                           rng.integers(-100, 100, (12, 24, 24)).astype(np.int16), np.diag([-1.0, -1.0, 2.0, 1.0]))
    volume = mm.volume_from_node(node)
    mm.place_evidence_rois(scene, node, volume, EvidenceAnchor(5, (VoxelBox.from_voxels(4, 4, 12, 12),)))
    asked = []
    session = EvidenceSession(scene, upload_allowed=lambda url: asked.append(url) or False)
    before = mm.node_ids(scene)
    with pytest.raises(UploadNotApproved, match="nothing was sent"):
        session.start_segment(node, "", PanelSettings(server_url="http://127.0.0.1:9"))
    assert asked == ["http://127.0.0.1:9"] and not session.busy and mm.node_ids(scene) == before
    mm.remove_nodes(scene, [node, *mm.evidence_rois(scene, node)])


def test_typing_in_the_question_copies_no_voxels(scene, monkeypatch):
    """The panel redraws the extent line and the box list on every parameter change (each keystroke): from the
    node's cached grid, with no copy of the volume (was a float32 copy of the whole CT per keystroke)."""
    import MedVolR1Lib.volume as volume_module

    rng = np.random.default_rng(5)
    matrix = np.array([[-0.8, 0, 0, 10.0], [0, -0.8, 0, 20.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1.0]])
    node = _set_node_array(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "typing"),
                           rng.integers(-1000, 1000, (30, 40, 48)).astype(np.int16), matrix)
    volume = mm.volume_from_node(node)
    evidence_edits.add_box(scene, node, volume, 12, VoxelBox.from_voxels(5, 5, 20, 20))
    evidence_edits.add_box(scene, node, volume, 17, VoxelBox.from_voxels(8, 8, 30, 30))
    evidence_edits.set_extent_limit(node, (10, 20))
    expected_extent = tuple(mm.slice_label(node, volume, k) for k in (10, 20))
    expected_list = [mm.slice_label(node, volume, mm.box_from_roi(volume, roi)[1]) for roi in mm.evidence_rois(scene, node)]

    copies = []
    for module, name in ((mm, "array_from_volume_node"), (mm, "volume_from_array"), (volume_module, "volume_from_array")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _original=original, _name=name, **k: copies.append(_name) or _original(*a, **k))
    mm.GRIDS.clear()
    computed = mm.GRIDS.computed
    for _keystroke in range(25):
        assert evidence_edits.extent_labels(node) == expected_extent
        assert [label for _roi, label in evidence_edits.evidence_list(scene, node)] == expected_list
    assert copies == [] and mm.GRIDS.computed == computed + 1
    assert [str(label) for label in expected_list] == ["slice 12 (S -270.0 mm)", "slice 17 (S -257.5 mm)"]
    # A changed geometry is noticed (the cache is keyed by the node's dimensions and IJK->RAS).
    node.SetSpacing(0.8, 0.8, 5.0)
    assert evidence_edits.extent_labels(node)[1].offset_mm != expected_extent[1].offset_mm
    assert mm.GRIDS.computed == computed + 2 and copies == []
    mm.remove_nodes(scene, [node, *mm.evidence_rois(scene, node)])


# ------------------------------------------------------------------------------------ user edits -> re-propagation


def test_one_drag_gives_one_request_and_code_updates_none(scene, ct_nodes):
    node = ct_nodes["as_read"]
    volume = mm.volume_from_node(node)
    rois = mm.place_evidence_rois(scene, node, volume, ANCHORS[0], mm.evidence_rois(scene, node))
    timer, edits = ManualTimer(), []
    watcher = RoiEditWatcher(edits.append, timer)
    watcher.watch(rois)
    # Code moves the boxes (as Find evidence / re-propagation do): ModifiedEvent only, nothing scheduled.
    mm.place_evidence_rois(scene, node, volume, ANCHORS[1], mm.evidence_rois(scene, node)[:1] + rois[1:])
    rois[0].SetCenter(1.0, 2.0, 3.0)
    timer.fire()
    assert timer.starts == 0 and edits == []
    # A user drag ends twice in a burst (move, then resize): one request, for the last ROI touched.
    rois[0].InvokeEvent(rois[0].PointEndInteractionEvent)
    rois[1].InvokeEvent(rois[1].PointEndInteractionEvent)
    assert edits == []  # debounced: nothing before the timer fires
    timer.fire()
    timer.fire()
    assert edits == [rois[1]]
    watcher.clear()
    rois[0].InvokeEvent(rois[0].PointEndInteractionEvent)
    timer.fire()
    assert edits == [rois[1]]


# --------------------------------------------------------------------------- session: real pipeline, real models


def _small_ct_node(scene, sample_volume, k0=44, k1=60):
    """A 16-slice crop of the real CT (canonical order) as a volume node: keeps model tests fast."""
    matrix = sample_volume.ijk_to_ras.copy()
    matrix[:3, 3] = sample_volume.ras_from_ijk([0, 0, k0])
    return _set_node_array(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct crop"), sample_volume.array[k0:k1].astype(np.int16), matrix)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    pytest.importorskip("transformers")
    from MedVolR1Lib.fixtures.tiny_qwen import build_tiny_qwen

    return build_tiny_qwen(tmp_path_factory.mktemp("qwen") / "tiny")


@pytest.fixture(scope="module")
def runner():
    """One warm worker process for the module's sessions (as one Slicer session keeps one)."""
    from MedVolR1SlicerGlue.jobs import ModelRunner

    runner = ModelRunner()
    yield runner
    runner.shutdown()


def _factory(tiny_qwen=None, micro_sam2=None):
    from MedVolR1Lib.pipeline import PipelineConfig

    def build(settings):
        return (
            PipelineConfig(
                model=str(tiny_qwen) if tiny_qwen else None,
                propagator="medsam2",
                sam_checkpoint=str(micro_sam2[0]) if micro_sam2 else None,
                sam_overrides=micro_sam2[1] if micro_sam2 else (),
                device="cpu",
                num_views=4,
                image_size=112,
            )
        )

    return build


def test_inputs_are_checked_before_anything_runs(scene, sample_volume, runner):
    node = _small_ct_node(scene, sample_volume)
    session = EvidenceSession(scene, _factory(), runner=runner)
    before = mm.node_ids(scene)
    with pytest.raises(VolumeError, match="No input volume"):
        session.start_find_evidence(None, "segment the liver", PanelSettings())
    with pytest.raises(QueryError, match="query"):
        session.start_find_evidence(node, "   ", PanelSettings())
    with pytest.raises(QueryError):
        session.start_segment(node, "", PanelSettings())  # no ROIs yet, so the query is needed
    assert not session.busy and mm.node_ids(scene) == before
    mm.remove_nodes(scene, [node])


def _cuda():
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def test_model_garbage_is_shown_raw_and_leaves_the_scene_unchanged(scene, sample_volume, tiny_qwen, micro_sam2, runner):
    node = _small_ct_node(scene, sample_volume)
    session = EvidenceSession(scene, _factory(tiny_qwen, micro_sam2), runner=runner)
    before = mm.node_ids(scene)
    session.start_find_evidence(node, "segment the left kidney", PanelSettings())
    with pytest.raises(BusyError):
        session.start_find_evidence(node, "segment the left kidney", PanelSettings())
    outcome = session.wait(timeout=300)
    # A random-weight tiny Qwen cannot produce a valid anchor: the grounder must refuse, not guess.
    assert outcome.status == "failed", outcome.message
    assert outcome.error.error_class == "GroundingError"  # raised in the worker process, named on this side
    assert outcome.raw_text == outcome.error.raw_text and outcome.raw_text.strip()
    assert mm.node_ids(scene) == before and mm.evidence_rois(scene, node) == []
    mm.remove_nodes(scene, [node])


def test_cancel_leaves_the_scene_as_before(scene, sample_volume, tiny_qwen, micro_sam2, runner):
    node = _small_ct_node(scene, sample_volume)
    session = EvidenceSession(scene, _factory(tiny_qwen, micro_sam2), runner=runner)
    volume = mm.volume_from_node(node)
    mm.place_evidence_rois(scene, node, volume, EvidenceAnchor(8, (VoxelBox.from_voxels(70, 41, 88, 60),)))
    before = mm.node_ids(scene)
    job = session.start_segment(node, "left kidney", PanelSettings())
    job.cancel()
    outcome = session.wait(timeout=300)
    assert outcome.status == "cancelled"
    assert mm.node_ids(scene) == before and session.segmentation_node is None and not session.busy
    mm.remove_nodes(scene, mm.evidence_rois(scene, node) + [node])


def test_segment_from_rois_then_a_drag_repropagates_once(scene, sample_volume, micro_sam2, runner):
    """Manual evidence -> Segment -> user drags the ROI -> exactly one re-propagation, reusing features."""
    node = _small_ct_node(scene, sample_volume)
    session = EvidenceSession(scene, _factory(None, micro_sam2), runner=runner)
    volume = mm.volume_from_node(node)
    anchor = EvidenceAnchor(8, (VoxelBox.from_voxels(70, 41, 88, 60),))
    rois = mm.place_evidence_rois(scene, node, volume, anchor)
    timer = ManualTimer()
    watcher = RoiEditWatcher(session.on_roi_edited, timer)
    watcher.watch(rois)

    session.start_segment(node, "segment the left kidney", PanelSettings())
    outcome = session.wait(timeout=300)
    assert outcome.status == "ok", outcome.message
    assert timer.starts == 0  # placing the ROIs from the result did not look like a user edit
    segment = session.segmentation_node.GetSegmentation().GetSegment(outcome.segment_id)
    assert segment.GetName() == "left kidney"
    np.testing.assert_array_equal(
        mm.segment_array(scene, session.segmentation_node, outcome.segment_id, node), volume.to_source_array(session.result.mask)
    )
    encoded = session.worker_stats()["encoded_slices"]
    assert encoded >= volume.num_slices

    center, _ = mm.roi_center_size(rois[0])
    rois[0].SetCenter(center[0], center[1], center[2] + volume.spacing[2])  # drag one slice up
    rois[0].InvokeEvent(rois[0].PointEndInteractionEvent)
    timer.fire()
    assert session.reprop_requests == 1 and session.busy
    outcome = session.wait(timeout=300)
    assert outcome.status == "ok", outcome.message
    assert session.result.anchor.slice_index == 9 and outcome.anchor.slice_index == 9
    assert session.segmentation_node.GetSegmentation().GetNumberOfSegments() == 1
    assert session.worker_stats()["encoded_slices"] == encoded  # cached features reused, no re-encoding
    assert timer.starts == 1 and session.reprop_requests == 1  # re-placing ROIs did not trigger another run
    np.testing.assert_array_equal(
        mm.segment_array(scene, session.segmentation_node, outcome.segment_id, node), volume.to_source_array(session.result.mask)
    )
    watcher.clear()
    mm.remove_nodes(scene, mm.evidence_rois(scene, node) + [session.segmentation_node.GetDisplayNode(), session.segmentation_node, node])


# ------------------------------------------------------------ the full panel flow with a model that gives an answer

FLOW_QUERY = "segment the left kidney"
FLOW_SLICES = (80, 96)  # a 16-slice crop of the sample CT through both kidneys
KIDNEY_LEFT = 3


@pytest.fixture(scope="module")
def kidney_case(tmp_path_factory, sample_volume, sample_labels):
    """The crop's Volume as the session will see it, the left kidney's mask on it, the answer that points at the
    kidney on the shown slice where it is largest, and the tiny Qwen taught to give exactly that answer to
    exactly the panel's prompt (4 views of 112 px): a wiring fixture, not a model that can find kidneys."""
    pytest.importorskip("transformers")
    from MedVolR1Lib.fixtures.answering_qwen import answer_for_mask, build_answering_tiny_qwen

    scene = slicer.vtkMRMLScene()
    volume = mm.volume_from_node(_small_ct_node(scene, sample_volume, *FLOW_SLICES))
    mask = (sample_labels[FLOW_SLICES[0] : FLOW_SLICES[1]] == KIDNEY_LEFT).astype(np.uint8)
    answer = answer_for_mask(volume, mask, num_views=4, image_size=112, think="left kidney")
    model = build_answering_tiny_qwen(
        tmp_path_factory.mktemp("answering") / "model", volume=volume, query=FLOW_QUERY, answer_text=answer,
        num_views=4, image_size=112,
    )
    return volume, mask, answer, model


def _same_anchor(got, want, slice_shift=0) -> bool:
    """Equal up to the 1e-6 voxel rounding of coordinates read back from ROI nodes."""
    return got.slice_index == want.slice_index + slice_shift and len(got.boxes) == len(want.boxes) and all(
        np.allclose(a.as_list(), b.as_list(), atol=1e-5) for a, b in zip(got.boxes, want.boxes)
    )


def test_find_evidence_segment_drag_repropagate(scene, sample_volume, kidney_case, micro_sam2, runner):
    """Query -> Find evidence -> ROIs -> Segment -> user drags an ROI -> one re-propagation, all on real models
    (the answering tiny Qwen, the micro SAM2 through the MedSAM2 propagator) and a real MRML scene."""
    from MedVolR1Lib.anchor import box_ras_bounds, parse_answer
    from MedVolR1Lib.views import ViewGeometry

    fixture_volume, kidney, answer, model = kidney_case
    node = _small_ct_node(scene, sample_volume, *FLOW_SLICES)
    volume = mm.volume_from_node(node)
    assert volume.fingerprint == fixture_volume.fingerprint  # premise: the prompt the model was taught
    session = EvidenceSession(scene, _factory(model, micro_sam2), runner=runner)
    settings = PanelSettings()
    parsed = parse_answer(answer)
    expected = ViewGeometry.for_volume(volume, 112).anchor_from_answer(parsed, volume.num_slices)

    # 1. Find evidence: the reasoning surfaces, one ROI per box on the key slice, exactly the answer's boxes.
    before = set(mm.node_ids(scene))
    session.start_find_evidence(node, FLOW_QUERY, settings)
    found = session.wait(timeout=300)
    assert found.status == "ok", found.message
    assert found.reasoning == "left kidney" and found.raw_text == answer
    assert found.anchor == expected and found.anchor.slice_index == parsed.slice_index
    assert session.grounding.raw_text == answer and session.grounding.slices == (0, 5, 10, 15)
    rois = mm.evidence_rois(scene, node)
    assert rois == found.rois and [r.GetName() for r in rois] == [f"Evidence {n + 1}" for n in range(len(expected.boxes))]
    assert set(mm.node_ids(scene)) - before == {r.GetID() for r in rois} | {r.GetDisplayNode().GetID() for r in rois}
    for roi, box in zip(rois, expected.boxes):
        lo, hi = box_ras_bounds(volume.ijk_to_ras, expected.slice_index, box)
        bounds = [0.0] * 6
        roi.GetRASBounds(bounds)
        np.testing.assert_allclose(bounds, [lo[0], hi[0], lo[1], hi[1], lo[2], hi[2]], atol=1e-4)
    # The box covers the kidney on the key slice (voxel -> answer pixels -> voxel lost nothing).
    jj, ii = np.nonzero(kidney[expected.slice_index])
    i0, j0, i1, j1 = expected.boxes[0].voxel_range(volume.shape[1:])
    assert i0 <= ii.min() and ii.max() <= i1 and j0 <= jj.min() and jj.max() <= j1
    # Where the panel jumps: the key slice's plane, on an axial slice view.
    assert round(float(volume.ijk_from_ras(found.key_ras)[2]), 6) == expected.slice_index
    view_scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(view_scene)
    red = view_scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    red.SetOrientationToAxial()
    mm.jump_slice_node(red, found.key_ras)
    assert red.GetSliceOffset() == pytest.approx(volume.ras_from_ijk([0, 0, expected.slice_index])[2], abs=1e-4)

    # 2. Segment (from the ROIs on screen): a segment named after the target, voxel for voxel the pipeline's mask.
    vlm_runs = session.worker_stats()["grounder_runs"]
    timer = ManualTimer()
    watcher = RoiEditWatcher(session.on_roi_edited, timer)
    watcher.watch(found.rois)  # as the panel does after each outcome
    session.start_segment(node, FLOW_QUERY, settings)
    segmented = session.wait(timeout=300)
    assert segmented.status == "ok", segmented.message
    assert _same_anchor(segmented.anchor, expected) and mm.evidence_rois(scene, node) == rois  # ROIs round-tripped (to 1e-6 voxel)
    segmentation = session.segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1 and segmentation.GetSegment(segmented.segment_id).GetName() == "left kidney"
    exported = mm.segment_array(scene, session.segmentation_node, segmented.segment_id, node)
    assert int(exported.sum()) == segmented.voxels == session.result.voxel_count
    np.testing.assert_array_equal(exported, volume.to_source_array(session.result.mask))
    assert timer.starts == 0  # re-placing the ROIs from the result is not a user edit
    encoded = session.worker_stats()["encoded_slices"]
    assert encoded >= volume.num_slices

    # 3. The user drags Evidence 1 one slice up: one debounced request, one re-propagation, no re-encoding, no VLM.
    center, _ = mm.roi_center_size(rois[0])
    rois[0].SetCenter(center[0], center[1], center[2] + volume.spacing[2])
    rois[0].InvokeEvent(rois[0].PointEndInteractionEvent)
    assert session.reprop_requests == 0
    timer.fire()
    assert session.reprop_requests == 1 and session.busy
    moved = session.wait(timeout=300)
    assert moved.status == "ok", moved.message
    assert moved.anchor.slice_index == expected.slice_index + 1 and _same_anchor(moved.anchor, expected, slice_shift=1)
    stats = session.worker_stats()
    assert stats["grounder_runs"] == vlm_runs  # neither Segment-from-ROIs nor the re-propagation asked the VLM again
    assert stats["encoded_slices"] == encoded  # cached features reused
    assert segmentation.GetNumberOfSegments() == 1
    np.testing.assert_array_equal(
        mm.segment_array(scene, session.segmentation_node, moved.segment_id, node), volume.to_source_array(session.result.mask)
    )
    timer.fire()
    assert timer.starts == 1 and session.reprop_requests == 1 and not session.busy  # our own ROI update did not re-trigger
    watcher.clear()
    mm.remove_nodes(scene, mm.evidence_rois(scene, node) + [session.segmentation_node.GetDisplayNode(), session.segmentation_node, node])


# ------------------------------------------------- Slicer's GIL: the worker runs at full speed while the GUI idles

def _session_polls(session, start, hold_gil: bool):
    start()
    outcomes = []
    polls = polls_until_done(lambda: bool(outcomes.append(session.poll()) or outcomes[-1] is not None), hold_gil)
    assert outcomes[-1] is not None and outcomes[-1].status == "ok", outcomes[-1] and outcomes[-1].message
    return polls


def test_the_harness_starves_a_python_thread_as_slicer_does():
    """Premise of the next test: with the GIL held between polls, a Python worker thread crawls.

    Counts the work a spinning thread gets done during the same number of polls, idle vs GIL held (work per
    poll, not seconds: on a loaded machine both shrink alike).  Measured here: about 20x less when held on an
    otherwise idle machine, 3-4x under a load of 15 on 2 cores; the assertion asks for 2x.
    """
    import threading

    counter, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        work = {}
        for held in (False, True, False):
            start = counter[0]
            polls_until_done(lambda: False, held=held, limit=5)
            work[held] = work.get(held, 0) + (counter[0] - start) / (2 if not held else 1)
    finally:
        stop.set()
        thread.join(10)
    assert work[True] * 2 < work[False], work


def test_find_evidence_and_segment_take_as_many_polls_with_the_gil_held(scene, sample_volume, kidney_case, micro_sam2, runner):
    """The issue's blocker: Slicer's main thread never releases the GIL while Qt idles.  With the model work in
    the worker process, Find evidence and Segment finish in about the same number of 100 ms polls either way."""
    _fixture_volume, _kidney, _answer, model = kidney_case
    node = _small_ct_node(scene, sample_volume, *FLOW_SLICES)
    session = EvidenceSession(scene, _factory(model, micro_sam2), runner=runner)
    settings = PanelSettings()

    def find():
        mm.remove_nodes(scene, mm.evidence_rois(scene, node))
        session.start_find_evidence(node, FLOW_QUERY, settings)

    def segment():  # no ROIs on screen: query -> VLM -> propagation, the longest path
        mm.remove_nodes(scene, mm.evidence_rois(scene, node))
        session.start_segment(node, FLOW_QUERY, settings)

    _session_polls(session, segment, hold_gil=False)  # warm-up: the worker loads the models once
    polls = {(step.__name__, hold): 0 for step in (find, segment) for hold in (False, True)}
    for _round in range(2):
        for step in (find, segment):
            for hold in (True, False):
                polls[step.__name__, hold] += _session_polls(session, step, hold)
    for step in ("find", "segment"):
        idle, held = polls[step, False], polls[step, True]
        assert held < 2 * idle + 2, polls  # the thread-based job needed ~40x more polls in the measurement
    mm.remove_nodes(scene, mm.evidence_rois(scene, node) + [session.segmentation_node.GetDisplayNode(), session.segmentation_node, node])


# ------------------------------------------------------------------------- a killed worker: scene unchanged, next run works


def test_killing_the_worker_mid_run_leaves_the_scene_and_the_next_run_works(scene, sample_volume, micro_sam2, runner):
    import os
    import signal

    node = _small_ct_node(scene, sample_volume)
    session = EvidenceSession(scene, _factory(None, micro_sam2), runner=runner)
    volume = mm.volume_from_node(node)
    mm.place_evidence_rois(scene, node, volume, EvidenceAnchor(8, (VoxelBox.from_voxels(70, 41, 88, 60),)))
    before = mm.node_ids(scene)
    client = runner.client(PanelSettings())
    session.start_segment(node, "left kidney", PanelSettings())
    while session.progress().message == "starting":  # the worker has the request and is working on it
        time.sleep(0.02)
    os.kill(client.pid, signal.SIGKILL)  # as a crash or the OOM killer would
    outcome = session.wait(timeout=60)
    assert outcome.status == "failed" and "worker stopped unexpectedly" in outcome.message, outcome.message
    assert outcome.error.error_class == "WorkerCrashed" and "\n" not in outcome.message
    assert mm.node_ids(scene) == before and session.segmentation_node is None and not session.busy
    starts = client.starts
    session.start_segment(node, "left kidney", PanelSettings())
    outcome = session.wait(timeout=300)
    assert outcome.status == "ok", outcome.message
    assert client.starts == starts + 1 and outcome.voxels == session.result.voxel_count
    mm.remove_nodes(scene, mm.evidence_rois(scene, node) + [session.segmentation_node.GetDisplayNode(), session.segmentation_node, node])
