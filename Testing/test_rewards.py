"""Rewards by hand-computed cases, garbage that must score 0 without raising, trl signatures, coherence
with a test-helper propagator that really propagates through the GT."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from MedVolR1Lib.anchor import ParsedAnswer, answer_problems, format_answer, parse_answer
from MedVolR1Lib.errors import DataError
from MedVolR1Lib.propagation.base import Propagator
from MedVolR1Lib.rewards import (
    CoherenceScorer,
    RewardTarget,
    RewardWeights,
    box_iou_matrix,
    completion_text,
    compute_rewards,
    format_score,
    make_coherence_reward,
    make_format_reward,
    make_grounding_reward,
    make_reward_functions,
    make_slice_reward,
    matched_box_score,
    oracle_curve,
)
from MedVolR1Lib.samples import build_samples, label_map_from_masks
from MedVolR1Lib.volume import Volume

A, B = [10, 10, 30, 30], [60, 60, 80, 80]


def _target(**changes) -> RewardTarget:
    data = dict(
        case_id="c1",
        labels=[1],
        shown_slices=[2, 4, 6],
        image_size=112,
        geometry={"image_size": 112, "pixels_per_voxel_x": 1.0, "pixels_per_voxel_y": 1.0, "offset_x": 0.0, "offset_y": 0.0, "shape_ji": [112, 112]},
        slice_areas=[0, 0, 5, 0, 10, 0, 8, 0, 0],
        gt_boxes={2: [A], 4: [A, B], 6: [B]},
    )
    data.update(changes)
    return RewardTarget(**data)


def _answer(k, boxes, think="the target"):
    return format_answer(k, boxes, think)


def _scores(text, target=None, **kw):
    return {k: v[0] for k, v in compute_rewards([text], [target or _target()], **kw).items()}


# ---------------------------------------------------------------- hand-computed cases


def test_perfect_answer_scores_one_everywhere():
    s = _scores(_answer(4, [A, B]))
    assert s["format"] == 1.0 and s["slice"] == 1.0 and s["grounding"] == pytest.approx(1.0)
    w = RewardWeights()
    assert s["total"] == pytest.approx(w.format + w.slice + w.grounding)
    assert "coherence" not in s  # no scorer given, no fake zeros in the logs
    # order of the boxes does not matter (Hungarian matching)
    assert _scores(_answer(4, [B, A]))["grounding"] == pytest.approx(1.0)


def test_disjoint_extra_missing_and_partial_boxes():
    assert _scores(_answer(4, [[90, 0, 100, 8]]))["grounding"] == 0.0
    assert _scores(_answer(4, [A, B, [90, 90, 100, 100]]))["grounding"] == pytest.approx(2 / 3)
    assert _scores(_answer(4, [A]))["grounding"] == pytest.approx(1 / 2)
    # half-height box on A: IoU 0.5, one of two GT boxes -> 0.25
    assert _scores(_answer(4, [[10, 10, 30, 20]]))["grounding"] == pytest.approx(0.25)
    # two predictions on one GT box: only one can match
    assert _scores(_answer(2, [A, A]))["grounding"] == pytest.approx(0.5)


def test_wrong_slice_lowers_the_slice_reward_and_grounds_against_that_slice():
    s = _scores(_answer(2, [A, B]))
    assert s["slice"] == pytest.approx(0.5)  # A(2)=5, max over shown 10
    assert s["grounding"] == pytest.approx(0.5)  # slice 2 has only box A
    s = _scores(_answer(3, [A, B]))  # not shown: the model never saw it
    assert s["slice"] == 0.0 and s["grounding"] == 0.0 and s["format"] == pytest.approx(0.8)
    target = _target(shown_slices=[2, 3, 4], gt_boxes={2: [A], 3: [], 4: [A, B]})
    assert _scores(_answer(3, [A]), target)["slice"] == 0.0  # shown slice that misses the target


def test_oracle_curve_replaces_area_when_present():
    target = _target(oracle={0: 0.1, 4: 0.8, 8: 0.4})
    # Q(2)=0.45, Q(4)=0.8, Q(6)=0.6 by linear interpolation
    assert _scores(_answer(6, [B]), target)["slice"] == pytest.approx(0.75)
    assert _scores(_answer(6, [B]), target, slice_source="area")["slice"] == pytest.approx(0.8)
    assert _scores(_answer(2, [A]), target)["slice"] == pytest.approx(0.45 / 0.8)
    assert _scores(_answer(6, [B]), _target(oracle={0: 0.0}), slice_source="oracle")["slice"] == 0.0
    assert _scores(_answer(6, [B]), _target(oracle={0: 0.0}))["slice"] == pytest.approx(0.8)  # auto falls back


def test_oracle_slice_reward_covers_every_visible_slice_beyond_the_sampled_points():
    # stride sampling computed Q on slices 2 and 4 only; slice 6 still shows the target (area 8)
    target = _target(oracle={2: 0.5, 4: 0.8})
    assert _scores(_answer(6, [B]), target)["slice"] == pytest.approx(1.0)  # held at Q(4), was 0 (right=0.0)
    assert _scores(_answer(2, [A]), target)["slice"] == pytest.approx(0.5 / 0.8)
    absent = _target(oracle={2: 0.5, 4: 0.8}, shown_slices=[2, 4, 7], gt_boxes={2: [A], 4: [A, B], 7: []})
    assert _scores(_answer(7, [B]), absent)["slice"] == 0.0  # a shown slice without the target stays 0


def _padded_target() -> RewardTarget:
    # a 56-row x 112-column scan shown at 112 px: rows 0..27.9 and 84.1..112 of the image are black padding
    geometry = {"image_size": 112, "pixels_per_voxel_x": 1.0, "pixels_per_voxel_y": 1.0, "offset_x": 0.0, "offset_y": 28.0, "shape_ji": [56, 112]}
    return _target(geometry=geometry)


def test_boxes_only_in_the_black_padding_lose_format_credit_like_the_grounder_rejects_them():
    from MedVolR1Lib.errors import AnchorError

    target = _padded_target()
    padding, straddling = [10, 2, 30, 20], [10, 20, 30, 40]
    assert _scores(_answer(4, [padding]), target)["format"] == pytest.approx(0.7)
    assert _scores(_answer(4, [straddling]), target)["format"] == pytest.approx(1.0)
    geometry = target.view_geometry()
    with pytest.raises(AnchorError):
        geometry.anchor_from_answer(parse_answer(_answer(4, [padding])), target.num_slices)
    geometry.anchor_from_answer(parse_answer(_answer(4, [straddling])), target.num_slices)  # accepted (clipped)


@settings(max_examples=100, deadline=None)
@given(boxes=st.lists(st.tuples(*[st.integers(-5, 117)] * 4), min_size=1, max_size=4))
def test_format_is_one_exactly_when_the_grounder_accepts_the_answer(boxes):
    from MedVolR1Lib.errors import AnchorError

    target = _padded_target()
    parsed = parse_answer(format_answer(4, boxes, "kidney"))
    try:
        target.view_geometry().anchor_from_answer(parsed, target.num_slices)
        accepted = not answer_problems(parsed, target.rules())
    except AnchorError:
        accepted = False
    assert (format_score(parsed, target) == pytest.approx(1.0)) == accepted


def test_graded_format_credit():
    t = _target()
    assert _scores(format_answer(4, [A, B]), t)["format"] == pytest.approx(0.9)  # no think
    assert _scores(_answer(4, [A, [100, 100, 130, 110]]), t)["format"] == pytest.approx(0.85)  # one box leaves the image
    assert _scores(_answer(4, [A] * 6), t)["format"] == pytest.approx(0.9)  # 6 boxes, at most 4
    inverted = '<think>x</think><answer>{"slice": 4, "boxes": [[30, 30, 10, 10]]}</answer>'
    assert _scores(inverted, t)["format"] == pytest.approx(0.7)
    assert _scores(inverted, t)["grounding"] == 0.0


GARBAGE = [
    "",
    "the liver is on slice 4",
    "<answer>not json</answer>",
    '<answer>{"slice": 4}</answer>',
    '<answer>{"slice": "4", "boxes": [[1, 2, 3, 4]]}</answer>',
    '<answer>{"slice": 4, "boxes": [[1, 2, 3]]}</answer>',
    '<answer>{"slice": 4, "boxes": [[1, 2, 3, NaN]]}</answer>',
    '<answer>{"slice": 1e400, "boxes": [[1, 2, 3, 4]]}</answer>',
    "<answer>[" * 5000 + "</answer>",
    '<think>a</think><answer>{"slice": 4, "boxes": [[1,2,3,4]]}</answer> trailing',
    None,
    12,
    {"role": "assistant"},
    [{"role": "assistant", "content": None}],
    [{"role": "user", "content": _answer(4, [A, B])}],  # not the assistant's
    [{"role": "assistant", "content": [{"type": "image"}, 5]}],
]


@pytest.mark.parametrize("completion", GARBAGE, ids=range(len(GARBAGE)))
def test_malformed_output_scores_zero_and_never_raises(completion):
    s = _scores(completion)
    assert s == {"format": 0.0, "slice": 0.0, "grounding": 0.0, "total": 0.0}


def test_extreme_but_parseable_boxes_do_not_raise():
    for boxes in ([[0, 0, 1e300, 1e300]], [[-1e300, -1e300, 1e300, 1e300]], [[5, 5, 5, 5]], [[1e-300, 0, 2e-300, 1]]):
        s = _scores(_answer(4, [[float(v) for v in b] for b in boxes]).replace(".0", ""))
        assert all(math.isfinite(v) and 0.0 <= v for v in s.values())


@settings(max_examples=150, deadline=None)
@given(
    k=st.sampled_from([1, 2, 4, 6, 120]),
    boxes=st.lists(st.tuples(*[st.integers(-20, 140)] * 4), min_size=1, max_size=6),
    think=st.sampled_from([None, "", "kidney"]),
)
def test_format_is_one_exactly_when_the_answer_has_no_problems(k, boxes, think):
    target = _target()
    parsed = parse_answer(format_answer(k, boxes, think))
    assert isinstance(parsed, ParsedAnswer)
    score = format_score(parsed, target)
    perfect = bool(think) and not answer_problems(parsed, target.rules())
    assert (score == pytest.approx(1.0)) == perfect
    assert 0.4 <= score <= 1.0


def test_box_iou_matrix_by_hand():
    iou = box_iou_matrix([A, [20, 20, 40, 40]], [A, B])
    assert iou[0, 0] == 1.0 and iou[0, 1] == 0.0
    assert iou[1, 0] == pytest.approx(100 / 700)
    assert matched_box_score([], [A]) == 0.0 and matched_box_score([A], []) == 0.0


# ---------------------------------------------------------------- serialisation and trl signatures


def test_reward_target_json_roundtrip_and_errors():
    t = _target(oracle={0: 0.1, 4: 0.8})
    text = t.to_json()
    assert isinstance(json.loads(text)["gt_boxes"]["4"], list)
    back = RewardTarget.from_json(text)
    assert back == t and back.gt_boxes[4] == [[float(v) for v in A], [float(v) for v in B]]
    with pytest.raises(DataError):
        RewardTarget.from_json("{")
    with pytest.raises(DataError):
        RewardTarget.from_json('{"case_id": "x"}')


def test_trl_reward_functions_accept_strings_and_conversations():
    funcs = [make_format_reward(), make_slice_reward(), make_grounding_reward()]
    assert [f.__name__ for f in funcs] == ["format_reward", "slice_reward", "grounding_reward"]
    text = _answer(4, [A])
    completions = [
        text,
        [{"role": "assistant", "content": text}],
        [{"role": "assistant", "content": [{"type": "text", "text": text[:20]}, {"type": "text", "text": text[20:]}]}],
        "garbage",
    ]
    column = [_target().to_json()] * 4
    for f in funcs:
        values = f(prompts=[None] * 4, completions=completions, reward_target=column, trainer_state=None, completion_ids=None)
        assert len(values) == 4 and values[0] == values[1] == values[2] and values[3] == 0.0
    assert funcs[2](None, completions, column)[0] == pytest.approx(0.5)
    assert completion_text([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]) == "ab"
    with pytest.raises(ValueError, match="reward targets"):
        funcs[0](None, completions, column[:2])
    funcs, weights = make_reward_functions(RewardWeights(format=0.1))
    assert len(funcs) == 3 and weights == [0.1, 0.5, 1.0]


# ---------------------------------------------------------------- coherence


class GTSlabPropagator(Propagator):
    """TEST HELPER, not a model: 'propagates' by taking the GT voxels 3D-connected to the seed (GT inside the
    boxes on the key slice), restricted to the boxes' columns and the slice range. A box on the wrong place or
    slice yields nothing; a box on one kidney yields one kidney."""

    name = "gt-slab-test-helper"

    def __init__(self, gt: np.ndarray):
        self.gt = np.asarray(gt) != 0
        self.prepared = []
        self.propagations = 0

    def prepare(self, volume, progress=None):
        self.prepared.append(volume.fingerprint)

    def propagate(self, anchor, *, merge=True, slice_range=None, progress=None):
        self.propagations += 1
        k = anchor.slice_index
        z0, z1 = slice_range if slice_range is not None else (0, self.gt.shape[0] - 1)
        column = np.zeros(self.gt.shape[1:], bool)
        for box in anchor.boxes:
            i0, j0, i1, j1 = box.voxel_range(self.gt.shape[1:])
            column[j0 : j1 + 1, i0 : i1 + 1] = True
        allowed = np.zeros_like(self.gt)
        allowed[z0 : z1 + 1] = self.gt[z0 : z1 + 1] & column[None]
        labelled, _ = ndimage.label(allowed)
        seeds = np.unique(labelled[k][allowed[k]])
        return np.isin(labelled, seeds[seeds > 0]).astype(np.uint8)


@pytest.fixture()
def kidneys_case():
    shape = (12, 40, 50)
    masks = np.zeros((1, *shape), bool)
    masks[0, 3:9, 15:25, 5:15] = True
    masks[0, 4:8, 15:25, 35:45] = True
    volume = Volume(np.random.default_rng(1).normal(size=shape).astype(np.float32), np.diag([-1.5, -1.5, 3.0, 1.0]), modality="ZSCORE", name="case7")
    label_map, names = label_map_from_masks(masks, ["kidney"])
    sample = build_samples(volume, label_map, names, shown_slices=[1, 4, 6, 10], image_size=112).samples[0]

    def resolve(case_id, labels):
        assert case_id == "case7"
        return volume, np.isin(label_map, labels)

    return volume, label_map, sample, resolve


def test_coherence_scores_a_real_propagation_and_prepares_once_per_volume(kidneys_case):
    volume, label_map, sample, resolve = kidneys_case
    propagator = GTSlabPropagator(label_map > 0)
    scorer = CoherenceScorer(propagator, resolve, window=2)
    target = sample.reward_target()
    k = sample.key_slice
    one_kidney = format_answer(k, sample.boxes_pixel[:1], "x")
    completions = [sample.answer_text("x"), one_kidney, _answer(10, sample.boxes_pixel), "garbage", _answer(k, [[40, 80, 60, 100]]), _answer(k, [[0, 0, 5, 5]])]
    out = compute_rewards(completions, [target.to_json()] * len(completions), coherence=scorer)
    coherence = out["coherence"]
    assert coherence[0] == pytest.approx(1.0)
    # one kidney of two, within k +- 2 (slices 2..6 or 4..8): Dice = 2|R| / (|R| + |R| + |L|)
    z0, z1 = max(0, k - 2), min(11, k + 2)
    right = label_map[z0 : z1 + 1, :, :25].sum()
    left = label_map[z0 : z1 + 1, :, 25:].sum()
    assert coherence[1] == pytest.approx(2 * right / (2 * right + left))
    assert coherence[2] == 0.0  # slice 10 is shown but the target is not there
    assert coherence[3] == 0.0 and coherence[4] == 0.0  # garbage; a box on background below the kidneys
    assert coherence[5] == 0.0  # a box above the image content (outside the slice)
    assert propagator.prepared == [volume.fingerprint] and scorer.prepare_calls == 1
    assert propagator.propagations == 4  # not for garbage nor for a box outside the slice
    # a window without target scores 0 (an empty prediction there must not count as agreement)
    narrow = CoherenceScorer(propagator, resolve, window=1)
    assert narrow.score(parse_answer(_answer(10, sample.boxes_pixel)), target) == 0.0
    assert propagator.propagations == 4
    w = RewardWeights()
    assert out["total"][0] == pytest.approx(w.format + w.slice + w.grounding * out["grounding"][0] + w.coherence)


def test_coherence_scores_a_group_together_and_caps_the_boxes(kidneys_case):
    """The group goes to `propagate_many` in one call (lockstep backends track it together); an answer with
    more boxes than the target's max_boxes scores 0 and is not propagated."""
    volume, label_map, sample, resolve = kidneys_case
    propagator = GTSlabPropagator(label_map > 0)
    batches = []
    original = propagator.propagate_many
    propagator.propagate_many = lambda evidences, **kw: batches.append(len(evidences)) or original(evidences, **kw)
    scorer = CoherenceScorer(propagator, resolve, window=2)
    target = sample.reward_target(max_boxes=2)
    k = sample.key_slice
    too_many = _answer(k, list(sample.boxes_pixel) + [[1, 1, 4, 4]])
    group = [sample.answer_text("x")] * 3 + [too_many]
    scores = scorer.score_many([parse_answer(c) for c in group], [target] * 4)
    assert scores[:3] == [pytest.approx(1.0)] * 3 and scores[3] == 0.0
    assert batches == [3] and propagator.propagations == 3
    assert scores == [scorer.score(parse_answer(c), target) for c in group]


