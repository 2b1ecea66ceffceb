"""Bad inputs get one clear line and no output: NaN/Inf voxels, boxes outside the image or the scan,
constant images, scans too big for memory, oblique grids.  Model boxes are still clipped, and that is recorded.

Each scan is a 24-slice crop of the real sample CT, altered the one way under test; the CLI runs in-process.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from MedVolR1Lib import cli
from MedVolR1Lib.anchor import EvidenceAnchor, ParsedAnswer, VoxelBox
from MedVolR1Lib.errors import AnchorError, VolumeError
from MedVolR1Lib.grounder import GroundingResult
from MedVolR1Lib.pipeline import Pipeline, SegmentationResult
from MedVolR1Lib.readers import AVAILABLE_MEMORY_ENV, estimate_load, load_volume
from MedVolR1Lib.user_input import require_inside_volume
from MedVolR1Lib.views import ViewGeometry
from MedVolR1Lib.volume import Volume, oblique_angle_deg

BOX = "150,150,260,260"  # inside the 448x448 view and inside the scan


@pytest.fixture(scope="module")
def crop(sample_ct):
    """float32 crop (122 x 101 x 24 voxels, 3 mm, LPS direction as stored)."""
    return sitk.Cast(sitk.ReadImage(str(sample_ct.ct_path))[:, :, 70:94], sitk.sitkFloat32)


@pytest.fixture(scope="module")
def micro_flags(micro_sam2):
    path, overrides = micro_sam2
    return ["--propagator", "medsam2", "--sam-checkpoint", str(path), "--device", "cpu",
            *[a for o in overrides for a in ("--sam-override", o)]]


def _write(image, path):
    sitk.WriteImage(image, str(path))
    return path


def _with_array(crop, array):
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.CopyInformation(crop)
    return image


def _propagate(scan, out, capsys, *extra):
    code = cli.main(["propagate", "--volume", str(scan), "--slice", "12", "--box", BOX, "--out", str(out),
                     "--propagator", "litemedsam", "--device", "cpu", *extra])
    return code, capsys.readouterr().err.strip()


def _nothing_written(out) -> bool:
    return not out.exists() or not any(out.iterdir())


def test_nonfinite_voxels_are_refused_with_their_count(crop, tmp_path, capsys):
    array = sitk.GetArrayFromImage(crop)
    array[12, 40, 50:57] = np.nan
    array[3, 10, 10:13] = np.inf
    scan = _write(_with_array(crop, array), tmp_path / "nan.nii.gz")
    code, err = _propagate(scan, tmp_path / "out", capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "10 voxels are not finite (7 NaN, 3 infinite)" in err and "--fill-nonfinite" in err
    assert _nothing_written(tmp_path / "out")


def test_fill_nonfinite_proceeds_and_records_it(crop, tmp_path, capsys, micro_flags):
    array = sitk.GetArrayFromImage(crop)
    array[12, 40, 50:55] = np.nan
    scan = _write(_with_array(crop, array), tmp_path / "nan.nii.gz")
    code = cli.main(["propagate", "--volume", str(scan), "--slice", "12", "--box", BOX, "--out", str(tmp_path / "out"),
                     "--fill-nonfinite", *micro_flags])
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "out" / "evidence.json").read_text())
    filled = record["provenance"]["input_adjustments"]["nonfinite_filled"]
    assert filled["count"] == 5 and filled["nan"] == 5 and filled["value"] == float(np.nanmin(array))


@pytest.mark.parametrize(
    "box, units, message",
    [
        ("10,10,900,900", "pixels", r"box 1 \(10,10,900,900\) reaches outside the 448x448 rendered image"),
        ("150,10,260,60", "pixels", r"reaches outside the scan, which fills pixels 0,38.*of the 448x448 rendered image"),
        ("100,10,130,20", "voxels", r"reaches outside the 122x101-voxel slice"),
    ],
)
def test_user_box_outside_the_image_or_scan_is_refused(crop, tmp_path, capsys, box, units, message):
    scan = _write(crop, tmp_path / "ct.nii.gz")
    code = cli.main(["propagate", "--volume", str(scan), "--slice", "12", "--box", box, "--box-units", units,
                     "--out", str(tmp_path / "out"), "--propagator", "litemedsam", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert _nothing_written(tmp_path / "out")


def test_slicer_roi_boxes_are_checked_strictly(sample_volume):
    """The library check the Slicer panel calls on the anchor its ROIs give (no clipping of user input)."""
    k, rows, cols = sample_volume.shape[0] // 2, sample_volume.shape[1], sample_volume.shape[2]
    inside = EvidenceAnchor(k, (VoxelBox(10, 10, 30, 30),))
    assert require_inside_volume(inside, sample_volume.shape).primary == inside
    half_off = EvidenceAnchor(k, (VoxelBox(10, 10, 30, 30), VoxelBox(-5.0, 10, 15, 30)))
    with pytest.raises(AnchorError, match=f"box 2 on slice {k} .* reaches outside the {cols}x{rows}-voxel slice"):
        require_inside_volume(half_off, sample_volume.shape)


def test_model_boxes_are_clipped_and_the_clipping_recorded(sample_volume, tmp_path):
    geometry = ViewGeometry.for_volume(sample_volume, 448)
    answer = ParsedAnswer(60, ((10.0, 10.0, 900.0, 900.0), (150.0, 150.0, 200.0, 200.0)))
    anchor = geometry.anchor_from_answer(answer, sample_volume.num_slices)  # clipped, as before
    assert anchor.boxes[0].i1 == sample_volume.shape[2]
    grounding = GroundingResult(anchor=anchor, answer=answer, reasoning="", raw_text="", query="q", slices=(60,),
                                pixel_boxes=geometry.pixel_boxes(anchor), geometry=geometry, window=None)
    mask = np.zeros(sample_volume.shape, np.uint8)
    mask[60, 40:50, 40:50] = 1
    result = SegmentationResult(sample_volume, anchor, mask, query="q", grounding=grounding)
    cli._finish(result, SimpleNamespace(out=str(tmp_path / "out"), image_size=448, formats=None), Pipeline().describe(), None)
    record = json.loads((tmp_path / "out" / "evidence.json").read_text())
    clipped = record["provenance"]["input_adjustments"]["model_boxes_clipped"]
    assert [c["box"] for c in clipped] == [1]  # box 2 lay inside: not listed
    assert record["shown_slices"] == [60]  # the slices the model saw, from the grounding result
    assert clipped[0]["model_pixels"] == [10.0, 10.0, 900.0, 900.0] and clipped[0]["clipped_pixels"][2] <= 448


def test_constant_image_is_refused(crop, tmp_path, capsys):
    scan = _write(_with_array(crop, np.full(sitk.GetArrayFromImage(crop).shape, -1000.0)), tmp_path / "blank.nii.gz")
    code, err = _propagate(scan, tmp_path / "out", capsys)
    assert code == 2 and "every voxel has the value -1000" in err and "constant image" in err
    assert _nothing_written(tmp_path / "out")


def test_scan_too_big_for_memory_is_refused_from_its_header(crop, tmp_path, capsys, monkeypatch):
    scan = _write(crop, tmp_path / "ct.nrrd")
    estimate = estimate_load(scan)
    assert estimate.shape_xyz == (122, 101, 24) and estimate.bytes == 122 * 101 * 24 * (4 + 4)
    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, "1MB")
    code, err = _propagate(scan, tmp_path / "out", capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "loading needs about 0.00 GB (122x101x24 voxels" in err and "only 0.00 GB is available" in err
    assert _nothing_written(tmp_path / "out")
    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, str(estimate.bytes))
    assert load_volume(scan).shape == (24, 101, 122)  # exactly enough is enough


def test_oblique_scan_is_refused_with_its_angle(crop, tmp_path, capsys):
    tilted = sitk.Image(crop)
    angle = np.radians(10.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    tilted.SetDirection(tuple((rotation @ np.asarray(crop.GetDirection()).reshape(3, 3)).ravel()))
    scan = _write(tilted, tmp_path / "oblique.nii.gz")
    code, err = _propagate(scan, tmp_path / "out", capsys)
    assert code == 2 and "oblique" in err and "10.00 degrees" in err
    assert _nothing_written(tmp_path / "out")
    # direction-cosine noise is not obliquity
    noisy = sitk.Image(crop)
    noisy.SetDirection(tuple(np.asarray(crop.GetDirection()) + np.array([0, 1e-6, 0, -1e-6, 0, 0, 0, 0, 0])))
    assert load_volume(_write(noisy, tmp_path / "noisy.nii.gz")).shape == (24, 101, 122)
    with pytest.raises(VolumeError, match="oblique"):
        load_volume(scan)
    assert oblique_angle_deg(np.diag([3.0, 3.0, 3.0, 1.0])) == 0.0


def test_pipeline_refuses_unusable_volumes_before_any_model(sample_volume):
    """Volumes built in memory (Slicer nodes, training code) meet the same checks in the pipeline."""
    pipeline = Pipeline()
    anchor = EvidenceAnchor(60, (VoxelBox(40, 40, 60, 60),))
    array = sample_volume.array.copy()
    array[60, 50, 50] = np.nan
    with pytest.raises(VolumeError, match="1 voxels are not finite"):
        pipeline.propagate(Volume(array=array, ijk_to_ras=sample_volume.ijk_to_ras), anchor)
    with pytest.raises(VolumeError, match="constant image"):
        pipeline.propagate(Volume(array=np.zeros_like(array), ijk_to_ras=sample_volume.ijk_to_ras), anchor)
    assert pipeline._propagator is None
