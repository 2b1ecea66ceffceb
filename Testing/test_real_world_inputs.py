"""Scans as they come from outside: vendor DICOM exports, series with gaps or company, files cut short.

The acceptance cases run the real `propagate` command (LiteMedSAM, real weights, on a 12-slice crop of the
sample CT through the right kidney, written as a DICOM series by GDCM and then edited like a Siemens export;
`--z-range` keeps each run to a few slices, and the batch tests share one pipeline and its slice features).
The series checks use small synthetic series (Testing/dicom_series.py), edited with pydicom where a
scanner would differ.  pydicom's own test files are the corpus of odd real-world DICOM.
"""

from __future__ import annotations

import collections
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_series import seg_frames_on_grid, vendorise, write_dicom_series
from MedVolR1Lib import cli, outputs
from MedVolR1Lib.dicom_input import read_folder
from MedVolR1Lib.errors import MedVolR1Error, OutputsIncomplete, VolumeError
from MedVolR1Lib.readers import load_volume

Z0, Z1 = 64, 76  # crop of the sample CT through the right kidney (it spans slices 66-101)
KIDNEY_ANCHOR = ["--slice", "8", "--box-units", "voxels", "--box", "28,46,46,69"]  # crop slice 8 = sample slice 72
SECOND_ROOT = "1.2.826.0.1.3680043.2.1125.77"


@pytest.fixture(scope="module")
def crop_image(sample_ct) -> sitk.Image:
    return sitk.Cast(sitk.ReadImage(str(sample_ct.ct_path))[:, :, Z0:Z1], sitk.sitkInt16)


@pytest.fixture(scope="module")
def vendor_series(crop_image, tmp_path_factory):
    """The crop as a Siemens-like export: empty SOP Class UID (valid file meta) and private tags."""
    folder = tmp_path_factory.mktemp("vendor") / "series"
    uids = write_dicom_series(crop_image, folder, description="Abdomen 3.0 Br40")
    vendorise(folder)
    return folder, uids


@pytest.fixture(scope="module")
def litemedsam_pipeline():
    """One pipeline for the batch tests: its slice features of a scan serve every later run on that scan."""
    from MedVolR1Lib.pipeline import Pipeline, PipelineConfig

    return Pipeline(PipelineConfig(propagator="litemedsam", device="cpu"))


def _propagate(volume_folder: Path, out: Path, *extra: str, z_range: str = "5:11") -> int:
    return cli.main(["propagate", "--volume", str(volume_folder), *KIDNEY_ANCHOR, "--name", "right kidney", "--z-range", z_range,
                     "--propagator", "litemedsam", "--device", "cpu", "--out", str(out), *extra])


def test_vendor_series_with_empty_sop_class_writes_every_default_output(vendor_series, tmp_path):
    import highdicom as hd

    folder, uids = vendor_series
    assert pydicom.dcmread(next(folder.iterdir())).SOPClassUID == ""  # the case that used to end in KeyError: ''
    out = tmp_path / "out"
    assert _propagate(folder, out) == 0
    assert {p.name for p in out.iterdir()} == {"mask.nii.gz", "segmentation.seg.nrrd", "segmentation.dcm", "statistics.csv",
                                               "evidence.png", "evidence.json"}
    seg = hd.seg.segread(out / "segmentation.dcm")
    sources = {ds.file_meta.MediaStorageSOPInstanceUID: ds for ds in (pydicom.dcmread(p) for p in folder.iterdir())}
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == uids["series"] and seg.StudyInstanceUID == uids["study"]
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == set(sources)
    assert {item.ReferencedSOPClassUID for item in referenced.ReferencedInstanceSequence} == {pydicom.uid.CTImageStorage}
    mask_image = sitk.ReadImage(str(out / "mask.nii.gz"))
    mask = sitk.GetArrayFromImage(mask_image)
    assert mask.sum() > 300  # a real kidney, not an empty mask that would match trivially
    np.testing.assert_array_equal(seg_frames_on_grid(seg, mask_image), mask)
    record = json.loads((out / "evidence.json").read_text())
    assert record["scan"]["dicom_series"]["series_instance_uid"] == uids["series"]
    assert record["scan"]["dicom_series"]["study_instance_uid"] == uids["study"]
    assert record["scan"]["dicom_series"]["series_description"] == "Abdomen 3.0 Br40"
    assert record["outputs"]["failed"] == []


