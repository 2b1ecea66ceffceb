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
from MedVolR1Lib.fixtures.micro_sam2 import build_micro_sam2_checkpoint, micro_sam2_overrides
from MedVolR1Lib.propagation.medsam2 import (
    InMemoryFrames,
    MedSAM2Propagator,
    _StopRule,
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
