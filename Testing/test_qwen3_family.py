"""Qwen3-VL beside Qwen2.5-VL: the tiny offline Qwen3-VL loads through the Auto classes, answers in 0-1000
through the grounder, runs the CLI query path, and adapters never meet the wrong coordinate convention."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from MedVolR1Lib.anchor import AnswerFormat, VoxelBox, format_answer
from MedVolR1Lib.errors import CheckpointError
from MedVolR1Lib.grounder import GenerationSettings, Grounder, _check
from MedVolR1Lib.views import render_views

QUERY = "Segment the liver."


@pytest.fixture(scope="module")
def grounder(tiny_qwen3_dir):
    return Grounder.from_pretrained(str(tiny_qwen3_dir), device="cpu")


def test_tiny_qwen3_is_a_real_qwen3_vl_checkpoint(tiny_qwen3_dir, grounder):
    config = json.loads((tiny_qwen3_dir / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl" and config["vision_config"]["deepstack_visual_indexes"]
    assert type(grounder.model).__name__ == "Qwen3VLForConditionalGeneration"
    assert type(grounder.processor).__name__ == "Qwen3VLProcessor"
    assert grounder.family.name == "qwen3-vl" and grounder.answer_format == AnswerFormat("medvolr1", "norm1000")
    from trl.chat_template_utils import qwen3_vl_chat_template

    assert grounder.processor.chat_template == qwen3_vl_chat_template  # the released template, as trl knows it


def test_qwen3_prompt_has_image_tokens_and_asks_for_0_1000(grounder, sample_volume):
    views = render_views(sample_volume, num_views=4, image_size=128)
    inputs = grounder.build_inputs(views, QUERY)
    image_tokens = int((inputs["input_ids"] == grounder.model.config.image_token_id).sum())
    assert image_tokens == 4 * 16  # 128 px / 16 px patches / 2x2 merge
    text = grounder.processor.batch_decode(inputs["input_ids"])[0]
    assert "0-1000" in text and text.count("Slice ") == 4


def test_a_0_1000_answer_becomes_the_right_voxel_anchor(grounder, sample_volume):
    """The same anchor written in 0-1000 (Qwen3-VL) maps back to the same voxels as in pixels."""
    views = render_views(sample_volume, num_views=4, image_size=128)
    geometry, k = views.geometry, views.slices[2]
    pixel_box = geometry.to_pixel_box(VoxelBox(30.0, 40.0, 80.0, 90.0))
    text = format_answer(k, [pixel_box], "liver", answer_format=grounder.answer_format, image_size=128)
    from MedVolR1Lib.anchor import AnswerRules

    rules = AnswerRules(image_size=128, shown_slices=tuple(views.slices))
    parsed, anchor = _check(text, rules, geometry, sample_volume.num_slices, GenerationSettings(), grounder.answer_format)
    assert '"boxes": [[' in text and anchor is not None, (parsed, anchor)
    assert anchor.slice_index == k
    # one 0-1000 unit is 0.128 px here: rounding to whole units moves an edge by well under a voxel
    assert anchor.boxes[0].i0 == pytest.approx(30.0, abs=0.1) and anchor.boxes[0].j1 == pytest.approx(90.0, abs=0.1)


def test_garbage_from_the_cli_is_a_typed_failure_with_the_raw_text(tiny_qwen3_dir, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "MedVolR1Lib.cli", "segment", "--volume", "sample", "--query", QUERY, "--model", str(tiny_qwen3_dir),
         "--num-views", "4", "--image-size", "128", "--device", "cpu", "--propagator", "litemedsam", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "no usable answer" in out.stderr and "Raw output" in out.stderr
    assert not (tmp_path / "out").exists()


def _adapter(tmp_path, tiny_lora_dir, **manifest):
    import shutil

    folder = tmp_path / "adapter"
    shutil.copytree(tiny_lora_dir, folder)
    (folder / "medvolr1_training.json").write_text(json.dumps(manifest))
    return folder


def test_an_adapter_is_never_used_with_another_convention(tmp_path, tiny_qwen_dir, tiny_lora_dir):
    adapter = _adapter(tmp_path, tiny_lora_dir, family="qwen2.5-vl", coordinates="norm1000", answer_schema="paper")
    grounder = Grounder.from_pretrained(str(tiny_qwen_dir), adapter=str(adapter), device="cpu")
    assert grounder.answer_format == AnswerFormat("paper", "norm1000")  # the adapter's own setting wins over the family's
    with pytest.raises(CheckpointError, match="trained with norm1000 box coordinates"):
        Grounder.from_pretrained(str(tiny_qwen_dir), adapter=str(adapter), device="cpu", coordinates="pixels")
    with pytest.raises(CheckpointError, match="paper schema"):
        Grounder.from_pretrained(str(tiny_qwen_dir), adapter=str(adapter), device="cpu", answer_schema="medvolr1")
    other = _adapter(tmp_path / "b", tiny_lora_dir, family="qwen3-vl", coordinates="norm1000")
    with pytest.raises(CheckpointError, match="trained on qwen3-vl"):
        Grounder.from_pretrained(str(tiny_qwen_dir), adapter=str(other), device="cpu")


def test_the_off_the_shelf_row_is_read_leniently_and_trained_rows_strictly(tiny_qwen3_dir):
    from MedVolR1Lib.training.evaluate import EvalArguments, load_checkpoint

    args = EvalArguments(device="cpu")
    off_the_shelf = load_checkpoint(f"off_the_shelf={tiny_qwen3_dir}", args)
    trained = load_checkpoint(f"sft={tiny_qwen3_dir}", args)
    assert off_the_shelf.settings.lenient and not trained.settings.lenient
    assert off_the_shelf.grounder.answer_format.coordinates == "norm1000"
