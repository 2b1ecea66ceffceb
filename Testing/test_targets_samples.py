"""GT targets (areas, key slice, boxes) and VRS samples: synthetic cases by hand, then the real sample CT."""

import json

import numpy as np
import pytest

from MedVolR1Lib.anchor import VoxelBox, parse_answer
from MedVolR1Lib.errors import DataError
from MedVolR1Lib.queries import ENTRIES, SPLITS, find_entry, get_entry, known_label, normalise_name, queries_for
from MedVolR1Lib.samples import VRSSample, build_samples, label_map_from_masks, sample_rows, target_mask
from MedVolR1Lib.targets import BoxRules, component_boxes, key_slice_from_areas, part_boxes, profile_labels, profile_target, slice_areas
from MedVolR1Lib.volume import Volume


# ---------------------------------------------------------------- targets, synthetic


def test_component_boxes_are_exact_edge_boxes_and_drop_specks():
    plane = np.zeros((20, 30), bool)
    plane[2:6, 3:9] = True  # rows j 2..5, cols i 3..8 (24 voxels)
    plane[10:18, 20:27] = True  # 56 voxels
    plane[0, 29] = True  # speck
    boxes = component_boxes(plane)
    assert boxes == [VoxelBox(3, 2, 9, 6), VoxelBox(20, 10, 27, 18)]  # image order, edge coordinates
    # relative threshold: with min_fraction 0.5 the 24-voxel part (< 28) goes too
    assert component_boxes(plane, BoxRules(min_fraction=0.5)) == [VoxelBox(20, 10, 27, 18)]
    # cap keeps the largest
    assert component_boxes(plane, BoxRules(max_boxes=1)) == [VoxelBox(20, 10, 27, 18)]
    # a diagonal touch is one component (8-connectivity)
    diag = np.zeros((6, 6), bool)
    diag[1:3, 1:3] = True
    diag[3:5, 3:5] = True
    assert component_boxes(diag) == [VoxelBox(1, 1, 5, 5)]


def test_tiny_target_keeps_its_only_component():
    plane = np.zeros((8, 8), bool)
    plane[4, 4] = True
    assert component_boxes(plane) == [VoxelBox(4, 4, 5, 5)]


def test_part_boxes_one_per_side_even_when_touching():
    right = np.zeros((10, 20), bool)
    left = np.zeros((10, 20), bool)
    right[2:8, 2:10] = True
    left[2:8, 10:18] = True  # touches the right side: one component of the union
    assert component_boxes(right | left) == [VoxelBox(2, 2, 18, 8)]
    assert part_boxes([right, left]) == [VoxelBox(2, 2, 10, 8), VoxelBox(10, 2, 18, 8)]
    # one side in two pieces (lobes) stays one box for that side
    right2 = np.zeros((10, 20), bool)
    right2[1:4, 1:6] = True
    right2[6:9, 2:7] = True
    assert part_boxes([right2, np.zeros_like(right2)]) == [VoxelBox(1, 1, 7, 9)]


def test_areas_and_key_slice_restricted_to_shown():
    mask = np.zeros((6, 5, 5), bool)
    mask[1, :2, :2] = True  # 4
    mask[2, :3, :3] = True  # 9
    mask[4, :2, :3] = True  # 6
    assert slice_areas(mask).tolist() == [0, 4, 9, 0, 6, 0]
    assert key_slice_from_areas(slice_areas(mask)) == 2
    assert key_slice_from_areas(slice_areas(mask), [0, 1, 4, 5]) == 4
    with pytest.raises(DataError, match="'liver'.*shown"):
        key_slice_from_areas(slice_areas(mask), [0, 3, 5], name="liver")
    profile = profile_target(mask, "x")
    assert profile.key_slice == 2 and profile.key_slice_among([1, 4]) == 4
    assert profile.boxes(3) == [] and profile.boxes(2) == [VoxelBox(0, 0, 3, 3)]
    with pytest.raises(DataError, match="out of range"):
        profile.boxes(6)


def test_empty_mask_is_a_data_error_naming_the_target():
    with pytest.raises(DataError, match="'gallbladder' is empty"):
        profile_target(np.zeros((3, 4, 4), np.uint8), "gallbladder")
    with pytest.raises(DataError, match="'spleen' is empty"):
        profile_labels(np.zeros((3, 4, 4), np.int32), [[1]], "spleen")


def test_profile_labels_paired_vs_single_part():
    labels = np.zeros((3, 10, 20), np.int32)
    labels[1, 2:8, 2:10] = 2
    labels[1, 2:8, 10:18] = 3
    assert len(profile_labels(labels, [[2], [3]], "kidneys").boxes(1)) == 2
    assert len(profile_labels(labels, [[2, 3]], "kidneys").boxes(1)) == 1  # union touches: one component


