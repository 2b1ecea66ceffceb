"""Clinical output formats on the real sample CT: DICOM SEG, Slicer .seg.nrrd, statistics, --formats.

The DICOM input is a 24-slice crop of the sample CT written as a series by GDCM (Testing/dicom_series.py).
The tests about writing use the reference right kidney as the result (no propagation); one CLI run with
a micro SAM2 checks `--formats` end to end.  Every file is read back with independent readers (highdicom,
pydicom, SimpleITK, slicerio, dciodvfy) and compared voxel for voxel with the NIfTI mask.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_series import seg_frames_on_grid as _frames_on_grid, write_dicom_series
from MedVolR1Lib import cli, outputs
from MedVolR1Lib.anchor import EvidenceAnchor
from MedVolR1Lib.hashing import file_sha256
from MedVolR1Lib.pipeline import SegmentationResult, target_name_from_query
from MedVolR1Lib.segment_codes import term_for_target
from MedVolR1Lib.targets import profile_labels
from MedVolR1Lib.readers import load_label_map, load_volume

Z0, Z1 = 60, 84  # the right kidney (label 2) spans slices 66-101: some crop slices hold no kidney
KIDNEY_RIGHT = 2


@pytest.fixture(scope="module")
def dicom_case(sample_ct, tmp_path_factory):
    """The crop as a DICOM series (int16, the file's own LPS-flipped geometry) and its right-kidney labels."""
    root = tmp_path_factory.mktemp("dicom_case")
    ct = sitk.Cast(sitk.ReadImage(str(sample_ct.ct_path))[:, :, Z0:Z1], sitk.sitkInt16)
    uids = write_dicom_series(ct, root / "series")
    labels_path = root / "labels.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(sample_ct.labels_path))[:, :, Z0:Z1], str(labels_path))
    volume = load_volume(root / "series")
    truth = load_label_map(labels_path, volume) == KIDNEY_RIGHT
    return {"root": root, "series": root / "series", "uids": uids, "volume": volume, "truth": truth, "ct": ct}


def _reference_result(volume, truth: np.ndarray, query: str) -> SegmentationResult:
    """The reference mask as a result, anchored on its max-area slice with its GT boxes."""
    truth = truth.astype(np.uint8)
    profile = profile_labels(truth, [[1]], "kidney_right")
    k = profile.key_slice
    return SegmentationResult(volume, EvidenceAnchor(k, tuple(profile.boxes(k))), truth, query=query,
                              target_name=target_name_from_query(query))


@pytest.fixture(scope="module")
def written_case(dicom_case):
    """Default outputs for the DICOM input, written from the reference right kidney."""
    out = dicom_case["root"] / "out"
    result = _reference_result(dicom_case["volume"], dicom_case["truth"], "segment the right kidney")
    outputs.write_outputs(result, out, {"propagator": {"name": "reference-labels", "sha256": "0" * 64}})
    record = json.loads((out / "evidence.json").read_text())
    mask_image = sitk.ReadImage(str(out / "mask.nii.gz"))
    return {"out": out, "record": record, "mask_image": mask_image, "mask": sitk.GetArrayFromImage(mask_image)}


def test_default_formats_for_a_dicom_input(written_case):
    names = {p.name for p in written_case["out"].iterdir()}
    assert names == {"mask.nii.gz", "segmentation.seg.nrrd", "segmentation.dcm", "statistics.csv", "evidence.png", "evidence.json"}
    assert written_case["record"]["outputs"]["formats"] == ["nifti", "seg-nrrd", "dicom-seg"]
    hashes = written_case["record"]["outputs"]["sha256"]  # lets a batch resume check a finished row
    assert set(hashes) == names - {"evidence.json"}
    assert hashes["segmentation.dcm"] == file_sha256(written_case["out"] / "segmentation.dcm")


def test_cli_propagate_on_a_dicom_folder_writes_the_chosen_formats(dicom_case, tmp_path):
    """End to end through the CLI (micro SAM2, random weights: wiring only) with --formats."""
    import highdicom as hd
    from MedVolR1Lib.fixtures.micro_sam2 import build_micro_sam2_checkpoint

    checkpoint = tmp_path / "micro_sam2.pt"
    overrides = build_micro_sam2_checkpoint(checkpoint)
    out = tmp_path / "out"
    argv = ["propagate", "--volume", str(dicom_case["series"]), "--slice", "12", "--box-units", "voxels", "--box", "28,46,46,69",
            "--name", "right kidney", "--propagator", "medsam2", "--sam-checkpoint", str(checkpoint), "--device", "cpu",
            "--formats", "dicom-seg,nifti", "--out", str(out)]
    for override in overrides:
        argv += ["--sam-override", override]
    assert cli.main(argv) == 0
    assert {p.name for p in out.iterdir()} == {"mask.nii.gz", "segmentation.dcm", "statistics.csv", "evidence.png", "evidence.json"}
    mask_image = sitk.ReadImage(str(out / "mask.nii.gz"))
    seg = hd.seg.segread(out / "segmentation.dcm")
    np.testing.assert_array_equal(_frames_on_grid(seg, mask_image), sitk.GetArrayFromImage(mask_image))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == dicom_case["uids"]["series"]
    record = json.loads((out / "evidence.json").read_text())
    assert record["statistics"][0]["voxels"] == int(sitk.GetArrayFromImage(mask_image).astype(bool).sum())
    assert "medsam2" in seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters


def test_dicom_seg_references_the_source_series_and_overlays_it(written_case, dicom_case):
    import highdicom as hd

    path = written_case["out"] / "segmentation.dcm"
    seg = hd.seg.segread(path)
    sources = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p) for p in sorted(dicom_case["series"].iterdir()))}
    uids = dicom_case["uids"]
    assert seg.StudyInstanceUID == uids["study"] and seg.FrameOfReferenceUID == uids["frame_of_reference"]
    assert seg.PatientID == "SAMPLE-CT" and seg.SeriesInstanceUID != uids["series"]
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == uids["series"]
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == set(sources)

    # frames placed by their positions equal the NIfTI mask voxel for voxel; empty slices have no frame
    placed = _frames_on_grid(seg, written_case["mask_image"])
    np.testing.assert_array_equal(placed, written_case["mask"])
    holding = int(np.count_nonzero(written_case["mask"].reshape(written_case["mask"].shape[0], -1).any(axis=1)))
    assert 0 < int(seg.NumberOfFrames) == holding < len(sources)
    # each frame names the source instance at its own position
    for group in seg.PerFrameFunctionalGroupsSequence:
        source_uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(
            np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, float),
            np.asarray(sources[source_uid].ImagePositionPatient, float), atol=1e-3,
        )
    assert written_case["record"]["dicom_seg"]["referenced_series_instance_uid"] == uids["series"]
    assert written_case["record"]["dicom_seg"]["frames"] == holding


