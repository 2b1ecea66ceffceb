"""M3D-Seg reader on a fixture written in the published layout (image.npy (1,X,Y,Z), sparse one-hot mask_(C,X,Y,Z).npz)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse

from MedVolR1Lib.errors import DataError
from MedVolR1Lib.m3d import (
    detect_axial_axis,
    load_m3d_case,
    load_m3d_image,
    orientation_affine,
    read_split,
    laterality_allowed,
)
from MedVolR1Lib.readers import load_volume

X, Y, Z = 12, 12, 8  # square in-plane matrix, like every CT


def body_image(shape_xyz=(X, Y, Z), seed: int = 0) -> np.ndarray:
    """Air (z-score -2) around a body that spans every slice and no in-plane border, like a cut-through CT."""
    nx, ny, _ = shape_xyz
    image = np.random.default_rng(seed).normal(-2.0, 0.1, size=shape_xyz).astype(np.float32)
    image[1 : nx - 1, 1 : ny - 3] += 2.0
    return image


def write_case(root: Path, code: str, case: str, *, channels: int = 3, labels_json: bool = True, axial_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One case in the exact M3D-Seg layout; returns (image xyz, one-hot cxyz).

    `axial_first` stores KiTS's (slices, height, width) = the (X, Y, Z) arrays transposed to (Z, Y, X).
    """
    image = body_image()
    onehot = np.zeros((channels, X, Y, Z), dtype=bool)
    onehot[0, 1:4, 2:5, 1:3] = True  # label 1: a block near low x
    onehot[1, 8:11, 6:9, 4:7] = True  # label 2: a block near high x, high z
    # channel 2 (label 3) left empty on purpose: an absent target
    image[onehot[0]] = 3.0
    image[onehot[1]] = 5.0
    folder = root / code / case
    folder.mkdir(parents=True)
    stored, stored_onehot = (image.transpose(2, 1, 0), onehot.transpose(0, 3, 2, 1)) if axial_first else (image, onehot)
    np.save(folder / "image.npy", np.ascontiguousarray(stored)[None])
    matrix = sparse.csr_matrix(np.ascontiguousarray(stored_onehot).reshape(channels, -1).astype(np.float64))
    grid = ", ".join(str(n) for n in stored.shape)
    sparse.save_npz(folder / f"mask_({channels}, {grid}).npz", matrix)
    json_path = root / code / f"{code}.json"
    meta = json.loads(json_path.read_text()) if json_path.exists() else {"train": [], "test": []}
    if labels_json:
        meta["labels"] = {"0": "background", "1": "Liver", "2": "Right Kidney", "3": "spleen"}
    split = "test" if case.endswith("t") else "train"
    meta[split].append({"image": f"{code}/{case}/image.npy", "label": f"{code}/{case}/mask_({channels}, {grid}).npz"})
    json_path.write_text(json.dumps(meta))
    return image, onehot


def test_case_loads_canonical_with_masks_aligned(tmp_path):
    image, onehot = write_case(tmp_path, "0003", "case_00001")
    volume, masks, names, axes = load_m3d_case(tmp_path / "0003" / "case_00001")
    assert axes.axis == 2 and axes.method == "square in-plane matrix"
    assert volume.modality == "ZSCORE"
    assert volume.shape == (Z, Y, X)
    assert masks.shape == (3, Z, Y, X) and masks.dtype == bool
    assert names == ("liver", "right_kidney", "spleen")
    # Assumed RAS array axes: canonical i points Left, j Posterior -> x and y are flipped, z kept.
    expected = np.transpose(image, (2, 1, 0))[:, ::-1, ::-1]
    np.testing.assert_array_equal(volume.array, expected)
    for c in range(3):
        assert masks[c].sum() == onehot[c].sum()
    assert np.all(volume.array[masks[0]] == 3.0) and np.all(volume.array[masks[1]] == 5.0)
    # voxel (x=1, y=2, z=1) of label 1 sits at canonical (k=1, j=Y-1-2, i=X-1-1)
    assert masks[0][1, Y - 1 - 2, X - 1 - 1]
    assert not masks[2].any()
    assert volume.spacing == pytest.approx((1.0, 1.0, 1.0))


