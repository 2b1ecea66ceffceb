"""M3D-Seg reader on a fixture written in the published layout (image.npy (1,X,Y,Z), sparse one-hot mask_(C,X,Y,Z).npz)."""

from __future__ import annotations

import json
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
