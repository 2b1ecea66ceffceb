"""Every shipped training config parses into the script's dataclasses (a typo would otherwise surface on a GPU server).

GPU configs are parsed with bf16 off and the CPU forced, the only overrides a machine without CUDA needs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "Training" / "configs").glob("*.yaml"))
CPU_OVERRIDES = ["--bf16", "false", "--use_cpu", "true", "--report_to", "none"]


def _parser(stage: str):
    from trl import GRPOConfig, SFTConfig, TrlParser

    from MedVolR1Lib.training.config import PolicyArguments, RewardArguments, VRSDataArguments
    from MedVolR1Lib.training.evaluate import EvalArguments
    from MedVolR1Lib.training.prepare import PrepareArguments

    classes = {
        "prepare": (PrepareArguments,),
        "sft": (VRSDataArguments, PolicyArguments, SFTConfig),
        "grpo": (VRSDataArguments, PolicyArguments, RewardArguments, GRPOConfig),
        "evaluate": (EvalArguments,),
    }[stage]
    return TrlParser(classes)


def _parse(config: Path, stage: str):
    from MedVolR1Lib.training.config import stage_argv

    extra = CPU_OVERRIDES if stage in ("sft", "grpo") else []
    return _parser(stage).parse_args_and_config(stage_argv(stage, ["--config", str(config), *extra]))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_stage_parses(config):
    sections = yaml.safe_load(config.read_text())
    for stage in ("prepare", "sft", "grpo", "evaluate"):
        if stage in sections:
            parsed = _parse(config, stage)
            assert parsed, stage
    if "grpo" in sections:
        grpo = _parse(config, "grpo")[-1]
        assert grpo.per_device_train_batch_size % grpo.num_generations == 0


def test_vllm_generation_is_a_flag_away():
    from MedVolR1Lib.training.config import stage_argv

    config = REPO / "Training" / "configs" / "qwen2.5-vl-7b.yaml"
    argv = stage_argv("grpo", ["--config", str(config), *CPU_OVERRIDES, "--use_vllm", "true", "--vllm_mode", "colocate"])
    grpo = _parser("grpo").parse_args_and_config(argv)[-1]
    assert grpo.use_vllm and grpo.vllm_mode == "colocate"


def test_a_misspelled_key_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"grpo": {"output_dir": str(tmp_path), "num_generation": 8}}))
    with pytest.raises((ValueError, SystemExit)):
        _parse(bad, "grpo")


def test_paper_config_reproduces_the_release_settings():
    """Every setting the MedVol-R1 release states (DESIGN.md section 9), as the scripts will parse it."""
    config = REPO / "Training" / "configs" / "qwen3-vl-4b-paper.yaml"
    (prepare,) = _parse(config, "prepare")
    assert (prepare.num_views, prepare.image_size, prepare.sample_ct) == (64, 256, False)
    _, policy, sft = _parse(config, "sft")
    assert policy.model_name_or_path == "Qwen/Qwen3-VL-4B-Instruct"
    assert (policy.answer_schema, policy.coordinates, policy.lora_rank) == ("paper", "norm1000", 128)
    assert (sft.num_train_epochs, sft.learning_rate) == (1, 2e-5)
    _, policy, rewards, grpo = _parse(config, "grpo")
    assert (policy.answer_schema, policy.coordinates) == ("paper", "norm1000")
    assert (grpo.num_train_epochs, grpo.num_generations, grpo.beta, grpo.learning_rate, grpo.max_completion_length) == (3, 4, 0.01, 2e-6, 256)
    assert (rewards.reward_format, rewards.reward_slice, rewards.reward_grounding, rewards.reward_coherence) == (0.25,) * 4
    assert (rewards.coherence_window, rewards.coherence_propagator) == (5, "medsam2")
    (evaluate,) = _parse(config, "evaluate")
    assert evaluate.checkpoints.startswith("off_the_shelf=Qwen/Qwen3-VL-4B-Instruct") and evaluate.lenient == "off_the_shelf"
