"""GRPO of the SFT policy with the MedVolR1 rewards (format, slice, grounding, coherence) via trl GRPOTrainer.

    python Training/grpo.py --config Training/configs/cpu-smoke.yaml
    accelerate launch --config_file Training/accelerate/zero2.yaml Training/grpo.py --config Training/configs/qwen2.5-vl-7b.yaml
Resumes exactly (optimizer, scheduler, RNG, step) from the latest checkpoint in output_dir (resume: auto).
"""

import sys

from trl import GRPOConfig, TrlParser

from MedVolR1Lib.training.config import PolicyArguments, RewardArguments, VRSDataArguments, stage_argv
from MedVolR1Lib.training.run import run_grpo


def main(argv=None) -> str:
    parser = TrlParser((VRSDataArguments, PolicyArguments, RewardArguments, GRPOConfig))
    data, policy, rewards, config = parser.parse_args_and_config(stage_argv("grpo", sys.argv[1:] if argv is None else argv))
    return run_grpo(data, policy, rewards, config)


if __name__ == "__main__":
    print(main())
