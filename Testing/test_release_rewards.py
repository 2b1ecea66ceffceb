"""The release's reward definitions (`reward_mode: release`) against values worked out by hand from them.

Each case is chosen so that our rewards and the release's give different numbers: a slice at a local
but not the global area maximum, boxes that match the key slice while the answer names another slice,
each format check failing on its own, an empty prediction against an empty GT window.  The canvas is
101 px, so 0-1000 coordinates map to pixels by round(v / 1000 * 100) = v / 10 for multiples of 10.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from MedVolR1Lib import release_rewards as rr
from MedVolR1Lib.errors import DataError
from MedVolR1Lib.propagation.base import Propagator
from MedVolR1Lib.rewards import RewardTarget, RewardWeights, compute_rewards, make_reward_functions
from MedVolR1Lib.volume import Volume

SIZE = 101
# per-slice GT areas: the global maximum on slice 3 (100), a local maximum on slice 12 (40)
AREAS = [0, 0, 60, 100, 60, 0, 0, 0, 0, 0, 20, 30, 40, 30, 0, 0, 0, 0, 0, 0]
KEY_BOX = [10, 10, 31, 31]  # pixel edges: inclusive pixels 10..30
LOCAL_BOX = [50, 50, 71, 61]  # on slice 12: inclusive pixels x 50..70, y 50..60


def _target(**changes) -> RewardTarget:
    data = dict(
        case_id="c1", labels=[1], shown_slices=[3, 8, 12, 16], image_size=SIZE,
        geometry={"image_size": SIZE, "pixels_per_voxel_x": 1.0, "pixels_per_voxel_y": 1.0, "offset_x": 0.0,
                  "offset_y": 0.0, "shape_ji": [SIZE, SIZE]},
        slice_areas=AREAS, gt_boxes={3: [KEY_BOX], 8: [], 12: [LOCAL_BOX], 16: []},
        answer_format="paper:norm1000", key_slice=3,
    )
    data.update(changes)
    return RewardTarget(**data)


def _text(k, boxes, think="the target", tail=""):
    return f"<think>{think}</think><answer>{json.dumps([{'slice': k, 'bbox_2d_list': boxes}])}</answer>{tail}"


def _release(text, target=None, variant="ctorg"):
    return {k: v[0] for k, v in rr.compute_release_rewards([text], [target or _target()], variant=variant).items()}


def _ours(text, target=None):
    return {k: v[0] for k, v in compute_rewards([text], [target or _target()], slice_source="area").items()}


def _iou(a, b):
    """Continuous IoU of two (x1, y1, x2, y2) boxes, for our mode's expected values."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# ---------------------------------------------------------------- time (our "slice")


def test_a_local_area_maximum_is_full_time_reward_but_not_full_slice_reward():
    text = _text(12, [[500, 500, 700, 600]])
    # release: window 7..17 holds areas 20, 30, 40, 30 -> 40 / 40; ours: 40 / the shown slices' max 100
    assert _release(text)["time"] == 1.0
    assert _ours(text)["slice"] == pytest.approx(40 / 100)


@pytest.mark.parametrize("k, expected", [
    (4, 60 / 100),   # window 0..9: the global maximum 100 lies inside; slice 4 is not shown, it counts anyway
    (11, 30 / 40),   # window 6..16
    (8, 0 / 100),    # no target on slice 8; window 3..13 holds 100
    (19, 0.0),       # window 14..19 holds no target: 0, not 0/0
    (20, 0.0),       # past the last slice
    (-1, 0.0),       # before the first
])
def test_time_is_the_area_over_the_largest_area_within_five_slices(k, expected):
    assert _release(_text(k, [[100, 100, 300, 300]]))["time"] == pytest.approx(expected)


def test_the_window_is_configurable():
    text = _text(11, [[100, 100, 300, 300]])
    out = rr.compute_release_rewards([text], [_target()], window=1)  # window 10..12: 30 / 40, as with 5
    assert out["time"] == [pytest.approx(30 / 40)]
    assert rr.compute_release_rewards([_text(4, [[1, 1, 9, 9]])], [_target()], window=0)["time"] == [1.0]  # 60 / 60
    funcs, _ = make_reward_functions(RewardWeights(), mode="release", variant="kits23", window=0)
    assert funcs[1](completions=[_text(4, [])], reward_target=[_target().to_json()]) == [1.0]


def test_ctorg_time_needs_boxes_and_kits23_time_does_not():
    text = _text(12, [])
    assert _release(text, variant="ctorg")["time"] == 0.0
    assert _release(text, variant="kits23")["time"] == 1.0


def test_the_slice_is_read_with_int_as_the_release_does():
    assert rr.answered_slice(_text(12.9, [])) == 12
    assert rr.answered_slice('<answer>[{"slice": "12"}]</answer>') == 12
    assert rr.answered_slice('<answer>[{"slice": "twelve"}]</answer>') is None
    assert rr.answered_slice('<answer>[{"bbox_2d_list": []}]</answer>') is None


