"""Cold-start SFT of Qwen2.5-VL on GT evidence anchors (trl SFTTrainer, LoRA, completion-only loss).

    python Training/sft.py --config Training/configs/cpu-smoke.yaml
    accelerate launch --config_file Training/accelerate/zero2.yaml Training/sft.py --config Training/configs/qwen2.5-vl-7b.yaml
"""

import sys

from trl import SFTConfig, TrlParser

from MedVolR1Lib.training.config import PolicyArguments, VRSDataArguments, stage_argv
from MedVolR1Lib.training.run import run_sft


def main(argv=None) -> str:
    parser = TrlParser((VRSDataArguments, PolicyArguments, SFTConfig))
    data, policy, config = parser.parse_args_and_config(stage_argv("sft", sys.argv[1:] if argv is None else argv))
    return run_sft(data, policy, config)


if __name__ == "__main__":
    print(main())