def test_a_failing_seg_writer_leaves_the_other_outputs_and_exits_3(vendor_series, tmp_path, monkeypatch, capsys):
    from MedVolR1Lib import dicom_seg

    def broken(*args, **kwargs):
        raise KeyError("")  # what highdicom raised on the empty SOP Class UID

    monkeypatch.setattr(dicom_seg, "build_segmentation", broken)
    out = tmp_path / "out"
    assert _propagate(vendor_series[0], out, z_range="7:9") == cli.OUTPUT_MISSING == 3
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "medvolr1 propagate" in line]
    assert len(error_lines) == 1
    assert "output missing: dicom-seg (segmentation.dcm) not written: KeyError: ''" in error_lines[0]
    assert "mask.nii.gz" in error_lines[0]  # and it says what was written
    assert {p.name for p in out.iterdir()} == {"mask.nii.gz", "segmentation.seg.nrrd", "statistics.csv", "evidence.png", "evidence.json"}
    record = json.loads((out / "evidence.json").read_text())
    assert record["outputs"]["failed"] == [{"format": "dicom-seg", "file": "segmentation.dcm", "reason": "KeyError: ''"}]
    assert record["statistics"][0]["voxels"] == int(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "mask.nii.gz"))).sum()) > 0


def test_batch_records_a_missing_output_and_redoes_the_row(vendor_series, litemedsam_pipeline, tmp_path, monkeypatch):
    from MedVolR1Lib import dicom_seg
    from MedVolR1Lib.batch import read_failures, run_batch

    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f'name,scan,anchor,box_units,target\nkidney,{vendor_series[0]},"8:28,46,46,69",voxels,right kidney\n')
    pipeline = litemedsam_pipeline
    original = dicom_seg.build_segmentation
    monkeypatch.setattr(dicom_seg, "build_segmentation", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk quota")))
    summary = run_batch(manifest, tmp_path / "out", pipeline=pipeline, show_progress=False)
    assert summary.written == 0 and len(summary.failures) == 1
    failures = read_failures(tmp_path / "out")
    assert failures[0]["name"] == "kidney" and "dicom-seg (segmentation.dcm) not written: RuntimeError: disk quota" in failures[0]["error"]
    assert (tmp_path / "out" / "kidney" / "mask.nii.gz").is_file()  # the result is kept
    monkeypatch.setattr(dicom_seg, "build_segmentation", original)
    again = run_batch(manifest, tmp_path / "out", pipeline=pipeline, show_progress=False)
    assert again.written == 1 and again.skipped == 0 and not again.failures  # the row with a missing output is redone
    assert (tmp_path / "out" / "kidney" / "segmentation.dcm").is_file() and read_failures(tmp_path / "out") == []


# --- two series in one folder ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_series(crop_image, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two") / "study"
    first = write_dicom_series(crop_image, folder, description="Abdomen 3.0 Br40")
    second = write_dicom_series(crop_image[:, :, 2:10], folder, uid_root=SECOND_ROOT, prefix="thin",
                                description="Abdomen subset", study_uid=first["study"])
    return folder, first, second


def test_two_series_are_refused_with_a_list_of_them(two_series):
    folder, first, second = two_series
    with pytest.raises(VolumeError) as caught:
        load_volume(folder)
    message = str(caught.value)
    assert "\n" not in message and "holds 2 series; choose one with --series UID" in message
    assert f'{first["series"]} "Abdomen 3.0 Br40" (12 instances)' in message
    assert f'{second["series"]} "Abdomen subset" (8 instances)' in message


def test_series_option_chooses_one_and_evidence_names_it(two_series, tmp_path):
    folder, _, second = two_series
    out = tmp_path / "out"
    assert _propagate(folder, out, "--series", second["series"], "--slice", "6", z_range="5:7") == 0  # crop slice 8 is 6 here
    record = json.loads((out / "evidence.json").read_text())
    assert record["scan"]["shape_kji"][0] == 8
    chosen = record["scan"]["dicom_series"]
    assert chosen["series_instance_uid"] == second["series"] and chosen["series_description"] == "Abdomen subset"
    assert chosen["other_series_in_folder"] == 1 and chosen["instances_used"] == 8
    assert record["dicom_seg"]["referenced_series_instance_uid"] == second["series"]
    with pytest.raises(VolumeError, match="no series with UID 1.2.3"):
        load_volume(folder, series_uid="1.2.3")


def test_batch_series_column(two_series, litemedsam_pipeline, tmp_path):
    from MedVolR1Lib.batch import read_failures, read_manifest, run_batch

    folder, first, second = two_series
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("name,scan,anchor,box_units,series\n"
                        f'subset,{folder},"6:28,46,46,69",voxels,{second["series"]}\n'
                        f'unchosen,{folder},"8:28,46,46,69",voxels,\n')
    assert [row.series for row in read_manifest(manifest)] == [second["series"], ""]
    summary = run_batch(manifest, tmp_path / "out", pipeline=litemedsam_pipeline, show_progress=False)
    assert summary.written == 1
    record = json.loads((tmp_path / "out" / "subset" / "evidence.json").read_text())
    assert record["scan"]["dicom_series"]["series_instance_uid"] == second["series"]
    (failure,) = read_failures(tmp_path / "out")
    assert failure["name"] == "unchosen" and "holds 2 series" in failure["error"] and first["series"] in failure["error"]


# --- series checks on small synthetic series ---------------------------------------------------------------

def _small_series(folder: Path, slices: int = 8) -> dict:
    rng = np.random.default_rng(7)
    image = sitk.GetImageFromArray(rng.integers(-200, 200, (slices, 16, 20)).astype(np.int16))
    image.SetSpacing((0.8, 0.8, 2.0))
    image.SetOrigin((10.0, -20.0, 30.0))
    return write_dicom_series(image, folder, description="small")


def _edit(path: Path, **values) -> None:
    ds = pydicom.dcmread(path)
    for key, value in values.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=False)


