"""Pipeline + output files + CLI `propagate` through the MedSAM2 path with a micro SAM2 (random weights).

Random weights check wiring, not accuracy: output geometry equals the input's (also for an LPS file),
re-propagation reuses cached features, evidence.json is complete, and outputs are all-or-nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from MedVolR1Lib import outputs
from MedVolR1Lib.anchor import EvidenceAnchor, VoxelBox
from MedVolR1Lib.errors import AnchorError, OutputsIncomplete
from MedVolR1Lib.pipeline import Pipeline, PipelineConfig, target_name_from_query
from MedVolR1Lib.readers import load_volume


@pytest.fixture(scope="module")
def crop_paths(sample_ct, tmp_path_factory):
    """A 24-slice crop of the real CT around the kidneys, stored RAS (as given) and LPS."""
    folder = tmp_path_factory.mktemp("crops")
    image = sitk.ReadImage(str(sample_ct.ct_path))
    crop = image[:, :, 70:94]
    paths = {"ras": folder / "crop_ras.nii.gz", "lps": folder / "crop_lps.nrrd"}
    sitk.WriteImage(crop, str(paths["ras"]))
    sitk.WriteImage(sitk.DICOMOrient(crop, "LPS"), str(paths["lps"]))
    return paths


def _pipeline(micro_sam2):
    path, overrides = micro_sam2
    return Pipeline(PipelineConfig(propagator="medsam2", sam_checkpoint=str(path), sam_overrides=overrides, device="cpu"))


def test_propagate_repropagate_and_outputs(micro_sam2, crop_paths, tmp_path):
    pipeline = _pipeline(micro_sam2)
    volume = load_volume(crop_paths["ras"])
    anchor = EvidenceAnchor(12, (VoxelBox(20, 40, 45, 70), VoxelBox(75, 40, 100, 70)))
    first = pipeline.propagate(volume, anchor, query="segment both kidneys")
    assert first.mask.shape == volume.shape and first.mask.dtype == np.uint8
    assert first.target_name == "both kidneys"
    encoded = pipeline.propagator.encoded_frames
    assert encoded == volume.num_slices
    edited = EvidenceAnchor(12, (VoxelBox(22, 42, 47, 72),))
    second = pipeline.repropagate(first, edited)
    assert pipeline.propagator.encoded_frames == encoded  # no re-encoding after a box edit
    assert second.anchor == edited.clipped(volume.shape) and second.target_name == first.target_name

    written = outputs.write_outputs(second, tmp_path / "out", {"propagator": pipeline.propagator.describe()})
    assert set(written) == {"mask.nii.gz", "segmentation.seg.nrrd", "statistics.csv", "evidence.json", "evidence.png"}
    record = json.loads(written["evidence.json"].read_text())
    box = record["boxes"][0]
    assert box["voxels_canonical"] == [22.0, 42.0, 47.0, 72.0]
    assert len(box["pixels"]) == 4 and len(box["ras_mm"]["min"]) == 3
    assert record["provenance"]["propagator"]["sha256"]
    assert record["provenance"]["packages"]["torch"]
    assert record["mask"]["voxels"] == int(np.count_nonzero(second.mask))
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_source_voxel_box_matches_the_files_indices(crop_paths):
    """evidence.json's source-voxel box, read back through ITK, lands on the canonical voxel."""
    for path in crop_paths.values():
        volume = load_volume(path)
        box = VoxelBox.from_voxels(30, 40, 30, 40)
        source = outputs.source_voxel_box(volume, 5, box)
        image = sitk.ReadImage(str(path))
        index = [int(round(v)) for v in source["ijk_min"]]
        assert image.GetPixel(index) == volume.array[5, 40, 30]