def test_dicom_seg_segment_codes_algorithm_and_evidence(written_case):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    seg = hd.seg.segread(written_case["out"] / "segmentation.dcm")
    assert seg.number_of_segments == 1
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "right kidney"
    kind = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (kind.CodeValue, kind.CodingSchemeDesignator) == (codes.SCT.Kidney.value, "SCT")
    assert kind.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == codes.SCT.Right.value
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == codes.cid7150.AnatomicalStructure.value
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "MedVol-R1"
    assert f"propagator_checkpoint_sha256={'0' * 64}" in algorithm.AlgorithmParameters
    assert "propagator=reference-labels" in algorithm.AlgorithmParameters
    record = written_case["record"]
    text = segment.SegmentDescription
    assert "segment the right kidney" in text and f"k={record['key_slice']['canonical_k']}" in text and "evidence.json" in text
    ras = record["boxes"][0]["ras_mm"]["min"]
    assert ", ".join(f"{v:.1f}" for v in ras) in text


def test_dicom_seg_validates_with_dciodvfy(written_case):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools; .ci/install.sh installs it where apt is available)")
    report = subprocess.run(["dciodvfy", str(written_case["out"] / "segmentation.dcm")], capture_output=True, text=True)
    lines = (report.stdout + report.stderr).splitlines()
    assert "Segmentation" in lines
    assert not [line for line in lines if line.startswith("Error")], "\n".join(lines)


