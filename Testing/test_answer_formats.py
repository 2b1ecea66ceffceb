"""Answer schemas and coordinate conventions: the paper's schema round-trips through parse -> anchor ->
format, the lenient inference mode reads native grounding JSON, and the rewards never accept it."""

import numpy as np
import pytest

from MedVolR1Lib.anchor import AnswerFormat, ParsedAnswer, ParseFailure, format_answer, parse_answer, parse_model_answer
from MedVolR1Lib.errors import CheckpointError
from MedVolR1Lib.families import FAMILIES, check_adapter_convention, family_of_checkpoint, resolve_coordinates
from MedVolR1Lib.rewards import RewardTarget, compute_rewards
from MedVolR1Lib.views import ViewGeometry, build_messages
from MedVolR1Lib.volume import volume_from_array

PAPER = AnswerFormat("paper", "norm1000")


def _volume(shape=(30, 90, 120), spacing=(0.8, 0.8, 2.5)):
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    return volume_from_array(np.zeros(shape, dtype=np.float32), affine, modality="CT")


@pytest.mark.parametrize("fmt", [PAPER, AnswerFormat(), AnswerFormat("paper", "pixels"), AnswerFormat("medvolr1", "norm1000")], ids=lambda f: f.spec)
@pytest.mark.parametrize("size", [256, 448])
def test_answer_round_trips_through_parse_anchor_format(fmt, size):
    volume = _volume()
    geometry = ViewGeometry.for_volume(volume, size)
    # boxes in the model's own units, inside the scan (not the black padding)
    top = int(np.ceil(geometry.offset_y * (1000 / size if fmt.coordinates == "norm1000" else 1))) + 5
    model_boxes = [[120, top, 380, top + 200], [600, top + 10, 810, top + 150]] if fmt.coordinates == "norm1000" else [[20, top, 90, top + 40], [130, top + 3, 200, top + 30]]
    text = format_answer(12, [fmt.to_pixels(b, size) for b in model_boxes], "both kidneys", answer_format=fmt, image_size=size)
    assert ('"bbox_2d_list"' in text) == (fmt.schema == "paper")
    parsed = parse_model_answer(text, fmt, size)
    assert isinstance(parsed, ParsedAnswer) and parsed.schema == fmt.schema and parsed.think == "both kidneys"
    anchor = geometry.anchor_from_answer(parsed, volume.num_slices)
    assert anchor.slice_index == 12 and len(anchor.boxes) == 2
    again = format_answer(anchor.slice_index, geometry.pixel_boxes(anchor), "both kidneys", answer_format=fmt, image_size=size)
    assert again == text


def test_norm1000_means_fractions_of_the_view():
    parsed = parse_model_answer('<answer>[{"slice": 4, "bbox_2d_list": [[0, 250, 500, 1000]]}]</answer>', PAPER, 256)
    assert parsed.boxes == ((0.0, 64.0, 128.0, 256.0),)
    assert AnswerFormat.from_spec(PAPER.spec) == PAPER and AnswerFormat.from_spec(None) == AnswerFormat()
    with pytest.raises(ValueError):
        AnswerFormat("paper", "percent")


def test_paper_schema_needs_one_slice():
    two = '<answer>[{"slice": 4, "bbox_2d_list": [[1, 2, 3, 4]]}, {"slice": 5, "bbox_2d_list": [[1, 2, 3, 4]]}]</answer>'
    assert parse_answer(two).reason == "several_slices"
    same = two.replace('"slice": 5', '"slice": 4')
    assert parse_answer(same).boxes == ((1.0, 2.0, 3.0, 4.0), (1.0, 2.0, 3.0, 4.0))


NATIVE = [
    ('```json\n[{"bbox_2d": [100, 200, 300, 400], "label": "liver"}]\n```\nThe liver is best seen on Slice 17.', 17),
    ('Slice 9: [{"bbox_2d": [1, 2, 3, 4], "label": "kidney"}, {"bbox_2d": [5, 6, 7, 8], "label": "kidney"}]', 9),
    ('[{"bbox_2d": [1, 2, 3, 4], "label": "spleen", "slice": 33}]', 33),
    ('{"slice": 5, "boxes": [[1, 2, 3, 4]]}', 5),  # our schema without tags
    ('<answer>```json\n[{"slice": 6, "bbox_2d_list": [[1, 2, 3, 4]]}]\n```</answer>', 6),  # fenced inside the tags
]


