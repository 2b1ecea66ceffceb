"""Fuzzing the answer parser (and the rewards on top of it): any text in, a ParseResult out, never an exception."""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MedVolR1Lib.anchor import AnswerFormat, ParsedAnswer, ParseFailure, format_answer, parse_answer, parse_model_answer
from MedVolR1Lib.rewards import RewardTarget, compute_rewards

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TARGET = RewardTarget(
    case_id="c",
    labels=[1],
    shown_slices=[0, 3, 7],
    image_size=56,
    geometry={"image_size": 56, "pixels_per_voxel_x": 2.0, "pixels_per_voxel_y": 2.0, "offset_x": 0.0, "offset_y": 0.0, "shape_ji": [28, 28]},
    slice_areas=[4, 0, 0, 9, 0, 0, 0, 1],
    gt_boxes={0: [[2, 2, 10, 10]], 3: [[4, 4, 20, 20], [30, 30, 40, 40]], 7: []},
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.sampled_from(["slice", "boxes", "bbox_2d_list", "bbox_2d", "label", "x"]) | st.text(max_size=4), children, max_size=4),
    max_leaves=20,
)
think_text = st.text(alphabet=st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), max_size=40)
boxes = st.lists(st.tuples(*[st.integers(-10**6, 10**6)] * 4), min_size=1, max_size=6)


def _check_result(result):
    assert isinstance(result, (ParsedAnswer, ParseFailure))
    if isinstance(result, ParsedAnswer):
        assert isinstance(result.slice_index, int) and not isinstance(result.slice_index, bool)
        assert result.boxes and all(len(b) == 4 and all(isinstance(v, float) and math.isfinite(v) for v in b) for b in result.boxes)
    else:
        assert isinstance(result.reason, str) and result.reason


@SETTINGS
@given(st.text(max_size=300))
def test_arbitrary_text_never_raises(text):
    _check_result(parse_answer(text))


