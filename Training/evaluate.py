"""Evaluate checkpoints side by side (plus the oracle row and the blind-prior / blanked-image controls).

    python Training/evaluate.py --config Training/configs/cpu-smoke.yaml
    python Training/evaluate.py --eval_data_dir runs/m3d --checkpoints base=Qwen/Qwen2.5-VL-7B-Instruct,sft=runs/sft,grpo=runs/grpo
    torchrun --nproc_per_node 8 Training/evaluate.py --eval_data_dir runs/m3d --checkpoints ...   # one shard per GPU, merged on rank 0
    python Training/evaluate.py --shard 3/8 ...   then   python Training/evaluate.py --merge runs/eval
Writes report.md (Table 1 layout: "DSC (IoU)" per dataset, NSD, per class; docs/evaluation.md), results.csv,
per_record.csv, summary.json and metrics.png under report_dir.
"""

import sys
from pathlib import Path

from trl import TrlParser

from MedVolR1Lib.training.config import stage_argv
from MedVolR1Lib.training.evaluate import EvalArguments, evaluate


def main(argv=None) -> dict:
    parser = TrlParser((EvalArguments,))
    (args,) = parser.parse_args_and_config(stage_argv("evaluate", sys.argv[1:] if argv is None else argv))
    summary = evaluate(args)
    if "table" in summary:  # one process, a merge, or rank 0 after merging
        print((Path(args.merge or args.report_dir) / "report.md").read_text())
    else:
        print(f"shard {summary['shard'][0]}/{summary['shard'][1]}: {summary['rows']} rows in {summary['seconds']:.1f} s -> {summary['path']}"
              + (f"; merge with: {summary['merge']}" if "merge" in summary else ""))
    return summary


if __name__ == "__main__":
    main()