# ---------------------------------------------------------------- query table


def test_every_entry_has_train_and_held_out_queries_and_they_never_overlap():
    for entry in ENTRIES:
        train = {q.text for q in entry.queries("train")}
        held = {q.text for q in entry.queries("held_out")}
        assert train and held, entry.key
        assert not train & held, entry.key
        assert all(q.split in SPLITS for q in entry.queries())


def test_required_names_are_known():
    total = ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
             "adrenal_gland_right", "adrenal_gland_left", "aorta", "inferior_vena_cava", "urinary_bladder",
             "duodenum", "colon", "small_bowel", "esophagus", "lung_upper_lobe_left", "lung_middle_lobe_right",
             "vertebrae_L3", "heart", "prostate"]
    m3d = ["liver", "kidney", "spleen", "pancreas", "kidney tumor", "kidney cyst", "bladder", "lungs", "bone", "brain", "kidneys"]
    for name in total + m3d:
        assert known_label(name), name
    assert find_entry("bladder").key == "urinary_bladder"
    assert find_entry("kidney").key == "kidneys"
    assert find_entry("Kidney Tumour").key == "kidney_tumor"
    assert find_entry("vertebrae_L3").key == "vertebrae_L3"
    kinds = {q.kind for q in queries_for("kidney_tumor")}
    assert "lesion" in kinds
    assert {q.kind for q in queries_for("kidneys")} >= {"direct", "multi_part", "descriptive"}
    assert "laterality" in {q.kind for q in queries_for("kidney_left")}
    assert any("bile" in q.text for q in queries_for("gallbladder"))


def test_kits23_paraphrases_never_name_the_lesion_and_keep_train_and_test_apart():
    import re

    for target in ("kidney_tumor", "kidney_cyst"):
        train = {q.text for q in queries_for(target, "train") if q.kind == "paraphrase"}
        held = {q.text for q in queries_for(target, "held_out") if q.kind == "paraphrase"}
        assert train and held and not train & held
        for text in train | held:
            assert not re.search(r"tumou?r|cancer|cyst|lesion", text, re.IGNORECASE), text
    assert "Segment the obvious fluid-filled sac in the kidney." in {q.text for q in queries_for("kidney_cyst", "train")}


def _kits_case(root, case: str) -> None:
    """A KiTS23-like M3D-Seg case: channels kidney, kidney_tumor, kidney_cyst (empty); square in-plane, axial last."""
    from scipy import sparse

    n, z = 28, 12
    image = np.full((n, n, z), -2.0, dtype=np.float32)
    image[2:26, 2:24] = 0.0  # body through every slice
    onehot = np.zeros((3, n, n, z), dtype=bool)
    onehot[0, 6:16, 8:18, 2:10] = True
    onehot[1, 9:14, 11:16, 4:8] = True
    onehot[0] &= ~onehot[1]
    image[onehot[0]], image[onehot[1]] = 1.0, 2.0
    folder = root / "0004" / case
    folder.mkdir(parents=True)
    np.save(folder / "image.npy", image[None])
    sparse.save_npz(folder / f"mask_(3, {n}, {n}, {z}).npz", sparse.csr_matrix(onehot.reshape(3, -1).astype(np.float32)))
    meta_path = root / "0004" / "0004.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"train": [], "test": []}
    meta["test" if case.endswith("t") else "train"].append({"image": f"0004/{case}/image.npy", "label": f"0004/{case}/mask_(3, {n}, {n}, {z}).npz"})
    meta_path.write_text(json.dumps(meta))


def test_paraphrased_test_dataset_gets_only_held_out_paraphrases(tmp_path):
    from MedVolR1Lib.training.prepare import PrepareArguments, prepare_dataset
    from MedVolR1Lib.training.records import read_records

    root = tmp_path / "M3D_Seg"
    _kits_case(root, "a")
    _kits_case(root, "bt")
    prepare_dataset(PrepareArguments(
        out_dir=str(tmp_path / "data"), sample_ct=False, m3d_root=str(root), m3d_datasets="0004", paraphrased_test_datasets="0004",
        targets="kidney_tumor,kidneys", num_views=4, image_size=56, lesion_instance_datasets="",  # the union task
    ))
    train, test = read_records(tmp_path / "data" / "train.jsonl"), read_records(tmp_path / "data" / "test.jsonl")
    assert {r.target for r in test} == {"kidney_tumor"} and {r.query_kind for r in test} == {"paraphrase"}
    assert {r.query_split for r in test} == {"held_out"} and not {r.query for r in train} & {r.query for r in test}
    assert "paraphrase" in {r.query_kind for r in train if r.target == "kidney_tumor"} and "kidneys" in {r.target for r in train}