@SETTINGS
@given(st.one_of(st.none(), st.integers(), st.binary(max_size=20), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
def test_non_text_never_raises(value):
    assert isinstance(parse_answer(value), ParseFailure)


@SETTINGS
@given(json_values, st.booleans())
def test_any_json_payload_never_raises(payload, with_think):
    try:
        body = json.dumps(payload)
    except ValueError:
        body = repr(payload)
    text = ("<think>t</think>" if with_think else "") + f"<answer>{body}</answer>"
    _check_result(parse_answer(text))
    _check_result(parse_answer(text, lenient=True))
    _check_result(parse_answer(f"Slice 3: {body}", lenient=True))  # untagged, as off-the-shelf models answer


@SETTINGS
@given(st.integers(-5, 200), boxes, think_text, st.data())
def test_near_miss_answers_never_raise(k, box_list, think, data):
    text = format_answer(k, box_list, think)
    mutation = data.draw(st.sampled_from(["delete", "insert", "duplicate", "swap_tags", "truncate", "stringify", "float"]))
    pos = data.draw(st.integers(0, len(text) - 1))
    if mutation == "delete":
        text = text[:pos] + text[pos + 1 :]
    elif mutation == "insert":
        text = text[:pos] + data.draw(st.sampled_from(list('{}[],:"<>/ 0.-eE\\\n') + ["NaN", "Infinity", "null", "</answer>", "<think>"])) + text[pos:]
    elif mutation == "duplicate":
        text = text + text
    elif mutation == "swap_tags":
        text = text.replace("<answer>", "<answr>") if pos % 2 else text.replace("</think>", "")
    elif mutation == "truncate":
        text = text[:pos]
    elif mutation == "stringify":
        text = text.replace(f'"slice": {k}', f'"slice": "{k}"')
    else:
        text = text.replace(f'"slice": {k}', f'"slice": {k}.5')
    result = parse_answer(text)
    _check_result(result)
    if mutation in ("stringify", "float", "duplicate"):
        assert isinstance(result, ParseFailure)
    scores = compute_rewards([text], [TARGET])
    assert all(0.0 <= v[0] < 10 and math.isfinite(v[0]) for v in scores.values())


@SETTINGS
@given(st.integers(-10**6, 10**6), boxes, st.one_of(st.none(), think_text))
def test_valid_answers_round_trip_through_format_answer(k, box_list, think):
    text = format_answer(k, box_list, think)
    result = parse_answer(text)
    assert isinstance(result, ParsedAnswer)
    assert result.slice_index == k
    assert result.boxes == tuple(tuple(float(v) for v in b) for b in box_list)
    assert result.has_think == (think is not None)
    assert result.think == (think or "").strip()
    assert format_answer(result.slice_index, result.boxes, think) == text


@SETTINGS
@given(st.text(max_size=200))
def test_rewards_on_arbitrary_text_are_zero(text):
    scores = compute_rewards([text], [TARGET])
    if isinstance(parse_answer(text), ParseFailure):
        assert all(v == [0.0] for v in scores.values())


# ---------------------------------------------------------------------------------------------- adversarial numbers and sizes

HUGE = "9" * 400
ADVERSARIAL = {
    "huge_int_box": f'<think>t</think><answer>{{"slice": 3, "boxes": [[{HUGE}, 1, 2, 3]]}}</answer>',
    "huge_negative_box": f'<think>t</think><answer>{{"slice": 3, "boxes": [[-{HUGE}, 1, 2, 3]]}}</answer>',
    "huge_int_slice": f'<think>t</think><answer>{{"slice": {HUGE}, "boxes": [[1, 1, 2, 3]]}}</answer>',
    "huge_int_paper": f'<answer>[{{"slice": 3, "bbox_2d_list": [[1, {HUGE}, 2, 3]]}}]</answer>',
    "huge_int_native": f'slice 3 [{{"bbox_2d": [1, 2, {HUGE}, 3], "label": "x"}}]',
    "over_4300_digits": f'<answer>{{"slice": 3, "boxes": [[{"9" * 5000}, 1, 2, 3]]}}</answer>',
    "huge_float": '<answer>{"slice": 3, "boxes": [[1e400, 1, 2, 3]]}</answer>',
    "1e300_float": '<answer>{"slice": 3, "boxes": [[1e300, 1, 2, 3]]}</answer>',
    "nan": '<answer>{"slice": 3, "boxes": [[NaN, 1, 2, 3]]}</answer>',
    "infinity": '<answer>[{"slice": 3, "bbox_2d_list": [[-Infinity, 1, 2, 3]]}]</answer>',
    "nan_slice": '<answer>{"slice": NaN, "boxes": [[1, 1, 2, 3]]}</answer>',
    "deep_list": "<answer>" + "[" * 100_000 + "]" * 100_000 + "</answer>",
    "deep_dict": "<answer>" + '{"a":' * 50_000 + "1" + "}" * 50_000 + "</answer>",
    "deep_in_box": '<answer>{"slice": 3, "boxes": [' + "[" * 20_000 + "]" * 20_000 + "]}</answer>",
    "deep_native": "slice 3 " + "[" * 50_000 + "]" * 50_000,
    "10k_boxes": '<answer>{"slice": 3, "boxes": [' + ", ".join(["[1, 2, 30, 40]"] * 10_000) + "]}</answer>",
    "10k_paper_entries": "<answer>[" + ", ".join(['{"slice": 3, "bbox_2d_list": [[1, 2, 30, 40]]}'] * 10_000) + "]</answer>",
    "10k_native": "slice 3 [" + ", ".join(['{"bbox_2d": [1, 2, 30, 40], "label": "x"}'] * 10_000) + "]",
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_completions_never_raise_in_parser_or_rewards(name):
    text = ADVERSARIAL[name]
    for lenient in (False, True):
        for schema in (None, "medvolr1", "paper"):
            result = parse_answer(text, lenient=lenient, schema=schema)
            _check_result(result)
            assert isinstance(result, ParseFailure), (name, lenient, schema)  # none of these is a usable answer
    for fmt in (AnswerFormat(), AnswerFormat("paper", "norm1000")):
        _check_result(parse_model_answer(text, fmt, 56, lenient=True))
        target = RewardTarget(**{**TARGET.to_dict(), "answer_format": fmt.spec})
        scores = compute_rewards([text], [target])
        assert all(v == [0.0] for v in scores.values()), name


def test_a_1e300_box_that_parses_scores_zero_without_overflow():
    text = '<think>t</think><answer>{"slice": 3, "boxes": [[1, 1, 2, 3], [0, 0, 1e8, 1e8]]}</answer>'
    assert isinstance(parse_answer(text), ParsedAnswer)
    scores = compute_rewards([text], [TARGET])
    assert all(math.isfinite(v[0]) for v in scores.values())


@SETTINGS
@given(st.text(max_size=300))
def test_lenient_mode_never_raises_on_arbitrary_text(text):
    _check_result(parse_answer(text, lenient=True))


@SETTINGS
@given(st.integers(0, 10**6), st.lists(st.tuples(*[st.integers(0, 1000)] * 4), min_size=1, max_size=6), st.one_of(st.none(), think_text))
def test_paper_schema_round_trips(k, box_list, think):
    fmt = AnswerFormat("paper", "norm1000")
    text = format_answer(k, [fmt.to_pixels(b, 256) for b in box_list], think, answer_format=fmt, image_size=256)
    result = parse_answer(text)
    assert isinstance(result, ParsedAnswer) and result.schema == "paper" and result.slice_index == k
    assert result.boxes == tuple(tuple(float(v) for v in b) for b in box_list)
    assert isinstance(parse_answer(text, schema="medvolr1"), ParseFailure)  # strict schema for rewards
