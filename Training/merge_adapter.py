"""Merge the SFT adapter into its base model, as the release does before GRPO.

    python Training/merge_adapter.py --adapter runs/ctorg/sft --out_dir runs/ctorg/sft-merged
"""

import argparse
import sys

from MedVolR1Lib.training.merge import merge_adapter


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="SFT output folder (adapter + medvolr1_training.json)")
    parser.add_argument("--out_dir", required=True, help="new folder for the merged model (must not exist)")
    parser.add_argument("--base_model", default=None, help="default: the base named in the adapter's manifest")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return str(merge_adapter(args.adapter, args.out_dir, base_model=args.base_model, dtype=args.dtype))


if __name__ == "__main__":
    print(main())