def test_seg_nrrd_has_named_coded_segment_on_the_input_grid(written_case, dicom_case):
    import slicerio

    segmentation = slicerio.read_segmentation(str(written_case["out"] / "segmentation.seg.nrrd"))
    assert slicerio.segment_names(segmentation) == ["right kidney"]
    segment = segmentation["segments"][0]
    assert segment["terminology"]["type"][1] == "64033007" and segment["terminology"]["typeModifier"][2] == "Right"
    # geometry: exactly the DICOM series' grid as SimpleITK reads it (LPS), in its own voxel order
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom_case["series"])))
    series = reader.Execute()
    expected = np.eye(4)
    expected[:3, :3] = np.asarray(series.GetDirection()).reshape(3, 3) * np.asarray(series.GetSpacing())
    expected[:3, 3] = series.GetOrigin()
    np.testing.assert_allclose(segmentation["ijkToLPS"], expected, atol=1e-5)
    voxels = slicerio.extract_segments(segmentation, [("right kidney", 1)])["voxels"]
    np.testing.assert_array_equal(voxels.transpose(2, 1, 0), written_case["mask"])


def test_statistics_match_the_source_intensities(written_case, dicom_case):
    rows = list(csv.DictReader((written_case["out"] / "statistics.csv").open()))
    assert len(rows) == 1 and rows[0]["segment"] == "right kidney" and rows[0]["intensity_unit"] == "HU"
    mask = written_case["mask"] > 0
    hu = sitk.GetArrayFromImage(dicom_case["ct"]).astype(float)[mask]  # what the scanner stored, not windowed
    spacing = np.asarray(written_case["mask_image"].GetSpacing())
    assert int(rows[0]["voxels"]) == mask.sum()
    assert float(rows[0]["volume_ml"]) == pytest.approx(mask.sum() * spacing.prod() / 1000, rel=1e-4)
    assert float(rows[0]["intensity_mean"]) == pytest.approx(hu.mean(), abs=1e-2)
    assert float(rows[0]["intensity_std"]) == pytest.approx(hu.std(), abs=1e-2)
    k, j, i = np.nonzero(mask)
    size = (np.array([i.max() - i.min(), j.max() - j.min(), k.max() - k.min()]) + 1) * spacing  # axis-aligned grid
    extent = [float(rows[0][f"extent_{a}_mm"]) for a in "xyz"]
    np.testing.assert_allclose(extent, size, atol=1e-3)
    record = written_case["record"]
    assert record["statistics"][0]["voxels"] == int(mask.sum())
    assert float(rows[0]["key_slice_z_mm"]) == pytest.approx(record["key_slice"]["ras_superior_mm"], abs=1e-3)


@pytest.fixture(scope="module")
def nifti_result(dicom_case):
    """The reference right kidney as a result on a NIfTI copy of the crop (writing only, no propagation)."""
    path = dicom_case["root"] / "crop.nii.gz"
    sitk.WriteImage(dicom_case["ct"], str(path))
    return _reference_result(load_volume(path), dicom_case["truth"], "kidney_right")


def test_formats_choose_the_files_and_a_rerun_replaces_them(nifti_result, tmp_path):
    out = tmp_path / "out"
    outputs.write_outputs(nifti_result, out)  # defaults for a NIfTI input: no DICOM SEG
    assert {p.name for p in out.iterdir()} == {"mask.nii.gz", "segmentation.seg.nrrd", "statistics.csv", "evidence.png", "evidence.json"}
    outputs.write_outputs(nifti_result, out, formats=("seg-nrrd",))
    assert {p.name for p in out.iterdir()} == {"segmentation.seg.nrrd", "statistics.csv", "evidence.png", "evidence.json"}
    record = json.loads((out / "evidence.json").read_text())
    assert record["mask"]["file"] is None and record["outputs"]["formats"] == ["seg-nrrd"]
    with pytest.raises(ValueError, match="unknown output format.*png"):
        outputs.parse_formats("nifti,png")
    with pytest.raises(ValueError, match="unknown output format"):
        outputs.write_outputs(nifti_result, tmp_path / "bad", formats=("stl",))
    assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").iterdir())