def test_a_clean_series_loads_with_its_spacing(tmp_path):
    _small_series(tmp_path)
    volume = load_volume(tmp_path)
    assert volume.shape == (8, 16, 20) and np.allclose(volume.spacing, (0.8, 0.8, 2.0))
    assert volume.dicom_series.statements == () and volume.dicom_series.slice_spacing_mm == pytest.approx(2.0)


def test_a_missing_instance_is_refused_naming_the_gap(tmp_path):
    uids = _small_series(tmp_path)
    (tmp_path / "slice003.dcm").unlink()  # what SimpleITK alone reads as 7 slices of 2.33 mm
    with pytest.raises(VolumeError) as caught:
        load_volume(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and uids["series"] in message
    assert "1 instance(s) missing, a gap of 4.00 mm between instance 3 (slice002.dcm) at 34.00 mm and instance 5 (slice004.dcm) at 38.00 mm" in message
    assert "spacing is 2.00 mm" in message


@pytest.mark.parametrize("case, edit, expected", [
    ("uneven", lambda f: _edit(f / "slice004.dcm", ImagePositionPatient=[10.0, -20.0, 38.7]), "uneven slice spacing, 2.70 mm between instance 4 (slice003.dcm) at 36.00 mm and instance 5"),
    ("duplicate", lambda f: _edit(f / "slice004.dcm", ImagePositionPatient=[10.0, -20.0, 36.0]), "two instances at the same position"),
    ("tilt", lambda f: [_edit(f / f"slice{z:03d}.dcm", ImagePositionPatient=[10.0, -20.0 + 0.9 * z, 30.0 + 2.0 * z], GantryDetectorTilt=24.2)
                        for z in range(8)], "tilted gantry (or sheared stack): each slice shifts 0.90 mm within its plane (24.2 degrees)"),
    ("orientation", lambda f: _edit(f / "slice005.dcm", ImageOrientationPatient=[0.9962, 0.0872, 0, -0.0872, 0.9962, 0]),
     "the orientation varies: instance 1 (slice000.dcm) has [1,0,0,0,1,0], instance 6 (slice005.dcm) has [0.9962,0.0872,0,-0.0872,0.9962,0]"),
    ("size", lambda f: _edit(f / "slice002.dcm", Rows=8, Columns=8, PixelData=bytes(8 * 8 * 2)),
     "the image size varies: instance 1 (slice000.dcm) has 20x16, instance 3 (slice002.dcm) has 8x8"),
    ("pixel spacing", lambda f: _edit(f / "slice006.dcm", PixelSpacing=[0.7, 0.7]), "the pixel spacing varies"),
])
def test_series_problems_are_refused_in_one_line_naming_where(tmp_path, case, edit, expected):
    uids = _small_series(tmp_path)
    edit(tmp_path)
    with pytest.raises(VolumeError) as caught:
        load_volume(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and uids["series"] in message and expected in message, message


def test_a_localizer_mixed_in_is_left_out_with_a_statement(tmp_path, capsys):
    uids = _small_series(tmp_path)
    shutil.copy(tmp_path / "slice000.dcm", tmp_path / "scout.dcm")
    _edit(tmp_path / "scout.dcm", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], ImageOrientationPatient=[0, 1, 0, 0, 0, -1],
          InstanceNumber=99, SOPInstanceUID=uids["series"] + ".99")
    volume = cli._load(str(tmp_path))
    assert volume.shape == (8, 16, 20)
    record = volume.dicom_series.to_record()
    assert record["instances_left_out"] == ["scout.dcm"]
    assert record["regularised"] == ["left out 1 localizer image(s) mixed into the series: instance 99 (scout.dcm)"]
    assert "note: left out 1 localizer image(s)" in capsys.readouterr().err


def test_uneven_spacing_check_tolerates_rounded_positions(tmp_path):
    _small_series(tmp_path)
    _edit(tmp_path / "slice004.dcm", ImagePositionPatient=[10.0, -20.0, 38.004])  # 3 decimals, as many exports write
    assert load_volume(tmp_path).shape == (8, 16, 20)


# --- files cut short -----------------------------------------------------------------------------------------

def _random_image() -> sitk.Image:
    rng = np.random.default_rng(3)  # random voxels: compression cannot hide a cut in long runs of zeros
    image = sitk.GetImageFromArray(rng.integers(-1000, 1000, (30, 40, 40)).astype(np.int16))
    image.SetSpacing((1.0, 1.0, 2.5))
    return image


def test_a_truncated_nii_gz_is_refused_with_byte_counts(tmp_path):
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(_random_image(), str(path), useCompression=True)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) * 6 // 10])
    sitk.ReadImage(str(path))  # SimpleITK itself reads it without a word (the missing part becomes zeros)
    with pytest.raises(VolumeError) as caught:
        load_volume(path)
    message = str(caught.value)
    assert "\n" not in message and "the gzip stream ends early" in message and "the header declares 96000" in message
    assert f"{len(whole) * 6 // 10} compressed bytes" in message