def test_unknown_target_is_a_data_error_naming_it():
    with pytest.raises(DataError, match="'flux_capacitor'"):
        get_entry("flux_capacitor")
    assert normalise_name(" Kidney-Cyst ") == "kidney_cyst"


# ---------------------------------------------------------------- samples, synthetic M3D-like case


def _synthetic_case():
    """Single-channel 'kidney' (two blobs, one per side) and a 'kidney tumor', as M3D-Seg stores them."""
    shape = (12, 40, 50)
    masks = np.zeros((2, *shape), bool)
    masks[0, 3:9, 15:25, 5:15] = True  # on the image's left = patient's right
    masks[0, 4:8, 15:25, 35:45] = True
    masks[1, 5:7, 18:21, 8:11] = True
    rng = np.random.default_rng(0)
    array = rng.normal(size=shape).astype(np.float32)
    volume = Volume(array, np.diag([-1.5, -1.5, 3.0, 1.0]), modality="ZSCORE", name="case7")
    return volume, masks


def test_m3d_like_case_gives_kidneys_with_two_boxes_and_a_lesion_sample():
    volume, masks = _synthetic_case()
    label_map, names = label_map_from_masks(masks, ["kidney", "kidney tumor"])
    assert names == {1: "kidney", 2: "kidney tumor"}
    result = build_samples(volume, label_map, names, shown_slices=[1, 4, 6, 10], image_size=112, min_key_voxels=4)
    by_target = {s.target: s for s in result.samples}
    assert set(by_target) == {"kidneys", "kidney_tumor"}
    kidneys = by_target["kidneys"]
    assert kidneys.key_slice in (4, 6)
    assert len(kidneys.boxes_voxel) == 2
    geometry = kidneys.view_geometry()
    for vox, pix in zip(kidneys.boxes_voxel, kidneys.boxes_pixel):
        back = geometry.to_voxel_box(pix)
        assert np.allclose(back.as_list(), vox)
    tumor = by_target["kidney_tumor"]
    assert tumor.key_slice == 6 and tumor.boxes_voxel == [[8.0, 18.0, 11.0, 21.0]]
    assert "lesion" in {q.kind for q in tumor.queries}
    # the tumour overwrote the kidney where they overlap (later channel wins)
    assert not target_mask(label_map, kidneys)[5, 19, 9]


def test_explicit_targets_and_skips_are_reported():
    volume, masks = _synthetic_case()
    label_map, names = label_map_from_masks(masks, ["kidney", "kidney tumor"])
    result = build_samples(volume, label_map, names, targets=["kidney", "liver"], shown_slices=[1, 4, 6, 10], image_size=112)
    assert [s.target for s in result.samples] == ["kidneys"]
    assert [(k.target, "no label" in k.reason) for k in result.skipped] == [("liver", True)]
    with pytest.raises(DataError, match="'gizzard'"):
        build_samples(volume, label_map, names, targets=["gizzard"], image_size=112)
    # on the shown slices the tumour is absent
    result = build_samples(volume, label_map, names, shown_slices=[1, 10], image_size=112)
    reasons = {k.target: k.reason for k in result.skipped}
    assert "not on any shown slice" in reasons["kidney_tumor"]
    # unknown label names are reported, or raise with strict
    names_extra = {**names, 3: "flux_capacitor"}
    result = build_samples(volume, label_map, names_extra, shown_slices=[4, 6], image_size=112)
    assert any(k.target == "flux_capacitor" and "unknown" in k.reason for k in result.skipped)
    with pytest.raises(DataError, match="'flux_capacitor'"):
        build_samples(volume, label_map, names_extra, shown_slices=[4, 6], image_size=112, strict=True)
    with pytest.raises(DataError, match="shape"):
        build_samples(volume, label_map[:-1], names, image_size=112)


def test_no_laterality_queries_when_orientation_is_unverified():
    volume, masks = _synthetic_case()
    label_map = np.zeros(masks.shape[1:], np.int32)
    label_map[:, :, :25][masks[0][:, :, :25]] = 2  # kidney_right
    label_map[:, :, 25:][masks[0][:, :, 25:]] = 3
    names = {2: "kidney_right", 3: "kidney_left"}
    allowed = build_samples(volume, label_map, names, shown_slices=[4, 6], image_size=112)
    assert {s.target for s in allowed.samples} == {"kidney_right", "kidney_left", "kidneys"}
    blocked = build_samples(volume, label_map, names, shown_slices=[4, 6], image_size=112, allow_laterality=False)
    assert [s.target for s in blocked.samples] == ["kidneys"]
    assert all("left" not in q.text.lower() and "right" not in q.text.lower() for q in blocked.samples[0].queries)
    assert {k.target for k in blocked.skipped} == {"kidney_right", "kidney_left"}