def test_load_volume_dispatches_to_m3d_and_orientation_is_configurable(tmp_path):
    image, _ = write_case(tmp_path, "0004", "case_00002")
    folder = tmp_path / "0004" / "case_00002"
    via_generic = load_volume(folder)
    assert via_generic.modality == "ZSCORE" and via_generic.shape == (Z, Y, X)
    lps = load_m3d_image(folder, orientation="LPS")
    np.testing.assert_array_equal(lps.array, np.transpose(image, (2, 1, 0)))
    assert not laterality_allowed(folder)  # orientation of every dataset is an unverified assumption


def test_builtin_label_table_when_json_has_no_labels(tmp_path):
    write_case(tmp_path, "0012", "case_00003", channels=6, labels_json=False)
    _, masks, names, _ = load_m3d_case(tmp_path / "0012" / "case_00003")
    assert names == ("liver", "bladder", "lungs", "kidneys", "bone", "brain")
    assert masks.shape[0] == 6


def test_read_split_lists_train_and_test(tmp_path):
    write_case(tmp_path, "0003", "a")
    write_case(tmp_path, "0003", "bt")
    train = read_split(tmp_path, "0003", "train")
    test = read_split(tmp_path, "0003", "test")
    assert [r.case_id for r in train] == ["0003/a"] and [r.case_id for r in test] == ["0003/bt"]
    case = load_m3d_case(train[0].folder, label_path=train[0].label_path)
    assert case.masks.any()
    with pytest.raises(DataError, match="validation"):
        read_split(tmp_path, "0003", "validation")
    with pytest.raises(DataError, match="0004"):
        read_split(tmp_path, "0004", "train")


def test_corrupt_files_raise_data_error_naming_the_case(tmp_path):
    write_case(tmp_path, "0003", "broken_mask")
    folder = tmp_path / "0003" / "broken_mask"
    next(folder.glob("mask_*.npz")).write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match="0003/broken_mask"):
        load_m3d_case(folder)

    write_case(tmp_path, "0003", "broken_image")
    folder = tmp_path / "0003" / "broken_image"
    (folder / "image.npy").write_bytes((folder / "image.npy").read_bytes()[:100])
    with pytest.raises(DataError, match="0003/broken_image"):
        load_m3d_image(folder)

    write_case(tmp_path, "0003", "wrong_grid")
    folder = tmp_path / "0003" / "wrong_grid"
    mask = next(folder.glob("mask_*.npz"))
    mask.rename(folder / f"mask_(3, {X}, {Y}, {Z + 1}).npz")
    with pytest.raises(DataError, match="wrong_grid"):
        load_m3d_case(folder)


def test_orientation_affine_rejects_bad_codes():
    assert np.allclose(orientation_affine("LPS")[:3, :3], np.diag([-1, -1, 1]))
    with pytest.raises(DataError):
        orientation_affine("RRS")


def test_axial_first_storage_loads_to_the_same_canonical_volume_and_masks(tmp_path):
    write_case(tmp_path, "0003", "xyz")
    write_case(tmp_path, "0004", "zyx", axial_first=True)  # KiTS: (slices, height, width)
    last = load_m3d_case(tmp_path / "0003" / "xyz")
    first = load_m3d_case(tmp_path / "0004" / "zyx")
    assert first.axes.axis == 0 and first.axes.storage_shape == (Z, Y, X) and "square" in first.axes.reason
    assert first.volume.shape == last.volume.shape == (Z, Y, X)
    np.testing.assert_array_equal(first.volume.array, last.volume.array)
    np.testing.assert_array_equal(first.masks, last.masks)