@pytest.mark.parametrize("variant", ["ras", "lps"])
def test_output_mask_lies_on_the_input_grid(variant, micro_sam2, crop_paths, tmp_path):
    pipeline = _pipeline(micro_sam2)
    volume = load_volume(crop_paths[variant])
    result = pipeline.propagate(volume, EvidenceAnchor(10, (VoxelBox(20, 40, 60, 80),)))
    result.mask[:] = 0
    result.mask[10, 40:80, 20:60] = 1  # a known block, to check placement exactly
    outputs.write_outputs(result, tmp_path / variant)
    written, source = sitk.ReadImage(str(tmp_path / variant / "mask.nii.gz")), sitk.ReadImage(str(crop_paths[variant]))
    assert written.GetSize() == source.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(written.GetSpacing(), source.GetSpacing(), atol=1e-6)
    # the block's physical centre is the same in RAS whichever file order it was written in
    array = sitk.GetArrayFromImage(written)
    z, y, x = np.argwhere(array > 0).mean(axis=0)
    lps = written.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z)))
    expected = volume.ras_from_ijk([39.5, 59.5, 10])
    np.testing.assert_allclose((-lps[0], -lps[1], lps[2]), expected, atol=1e-3)


def test_a_failed_output_leaves_the_others_written(micro_sam2, crop_paths, tmp_path, monkeypatch):
    pipeline = _pipeline(micro_sam2)
    volume = load_volume(crop_paths["ras"])
    result = pipeline.propagate(volume, EvidenceAnchor(10, (VoxelBox(20, 40, 60, 80),)))

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(outputs, "evidence_png", disk_full)  # fault injection after the mask was staged
    with pytest.raises(OutputsIncomplete, match=r"evidence-png \(evidence.png\) not written: No space left on device"):
        outputs.write_outputs(result, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["evidence.json", "mask.nii.gz", "segmentation.seg.nrrd", "statistics.csv"]
    record = json.loads((tmp_path / "out" / "evidence.json").read_text())
    assert record["outputs"]["failed"] == [{"format": "evidence-png", "file": "evidence.png", "reason": "No space left on device"}]
    assert "evidence.png" not in record["outputs"]["files"]


def test_bad_anchor_is_refused_before_any_work(micro_sam2, crop_paths):
    pipeline = _pipeline(micro_sam2)
    volume = load_volume(crop_paths["ras"])
    with pytest.raises(AnchorError, match="out of range"):
        pipeline.propagate(volume, EvidenceAnchor(99, (VoxelBox(1, 1, 5, 5),)))
    with pytest.raises(AnchorError, match="no boxes"):
        pipeline.propagate(volume, EvidenceAnchor(3, ()))
    assert pipeline._propagator is None  # nothing was loaded for a refused anchor


def test_cli_propagate_writes_outputs(micro_sam2, crop_paths, tmp_path):
    path, overrides = micro_sam2
    command = [sys.executable, "-m", "MedVolR1Lib.cli", "propagate", "--volume", str(crop_paths["lps"]), "--slice", "12",
               "--box", "100,150,200,260", "--propagator", "medsam2", "--sam-checkpoint", str(path), "--device", "cpu",
               "--out", str(tmp_path / "cli")]
    for override in overrides:
        command += ["--sam-override", override]
    out = subprocess.run(command, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert summary["key_slice"] == 12
    assert (tmp_path / "cli" / "evidence.png").exists()


def test_cli_missing_checkpoint_and_cuda(tmp_path, crop_paths):
    base = [sys.executable, "-m", "MedVolR1Lib.cli", "propagate", "--volume", str(crop_paths["ras"]), "--slice", "3",
            "--box", "100,150,200,260", "--out", str(tmp_path / "x")]
    missing = subprocess.run(base + ["--propagator", "medsam2"], capture_output=True, text=True)
    assert missing.returncode == 2 and "huggingface.co/wanglab/MedSAM2" in missing.stderr
    import torch

    if not torch.cuda.is_available():
        cuda = subprocess.run(base + ["--propagator", "litemedsam", "--device", "cuda"], capture_output=True, text=True)
        assert cuda.returncode == 2 and "CUDA" in cuda.stderr and "Traceback" not in cuda.stderr


def test_target_names_from_queries():
    assert target_name_from_query("Segment the liver.") == "liver"
    assert target_name_from_query("Which organ stores bile?") == "Which organ stores bile"
    assert target_name_from_query(None) == "target"