def test_coherence_trl_function_and_full_volume(kidneys_case):
    volume, label_map, sample, resolve = kidneys_case
    propagator = GTSlabPropagator(label_map > 0)
    f = make_coherence_reward(propagator, resolve, window=None)
    assert f.__name__ == "coherence_reward"
    values = f([None] * 2, [sample.answer_text(), [{"role": "assistant", "content": "nope"}]], [sample.reward_target().to_json()] * 2)
    assert values == [pytest.approx(1.0), 0.0]
    funcs, weights = make_reward_functions(propagator=propagator, resolve=resolve)
    assert [g.__name__ for g in funcs] == ["format_reward", "slice_reward", "grounding_reward", "coherence_reward"]


def test_coherence_rejects_a_resolver_returning_another_grid(kidneys_case):
    volume, label_map, sample, _ = kidneys_case
    other = Volume(np.zeros((5, 40, 50), np.float32), np.eye(4))
    scorer = CoherenceScorer(GTSlabPropagator(label_map > 0), lambda c, l: (other, np.ones((5, 40, 50))))
    with pytest.raises(DataError, match="does not match"):
        scorer.score(parse_answer(sample.answer_text()), sample.reward_target())


def test_oracle_curve_with_the_helper_propagator(kidneys_case):
    volume, label_map, sample, _ = kidneys_case
    from MedVolR1Lib.targets import profile_labels

    profile = profile_labels(label_map, [[1]], "kidneys")
    curve = oracle_curve(GTSlabPropagator(label_map > 0), volume, label_map > 0, profile.boxes_for([1, 4, 6, 10]))
    assert curve[4] == pytest.approx(1.0) and curve[1] == 0.0 and curve[10] == 0.0
    assert curve[6] == pytest.approx(1.0)
    target = sample.reward_target(oracle=curve)
    assert RewardTarget.from_json(target.to_json()).oracle == curve


# ---------------------------------------------------------------- the GT answers of the real sample CT


def test_gt_answers_of_the_sample_ct_score_full_marks():
    from MedVolR1Lib.sample_data import fetch_sample
    from MedVolR1Lib.readers import load_label_map, load_volume

    s = fetch_sample()
    volume = load_volume(s.ct_path)
    labels = load_label_map(s.labels_path, volume)
    samples = build_samples(volume, labels, s.label_names, targets=["kidneys", "liver", "spleen", "gallbladder", "colon"]).samples
    out = compute_rewards([x.answer_text("t") for x in samples], [x.reward_target().to_json() for x in samples])
    assert out["format"] == [1.0] * len(samples) and out["slice"] == [1.0] * len(samples)
    # whole-pixel rounding in the answer text costs a little IoU, no more
    assert min(out["grounding"]) > 0.9
