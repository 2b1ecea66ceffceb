"""Geometry of the canonical Volume on the real sample CT and reoriented copies of the same scan.

The copies (LPS-stored, z-flipped, axes permuted) hold the same anatomy in different voxel orders; a
correct loader gives every copy the same canonical array and the same voxel -> RAS mapping, renders it
in radiological convention, and writes masks back on each file's own grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from MedVolR1Lib.anchor import EvidenceAnchor, VoxelBox, box_from_ras_bounds, box_ras_bounds
from MedVolR1Lib.errors import VolumeError
from MedVolR1Lib.views import ViewGeometry, render_views
from MedVolR1Lib.volume import save_mask, volume_from_array
from MedVolR1Lib.readers import load_volume

LIVER, SPLEEN = 5, 1


def _variants(ct_path, tmp_path):
    """The sample CT as stored (RAS), re-stored as LPS, flipped in z, and with axes permuted."""
    image = sitk.ReadImage(str(ct_path))
    variants = {
        "ras": image,
        "lps": sitk.DICOMOrient(image, "LPS"),
        "flip_z": sitk.Flip(image, [False, False, True]),
        "permuted": sitk.PermuteAxes(image, [2, 0, 1]),
    }
    paths = {}
    for name, img in variants.items():
        path = tmp_path / f"ct_{name}.nrrd"
        sitk.WriteImage(img, str(path))
        paths[name] = path
    return paths


@pytest.fixture(scope="module")
def variant_paths(sample_ct, tmp_path_factory):
    return _variants(sample_ct.ct_path, tmp_path_factory.mktemp("variants"))


def test_copies_share_canonical_array_and_geometry(variant_paths):
    reference = load_volume(variant_paths["ras"])
    for name, path in variant_paths.items():
        volume = load_volume(path)
        assert volume.shape == reference.shape, name
        np.testing.assert_array_equal(volume.array, reference.array, err_msg=name)
        np.testing.assert_allclose(volume.ijk_to_ras, reference.ijk_to_ras, atol=1e-4, err_msg=name)
    # the LPS copy is already canonical on disk; the others are not
    assert load_volume(variant_paths["lps"]).source.reorientation.is_identity
    assert not load_volume(variant_paths["permuted"]).source.reorientation.is_identity


def test_canonical_voxels_sit_where_the_file_says(variant_paths):
    """A canonical voxel's RAS position equals ITK's physical point of the matching source voxel."""
    rng = np.random.default_rng(0)
    for name, path in variant_paths.items():
        volume = load_volume(path)
        image = sitk.ReadImage(str(path))
        source_array = sitk.GetArrayFromImage(image)
        for _ in range(20):
            k, j, i = (int(rng.integers(0, n)) for n in volume.shape)
            ras = volume.ras_from_ijk([i, j, k])
            lps = (-ras[0], -ras[1], ras[2])
            index = image.TransformPhysicalPointToIndex(lps)
            assert source_array[index[2], index[1], index[0]] == volume.array[k, j, i], name
            np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(index), lps, atol=1e-4)


def test_canonical_axes_point_left_posterior_superior(sample_volume):
    directions = sample_volume.ijk_to_ras[:3, :3]
    assert directions[0, 0] < 0 and directions[1, 1] < 0 and directions[2, 2] > 0


@pytest.mark.parametrize("variant", ["ras", "lps", "flip_z", "permuted"])
def test_views_are_radiological(variant, variant_paths, sample_ct):
    """Liver (patient's right) on the image's left, spleen on its right; spine toward the image bottom."""
    volume = load_volume(variant_paths[variant])
    labels_image = sitk.ReadImage(str(sample_ct.labels_path))
    reference = load_volume(sample_ct.ct_path)
    labels = reference.source.reorientation.to_canonical(sitk.GetArrayFromImage(labels_image))
    k = int(np.argmax(((labels == LIVER) & True).sum(axis=(1, 2)) * ((labels == SPLEEN).sum(axis=(1, 2)) > 0)))
    views = render_views(volume, [k], image_size=224)
    geometry = views.geometry
    liver_j, liver_i = np.nonzero(labels[k] == LIVER)
    spleen_j, spleen_i = np.nonzero(labels[k] == SPLEEN)
    liver_x, _ = geometry.pixel_from_voxel(liver_i.mean() + 0.5, 0)
    spleen_x, _ = geometry.pixel_from_voxel(spleen_i.mean() + 0.5, 0)
    assert liver_x < geometry.image_size / 2 < spleen_x
    # bone (> 300 HU) in the rendered slice lies mostly in the lower half (posterior)
    bone_j, _ = np.nonzero(volume.array[k] > 300)
    _, bone_y = geometry.pixel_from_voxel(0, bone_j.mean() + 0.5)
    assert bone_y > geometry.image_size / 2
    # and the rendered pixels really are that slice: a bright bone voxel renders bright
    image = views.images[0][:, :, 0].astype(float)
    j, i = bone_j[0], np.nonzero(volume.array[k] > 300)[1][0]
    x, y = geometry.pixel_from_voxel(i + 0.5, j + 0.5)
    assert image[int(y), int(x)] > 200


@pytest.mark.parametrize("variant", ["ras", "lps", "flip_z", "permuted"])
def test_pixel_voxel_ras_round_trip(variant, variant_paths):
    volume = load_volume(variant_paths[variant])
    geometry = ViewGeometry.for_volume(volume, 448)
    rng = np.random.default_rng(1)
    for _ in range(25):
        x1, y1 = rng.uniform(0, 300, 2)
        box_px = (x1, y1, x1 + rng.uniform(5, 140), y1 + rng.uniform(5, 140))
        k = int(rng.integers(0, volume.num_slices))
        voxel_box = geometry.to_voxel_box(box_px)
        ras_min, ras_max = box_ras_bounds(volume.ijk_to_ras, k, voxel_box)
        assert ras_max[2] - ras_min[2] == pytest.approx(volume.spacing[2])  # one slice thick
        back_box, back_k = box_from_ras_bounds(volume.ijk_to_ras, ras_min, ras_max)
        assert back_k == k
        np.testing.assert_allclose(geometry.to_pixel_box(back_box), box_px, atol=1e-6)


def test_whole_voxel_box_maps_to_voxel_range(sample_volume):
    box = VoxelBox.from_voxels(10, 20, 30, 40)
    assert box.voxel_range(sample_volume.shape[1:]) == (10, 20, 30, 40)
    anchor = EvidenceAnchor(5, (box,)).validate(sample_volume.shape)
    assert anchor.slice_index == 5


def test_mask_written_back_on_each_files_grid(variant_paths, tmp_path):
    reference = load_volume(variant_paths["ras"])
    mask = np.zeros(reference.shape, dtype=np.uint8)
    mask[40:60, 30:50, 20:45] = 1
    mask[45, 35, 25] = 2
    canonical_masks = []
    for name, path in variant_paths.items():
        volume = load_volume(path)
        out = save_mask(mask, volume, tmp_path / f"mask_{name}.nii.gz")
        written, source = sitk.ReadImage(str(out)), sitk.ReadImage(str(path))
        assert written.GetSize() == source.GetSize(), name
        np.testing.assert_allclose(written.GetSpacing(), source.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)
        canonical_masks.append(sitk.GetArrayFromImage(sitk.DICOMOrient(written, "LPS")))
    for other in canonical_masks[1:]:
        np.testing.assert_array_equal(other, canonical_masks[0])
    np.testing.assert_array_equal(canonical_masks[0], mask)


def test_mask_for_sample_ct_reloads_with_identical_geometry(sample_ct, sample_volume, tmp_path):
    mask = np.zeros(sample_volume.shape, dtype=np.uint8)
    mask[50, 50, 50] = 1
    out = save_mask(mask, sample_volume, tmp_path / "m.nii.gz")
    source, written = sitk.ReadImage(str(sample_ct.ct_path)), sitk.ReadImage(str(out))
    assert written.GetSize() == source.GetSize()
    assert written.GetSpacing() == source.GetSpacing()
    assert written.GetOrigin() == source.GetOrigin()
    assert written.GetDirection() == source.GetDirection()
    reloaded = load_volume(out, modality="MR")
    np.testing.assert_array_equal(reloaded.array, mask)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_unreadable_file_names_the_file(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"not an image at all")
    with pytest.raises(VolumeError, match="broken.nii.gz"):
        load_volume(path)


def test_missing_file(tmp_path):
    with pytest.raises(VolumeError, match="not found"):
        load_volume(tmp_path / "absent.nrrd")


def test_2d_and_4d_images_are_refused(tmp_path):
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkInt16), str(flat))
    with pytest.raises(VolumeError, match="flat.nrrd.*2D"):
        load_volume(flat)
    four = tmp_path / "four.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.int16), isVector=False), str(four))
    with pytest.raises(VolumeError, match="four.nii.gz.*4D"):
        load_volume(four)
    single = tmp_path / "single.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 30, 30), np.int16)), str(single))
    with pytest.raises(VolumeError, match="at least 2"):
        load_volume(single)


def test_nii_beside_nii_gz_is_refused(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))
    sitk.WriteImage(image, str(tmp_path / "scan.nii.gz"))
    sitk.WriteImage(image, str(tmp_path / "scan.nii"))
    with pytest.raises(VolumeError, match="scan.nii"):
        load_volume(tmp_path / "scan.nii.gz")


def test_dicom_series_folder(tmp_path, sample_volume):
    from dicom_series import write_dicom_series

    crop = sample_volume.array[40:44, 20:60, 30:70].astype(np.int16)
    image = sitk.GetImageFromArray(crop)
    image.SetSpacing((0.8, 0.8, 2.5))
    write_dicom_series(image, tmp_path)
    volume = load_volume(tmp_path)
    assert volume.shape == crop.shape
    np.testing.assert_allclose(volume.spacing, (0.8, 0.8, 2.5), atol=1e-3)
    np.testing.assert_array_equal(volume.array, crop)


def test_volume_from_array_refuses_bad_input():
    with pytest.raises(VolumeError, match="3D"):
        volume_from_array(np.zeros((4, 4)), np.eye(4))
    with pytest.raises(VolumeError, match="invertible"):
        volume_from_array(np.zeros((4, 4, 4)), np.zeros((4, 4)))
