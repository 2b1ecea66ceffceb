"""SFT and GRPO runs over VRS records: what Training/sft.py and Training/grpo.py call.

Guard rails (each a failure seen with trl 1.16 / transformers 5): on CPU trl needs use_cpu=True and
bf16=False; SFT never truncates (max_length=None: a cut would remove image tokens or the answer); GRPO's
per-device batch counts completions and must be divisible by num_generations; extra dataset columns
(reward_target) reach the reward functions as keyword lists.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from ..errors import DataError
from .checkpoints import resolve_resume, write_manifest
from .config import PolicyArguments, RewardArguments, VRSDataArguments
from .records import read_records
from .store import VolumeStore

log = logging.getLogger("medvolr1.training")


def _records(data: VRSDataArguments):
    records = read_records(Path(data.data_dir) / f"{data.train_file}.jsonl")
    if not records:
        raise DataError(f"{data.data_dir}/{data.train_file}.jsonl holds no records")
    if data.max_train_records:
        records = records[: data.max_train_records]
    return records


def check_cpu_flags(config) -> None:
    """trl defaults to bf16; on a machine without CUDA that must be off and use_cpu on."""
    import torch

    if not torch.cuda.is_available():
        if getattr(config, "bf16", False) or getattr(config, "fp16", False):
            raise ValueError("no CUDA device: set bf16: false and fp16: false (and use_cpu: true) in the config")
        config.use_cpu = True


def run_sft(data: VRSDataArguments, policy: PolicyArguments, config) -> str:
    """Cold-start SFT on GT answers (completion-only loss); returns the folder of the saved adapter/model."""
    from trl import SFTTrainer

    check_cpu_flags(config)
    if config.max_length is not None:
        log.warning("SFT max_length=%s would truncate image tokens; forcing max_length=None", config.max_length)
        config.max_length = None
    config.completion_only_loss = True
    config.remove_unused_columns = False  # the lazy transform needs the raw 'record' column
    config.dataset_kwargs = {**(config.dataset_kwargs or {}), "skip_prepare_dataset": True}
    records = _records(data)
    store = VolumeStore.from_dir(data.data_dir)
    from .data import sft_dataset

    family, fmt = answer_format_for(policy)
    dataset = sft_dataset(records, store, think=data.think, blank=data.blank_images, answer_format=fmt)
    model, processor, model_path = load_policy_for(policy, config)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=processor)
    return _train_and_save(trainer, processor, "sft", data, policy, config, model_path, len(records), **_format_info(family, fmt))


def answer_format_for(policy: PolicyArguments):
    """(family, AnswerFormat) of the run, decided before any weights load (a mismatched adapter fails fast)."""
    from .policy import policy_answer_format, resolve_model_path

    return policy_answer_format(policy, resolve_model_path(policy))


def _format_info(family, fmt) -> dict:
    """What the manifest records so the grounder and later stages use the same convention."""
    return {"family": family.name, "coordinates": fmt.coordinates, "answer_schema": fmt.schema}


def load_policy_for(policy: PolicyArguments, config):
    from .policy import load_policy

    return load_policy(policy, use_cpu=bool(getattr(config, "use_cpu", False)), gradient_checkpointing=bool(config.gradient_checkpointing))


def build_propagator(rewards: RewardArguments):
    if rewards.coherence_propagator == "none":
        return None
    from ..propagation.factory import build_propagator as factory

    return factory(rewards.coherence_propagator, sam_checkpoint=rewards.sam_checkpoint)


def reward_functions(rewards: RewardArguments, store: VolumeStore, propagator=None):
    """(functions, weights) from the rewards module; coherence shares the store's case cache."""
    from ..rewards import RewardWeights, make_reward_functions

    weights = RewardWeights(rewards.reward_format, rewards.reward_slice, rewards.reward_grounding, rewards.reward_coherence)
    window = None if rewards.coherence_window < 0 else rewards.coherence_window
    use_coherence = propagator is not None and rewards.reward_coherence > 0
    return make_reward_functions(
        weights,
        propagator=propagator if use_coherence else None,
        resolve=store.resolve if use_coherence else None,
        window=window,
        slice_source=rewards.slice_source,
        mode=rewards.reward_mode,
        variant=rewards.release_variant,
    )


def check_reward_format(rewards: RewardArguments, fmt) -> None:
    """The release's rewards read its answer schema ([{"slice", "bbox_2d_list"}]) only."""
    if rewards.reward_mode == "release" and fmt.schema != "paper":
        raise ValueError(
            f"reward_mode release reads the release's answer schema: set answer_schema: paper (got {fmt.schema!r})"
        )


def check_grpo_batch(config) -> None:
    generations = config.num_generations
    batch = config.per_device_train_batch_size * config.gradient_accumulation_steps
    if generations and batch % generations:
        raise ValueError(
            f"per_device_train_batch_size ({config.per_device_train_batch_size}) x gradient_accumulation_steps "
            f"({config.gradient_accumulation_steps}) counts completions and must be divisible by num_generations ({generations})"
        )


def run_grpo(data: VRSDataArguments, policy: PolicyArguments, rewards: RewardArguments, config, *, callbacks=None) -> str:
    """GRPO from the SFT adapter with the MedVolR1 rewards; resumes exactly from the latest checkpoint."""
    from trl import GRPOTrainer

    check_cpu_flags(config)
    check_grpo_batch(config)
    config.remove_unused_columns = False
    records = _records(data)
    store = VolumeStore.from_dir(data.data_dir)
    propagator = build_propagator(rewards)
    funcs, weights = reward_functions(rewards, store, propagator)
    config.reward_weights = weights
    from .data import grpo_dataset

    family, fmt = answer_format_for(policy)
    check_reward_format(rewards, fmt)
    dataset = grpo_dataset(records, store, max_boxes=data.max_boxes, blank=data.blank_images, answer_format=fmt)
    model, processor, model_path = load_policy_for(policy, config)
    trainer = GRPOTrainer(
        model=model, reward_funcs=funcs, args=config, train_dataset=dataset, processing_class=processor, callbacks=callbacks
    )
    return _train_and_save(trainer, processor, "grpo", data, policy, config, model_path, len(records),
                           reward_functions=[f.__name__ for f in funcs], reward_weights=weights, **_format_info(family, fmt))


def _train_and_save(trainer, processor, stage: str, data, policy, config, model_path, num_records: int, **extra) -> str:
    """Train (resuming when asked), save adapter + processor, then the manifest evaluation reads.

    `save_model` runs on every rank (FSDP / DeepSpeed gather the weights collectively and it writes on the
    main process only); the processor and the manifest are written by the process that saves
    (`args.should_save`, the flag transformers' own writes use), and every rank waits until they exist.
    """
    trainer.train(resume_from_checkpoint=resolve_resume(data.resume, config.output_dir))
    trainer.save_model(config.output_dir)
    if trainer.args.should_save:
        processor.save_pretrained(config.output_dir)
        write_manifest(
            config.output_dir, stage=stage, base_model=model_path, start_adapter=policy.adapter_path, lora=policy.use_lora,
            records=num_records, data_dir=data.data_dir, global_step=trainer.state.global_step, **extra,
        )
    trainer.accelerator.wait_for_everyone()
    return config.output_dir
