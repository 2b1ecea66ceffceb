"""Grounder, device resolution and the offline tiny Qwen2.5-VL / LoRA fixtures.

Everything runs through the real transformers / peft code paths on a tiny random-weight model.
Random weights emit garbage, so both outcomes are tested honestly: garbage -> GroundingError with
the raw text; and the library's answering fixture (the tiny model taught one fixed answer on this
prompt, fixtures/answering_qwen.py) reproduces it, and `ground()` must return the matching voxel anchor.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from MedVolR1Lib.anchor import EvidenceAnchor, VoxelBox, format_answer, parse_answer
from MedVolR1Lib.devices import parse_dtype, resolve_device
from MedVolR1Lib.errors import Cancelled, CheckpointError, DeviceError
from MedVolR1Lib.fixtures.answering_qwen import build_answering_tiny_qwen, training_record
from MedVolR1Lib.fixtures.tiny_qwen import (
    MARKER_FILE,
    QWEN_SPECIAL_TOKENS,
    build_tiny_lora_adapter,
    build_tiny_qwen,
)
from MedVolR1Lib.grounder import GenerationSettings, Grounder, GroundingError, GroundingResult, _resolve_source
from MedVolR1Lib.views import render_views
from MedVolR1Lib.volume import volume_from_array

QUERY = "segment the liver"
SHOWN = (2, 7, 13, 18)
IMAGE_SIZE = 112  # multiple of 28; the tiny processor keeps it as is (16 tokens per view)
KEY_SLICE = 13
PIXEL_BOX = (21, 28, 56, 63)
THINK = "liver"


@pytest.fixture(scope="module")
def volume():
    """20 x 48 x 64 CT-like block, 0.8 x 0.8 x 2.5 mm, canonical (LPS-index) orientation."""
    array = np.full((20, 48, 64), -1000.0, np.float32)
    array[:, 10:40, 8:56] = 40.0
    array[:, 20:30, 20:40] = 200.0
    return volume_from_array(array, np.diag([-0.8, -0.8, 2.5, 1.0]))


def expected_voxel_box():
    """Hand-computed, independent of views.py: the 64 x 48 slice at 0.8 mm fills 112 px across
    (1.75 px per voxel), so rows are centred with (112 - 48 * 1.75) / 2 = 14 px padding on top."""
    x1, y1, x2, y2 = PIXEL_BOX
    return VoxelBox(x1 / 1.75, (y1 - 14) / 1.75, x2 / 1.75, (y2 - 14) / 1.75)  # = (12, 8, 32, 28)


# ----------------------------------------------------------------------------- fixtures themselves


def test_tiny_qwen_folder_is_a_complete_checkpoint(tiny_qwen_dir):
    from transformers import AutoConfig, AutoProcessor

    names = {p.name for p in tiny_qwen_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "generation_config.json", MARKER_FILE} <= names
    config = AutoConfig.from_pretrained(tiny_qwen_dir)
    text, vision = config.text_config, config.vision_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert vision.out_hidden_size == text.hidden_size
    processor = AutoProcessor.from_pretrained(tiny_qwen_dir)
    tokenizer = processor.tokenizer
    assert text.vocab_size >= len(tokenizer)
    for token in QWEN_SPECIAL_TOKENS + ("<|endoftext|>",):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, f"{token} must be a single token"
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    answer = format_answer(41, [[10, 20, 300, 400], [5, 6, 7, 8]], think="both kidneys, right first")
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == answer
    assert len(ids) < len(answer)  # the BPE learned merges, not just bytes


def test_tiny_processor_token_budget(tiny_qwen_dir):
    """16 views of 448 px must stay cheap for CPU training: 16 tokens per view after resizing."""
    from PIL import Image
    from transformers import AutoProcessor

    from MedVolR1Lib.views import build_messages

    processor = AutoProcessor.from_pretrained(tiny_qwen_dir)
    images = [Image.fromarray(np.zeros((448, 448, 3), np.uint8)) for _ in range(16)]
    messages = build_messages(list(range(16)), QUERY, 448, images=images)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 16
    assert text.endswith("<|im_start|>assistant\n")
    inputs = processor(text=[text], images=images, return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == image_id).sum()) == 16 * 16
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]] * 16


def test_build_is_idempotent_and_atomic(tiny_qwen_dir, tmp_path):
    weights = tiny_qwen_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_qwen(tiny_qwen_dir) == tiny_qwen_dir
    assert weights.stat().st_mtime_ns == before  # reused, not rebuilt
    assert not [p for p in tiny_qwen_dir.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    foreign = tmp_path / "not_a_fixture"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        build_tiny_qwen(foreign)
    assert (foreign / "precious.txt").read_text() == "keep me"
    with pytest.raises(CheckpointError, match="not a tiny Qwen fixture"):
        build_tiny_lora_adapter(foreign, tmp_path / "adapter")


def test_lora_fixture_is_a_peft_adapter(tiny_lora_dir, tiny_qwen_dir):
    config = json.loads((tiny_lora_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == str(tiny_qwen_dir)
    assert (tiny_lora_dir / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------- devices


def test_resolve_device_auto_and_dtypes():
    choice = resolve_device("auto")
    if torch.cuda.is_available():
        assert choice.device.type == "cuda" and choice.dtype in (torch.bfloat16, torch.float16)
    else:
        assert choice.device.type == "cpu" and choice.dtype == torch.float32
    assert resolve_device("cpu", "bf16").dtype == torch.bfloat16
    assert parse_dtype("auto") is None and parse_dtype("float16") == torch.float16
    with pytest.raises(DeviceError, match="unknown dtype"):
        parse_dtype("int8")
    with pytest.raises(DeviceError, match="not supported|unknown device"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is absent")
def test_cuda_without_cuda_is_a_device_error(tiny_qwen_dir):
    with pytest.raises(DeviceError, match="CUDA is not available.*device='cpu'"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        Grounder.from_pretrained(str(tiny_qwen_dir), device="cuda:0")
    with pytest.raises(DeviceError, match="4bit.*CUDA"):
        Grounder.from_pretrained(str(tiny_qwen_dir), device="cpu", quantize="4bit")


# ----------------------------------------------------------------------------- loading errors


def test_missing_or_wrong_folders_are_checkpoint_errors(tmp_path, tiny_qwen_dir):
    missing = tmp_path / "no_such_model"
    with pytest.raises(CheckpointError, match="no_such_model.*does not exist"):
        Grounder.from_pretrained(str(missing), device="cpu")
    with pytest.raises(CheckpointError, match="does not exist"):
        Grounder.from_pretrained("./models/qwen/missing", device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        Grounder.from_pretrained(str(empty), device="cpu")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="could not load the checkpoint .*broken"):
        Grounder.from_pretrained(str(broken), device="cpu")
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        Grounder.from_pretrained(str(tiny_qwen_dir), adapter=str(empty), device="cpu")
    with pytest.raises(CheckpointError, match="adapter folder .*missing_adapter.*does not exist"):
        Grounder.from_pretrained(str(tiny_qwen_dir), adapter=str(tmp_path / "missing_adapter"), device="cpu")
    # A bare "owner/name" is a hub id (loaded only where the hub is reachable); not touched here.
    assert _resolve_source("Qwen/Qwen2.5-VL-3B-Instruct", "model") == ("Qwen/Qwen2.5-VL-3B-Instruct", None)


def test_generation_settings_validate():
    with pytest.raises(ValueError):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ValueError):
        GenerationSettings(top_p=0.0)
    with pytest.raises(ValueError):
        GenerationSettings(retries=-1)


# ----------------------------------------------------------------------------- grounding, garbage path


@pytest.fixture(scope="module")
def random_grounder(tiny_qwen_dir):
    return Grounder.from_pretrained(str(tiny_qwen_dir), device="cpu", settings=GenerationSettings(max_new_tokens=24, retries=1))


def test_random_model_output_is_a_typed_failure_with_raw_text(random_grounder, volume):
    with pytest.raises(GroundingError) as info:
        random_grounder.ground(volume, QUERY, slices=SHOWN, image_size=IMAGE_SIZE)
    error = info.value
    assert error.raw_text.strip() and repr(error.raw_text)[:40] in str(error)  # the user sees what the model said
    assert error.reason == parse_answer(error.raw_text).reason
    assert len(error.candidates) == 2  # greedy, then one sampled retry
    assert [c.sampled for c in error.candidates] == [False, True]
    assert all(c.failure for c in error.candidates)
    result = error.result
    assert isinstance(result, GroundingResult) and result.anchor is None and result.slices == SHOWN
    assert result.timings["attempts"] == 2 and result.timings["image_tokens"] == 4 * 16
    # Same garbage as a result object when asked not to raise (the UI path).
    soft = random_grounder.ground(volume, QUERY, slices=SHOWN, image_size=IMAGE_SIZE, raise_on_failure=False)
    assert not soft.ok and soft.raw_text == error.raw_text and soft.failure == error.reason


def test_progress_reports_and_cancel_stops_generation(random_grounder, volume):
    seen = []

    def progress(fraction, message):
        seen.append((fraction, message))
        if "tokens" in message and message.split(": ")[-1].startswith("3/"):
            raise Cancelled("user pressed cancel")

    with pytest.raises(Cancelled):
        random_grounder.ground(volume, QUERY, slices=SHOWN, image_size=IMAGE_SIZE, progress=progress)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and 0.0 in fractions
    assert seen[-1][1].endswith("3/24 tokens")


def test_adapter_is_applied(tiny_qwen_dir, tiny_lora_dir, random_grounder, volume):
    adapted = Grounder.from_pretrained(str(tiny_qwen_dir), adapter=str(tiny_lora_dir), device="cpu")
    views = render_views(volume, SHOWN, image_size=IMAGE_SIZE)
    with torch.no_grad():
        base_logits = random_grounder.model(**random_grounder.build_inputs(views, QUERY)).logits
        lora_logits = adapted.model(**adapted.build_inputs(views, QUERY)).logits
    assert base_logits.shape == lora_logits.shape
    assert (base_logits - lora_logits).abs().max() > 1e-3
    described = adapted.describe()
    assert described["adapter"] == str(tiny_lora_dir) and described["adapter_fingerprint"]
    assert described["model_fingerprint"] == random_grounder.describe()["model_fingerprint"]
    assert random_grounder.describe()["adapter_fingerprint"] is None


# ----------------------------------------------------------------------------- grounding, valid path


@pytest.fixture(scope="module")
def answering_dir(tmp_path_factory, volume):
    """The library's answering fixture: the tiny model taught this one answer for this one prompt."""
    return build_answering_tiny_qwen(
        tmp_path_factory.mktemp("answering") / "model",
        volume=volume, query=QUERY, answer_text=format_answer(KEY_SLICE, [PIXEL_BOX], think=THINK),
        slices=SHOWN, image_size=IMAGE_SIZE,
    )