@pytest.mark.parametrize("text,k", NATIVE)
def test_lenient_mode_reads_what_instruct_models_write(text, k):
    parsed = parse_answer(text, lenient=True)
    assert isinstance(parsed, ParsedAnswer) and parsed.slice_index == k
    assert isinstance(parse_answer(text), ParseFailure)  # strict mode (training, rewards) refuses all of them


def test_lenient_mode_refuses_native_json_without_a_slice():
    assert parse_answer('[{"bbox_2d": [1, 2, 3, 4], "label": "liver"}]', lenient=True).reason == "no_slice"
    assert parse_answer('slice 3 or slice 4: [{"bbox_2d": [1, 2, 3, 4]}]', lenient=True).reason == "several_slices"
    for bad in ("[1]", "{}", '"4"', "4.5", "true", "1e999"):
        text = f'[{{"bbox_2d": [1, 2, 3, 4], "slice": {bad}}}]'
        assert parse_answer(text, lenient=True).reason == "slice_not_integer", bad


@pytest.mark.parametrize("fmt", [AnswerFormat(), PAPER], ids=lambda f: f.spec)
def test_rewards_score_native_grounding_output_as_invalid(fmt):
    """The GT answer scores well, the same boxes as native grounding JSON score 0 on every component."""
    target = RewardTarget(
        case_id="c", labels=[1], shown_slices=[2, 4], image_size=100,
        geometry={"image_size": 100, "pixels_per_voxel_x": 1.0, "pixels_per_voxel_y": 1.0, "offset_x": 0.0, "offset_y": 0.0, "shape_ji": [100, 100]},
        slice_areas=[0, 0, 5, 0, 9], gt_boxes={2: [[10, 10, 30, 30]], 4: [[20, 20, 50, 60]]}, answer_format=fmt.spec,
    )
    good = format_answer(4, [[20, 20, 50, 60]], "t", answer_format=fmt, image_size=100)
    native_box = [int(v) for v in fmt.from_pixels([20, 20, 50, 60], 100)]
    native = f'Slice 4: ```json\n[{{"bbox_2d": {native_box}, "label": "target"}}]\n```'
    assert isinstance(parse_model_answer(native, fmt, 100, lenient=True), ParsedAnswer)  # inference would accept it
    scores = compute_rewards([good, native], [target.to_json()] * 2)
    assert scores["format"][0] == 1.0 and scores["grounding"][0] == pytest.approx(1.0) and scores["slice"][0] == 1.0
    assert all(values[1] == 0.0 for values in scores.values())
    other = AnswerFormat("medvolr1" if fmt.schema == "paper" else "paper", fmt.coordinates)
    wrong_schema = format_answer(4, [[20, 20, 50, 60]], "t", answer_format=other, image_size=100)
    assert compute_rewards([wrong_schema], [target])["total"] == [0.0]  # rewards hold the configured schema


def test_prompt_instruction_follows_the_answer_format():
    pixels = build_messages([1, 2], "liver", 448)[1]["content"][-1]["text"]
    paper = build_messages([1, 2], "liver", 256, answer_format=PAPER)[1]["content"][-1]["text"]
    assert '"boxes"' in pixels and "448x448" in pixels
    assert '"bbox_2d_list"' in paper and "0-1000" in paper


def test_family_sets_the_coordinates_and_adapters_keep_theirs(tmp_path):
    assert resolve_coordinates(FAMILIES["qwen2.5-vl"]) == "pixels"
    assert resolve_coordinates(FAMILIES["qwen3-vl"]) == "norm1000"
    assert resolve_coordinates(FAMILIES["qwen3-vl"], "pixels") == "pixels"
    assert family_of_checkpoint("Qwen/Qwen3-VL-4B-Instruct").name == "qwen3-vl"
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    assert family_of_checkpoint(str(tmp_path)).name == "qwen2.5-vl"
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="not a supported VLM family"):
        family_of_checkpoint(str(tmp_path))
    check_adapter_convention({"family": "qwen3-vl", "coordinates": "norm1000"}, FAMILIES["qwen3-vl"], "norm1000", "x")
    with pytest.raises(CheckpointError, match="trained with pixels box coordinates"):
        check_adapter_convention({"coordinates": "pixels"}, FAMILIES["qwen3-vl"], "norm1000", "x")
    with pytest.raises(CheckpointError, match="trained on qwen2.5-vl"):
        check_adapter_convention({"family": "qwen2.5-vl"}, FAMILIES["qwen3-vl"], "norm1000", "x")
