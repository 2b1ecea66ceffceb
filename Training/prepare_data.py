"""Prepare VRS data: M3D-Seg splits and/or the embedded sample CT -> cases.json, train.jsonl, test.jsonl.

    python Training/prepare_data.py --config Training/configs/cpu-smoke.yaml
    python Training/prepare_data.py --m3d_root /data/M3D_Seg --out_dir runs/m3d --num_views 16 --image_size 448
"""

import json
import sys

from trl import TrlParser

from MedVolR1Lib.training.config import stage_argv
from MedVolR1Lib.training.prepare import PrepareArguments, prepare_dataset


def main(argv=None) -> dict:
    parser = TrlParser((PrepareArguments,))
    (args,) = parser.parse_args_and_config(stage_argv("prepare", sys.argv[1:] if argv is None else argv))
    summary = prepare_dataset(args)
    print(json.dumps({k: summary[k] for k in ("records", "targets")}, indent=1))
    for skip in summary["skipped"]:
        print(f"skipped: {skip.get('case')} {skip.get('target')} ({skip.get('split', '')}): {skip['reason']}")
    return summary


if __name__ == "__main__":
    main()