# ---------------------------------------------------------------- space (our "grounding")


def test_boxes_on_the_key_slice_score_wherever_the_answer_points():
    text = _text(12, [[100, 100, 300, 300]])  # the key slice's box, answered on slice 12
    assert _release(text)["space"] == 1.0     # inclusive pixels 10..30 both
    assert _ours(text)["grounding"] == 0.0    # ours compares with slice 12's box, which is elsewhere


def test_the_right_box_on_the_answered_non_key_slice_scores_zero_in_the_release():
    text = _text(12, [[500, 500, 700, 600]])
    assert _release(text)["space"] == 0.0
    # ours: 0-1000 * 101 / 1000 -> (50.5, 50.5, 70.7, 60.6) against slice 12's (50, 50, 71, 61)
    assert _ours(text)["grounding"] == pytest.approx(_iou((50.5, 50.5, 70.7, 60.6), LOCAL_BOX))


@pytest.mark.parametrize("boxes, expected", [
    ([[300, 300, 100, 100]], 1.0),                        # corners swapped back
    ([[100, 100, 300, 300], [500, 500, 700, 600]], 0.5),  # one match, divided by max(N, M) = 2
    ([[100, 100, 100, 300]], (2 * 21) / (21 * 21)),       # zero width widened to pixels 10..11: 42 / 441
    ([[100, 100, 3000, 300]], (21 * 21) / (91 * 21)),     # 3000 clamped to 1000 -> pixel 100
    ([[100, 100, "300", 300]], 1.0),                      # a number in a string is read, as float() does
    ([[100, 100, 300]], 0.0),                             # three numbers: dropped
    ([], 0.0),
])
def test_space_edge_cases(boxes, expected):
    assert _release(_text(3, boxes))["space"] == pytest.approx(expected)


def test_space_needs_no_answered_slice():
    assert _release(_text(None, [[100, 100, 300, 300]]))["space"] == 1.0  # the release scores boxes alone


def test_release_mode_needs_the_release_answer_schema():
    from MedVolR1Lib.anchor import AnswerFormat
    from MedVolR1Lib.training.config import RewardArguments
    from MedVolR1Lib.training.run import check_reward_format

    check_reward_format(RewardArguments(reward_mode="release"), AnswerFormat("paper", "norm1000"))
    check_reward_format(RewardArguments(), AnswerFormat())
    with pytest.raises(ValueError, match="answer_schema: paper"):
        check_reward_format(RewardArguments(reward_mode="release"), AnswerFormat())


def test_space_is_zero_without_gt_boxes_on_the_key_slice_and_refuses_a_target_without_one():
    assert _release(_text(8, [[100, 100, 300, 300]]), _target(key_slice=8))["space"] == 0.0
    with pytest.raises(DataError, match="key slice"):
        _release(_text(3, [[100, 100, 300, 300]]), _target(key_slice=None))


# ---------------------------------------------------------------- format


GOOD = _text(12, [[500, 500, 700, 600]])


@pytest.mark.parametrize("text, checks", [
    (GOOD, (1, 1, 1, 1)),
    (GOOD + " done", (0, 1, 1, 1)),                                          # text after </answer>
    (_text(12, [[500, 500, 700, 600]], think="  "), (1, 0, 1, 1)),          # empty think
    ("<think>x</think><answer>slice 12, box 500 500 700 600</answer>", (1, 1, 0, 0)),  # no JSON: no boxes either
    (_text(12, [[500, 500, 700, 600], [500, 500, 1200, 600]]), (1, 1, 1, 0.5)),      # one box past 1000
    (_text(12, [[700, 500, 500, 600]]), (1, 1, 1, 0)),                     # x1 > x2
    ("< Think >x</ think ><answer>[{\"slice\": 1, \"bbox_2d_list\": [[1, 2, 3, 4]]}] ok</answer>", (1, 1, 1, 1)),
    ("<think>x</think><answer>[]</answer>", (1, 1, 0, 0)),                  # an empty list does not count
    ("<think>x</think><answer>{\"slice\": 1, \"bbox_2d_list\": []}</answer>", (1, 1, 1, 0)),  # no boxes: 0
])
def test_each_format_check_fails_alone(text, checks):
    assert rr.format_checks(text) == tuple(float(c) for c in checks)
    assert rr.format_score(text) == pytest.approx(sum(checks) / 4)


def test_format_differs_from_ours_on_a_box_past_the_image():
    text = _text(12, [[500, 500, 1200, 600]])
    assert _release(text)["format"] == pytest.approx(3 / 4)
    assert _ours(text)["format"] == pytest.approx(0.4 + 0.1 + 0.2)  # parse, think, shown slice; no usable box


# ---------------------------------------------------------------- consistency