def test_dicom_seg_on_request_for_a_nifti_input_uses_a_placeholder_series(nifti_result, tmp_path):
    import highdicom as hd

    written = outputs.write_outputs(nifti_result, tmp_path, formats=("nifti", "dicom-seg"))
    assert "dicom_source" in written and "segmentation.seg.nrrd" not in written
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "dicom_source")))
    series, source = reader.Execute(), sitk.ReadImage(nifti_result.volume.source.path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(series), sitk.GetArrayFromImage(source))  # HU kept exactly
    np.testing.assert_allclose(series.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(series.GetDirection(), source.GetDirection(), atol=1e-6)
    seg = hd.seg.segread(tmp_path / "segmentation.dcm")
    first = pydicom.dcmread(next((tmp_path / "dicom_source").iterdir()))
    assert seg.PatientName == "PLACEHOLDER^MEDVOLR1" and first.PatientName == seg.PatientName
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "64033007"
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "mask.nii.gz")))
    np.testing.assert_array_equal(_frames_on_grid(seg, series), mask)
    if shutil.which("dciodvfy"):
        for path in (tmp_path / "segmentation.dcm", tmp_path / "dicom_source" / "IM00001.dcm"):
            report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
            errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
            assert not errors, f"{path.name}: {errors}"


def test_segment_terms_use_pydicom_snomed_codes_and_fall_back_to_tissue():
    from pydicom.sr.codedict import codes

    left = term_for_target("left kidney")
    assert (left.type, left.modifier, left.key) == (codes.SCT.Kidney, codes.SCT.Left, "kidney_left")
    assert term_for_target("both kidneys").modifier == codes.SCT.Bilateral
    tumour = term_for_target("the liver tumour")
    assert tumour.type == codes.SCT.Tumor and tumour.anatomic_region == codes.SCT.Liver
    assert term_for_target("vertebrae_L3").type == codes.SCT.L3Vertebra
    unknown = term_for_target("the odd thing near the hilum")
    assert unknown.key is None and unknown.type == codes.SCT.Tissue and unknown.label == "the odd thing near the hilum"


def test_a_series_that_no_longer_matches_the_scan_loses_only_the_seg(dicom_case, tmp_path):
    from MedVolR1Lib.errors import OutputsIncomplete

    folder = tmp_path / "series"
    shutil.copytree(dicom_case["series"], folder)
    volume = load_volume(folder)
    (folder / "slice005.dcm").unlink()  # the folder changed after the scan was read
    result = _reference_result(volume, dicom_case["truth"], "right kidney")
    with pytest.raises(OutputsIncomplete, match=r"dicom-seg \(segmentation.dcm\) not written: .*23 instances for 24 slices") as caught:
        outputs.write_outputs(result, tmp_path / "out")
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(caught.value.written) == ["evidence.json", "evidence.png", "mask.nii.gz", "segmentation.seg.nrrd", "statistics.csv"]
    failed = json.loads((tmp_path / "out" / "evidence.json").read_text())["outputs"]["failed"]
    assert [(f["format"], f["file"]) for f in failed] == [("dicom-seg", "segmentation.dcm")] and "23 instances" in failed[0]["reason"]


def test_placeholder_series_of_a_float_mr_keeps_values_within_one_step(tmp_path):
    from MedVolR1Lib.dicom_seg import placeholder_series, write_series
    from MedVolR1Lib.volume import volume_from_array

    rng = np.random.default_rng(0)
    values = rng.normal(300.0, 80.0, size=(6, 20, 24)).astype(np.float32)
    affine = np.diag([1.2, 1.2, 4.0, 1.0])
    affine[:3, 3] = (10.0, -20.0, 30.0)
    volume = volume_from_array(values, affine, modality="MR", name="mr")
    instances = placeholder_series(volume, "float MR")
    slope = float(instances[0].RescaleSlope)
    write_series(instances, tmp_path / "mr")
    back = load_volume(tmp_path / "mr", modality="MR")
    np.testing.assert_allclose(back.array, volume.array, atol=slope / 2 + 1e-3)
    np.testing.assert_allclose(back.ijk_to_ras, volume.ijk_to_ras, atol=1e-4)
    assert instances[0].PatientID == "MEDVOLR1-PLACEHOLDER" and instances[0].Modality == "MR"
    if shutil.which("dciodvfy"):
        report = subprocess.run(["dciodvfy", str(tmp_path / "mr" / "IM00001.dcm")], capture_output=True, text=True)
        assert not [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