def test_axial_axis_from_content_when_the_shape_cannot_tell_and_refused_when_neither_can():
    cube = body_image((10, 10, 10))
    for stored_axis, stored in ((2, cube), (0, cube.transpose(2, 1, 0)), (1, cube.transpose(0, 2, 1))):
        axes = detect_axial_axis(stored)
        assert axes.axis == stored_axis and axes.method == "body cut by the end faces" and "cube" in axes.reason
    cropped = body_image((12, 11, 8)).transpose(2, 0, 1)  # foreground-cropped: three different sizes, axial first
    assert detect_axial_axis(cropped).axis == 0
    noise = np.random.default_rng(0).normal(size=(9, 10, 11)).astype(np.float32)
    with pytest.raises(DataError, match="axial axis"):
        detect_axial_axis(noise)
    # a square pair outranks content, and the disagreement is written down
    odd = body_image((12, 12, 12))[:, :, :9].transpose(0, 2, 1)  # (12, 9, 12): content says axis 1, shape says 1 too
    assert detect_axial_axis(odd).axis == 1
    pair = body_image((12, 10, 12))  # axes 0 and 2 square, but the body fills the end faces of axis 2
    decision = detect_axial_axis(pair)
    assert decision.axis == 1 and "the shape wins" in decision.reason


def test_an_undecidable_case_is_refused_naming_it_and_a_given_axis_loads_it(tmp_path):
    folder = tmp_path / "0004" / "odd"
    folder.mkdir(parents=True)
    np.save(folder / "image.npy", np.random.default_rng(1).normal(size=(1, 9, 10, 11)).astype(np.float32))
    with pytest.raises(DataError, match="0004/odd.*axial axis"):
        load_m3d_image(folder)
    volume = load_m3d_image(folder, axial_axis=0)
    assert volume.shape == (9, 10, 11)


def test_m3d_window_on_segvol_z_scores_reproduces_the_hu_abdomen_window_on_the_sample_ct(sample_volume):
    from MedVolR1Lib.errors import VolumeError
    from MedVolR1Lib.m3d import segvol_normalise
    from MedVolR1Lib.windowing import resolve_window

    z = segvol_normalise(sample_volume.array)
    assert abs(float(z[z > z.mean()].mean())) < 0.2  # z-scored foreground (clipping shifts it slightly)
    chosen = resolve_window(z, "ZSCORE")  # the default for M3D-Seg arrays (docs/m3d_windows.md)
    assert (chosen.low, chosen.high) == (-1.10, 2.03)
    hu = resolve_window(sample_volume.array, "CT", "abdomen").apply(sample_volume.array)
    assert float(np.abs(chosen.apply(z) - hu).mean()) < 0.01
    assert float(np.abs(resolve_window(z, "ZSCORE", "percentile").apply(z) - hu).mean()) > 0.03  # what it replaced
    with pytest.raises(VolumeError, match="z-scored"):
        resolve_window(sample_volume.array, "CT", "m3d_abdomen")


# ------------------------------------------------------------------- KiTS23 one lesion per query


def _kits_lesion_case(root: Path, case: str, split: str) -> np.ndarray:
    """KiTS23 in the M3D-Seg layout with the json's short names (kidney, tumor, cyst): two tumours of different
    sizes in one kidney, a cyst in the other and a 3-voxel tumour speck.  Returns the one-hot (3, X, Y, Z)."""
    n, z = 40, 24
    image = body_image((n, n, z), seed=3)
    onehot = np.zeros((3, n, n, z), dtype=bool)
    onehot[0, 4:16, 14:30, 3:21] = True  # kidney at low x
    onehot[0, 24:36, 14:30, 3:21] = True  # kidney at high x
    onehot[1, 6:12, 16:22, 5:11] = True  # the larger tumour: 216 voxels
    onehot[1, 8:12, 18:22, 14:18] = True  # the smaller tumour, same kidney: 64 voxels
    onehot[1, 14, 28, 19:22] = True  # a speck at the kidney's edge: 3 voxels
    onehot[2, 27:32, 18:23, 8:12] = True  # the cyst, other kidney
    onehot[0] &= ~(onehot[1] | onehot[2])
    for c, value in enumerate((1.0, 2.0, 0.5)):
        image[onehot[c]] = value
    folder = root / "0004" / case
    folder.mkdir(parents=True)
    np.save(folder / "image.npy", image[None])
    sparse.save_npz(folder / f"mask_(3, {n}, {n}, {z}).npz", sparse.csr_matrix(onehot.reshape(3, -1).astype(np.float64)))
    meta_path = root / "0004" / "0004.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"labels": {"0": "background", "1": "kidney", "2": "tumor", "3": "cyst"}, "train": [], "test": []}
    meta[split].append({"image": f"0004/{case}/image.npy", "label": f"0004/{case}/mask_(3, {n}, {n}, {z}).npz"})
    meta_path.write_text(json.dumps(meta))
    return onehot


