"""GRPO on the project's own rewards with a real signal: rewards that differ within a group, images that reach the policy.

A random-init policy never writes a parseable answer, so every MedVolR1 reward ties at 0 and GRPO's advantages
are all zero.  Here the tiny policy first overfits a few SFT steps on the GT answers of one target (the key
slice moves between the shifted slice sets), so sampled completions parse but differ in slice and boxes; then
one GRPO step runs through `run_grpo` with the format, slice and grounding rewards only.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def taught(tmp_path_factory, tiny_qwen_dir):
    """A tiny policy after a short full fine-tune on GT answers (liver, 4 shifted slice sets)."""
    from trl import SFTConfig

    from MedVolR1Lib.training.config import PolicyArguments, VRSDataArguments
    from MedVolR1Lib.training.prepare import PrepareConfig, build_records
    from MedVolR1Lib.training.records import write_records
    from MedVolR1Lib.training.run import run_sft
    from MedVolR1Lib.training.store import CaseSource, load_case, write_cases

    folder = tmp_path_factory.mktemp("grpo_signal")
    source = CaseSource("sample_ct", "sample_ct", dataset="sample")
    report = build_records(load_case(source), PrepareConfig(targets=("liver",), num_views=4, image_size=112, max_queries_per_target=1, view_sets=4))
    write_cases(folder / "cases.json", [source])
    write_records(folder / "train.jsonl", report.records)
    assert len({r.gt_slice for r in report.records}) > 1
    data = VRSDataArguments(data_dir=str(folder), think="none")
    policy = PolicyArguments(model_name_or_path=str(tiny_qwen_dir), use_lora=False)
    sft = SFTConfig(
        output_dir=str(folder / "sft"), use_cpu=True, bf16=False, max_steps=80, per_device_train_batch_size=2, learning_rate=3e-3,
        lr_scheduler_type="constant", report_to="none", save_strategy="no", logging_steps=10, seed=0,
    )
    run_sft(data, policy, sft)
    return folder


def test_project_rewards_differ_within_a_group_and_images_reach_the_policy(taught):
    from transformers import TrainerCallback
    from trl import GRPOConfig

    from MedVolR1Lib.training.config import PolicyArguments, RewardArguments, VRSDataArguments
    from MedVolR1Lib.training.run import run_grpo

    class SeeImages(TrainerCallback):
        """Hooks the vision tower: what pixel values the policy is given during the GRPO step."""

        def __init__(self):
            self.pixels: list[torch.Tensor] = []
            self.logs: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            visual = next(m for n, m in model.named_modules() if n.endswith("visual"))
            visual.register_forward_pre_hook(lambda module, inputs: self.pixels.append(inputs[0].detach().clone()))

    probe = SeeImages()
    config = GRPOConfig(
        output_dir=str(taught / "grpo"), use_cpu=True, bf16=False, max_steps=1, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=64, temperature=1.0, learning_rate=1e-4, beta=0.0, loss_type="dapo", report_to="none",
        save_strategy="no", logging_steps=1, seed=0,
    )
    run_grpo(VRSDataArguments(data_dir=str(taught)), PolicyArguments(model_name_or_path=str(taught / "sft"), use_lora=False),
             RewardArguments(reward_coherence=0.0, coherence_propagator="none"), config, callbacks=[probe])
    step = next(log for log in probe.logs if "frac_reward_zero_std" in log)
    assert step["frac_reward_zero_std"] < 1.0 and step["reward_std"] > 0  # a group with differing rewards
    assert max(step[f"rewards/{name}_reward/std"] for name in ("format", "slice", "grounding")) > 0
    from safetensors.torch import load_file

    before, after = load_file(str(taught / "sft" / "model.safetensors")), load_file(str(taught / "grpo" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)  # the step moved the policy

    # images reach the policy: the vision tower saw the rendered views of the prompt (generation and loss)
    from transformers import AutoProcessor

    from MedVolR1Lib.training.data import grpo_dataset
    from MedVolR1Lib.training.records import read_records
    from MedVolR1Lib.training.store import VolumeStore

    processor = AutoProcessor.from_pretrained(str(taught / "sft"))
    dataset = grpo_dataset(read_records(taught / "train.jsonl"), VolumeStore.from_dir(taught))
    views = [processor.image_processor(images=dataset[i]["images"], return_tensors="pt")["pixel_values"] for i in range(len(dataset))]
    assert len(probe.pixels) >= 2
    for pixels in probe.pixels:
        per_prompt = pixels.reshape(4, -1, pixels.shape[-1])  # G = 4 completions of one prompt
        assert any(all(torch.allclose(p, v) for p in per_prompt) for v in views if v.shape == per_prompt.shape[1:])
        assert pixels.std() > 0