# ---------------------------------------------------------------- the real sample CT


@pytest.fixture(scope="module")
def sample_ct():
    from MedVolR1Lib.sample_data import fetch_sample
    from MedVolR1Lib.readers import load_label_map, load_volume

    sample = fetch_sample()
    volume = load_volume(sample.ct_path)
    labels = load_label_map(sample.labels_path, volume)
    result = build_samples(volume, labels, sample.label_names, case_id="sample_ct")
    return volume, labels, sample.label_names, result


def test_sample_ct_kidneys_two_boxes_and_radiological_sides(sample_ct):
    volume, labels, names, result = sample_ct
    value = {v: k for k, v in names.items()}
    by_target = {s.target: s for s in result.samples}
    kidneys = by_target["kidneys"]
    right_area = (labels == value["kidney_right"]).reshape(volume.num_slices, -1).sum(1)
    left_area = (labels == value["kidney_left"]).reshape(volume.num_slices, -1).sum(1)
    both = [k for k in kidneys.shown_slices if right_area[k] > 50 and left_area[k] > 50]
    assert both, "the sample CT shows both kidneys on some shown slice"
    half = kidneys.image_size / 2
    for k in both:
        boxes = kidneys.boxes_pixel_by_slice[k]
        assert len(boxes) == 2
        # image order: first box on the image's left = the patient's right kidney
        (r, l) = boxes
        assert r[2] <= half < l[0]
    right = by_target["kidney_right"]
    x1, _, x2, _ = right.boxes_pixel[0]
    assert x2 <= half, "kidney_right must be on the image's LEFT half (radiological convention)"
    left = by_target["kidney_left"]
    assert left.boxes_pixel[0][0] >= half
    # the box encloses exactly the label's voxels on the key slice
    ys, xs = np.nonzero(labels[right.key_slice] == value["kidney_right"])
    assert right.boxes_voxel == [[float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]]
    assert right.key_slice == max(right.shown_slices, key=lambda k: (right_area[k], -k))


def test_sample_ct_samples_cover_the_abdomen_and_report_skips(sample_ct):
    volume, labels, names, result = sample_ct
    targets = {s.target for s in result.samples}
    assert {"liver", "spleen", "kidneys", "pancreas", "stomach", "gallbladder", "aorta", "urinary_bladder"} <= targets
    reasons = {k.target: k.reason for k in result.skipped}
    assert "absent" in reasons["brain"] and "unknown" in reasons["rib_left_7"]
    for s in result.samples:
        assert s.key_slice in s.shown_slices
        assert s.boxes_pixel == s.boxes_pixel_by_slice[s.key_slice]
        assert len(s.slice_areas) == volume.num_slices
        assert s.slice_areas[s.key_slice] == max(s.slice_areas[k] for k in s.shown_slices)
        for x1, y1, x2, y2 in s.boxes_pixel:
            assert 0 <= x1 < x2 <= s.image_size and 0 <= y1 < y2 <= s.image_size


def test_sample_ct_samples_roundtrip_json(sample_ct):
    _, _, _, result = sample_ct
    for s in result.samples:
        text = s.to_json()
        json.loads(text)  # plain types only
        back = VRSSample.from_json(text)
        assert back == s
        assert back.reward_target().to_json() == s.reward_target().to_json()
        answer = parse_answer(s.answer_text("both kidneys"))
        assert answer.slice_index == s.key_slice and len(answer.boxes) == len(s.boxes_pixel)
    with pytest.raises(DataError):
        VRSSample.from_json('{"case_id": "x"}')
    with pytest.raises(DataError):
        VRSSample.from_json("not json")


def test_sample_rows_split_queries_and_carry_reward_targets(sample_ct):
    _, _, _, result = sample_ct
    kidneys = [s for s in result.samples if s.target == "kidneys"]
    train, held = sample_rows(kidneys, "train"), sample_rows(kidneys, "held_out")
    assert train and held and not {r["query"] for r in train} & {r["query"] for r in held}
    assert len(train) + len(held) == len(kidneys[0].queries)
    row = train[0]
    json.dumps(row)
    from MedVolR1Lib.rewards import RewardTarget, compute_rewards

    target = RewardTarget.from_json(row["reward_target"])
    assert target.shown_slices == row["shown_slices"] and target.labels == kidneys[0].label_values
    assert compute_rewards([row["answer"]], [row["reward_target"]])["slice"] == [1.0]
    with pytest.raises(ValueError):
        sample_rows(kidneys, "test")
