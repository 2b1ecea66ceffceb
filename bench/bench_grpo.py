"""GRPO step cost on the cpu-smoke setting, split into generation / rewards (of which propagation) / loss / backward,
and the coherence reward's cost for one group of 8 rollouts relative to a single propagation.

    OMP_NUM_THREADS=1 python bench/bench_grpo.py [--steps 3] [--window 1] [--out runs/bench]

Prints ratios and peak memory (ru_maxrss); timings are wall clock on this machine (shared CPUs vary).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from collections import defaultdict
from pathlib import Path


class Timer:
    def __init__(self):
        self.total = defaultdict(float)
        self.calls = defaultdict(int)

    def wrap(self, obj, name: str, key: str):
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.total[key] += time.perf_counter() - start
                self.calls[key] += 1

        setattr(obj, name, timed)


def prepare(out: Path, views: int, size: int):
    from MedVolR1Lib.training.prepare import PrepareArguments, prepare_dataset

    prepare_dataset(PrepareArguments(out_dir=str(out), targets="liver,spleen,kidneys,stomach", num_views=views, image_size=size, max_queries_per_target=2))


def bench_coherence(data: Path, window: int, group: int = 8) -> dict:
    """One propagation from scratch vs the coherence reward of a group sharing the case (fresh LiteMedSAM
    propagators); the measurement itself is gpu_bench_grpo's, here on the CPU."""
    from gpu_bench_grpo import coherence_group_cost  # bench/ is this script's folder, first on sys.path

    from MedVolR1Lib.propagation.factory import build_propagator

    return coherence_group_cost(data, lambda: build_propagator("litemedsam", device="cpu"), lambda: None, window, group)


def bench_steps(data: Path, steps: int, window: int, out: Path) -> dict:
    from trl import GRPOConfig, GRPOTrainer

    from MedVolR1Lib.training.config import PolicyArguments, RewardArguments
    from MedVolR1Lib.training.data import grpo_dataset
    from MedVolR1Lib.training.policy import load_policy
    from MedVolR1Lib.training.records import read_records
    from MedVolR1Lib.training.run import build_propagator, reward_functions
    from MedVolR1Lib.training.store import VolumeStore

    store = VolumeStore.from_dir(data)
    rewards = RewardArguments(reward_coherence=1.0, coherence_propagator="litemedsam", coherence_window=window)
    propagator = build_propagator(rewards)
    timer = Timer()
    timer.wrap(propagator, "propagate", "propagation")
    timer.wrap(propagator, "prepare", "propagation")
    funcs, weights = reward_functions(rewards, store, propagator)
    model, processor, _ = load_policy(PolicyArguments(model_name_or_path="tiny", tiny_model_dir=str(out / "tiny-qwen"), lora_rank=8, torch_threads=1), use_cpu=True)
    config = GRPOConfig(
        output_dir=str(out / "grpo"), use_cpu=True, bf16=False, max_steps=steps, per_device_train_batch_size=8, num_generations=8,
        max_completion_length=48, learning_rate=1e-4, beta=0.0, loss_type="dapo", epsilon_high=0.28, reward_weights=weights,
        report_to="none", save_strategy="no", logging_steps=1, seed=0, remove_unused_columns=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=config, train_dataset=grpo_dataset(read_records(data / "train.jsonl"), store), processing_class=processor)
    timer.wrap(trainer, "_generate", "generation")
    timer.wrap(trainer, "_calculate_rewards", "rewards")
    timer.wrap(trainer, "compute_loss", "loss_forward")
    timer.wrap(trainer.accelerator, "backward", "backward")
    timer.wrap(trainer, "training_step", "step_total")
    trainer.train()
    per_step = {k: v / steps for k, v in timer.total.items()}
    per_step["rewards_without_propagation"] = per_step.get("rewards", 0.0) - per_step.get("propagation", 0.0)
    return {"steps": steps, "per_step_s": {k: round(v, 3) for k, v in sorted(per_step.items())},
            "share_of_step": {k: round(v / per_step["step_total"], 3) for k, v in sorted(per_step.items()) if k != "step_total"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--window", type=int, default=1, help="coherence window +-W slices")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_grpo_"))
    prepare(out / "data", args.views, args.image_size)
    result = {"coherence": bench_coherence(out / "data", args.window), "grpo": bench_steps(out / "data", args.steps, args.window, out)}
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result, indent=1))
    c = result["coherence"]
    print(f"coherence reward for a group of 8 / one propagation: {c['group_over_one']:.2f}x (target <= 1.5x; lockstep group tracking), prepare calls {c['prepare_calls']}")


if __name__ == "__main__":
    main()