@pytest.fixture(scope="module")
def trained_grounder(answering_dir):
    return Grounder.from_pretrained(str(answering_dir), device="cpu", settings=GenerationSettings(max_new_tokens=64, retries=0))


def test_answering_fixture_is_recorded_reused_and_checked(answering_dir, volume, tmp_path):
    record = training_record(answering_dir)
    assert 0 < record["steps"] < 200 and record["final_loss"] < 0.1
    assert record["slices"] == list(SHOWN) and record["query"] == QUERY
    assert not (answering_dir / "_base").exists()  # the random base it started from is not shipped
    weights = answering_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    same = dict(volume=volume, query=QUERY, answer_text=format_answer(KEY_SLICE, [PIXEL_BOX], think=THINK), slices=SHOWN,
                image_size=IMAGE_SIZE)
    assert build_answering_tiny_qwen(answering_dir, **same) == answering_dir
    assert weights.stat().st_mtime_ns == before  # same inputs hash: reused, not retrained
    # Too few steps to memorise: a clear error, and nothing half-built left behind.
    failed = tmp_path / "too_short"
    with pytest.raises(CheckpointError, match="did not memorise.*in 2 steps"):
        build_answering_tiny_qwen(failed, **same, max_steps=2)
    assert not failed.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_valid_answer_becomes_the_voxel_anchor(trained_grounder, volume):
    result = trained_grounder.ground(volume, QUERY, slices=SHOWN, image_size=IMAGE_SIZE)
    assert result.raw_text == format_answer(KEY_SLICE, [PIXEL_BOX], think=THINK)
    assert result.reasoning == THINK
    assert result.slices == SHOWN and result.model_frame == (IMAGE_SIZE, IMAGE_SIZE)
    expected = expected_voxel_box()
    assert result.anchor.slice_index == KEY_SLICE
    (box,) = result.anchor.boxes
    np.testing.assert_allclose(box.as_list(), [12.0, 8.0, 32.0, 28.0], atol=1e-9)
    np.testing.assert_allclose(box.as_list(), expected.as_list(), atol=1e-9)
    np.testing.assert_allclose(result.pixel_boxes[0], PIXEL_BOX, atol=1e-9)
    assert isinstance(result.anchor, EvidenceAnchor) and result.anchor.validate(volume.shape)
    assert result.timings["attempts"] == 1 and result.candidates[0].failure is None
    assert result.to_dict()["anchor"] == {"slice": KEY_SLICE, "boxes_voxel": [[12.0, 8.0, 32.0, 28.0]]}