@pytest.mark.parametrize("name, compressed", [("scan.nii", False), ("scan.nrrd", True), ("scan.nrrd", False), ("scan.nhdr", False),
                                              ("scan.nhdr", True), ("scan.mha", True), ("scan.mha", False), ("scan.mhd", False),
                                              ("scan.mhd", True)])
def test_cut_short_nifti_nrrd_and_metaimage_are_refused(tmp_path, name, compressed):
    path = tmp_path / name
    sitk.WriteImage(_random_image(), str(path), useCompression=compressed)
    assert load_volume(path).shape == (30, 40, 40)
    data = max((p for p in tmp_path.iterdir()), key=lambda p: p.stat().st_size)  # inline: the file; detached: its data file
    whole = data.read_bytes()
    data.write_bytes(whole[: len(whole) - 5000])
    with pytest.raises(VolumeError, match=r"(ends early|data cut short).*declares 96000"):
        load_volume(path)


def test_an_uncompressed_nifti_named_nii_gz_still_loads(tmp_path):
    """zlib's gzopen (ITK's reader) reads a plain file named .gz; the completeness check must not refuse it."""
    sitk.WriteImage(_random_image(), str(tmp_path / "plain.nii"))
    (tmp_path / "plain.nii").rename(tmp_path / "plain.nii.gz")
    assert load_volume(tmp_path / "plain.nii.gz").shape == (30, 40, 40)