def _canonical(onehot_channel: np.ndarray) -> np.ndarray:
    """(X, Y, Z) -> canonical (K, J, I) under the assumed RAS array axes (x and y flipped)."""
    return np.transpose(onehot_channel, (2, 1, 0))[:, ::-1, ::-1]


def test_kits23_json_short_names_map_to_the_lesion_targets(tmp_path):
    _kits_lesion_case(tmp_path, "case_00001", "train")
    _, _, names, _ = load_m3d_case(tmp_path / "0004" / "case_00001")
    assert names == ("kidney", "kidney_tumor", "kidney_cyst")


def test_kits23_prepare_emits_one_query_per_lesion_and_the_larger_tumour_is_that_tumour_alone(tmp_path):
    from scipy import ndimage

    from MedVolR1Lib.training.prepare import PrepareArguments, prepare_dataset
    from MedVolR1Lib.training.records import read_records
    from MedVolR1Lib.training.store import read_cases, load_case

    root = tmp_path / "M3D_Seg"
    onehot = _kits_lesion_case(root, "case_00001", "train")
    _kits_lesion_case(root, "case_00002", "test")
    summary = prepare_dataset(PrepareArguments(
        out_dir=str(tmp_path / "data"), sample_ct=False, m3d_root=str(root), m3d_datasets="0004",
        targets="kidneys,kidney_tumor,kidney_cyst", num_views=8, image_size=64,
    ))
    train, test = read_records(tmp_path / "data" / "train.jsonl"), read_records(tmp_path / "data" / "test.jsonl")
    case = load_case(read_cases(tmp_path / "data" / "cases.json")["0004/case_00001"])
    tumours, _ = ndimage.label(onehot[1], structure=np.ones((3, 3, 3)))
    larger, smaller = (_canonical(tumours == tumours[7, 17, 6]), _canonical(tumours == tumours[9, 19, 15]))
    cyst = _canonical(onehot[2])

    larger_rows = [r for r in train if "larger kidney tumour" in r.query]
    assert larger_rows and {r.target for r in larger_rows} == {"kidney_tumor_instance"}
    for r in larger_rows:
        np.testing.assert_array_equal(case.target_mask(r.labels), larger)  # that tumour alone: not the smaller one, not the speck
    smaller_rows = [r for r in train if "smaller kidney tumour" in r.query]
    assert smaller_rows and all(np.array_equal(case.target_mask(r.labels), smaller) for r in smaller_rows)
    cyst_rows = [r for r in train if "only kidney cyst" in r.query]
    assert cyst_rows and all(np.array_equal(case.target_mask(r.labels), cyst) for r in cyst_rows)
    assert not any(r.target == "kidney_tumor" for r in train)  # no union-of-tumours records for KiTS23
    assert any(r.query == "Segment the larger renal mass." for r in train)
    # paraphrases never name the lesion; held-out wording never appears in training
    assert all(not re.search(r"tumou?r|cyst|lesion|neoplasm", r.query, re.I) for r in train if r.query_kind == "paraphrase")
    assert {r.query_split for r in test} == {"held_out"} and not {r.query for r in train} & {r.query for r in test}
    assert any("bigger" in r.query for r in test)
    # nothing skipped silently: the speck is reported with its reason, and every record names its instance
    reasons = [(s["case"], s["target"], s["reason"]) for s in summary["skipped"]]
    assert any(c == "0004/case_00001" and t == "kidney_tumor_instance" and "speck of 3 voxels" in why for c, t, why in reasons)
    assert {r.parts[0][0] for r in train if r.target == "kidney_tumor_instance"} == {"kidney_tumor#1", "kidney_tumor#2"}