def test_answer_on_a_slice_not_shown_is_rejected(trained_grounder, volume):
    """Slice 13 not shown: the memorising model still answers 13, and the grounder must refuse it."""
    shown = (2, 7, 12, 18)
    result = trained_grounder.ground(volume, QUERY, slices=shown, image_size=IMAGE_SIZE, raise_on_failure=False)
    parsed = parse_answer(result.candidates[0].text)
    assert getattr(parsed, "slice_index", None) == KEY_SLICE, f"premise: the model repeats its answer, got {result.raw_text!r}"
    assert not result.ok and result.anchor is None
    assert result.failure == "invalid_answer"
    assert "slice 13 was not among the slices shown" in result.candidates[0].detail


def test_lenient_mode_reads_native_grounding_json_only_when_asked(volume, tmp_path_factory):
    """A model that answers like an off-the-shelf Instruct (native bbox_2d JSON, no tags): strict parsing refuses
    it; the inference-only lenient mode turns it into the same voxel anchor as the tagged answer."""
    native = f'Slice {KEY_SLICE}: [{{"bbox_2d": {list(PIXEL_BOX)}, "label": "liver"}}]'
    folder = build_answering_tiny_qwen(tmp_path_factory.mktemp("native") / "model", volume=volume, query=QUERY,
                                       answer_text=native, slices=SHOWN, image_size=IMAGE_SIZE)
    grounder = Grounder.from_pretrained(str(folder), device="cpu", settings=GenerationSettings(max_new_tokens=64, retries=0))
    strict = grounder.ground(volume, QUERY, slices=SHOWN, image_size=IMAGE_SIZE, raise_on_failure=False)
    assert strict.raw_text == native and not strict.ok and strict.failure == "missing_answer_tags"
    lenient = grounder.ground(volume, QUERY, slices=SHOWN, image_size=IMAGE_SIZE,
                              settings=GenerationSettings(max_new_tokens=64, retries=0, lenient=True))
    assert lenient.anchor.slice_index == KEY_SLICE and lenient.answer.schema == "native"
    np.testing.assert_allclose(lenient.anchor.boxes[0].as_list(), expected_voxel_box().as_list(), atol=1e-9)


def test_a_fixture_built_by_two_processes_at_once_is_never_pulled_from_under_the_first(tmp_path):
    """Parallel shards build the same tiny model: the one that finishes second must keep the first one's folder
    (which that process may already be loading), not swap it out as if it were stale."""
    from MedVolR1Lib.fixtures.tiny_qwen import _atomic_build

    marker = {"fixture": "race", "seed": 0}
    out = tmp_path / "tiny"

    def finished_elsewhere(folder):  # while this build runs, another process completes the same one
        (folder / "weights").write_text("second")
        _atomic_build(out, marker, lambda other: (other / "weights").write_text("first"))
        first_inode = (out / "weights").stat().st_ino
        finished_elsewhere.first = first_inode

    assert _atomic_build(out, marker, finished_elsewhere) == out.resolve()
    assert (out / "weights").read_text() == "first" and (out / "weights").stat().st_ino == finished_elsewhere.first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temporary folder left behind