def test_a_detached_data_file_that_is_missing_is_named(tmp_path):
    path = tmp_path / "scan.mhd"
    sitk.WriteImage(_random_image(), str(path))
    (tmp_path / "scan.raw").unlink()
    with pytest.raises(VolumeError, match="data file scan.raw is missing"):
        load_volume(path)


# --- pydicom's corpus ----------------------------------------------------------------------------------------

def test_pydicom_test_files_load_or_are_refused_in_one_line(tmp_path, capsys):
    """Every file of pydicom's test corpus, alone and in its own folder's company: a volume or a one-line refusal."""
    from pydicom.data import get_testdata_files

    files = sorted(f for f in get_testdata_files() if Path(f).is_file())
    assert len(files) > 100
    outcome: dict[str, str] = {}
    one_file_volumes = 0
    for path in files:  # each file given directly
        try:
            load_volume(path)
            one_file_volumes += 1
        except MedVolR1Error as exc:
            assert "\n" not in str(exc).strip(), (path, str(exc))
    by_folder = collections.defaultdict(list)
    for path in files:
        by_folder[Path(path).parent].append(path)
    for n, (source, members) in enumerate(sorted(by_folder.items())):  # each folder as a series folder
        folder = tmp_path / str(n)
        folder.mkdir()
        copies = {}
        for path in members:
            copy = folder / Path(path).name
            shutil.copy(path, copy)
            copies[str(copy)] = path
        groups = read_folder(folder)
        in_series = {i.path for items in groups.values() for i in items}
        for copy in copies:
            if copy not in in_series:
                outcome[copies[copy]] = "refused: not a DICOM image instance"
        for uid in groups:
            try:
                volume = load_volume(folder, series_uid=uid)
                for copy in volume.dicom_series.files:
                    outcome[copies[copy]] = "loaded"
                for copy in volume.dicom_series.left_out:
                    outcome[copies[copy]] = "refused: localizer left out"
            except MedVolR1Error as exc:
                text = str(exc).strip()
                assert text and "\n" not in text, (uid, text)
                for instance in groups[uid]:
                    outcome.setdefault(copies[instance.path], "refused: " + text)
    assert set(outcome) == set(files)
    loaded = sum(v == "loaded" for v in outcome.values())
    with capsys.disabled():
        print(f"\npydicom corpus ({pydicom.__version__}): {len(files)} files; as series folders {loaded} loaded, "
              f"{len(files) - loaded} refused in one line; given alone {one_file_volumes} loaded as volumes; 0 tracebacks")
    assert loaded >= 5  # the CT series of pydicom's DICOMDIR test set
