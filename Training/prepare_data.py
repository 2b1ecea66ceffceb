"""Prepare VRS data: M3D-Seg splits and/or the embedded sample CT -> cases.json, train.jsonl, test.jsonl.

    python Training/prepare_data.py --config Training/configs/cpu-smoke.yaml
    python Training/prepare_data.py --m3d_root /data/M3D_Seg --out_dir runs/m3d --num_views 16 --image_size 448 --workers 8
Every (case, target) left out is listed with its reason in <out_dir>/report.json; the console gets a count per reason.
"""

import json
import sys
from collections import Counter

from trl import TrlParser

from MedVolR1Lib.training.config import stage_argv
from MedVolR1Lib.training.prepare import PrepareArguments, prepare_dataset


def main(argv=None) -> dict:
    parser = TrlParser((PrepareArguments,))
    (args,) = parser.parse_args_and_config(stage_argv("prepare", sys.argv[1:] if argv is None else argv))
    summary = prepare_dataset(args)
    print(json.dumps({k: summary[k] for k in ("records", "targets")}, indent=1))
    skipped = summary["skipped"]
    print(f"skipped {len(skipped)} (case, target) pairs; each with its reason in {args.out_dir}/report.json")
    for reason, count in Counter(s["reason"] for s in skipped).most_common():
        example = next(s for s in skipped if s["reason"] == reason)
        print(f"  {count:5d} x {reason}  (e.g. {example.get('case')} {example.get('target')}, {example.get('split', '')})")
    return summary


if __name__ == "__main__":
    main()
