"""MedSAM2 propagator wiring, with a random-weight micro SAM2 loaded through the real checkpoint path.

The micro model's masks mean nothing: these tests check what reaches the predictor and what comes back
(directions, frames, objects, coordinates, caching, errors), never segmentation quality.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from MedVolR1Lib.anchor import EvidenceAnchor, VoxelBox
from MedVolR1Lib.errors import AnchorError, Cancelled, CheckpointError, DeviceError
from MedVolR1Lib.evidence import Evidence, EvidencePoint
from MedVolR1Lib.fixtures.micro_sam2 import build_micro_sam2_checkpoint, micro_sam2_overrides
from MedVolR1Lib.propagation.medsam2 import (
    InMemoryFrames,
    MedSAM2Propagator,
    _StopRule,
    fill_small_holes,
    largest_component,
    resize_slices_uint8,
)
from MedVolR1Lib.volume import volume_from_array

pytestmark = pytest.mark.filterwarnings("ignore:cannot import name '_C'")

SIZE = 128
K, J, I = 10, 40, 56  # non-square slices, so x/y scaling mix-ups show


def _synthetic(shift: float = 0.0):
    rng = np.random.default_rng(0)
    arr = rng.normal(-80.0, 30.0, (K, J, I)).astype(np.float32) + shift
    arr[2:8, 8:24, 10:30] += 180.0  # an "organ"
    arr[3:7, 26:36, 36:50] += 120.0  # a second one
    return volume_from_array(arr, np.diag([0.8, 0.8, 2.5, 1.0]), modality="CT", name="synthetic")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    path = tmp_path_factory.mktemp("medsam2") / "MedSAM2_micro.pt"
    overrides = build_micro_sam2_checkpoint(path, image_size=SIZE)
    return path, overrides


@pytest.fixture(scope="module")
def volume():
    return _synthetic()


@pytest.fixture(scope="module")
def prop(micro, volume):
    path, overrides = micro
    p = MedSAM2Propagator(path, hydra_overrides=overrides, device="cpu", stop_after_absent=None, keep_logits=True)
    p.prepare(volume)
    return p


TWO_BOXES = EvidenceAnchor(4, (VoxelBox(10, 8, 30, 24), VoxelBox(36, 26, 50, 36)))


def _expected_from_logits(trace, shape, merge):
    """Compose the output from the per-object logits the trace exposes (later boxes win)."""
    out = np.zeros(shape, np.uint8)
    for obj in trace.object_ids:
        for (direction, o, frame), logits in trace.logits.items():
            if o == obj and trace.object_scores[(direction, o)][frame] > 0:
                out[frame][logits > 0] = 1 if merge else obj
    return out


def test_micro_checkpoint_has_medsam2_layout(micro):
    path, overrides = micro
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert set(payload) == {"model"} and all(isinstance(v, torch.Tensor) for v in payload["model"].values())
    assert f"++model.image_size={SIZE}" in overrides
    assert overrides == micro_sam2_overrides(SIZE)


def test_input_preparation_matches_medsam2():
    gray = np.arange(2 * 6 * 9, dtype=np.uint8).reshape(2, 6, 9) * 2
    resized = resize_slices_uint8(gray, 32)
    assert resized.shape == (2, 32, 32) and resized.dtype == np.uint8
    frames = InMemoryFrames(torch.from_numpy(resized))
    x = frames[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    base = torch.from_numpy(resized[1]).float() / 255.0
    for c, (m, s) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        torch.testing.assert_close(x[c], (base - m) / s)
    torch.testing.assert_close(frames.take([1, 0], "cpu")[0], x)


def test_forward_and_reverse_cover_the_volume(prop, volume):
    mask = prop.propagate(EvidenceAnchor(4, (VoxelBox(10, 8, 30, 24),)))
    trace = prop.last_trace
    assert trace.visited["forward"] == list(range(4, K))
    assert trace.visited["reverse"] == list(range(4, -1, -1))
    assert mask.shape == volume.shape and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}
    # every visited frame produced slice-sized logits for the object, on both sides of the key slice
    for direction, frames in trace.visited.items():
        for frame in frames:
            assert trace.logits[(direction, 1, frame)].shape == (J, I)
    np.testing.assert_array_equal(mask, _expected_from_logits(trace, volume.shape, merge=True))


def test_two_boxes_are_two_objects(prop, volume):
    labels = prop.propagate(TWO_BOXES, merge=False)
    trace = prop.last_trace
    assert trace.object_ids == (1, 2)
    for direction in ("forward", "reverse"):
        for obj in (1, 2):
            assert sorted(trace.object_scores[(direction, obj)]) == sorted(trace.visited[direction])
    # different prompts give different predictions (the objects are not one shared track)
    assert not np.array_equal(trace.key_logits[1], trace.key_logits[2])
    np.testing.assert_array_equal(labels, _expected_from_logits(trace, volume.shape, merge=False))
    # the fixture's object-score bias makes both objects' (random) masks reach the output
    assert {1, 2} <= set(np.unique(labels).tolist())
    merged = prop.propagate(TWO_BOXES, merge=True)
    np.testing.assert_array_equal(merged, (labels > 0).astype(np.uint8))


def test_box_reaches_predictor_in_its_pixel_convention(prop):
    box = VoxelBox(7, 5, 21, 33)
    prop.propagate(EvidenceAnchor(2, (box,)), slice_range=(2, 3))
    got = prop.last_trace.model_boxes[1]
    # frames are transposed (rows = canonical i, columns = canonical j) and far edges are the last covered pixel,
    # MedSAM2's pixel-index convention: voxels 7..20 x 5..32 -> x 5..32, y 7..20 of a J-wide, I-high frame
    want = (box.j0 * SIZE / J, box.i0 * SIZE / I, (box.j1 - 1) * SIZE / J, (box.i1 - 1) * SIZE / I)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_slice_range_is_honoured(prop, volume):
    mask = prop.propagate(TWO_BOXES, slice_range=(3, 6))
    trace = prop.last_trace
    assert trace.visited == {"forward": [4, 5, 6], "reverse": [4, 3]}
    assert not mask[:3].any() and not mask[7:].any()
    # a key slice at the range's lower end needs no reverse pass
    prop.propagate(EvidenceAnchor(3, TWO_BOXES.boxes), slice_range=(3, 5))
    assert prop.last_trace.visited == {"forward": [3, 4, 5]}
    with pytest.raises(AnchorError, match="outside the slice range"):
        prop.propagate(TWO_BOXES, slice_range=(5, 8))


def test_features_are_cached_per_volume(micro, volume):
    path, overrides = micro
    p = MedSAM2Propagator(path, hydra_overrides=overrides, device="cpu", stop_after_absent=None)
    assert p.encoded_frames == 0
    p.prepare(volume)
    assert p.encoded_frames == K  # one encoder pass per slice
    window = (2, 7)  # all slices would show the same, slower
    first = p.propagate(TWO_BOXES, slice_range=window)
    moved = EvidenceAnchor(5, (VoxelBox(12, 10, 28, 22),))  # the user drags the box
    p.propagate(moved, slice_range=window)
    again = p.propagate(TWO_BOXES, slice_range=window)
    assert p.encoded_frames == K  # re-propagation never reruns the image encoder
    np.testing.assert_array_equal(first, again)  # and the prompt state was fully reset in between
    p.prepare(volume)
    assert p.encoded_frames == K  # same fingerprint: free
    changed = _synthetic(shift=60.0)
    p.prepare(changed)
    assert p.encoded_frames == 2 * K  # another volume: encoded again
    assert p.propagate(TWO_BOXES, slice_range=window).shape == changed.shape


def test_stop_rule():
    rule = _StopRule(patience=2)
    assert rule.update(False, is_key=True)  # an anchor slice never counts
    assert rule.update(False, is_key=False)
    assert rule.update(True, is_key=False)  # presence resets the count
    assert rule.update(False, is_key=False)
    assert not rule.update(False, is_key=False)
    never = _StopRule(patience=None)  # the official script: track every slice
    assert all(never.update(False, is_key=False) for _ in range(20))


def test_tracking_stops_where_the_object_score_says_it_is_gone(tmp_path, volume):
    # object_score_bias=None keeps the random object-score head, which here scores every slice "absent"
    path = tmp_path / "absent.pt"
    overrides = build_micro_sam2_checkpoint(path, image_size=SIZE, object_score_bias=None)
    p = MedSAM2Propagator(path, hydra_overrides=overrides, device="cpu", stop_after_absent=2)
    p.prepare(volume)
    mask = p.propagate(EvidenceAnchor(4, (VoxelBox(10, 8, 30, 24),)))
    trace = p.last_trace
    assert all(score <= 0 for scores in trace.object_scores.values() for score in scores.values())
    assert trace.visited == {"forward": [4, 5, 6], "reverse": [4, 3, 2]}
    assert trace.stopped_at == {("forward", 1): 6, ("reverse", 1): 2}
    assert not mask.any()
    # with two anchors a stopped object sleeps until its next anchor, then tracks on from it
    p.propagate(Evidence((EvidenceAnchor(1, (BOX_A,)), EvidenceAnchor(8, (BOX_B,)))))
    assert p.last_trace.visited == {"forward": [1, 2, 3, 8, 9], "reverse": [8, 7, 6, 1, 0]}


def test_offload_fallback_gives_the_same_result(micro, volume):
    path, overrides = micro
    p = MedSAM2Propagator(path, hydra_overrides=overrides, device="cpu", stop_after_absent=None)
    p.prepare(volume)
    before = p.propagate(TWO_BOXES, merge=False, slice_range=(2, 7))
    p._enable_offload()  # what a CUDA out-of-memory during tracking triggers
    assert p._state["storage_device"] == torch.device("cpu")
    np.testing.assert_array_equal(p.propagate(TWO_BOXES, merge=False, slice_range=(2, 7)), before)
    assert p.encoded_frames == K


def test_progress_reports_and_cancel(prop):
    seen = []
    prop.propagate(TWO_BOXES, slice_range=(3, 6), progress=lambda f, m: seen.append(f))
    assert seen[-1] == 1.0 and all(0.0 <= f <= 1.0 for f in seen) and seen == sorted(seen)

    def cancel(fraction, message):
        if fraction > 0.3:
            raise Cancelled("user pressed cancel")

    with pytest.raises(Cancelled):
        prop.propagate(TWO_BOXES, slice_range=(2, 7), progress=cancel)
    assert prop.propagate(TWO_BOXES, slice_range=(3, 5)).shape == (K, J, I)  # usable after a cancel


def test_propagate_needs_prepare(micro):
    path, overrides = micro
    p = MedSAM2Propagator(path, hydra_overrides=overrides, device="cpu")
    with pytest.raises(RuntimeError, match="prepare"):
        p.propagate(TWO_BOXES)
    assert p.describe()["image_size"] == SIZE and len(p.describe()["sha256"]) == 64


def test_real_ct_crop(micro, sample_volume, sample_labels):
    path, overrides = micro
    kidney = sample_labels == 2  # kidney_right
    areas = kidney.sum(axis=(1, 2))
    key = int(np.argmax(areas))
    k0, k1 = max(key - 4, 0), min(key + 4, sample_volume.shape[0])
    crop = volume_from_array(sample_volume.array[k0:k1], sample_volume.ijk_to_ras, modality="CT", name="crop")
    js, is_ = np.nonzero(kidney[key])
    anchor = EvidenceAnchor(key - k0, (VoxelBox.from_voxels(is_.min(), js.min(), is_.max(), js.max()),))
    p = MedSAM2Propagator(path, hydra_overrides=overrides, device="cpu", stop_after_absent=None)
    p.prepare(crop)
    mask = p.propagate(anchor)
    assert mask.shape == crop.shape and mask.dtype == np.uint8
    trace = p.last_trace
    assert trace.visited["forward"][-1] == crop.shape[0] - 1 and trace.visited["reverse"][-1] == 0


# ---- errors ---------------------------------------------------------------------------------------------------------


def test_missing_checkpoint_says_where_it_comes_from(tmp_path):
    with pytest.raises(CheckpointError) as err:
        MedSAM2Propagator(tmp_path / "nope" / "MedSAM2_latest.pt", device="cpu")
    assert "MedSAM2_latest.pt" in str(err.value) and "huggingface.co/wanglab/MedSAM2" in str(err.value)
    assert "--sam-checkpoint" in str(err.value)


def test_corrupt_checkpoint(tmp_path, micro):
    _, overrides = micro
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="junk.pt"):
        MedSAM2Propagator(junk, hydra_overrides=overrides, device="cpu")
    no_model = tmp_path / "no_model.pt"
    torch.save({"state_dict": {}}, no_model)
    with pytest.raises(CheckpointError, match="under 'model'"):
        MedSAM2Propagator(no_model, hydra_overrides=overrides, device="cpu")
    wrong_keys = tmp_path / "wrong_keys.pt"
    torch.save({"model": {"backbone.weight": torch.zeros(3)}}, wrong_keys)
    with pytest.raises(CheckpointError, match=r"missing keys \d+ .*unexpected keys 1 \(backbone.weight\)"):
        MedSAM2Propagator(wrong_keys, hydra_overrides=overrides, device="cpu")


def test_checkpoint_of_another_model_size(micro):
    path, overrides = micro
    # same module tree, twice the Hiera width: keys match, shapes do not
    wider = overrides + [
        "++model.image_encoder.trunk.embed_dim=32",
        "++model.image_encoder.neck.backbone_channel_list=[256,128,64,32]",
    ]
    with pytest.raises(CheckpointError, match="shapes do not match"):
        MedSAM2Propagator(path, hydra_overrides=wider, device="cpu")
    # the full-size MedSAM2 model (no micro overrides) has more blocks: missing keys
    with pytest.raises(CheckpointError, match="missing keys"):
        MedSAM2Propagator(path, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_a_device_error(micro):
    path, overrides = micro
    with pytest.raises(DeviceError, match="CUDA is not available"):
        MedSAM2Propagator(path, hydra_overrides=overrides, device="cuda")
    with pytest.raises(DeviceError):
        MedSAM2Propagator(path, hydra_overrides=overrides, device="tpu")


def test_dtype_auto_follows_the_hardware(monkeypatch):
    import MedVolR1Lib.propagation.medsam2 as m

    monkeypatch.setattr(m, "cpu_has_native_bf16", lambda: False)
    assert m.resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert m.resolve_dtype("auto", torch.device("cuda")) == "bfloat16"
    monkeypatch.setattr(m, "cpu_has_native_bf16", lambda: True)
    assert m.resolve_dtype("auto", torch.device("cpu")) == "bfloat16"
    assert m.resolve_dtype("float32", torch.device("cpu")) == "float32"
    with pytest.raises(DeviceError, match="unknown dtype"):
        m.resolve_dtype("float16", torch.device("cpu"))


def test_float32_and_bfloat16_tracking_agree(micro, volume):
    """bf16 autocast (the CPU 'auto' where bf16 is native) must not change the masks materially."""
    path, overrides = micro
    masks = {}
    for dt in ("float32", "bfloat16"):
        p = MedSAM2Propagator(path, hydra_overrides=overrides, device="cpu", dtype=dt, stop_after_absent=None)
        assert p.describe()["dtype"] == dt
        p.prepare(volume)
        masks[dt] = p.propagate(TWO_BOXES) > 0
    a, b = masks["float32"], masks["bfloat16"]
    assert a.any()
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice > 0.98, dice  # measured 0.996 on this micro model's near-zero random logits


# ---- evidence: several anchors, points, extent limits (issue 10) -------------------------------------------------


BOX_A = VoxelBox(10, 8, 30, 24)
BOX_B = VoxelBox(12, 10, 26, 22)


def test_two_anchors_both_condition_the_video(prop, volume):
    single = prop.propagate(EvidenceAnchor(2, (BOX_A,)))
    single_logits = dict(prop.last_trace.logits)
    two = Evidence((EvidenceAnchor(2, (BOX_A,)), EvidenceAnchor(7, (BOX_B,))))
    mask = prop.propagate(two)
    trace = prop.last_trace
    # both anchors were given to the predictor as prompts of the same object
    assert set(trace.prompts) == {(1, 2), (1, 7)}
    assert trace.prompts[(1, 7)][1].tolist() == [2, 3]  # a box: its two corners
    # nearer-anchor rule: 3-4 from the anchor at 2 (forward), 5-6 from the anchor at 7 (reverse), outward beyond
    assert trace.visited == {"forward": [2, 3, 4, 7, 8, 9], "reverse": [7, 6, 5, 2, 1, 0]}
    # the second key slice is segmented from its own prompt, and slices near it differ from the one-anchor run
    second = trace.logits[("forward", 1, 7)]
    np.testing.assert_array_equal(mask[7], (second > 0).astype(np.uint8))
    assert mask[7].any()
    assert not np.array_equal(second, single_logits[("forward", 1, 7)])
    for frame, direction in ((6, "reverse"), (8, "forward")):  # the one-anchor run tracked both forward from 2
        assert not np.array_equal(trace.logits[(direction, 1, frame)], single_logits[("forward", 1, frame)])
    assert not np.array_equal(mask, single)
    np.testing.assert_array_equal(mask, _expected_from_logits(trace, volume.shape, merge=True))


def test_equidistant_slice_takes_both_passes(prop):
    prop.propagate(Evidence((EvidenceAnchor(2, (BOX_A,)), EvidenceAnchor(6, (BOX_B,)))), slice_range=(1, 7))
    assert prop.last_trace.visited == {"forward": [2, 3, 4, 6, 7], "reverse": [6, 5, 4, 2, 1]}


def test_boxes_of_a_second_anchor_join_the_nearest_object(prop):
    b1, b2 = TWO_BOXES.boxes
    two = Evidence((TWO_BOXES, EvidenceAnchor(6, (VoxelBox(37, 27, 49, 35), VoxelBox(11, 9, 29, 23), VoxelBox(1, 30, 6, 38)))))
    labels = prop.propagate(two, merge=False, slice_range=(3, 7))
    trace = prop.last_trace
    assert trace.object_ids == (1, 2, 3)  # the third box on slice 6 matches no first-anchor box: a new object
    assert {(1, 4), (2, 4), (1, 6), (2, 6), (3, 6)} == set(trace.prompts)
    # object 1 (first box) got the box near it on slice 6, object 2 the one near the second box
    scale = np.array([SIZE / J, SIZE / I])
    np.testing.assert_allclose(trace.prompts[(1, 6)][0][0], np.array([9, 11]) * scale, rtol=1e-5)
    np.testing.assert_allclose(trace.prompts[(2, 6)][0][0], np.array([27, 37]) * scale, rtol=1e-5)
    assert labels.max() <= 3


def test_points_reach_the_predictor(prop):
    k = 4
    outputs = {}
    for positive in (True, False):
        ev = Evidence((EvidenceAnchor(k, (BOX_A,)),), points=(EvidencePoint(k, 20.0, 15.0, positive),))
        prop.propagate(ev, slice_range=(3, 5))
        coords, labels = prop.last_trace.prompts[(1, k)]
        assert labels.tolist() == [2, 3, 1 if positive else 0]
        # point (i=20, j=15) -> frame pixel (x=j, y=i) of the transposed frame, scaled to the model square
        np.testing.assert_allclose(coords[2], [15 * SIZE / J, 20 * SIZE / I], rtol=1e-5)
        outputs[positive] = prop.last_trace.key_logits[1]
    assert not np.array_equal(outputs[True], outputs[False])  # the label changes the prediction


def test_points_join_the_box_they_are_in(prop):
    k = 4
    ev = Evidence((TWO_BOXES,), points=(EvidencePoint(k, 40.0, 30.0, False), EvidencePoint(k, 5.0, 5.0, True)))
    prop.propagate(ev, slice_range=(4, 5))
    assert prop.last_trace.prompts[(2, k)][1].tolist() == [2, 3, 0]  # inside the second box
    assert prop.last_trace.prompts[(1, k)][1].tolist() == [2, 3, 1]  # nearest to the first box


def test_nothing_passes_the_extent_limit(prop):
    ev = Evidence((EvidenceAnchor(4, (BOX_A,)), EvidenceAnchor(6, (BOX_B,))), z_range=(3, 7))
    mask = prop.propagate(ev)
    frames = {f for v in prop.last_trace.visited.values() for f in v}
    assert frames == set(range(3, 8))
    assert not mask[:3].any() and not mask[8:].any()
    # the limit and a coherence window combine (the narrower wins)
    prop.propagate(ev, slice_range=(0, 6))
    assert {f for v in prop.last_trace.visited.values() for f in v} == set(range(3, 7))
    with pytest.raises(AnchorError, match="outside"):
        prop.propagate(Evidence((EvidenceAnchor(4, (BOX_A,)),), z_range=(5, 7)))


def test_repropagating_evidence_encodes_nothing_new(micro, volume):
    path, overrides = micro
    p = MedSAM2Propagator(path, hydra_overrides=overrides, device="cpu", stop_after_absent=None)
    p.prepare(volume)
    assert p.encoded_frames == K
    first = Evidence((EvidenceAnchor(3, (BOX_A,)),))
    corrected = Evidence(
        (EvidenceAnchor(3, (BOX_A,)), EvidenceAnchor(6, (BOX_B,))), z_range=(2, 7), points=(EvidencePoint(6, 20, 15, False),)
    )
    a = p.propagate(first, slice_range=(2, 7))
    p.propagate(corrected)
    assert p.encoded_frames == K
    np.testing.assert_array_equal(p.propagate(first, slice_range=(2, 7)), a)  # undo gives the same mask back


def test_frames_are_transposed_and_masks_map_back_exactly(micro, volume):
    """Transposed frames of a volume = radiological frames of its transposed twin: same prompts and masks."""
    path, overrides = micro
    from MedVolR1Lib.volume import Volume

    twin = Volume(np.ascontiguousarray(volume.array.transpose(0, 2, 1)), volume.ijk_to_ras, modality="CT", name="twin")
    a = MedSAM2Propagator(path, hydra_overrides=overrides, device="cpu", stop_after_absent=None)
    b = MedSAM2Propagator(path, hydra_overrides=overrides, device="cpu", stop_after_absent=None, frame_orientation="radiological")
    a.prepare(volume)
    b.prepare(twin)
    torch.testing.assert_close(a._state["images"].gray, b._state["images"].gray)
    box = VoxelBox(7, 5, 21, 33)
    point = EvidencePoint(4, 12.0, 20.0, True)
    mask_a = a.propagate(Evidence((EvidenceAnchor(4, (box,)),), points=(point,)), merge=False)
    twin_box = VoxelBox(box.j0, box.i0, box.j1, box.i1)
    twin_point = EvidencePoint(4, point.j, point.i, True)
    mask_b = b.propagate(Evidence((EvidenceAnchor(4, (twin_box,)),), points=(twin_point,)), merge=False)
    assert mask_a.shape == volume.shape and mask_a.any()
    np.testing.assert_array_equal(mask_a, mask_b.transpose(0, 2, 1))
    with pytest.raises(ValueError, match="frame_orientation"):
        MedSAM2Propagator(path, hydra_overrides=overrides, device="cpu", frame_orientation="lps")


def test_fill_small_holes_on_crafted_scores():
    scores = torch.full((2, 1, 12, 12), 3.0)
    scores[0, 0, 2:4, 2:4] = -1.0  # 4-px hole: filled
    scores[0, 0, 6:9, 6:9] = -2.0  # 9-px hole: kept (above 8)
    scores[0, 0, 0, 11] = -1.0  # corner speck touching the border: a small background component too, filled
    scores[0, 0, 10, 0] = scores[0, 0, 11, 1] = -1.0  # diagonal pair: one 8-connected 2-px component
    scores[1, 0, :, 6:] = -5.0  # a large background half: kept
    out = fill_small_holes(scores, 8)
    assert torch.all(out[0, 0, 2:4, 2:4] == 0.1) and out[0, 0, 0, 11] == 0.1
    assert out[0, 0, 10, 0] == 0.1 and out[0, 0, 11, 1] == 0.1
    assert torch.all(out[0, 0, 6:9, 6:9] == -2.0)
    torch.testing.assert_close(out[1], scores[1])
    untouched = scores > 0
    torch.testing.assert_close(out[untouched], scores[untouched])
    assert fill_small_holes(scores, 0) is scores


def test_hole_filling_runs_inside_tracking(micro, volume):
    """sam2 without _C skips fill_hole_area=8 with a warning; ours fills, so no small background holes remain."""
    path, overrides = micro

    def small_holes(p):
        count = 0
        for out in p._state["output_dict_per_obj"][0]["non_cond_frame_outputs"].values():
            background = (out["pred_masks"][0, 0] <= 0).cpu().numpy()
            labelled, n = ndimage_label(background)
            areas = np.bincount(labelled.ravel())[1:]
            count += int((areas <= 8).sum())
        return count

    holes = {}
    for area in (0, 8):
        p = MedSAM2Propagator(path, hydra_overrides=overrides, device="cpu", stop_after_absent=None, fill_hole_area=area)
        p.prepare(volume)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # sam2's "Skipping the post-processing step" must not come
            p.propagate(EvidenceAnchor(4, (BOX_A,)), slice_range=(2, 7))
        holes[area] = small_holes(p)
    assert holes[0] > 0, "the crafted check needs random logits with small holes"
    assert holes[8] == 0


def ndimage_label(plane):
    from scipy import ndimage

    return ndimage.label(plane, structure=np.ones((3, 3), dtype=bool))


def test_largest_component_option(tmp_path, volume):
    mask = np.zeros((4, 6, 6), bool)
    mask[0:2, 0:2, 0:2] = True  # 8 voxels
    mask[3, 4:6, 4:6] = True  # 4 voxels, separate
    mask[2, 2, 2] = True  # touches the first only diagonally (26-connected): joins it
    kept = largest_component(mask)
    assert kept.sum() == 9 and not kept[3].any()
    from scipy import ndimage

    # object-score bias 0.15: the prompted (anchor) slices score present, tracked slices absent (scores about
    # -0.16 / -0.25 before the bias, +0.04 / -0.04 after), so one object's mask is two separate slabs: the anchors at 2 and 7
    path = tmp_path / "gaps.pt"
    overrides = build_micro_sam2_checkpoint(path, image_size=SIZE, object_score_bias=0.15)
    two = Evidence((EvidenceAnchor(2, (BOX_A,)), EvidenceAnchor(7, (BOX_B,))))
    pieces = {}
    for keep in (False, True):
        p = MedSAM2Propagator(path, hydra_overrides=overrides, device="cpu", stop_after_absent=None, largest_component=keep)
        p.prepare(volume)
        mask = p.propagate(two)
        assert p.last_trace.object_ids == (1,)
        pieces[keep] = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))[1]
        assert mask.any()
    assert pieces[False] > 1 and pieces[True] == 1
    assert p.describe()["largest_component"] is True