def test_lesion_ranks_are_strict_and_a_tie_is_reported_not_guessed():
    from MedVolR1Lib.kits_lesions import survey_lesions
    from MedVolR1Lib.samples import build_lesion_samples
    from MedVolR1Lib.volume import Volume

    label_map = np.zeros((20, 20, 30), dtype=np.int32)
    label_map[2:18, 4:16, 2:12] = 1  # one kidney
    label_map[5:8, 6:9, 3:6] = 2  # three equal tumours at three heights: the middle one has no strict rank
    label_map[9:12, 6:9, 3:6] = 2
    label_map[13:16, 6:9, 3:6] = 2
    names = {1: "kidney", 2: "kidney_tumor", 3: "kidney_cyst"}
    survey = survey_lesions(label_map, names)
    ranks = sorted((i.height, i.size_rank.get("case"), i.height_rank.get("case")) for i in survey.instances)
    assert [r[1:] for r in ranks] == [(None, "lowermost"), (None, None), (None, "uppermost")]
    volume = Volume(np.zeros(label_map.shape, np.float32), np.eye(4), modality="CT", name="tie")
    result = build_lesion_samples(volume, label_map, names, case_id="tie", shown_slices=range(20), image_size=32, min_key_voxels=4)
    assert len(result.samples) == 2
    assert any("nothing tells it apart" in s.reason for s in result.skipped)
    assert any(s.target == "kidney_cyst_instance" and s.reason.startswith("absent") for s in result.skipped)


def test_prepare_with_two_workers_writes_the_same_bytes_as_one(tmp_path):
    from MedVolR1Lib.training.prepare import PrepareArguments, prepare_dataset

    root = tmp_path / "M3D_Seg"
    for n, split in enumerate(("train", "train", "test", "train")):
        _kits_lesion_case(root, f"case_{n:05d}", split)
    (root / "0004" / "case_00001" / "image.npy").write_bytes(b"not an array")  # an unreadable case, reported in order
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        summary = prepare_dataset(PrepareArguments(out_dir=str(out), sample_ct=False, m3d_root=str(root), m3d_datasets="0004",
                                                   targets="kidneys,kidney_tumor,kidney_cyst", num_views=6, image_size=56,
                                                   train_view_sets=2, workers=workers))
        assert summary["records"]["train"] > 0 and summary["records"]["test"] > 0
        assert any("unreadable case" in s["reason"] for s in summary["skipped"])
        report = json.loads((out / "report.json").read_text())
        report["settings"].pop("workers"), report["settings"].pop("out_dir")
        outputs[workers] = {name: (out / name).read_bytes() for name in ("cases.json", "train.jsonl", "test.jsonl")}, report
    assert outputs[1] == outputs[2]


def test_a_channel_with_voxels_that_no_target_reads_is_reported(tmp_path):
    from MedVolR1Lib.training.prepare import PrepareArguments, prepare_dataset

    root = tmp_path / "M3D_Seg"
    write_case(root, "0003", "case_00001", channels=3, labels_json=False)  # liver and kidney have voxels, spleen none
    summary = prepare_dataset(PrepareArguments(out_dir=str(tmp_path / "data"), sample_ct=False, m3d_root=str(root),
                                               m3d_datasets="0003", targets="liver", num_views=4, image_size=56))
    unread = [(s["target"], s["reason"]) for s in summary["skipped"] if s["case"] == "0003/case_00001"]
    assert ("kidney", "channel has voxels but no requested target reads it") in unread
    assert not any(t == "spleen" for t, _ in unread)  # an empty channel is not data left out
