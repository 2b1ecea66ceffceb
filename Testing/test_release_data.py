"""CT-ORG from raw NIfTI as the release prepares it (HU, WC40/WW400, 512 px slices), on small synthetic NIfTI files."""

from __future__ import annotations

import json

import numpy as np
import pytest

X, Y, Z = 40, 30, 10  # NIfTI storage (x, y, z); a small non-square matrix so the resize is visible
SPACING = (0.8, 0.9, 2.5)


def write_ctorg_case(folder, number: int, *, shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """volume-N.nii.gz (HU) and labels-N.nii.gz in CT-ORG's layout; returns the (z, y, x) arrays written."""
    import SimpleITK as sitk

    hu = np.full((Z, Y, X), -1000.0, dtype=np.float32)
    hu[:, 3:27, 4:36] = 30.0  # body
    labels = np.zeros((Z, Y, X), dtype=np.int16)
    labels[2:8, 6:16, 6 + shift : 20 + shift] = 1  # liver
    labels[3:7, 18:24, 24:32] = 4  # kidneys
    hu[labels == 1] = 60.0
    hu[labels == 4] = 150.0
    for name, array in ((f"volumes/volume-{number}.nii.gz", hu), (f"labels/labels-{number}.nii.gz", labels)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(SPACING)
        image.SetOrigin((-10.0, 5.0, 100.0))
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(folder / name))
    return hu, labels


def test_case_stays_in_hu_with_slices_resized_and_geometry_kept(tmp_path):
    from MedVolR1Lib.release_data import load_ctorg_case
    from MedVolR1Lib.windowing import window_volume

    hu, labels = write_ctorg_case(tmp_path, 7)
    volume, label_map = load_ctorg_case(tmp_path / "volumes" / "volume-7.nii.gz", tmp_path / "labels" / "labels-7.nii.gz", size=64)
    assert volume.modality == "CT" and volume.shape == (Z, 64, 64) and label_map.shape == (Z, 64, 64)
    assert volume.array.min() == pytest.approx(-1000.0) and volume.array.max() == pytest.approx(150.0)  # HU, not z-scores
    assert set(np.unique(label_map)) == {0, 1, 4}  # nearest neighbour: no blended label values
    # the first and last voxel centres stay put: spacing x (n - 1) / (size - 1) in-plane, slices untouched
    assert volume.spacing == pytest.approx((0.8 * (X - 1) / 63, 0.9 * (Y - 1) / 63, 2.5))
    extent = lambda mask, axis: (mask.any(axis=tuple(a for a in range(3) if a != axis))).sum()  # noqa: E731
    liver_mm = extent(label_map == 1, 2) * volume.spacing[0]
    assert liver_mm == pytest.approx(14 * 0.8, abs=2 * volume.spacing[0])  # 14 source columns, the same mm
    # the release's window: WC40/WW400 into [0, 1] is what the "abdomen" view window renders
    shown = window_volume(volume, "abdomen")
    expected = np.clip((volume.array - (40 - 200)) / 400, 0, 1)
    np.testing.assert_allclose(shown, expected, atol=1e-6)


def test_prepare_reads_raw_ctorg_with_the_release_window_and_reports_unpaired_files(tmp_path):
    from MedVolR1Lib.training.prepare import PrepareArguments, prepare_dataset
    from MedVolR1Lib.training.records import read_records

    raw = tmp_path / "ctorg"
    write_ctorg_case(raw, 1)
    write_ctorg_case(raw, 2, shift=3)
    write_ctorg_case(raw, 3)
    (raw / "labels" / "labels-3.nii.gz").unlink()  # a scan without labels
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["volume-1", 3], "test": [2]}))
    summary = prepare_dataset(PrepareArguments(out_dir=str(tmp_path / "data"), sample_ct=False, ctorg_nifti_root=str(raw),
                                               ctorg_split_file=str(split), ctorg_size=56, targets="liver,kidneys",
                                               num_views=4, image_size=56))
    train, test = read_records(tmp_path / "data" / "train.jsonl"), read_records(tmp_path / "data" / "test.jsonl")
    assert {r.case_id for r in train} == {"ctorg_hu/volume-1"} and {r.case_id for r in test} == {"ctorg_hu/volume-2"}
    assert {r.window for r in train + test} == {"abdomen"} and {r.dataset for r in train} == {"ctorg_hu"}
    reasons = [s["reason"] for s in summary["skipped"] if s["case"] == "ctorg_hu/volume-3"]
    assert any("has no labels-3 file" in r for r in reasons)  # the unpaired scan
    assert any("in the split file but no volume/labels pair" in r for r in reasons)  # and the split entry it leaves empty


def test_split_file_errors_are_one_line_and_name_the_problem(tmp_path):
    from MedVolR1Lib.errors import DataError
    from MedVolR1Lib.release_data import read_ctorg_split
    from MedVolR1Lib.training.prepare import PrepareArguments, prepare_dataset

    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({"train": [1, 2], "test": [2]}))
    with pytest.raises(DataError, match=r"cases \['2'\] are in both"):
        read_ctorg_split(bad)
    (tmp_path / "ctorg").mkdir()
    with pytest.raises(DataError, match="split files are not public"):
        prepare_dataset(PrepareArguments(out_dir=str(tmp_path / "d"), sample_ct=False, ctorg_nifti_root=str(tmp_path / "ctorg")))