class BoxExtrusion(Propagator):
    """TEST HELPER, not a model: fills the answer's voxel boxes on every slice of the window, so Dice is
    countable by hand."""

    name = "box-extrusion-test-helper"

    def __init__(self):
        self.calls = 0

    def prepare(self, volume, progress=None):
        self.shape = volume.shape

    def propagate(self, anchor, *, merge=True, slice_range=None, progress=None):
        self.calls += 1
        out = np.zeros(self.shape, np.uint8)
        z0, z1 = slice_range
        for box in anchor.boxes:
            i0, j0, i1, j1 = box.voxel_range(self.shape[1:])
            out[z0 : z1 + 1, j0 : j1 + 1, i0 : i1 + 1] = 1
        return out


@pytest.fixture()
def padded_case():
    """20 x 101 x 80 voxels drawn at 1 px per voxel, centred: x = i + 10.5, so pixels left of 10.5 are padding.
    The target fills voxel columns 29..49 and rows 50..60 on slices 10..13."""
    gt = np.zeros((20, SIZE, 80), bool)
    gt[10:14, 50:61, 29:50] = True
    volume = Volume(np.zeros(gt.shape, np.float32), np.eye(4), modality="CT", name="padded")
    target = _target(
        geometry={"image_size": SIZE, "pixels_per_voxel_x": 1.0, "pixels_per_voxel_y": 1.0, "offset_x": 10.5,
                  "offset_y": 0.0, "shape_ji": [SIZE, 80]},
        slice_areas=[int(a) for a in gt.sum(axis=(1, 2))],
    )
    return target, (lambda case_id, labels: (volume, gt))


def test_consistency_is_dice_within_five_slices(padded_case):
    target, resolve = padded_case
    scorer = rr.ConsistencyScorer(BoxExtrusion(), resolve)
    # pixels 50..70 -> voxel columns 39.5..60.5 -> 39..60 (22 columns) x rows 50..60 (11) on slices 7..17 (11)
    pred, gt, inter = 22 * 11 * 11, 21 * 11 * 4, 11 * 4 * (49 - 39 + 1)
    group = [_text(12, [[500, 500, 700, 600]])] * 3
    assert scorer.score_texts(group, [target] * 3) == [pytest.approx(2 * inter / (pred + gt))] * 3
    assert scorer.prepare_calls == 1  # a group's answers on one volume share one prepare


def test_an_empty_prediction_against_an_empty_gt_window_scores_one(padded_case):
    target, resolve = padded_case
    propagator = BoxExtrusion()
    scorer = rr.ConsistencyScorer(propagator, resolve)
    padding_only = _text(2, [[0, 0, 90, 100]])  # pixels 0..9, voxels -10.5..-0.5: wholly in the padding
    assert scorer.score_texts([padding_only], [target]) == [1.0] and propagator.calls == 0
    # a box on the scan far from the target: the window 0..7 is empty, the prediction is not -> 0
    assert scorer.score_texts([_text(2, [[500, 500, 700, 600]])], [target]) == [0.0]
    # no slice, no boxes or a slice off the volume: 0 without propagating
    calls = propagator.calls
    texts = [_text(None, [[500, 500, 700, 600]]), _text(12, []), _text(20, [[500, 500, 700, 600]]), "garbage"]
    assert scorer.score_texts(texts, [target] * 4) == [0.0] * 4 and propagator.calls == calls


def test_release_mode_through_the_trl_functions_and_the_total(padded_case):
    target, resolve = padded_case
    funcs, weights = make_reward_functions(RewardWeights(0.25, 0.25, 0.25, 0.25), mode="release", variant="ctorg",
                                           propagator=BoxExtrusion(), resolve=resolve, window=5)
    names = [f.__name__ for f in funcs]
    assert names == ["release_format_reward", "release_time_reward", "release_space_reward", "release_consistency_reward"]
    text = _text(12, [[500, 500, 700, 600]])
    values = [f(prompts=[None], completions=[[{"role": "assistant", "content": text}]], reward_target=[target.to_json()])[0]
              for f in funcs]
    direct = rr.compute_release_rewards([text], [target], consistency=rr.ConsistencyScorer(BoxExtrusion(), resolve))
    assert values == pytest.approx([direct[c][0] for c in rr.COMPONENTS])
    assert direct["total"][0] == pytest.approx(sum(0.25 * v for v in values))
    kits, kits_weights = make_reward_functions(RewardWeights(0.30, 0.35, 0.35, 0.0), mode="release", variant="kits23",
                                               propagator=BoxExtrusion(), resolve=resolve)
    assert [f.__name__ for f in kits] == names[:3] and kits_weights == [0.30, 0.35, 0.35]
    with pytest.raises(ValueError, match="reward_mode"):
        make_reward_functions(mode="paper")
    with pytest.raises(ValueError, match="variant"):
        make_reward_functions(mode="release", variant="abdomen")


def test_garbage_scores_zero_everywhere_without_raising():
    for text in ["", "<answer>", "<think></think><answer>[{\"slice\": []}]</answer>", "[" * 5000, "<answer>" + "[" * 5000 + "</answer>"]:
        scores = _release(text)
        assert scores["time"] == scores["space"] == 0.0 and 0.0 <= scores["format"] <= 0.5
