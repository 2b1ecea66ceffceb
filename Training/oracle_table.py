"""Oracle table: GT anchors on the real sample CT -> LiteMedSAM propagation -> Dice / NSD, as markdown.

    OMP_NUM_THREADS=2 python Training/oracle_table.py --out docs/oracle_litemedsam.md

Everything is library code (MedVolR1Lib.propagation.oracle); this file only parses flags and writes
the report.  A "## Notes" section already in the output file is kept (hand-written explanations).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from MedVolR1Lib.propagation.lite_encoder import ENCODERS
from MedVolR1Lib.propagation.oracle import SAMPLE_CT_TARGETS as DEFAULT_TARGETS

NOTES_HEADING = "## Notes"


def kept_section(path: Path, heading: str) -> str:
    """The hand-written part of a report (from `heading` to the end) already in `path`, "" when there is none:
    regenerating the table keeps it."""
    text = path.read_text() if path.is_file() else ""
    return text[text.index(heading):] if heading in text else ""


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, Python {platform.python_version()}"


def render(rows, *, command: str, machine: str, seconds: float, encoded: int, describe: dict, main_count: int,
           notes: str) -> str:
    main = rows[:main_count]
    lines = [
        "# Oracle: GT anchor -> LiteMedSAM box tracking on the sample CT",
        "",
        "GT anchor = the target's max-area axial slice and one box per connected component on it "
        "(MedVolR1Lib.targets; a vertebra/sacrum gets one box around all its pieces); the propagator tracks it "
        "up and down (MedVolR1Lib/propagation/box_tracking.py). Scores vs the reference labels at native 3 mm "
        "resolution (MedVolR1Lib.metrics: Dice, NSD at 2 mm tolerance).",
        "",
        "**The reference labels are TotalSegmentator 2.18.0's own predictions** (its example CT, 122x101x112 at 3 mm, "
        "abdomen-pelvis), not manual annotations. Liver, spleen, stomach, aorta and IVC reach the top slice of the scan.",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine}",
        f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Propagator: `{json.dumps(describe)}`",
        f"- Whole table: {seconds:.0f} s wall, {encoded} slices encoded once (shared by all targets), "
        f"{sum(r.seconds for r in rows):.0f} s inside propagate().",
        "",
        "| target | label | key slice | boxes | GT slices | predicted slices | GT voxels | pred/GT volume | Dice | NSD 2 mm | stops (down / up) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pred = f"{r.pred_slices[0]}-{r.pred_slices[1]}" if r.pred_slices else "none"
        lines.append(
            f"| {r.target} | {r.label} | {r.key_slice} | {r.boxes} | {r.gt_slices[0]}-{r.gt_slices[1]} | {pred} | "
            f"{r.gt_voxels} | {r.pred_voxels / max(r.gt_voxels, 1):.2f} | {r.dice:.3f} | {r.nsd:.3f} | {r.stops} |"
        )
    mean_dice = sum(r.dice for r in main) / len(main)
    mean_nsd = sum(r.nsd for r in main) / len(main)
    lines += ["", f"**Mean over the first {len(main)} targets: Dice {mean_dice:.3f}, NSD {mean_nsd:.3f}.**"]
    if len(rows) > main_count:
        lines.append(f"Mean over all {len(rows)}: Dice {sum(r.dice for r in rows) / len(rows):.3f}, "
                     f"NSD {sum(r.nsd for r in rows) / len(rows):.3f}.")
    lines += ["", notes.strip() if notes.strip() else f"{NOTES_HEADING}\n\n(none yet)", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/oracle_litemedsam.md")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated label names")
    parser.add_argument("--main-count", type=int, default=10, help="the mean in bold is over the first N targets")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"))
    parser.add_argument("--encoder", default="auto", choices=("auto", *ENCODERS),
                        help="LiteMedSAM's encoder path (auto: the one --precision names)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    import torch

    from MedVolR1Lib.propagation.litemedsam import LiteMedSAMPropagator
    from MedVolR1Lib.propagation.oracle import oracle_rows
    from MedVolR1Lib.sample_data import fetch_sample
    from MedVolR1Lib.volume import atomic_write
    from MedVolR1Lib.readers import load_label_map, load_volume

    torch.set_num_threads(args.threads)
    sample = fetch_sample()
    volume = load_volume(sample.ct_path)
    labels = load_label_map(sample.labels_path, volume)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    propagator = LiteMedSAMPropagator(precision=args.precision, encoder=args.encoder)
    t0 = time.perf_counter()
    rows = oracle_rows(propagator, volume, labels, sample.label_names, targets,
                       progress=lambda f, m: print(f"[{f:4.0%}] {m}", flush=True))
    seconds = time.perf_counter() - t0

    out = Path(args.out)
    notes = kept_section(out, NOTES_HEADING)
    command = "OMP_NUM_THREADS=2 python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    report = render(rows, command=command, machine=_machine(), seconds=seconds, encoded=propagator.stats.encoded_slices,
                    describe=propagator.describe(), main_count=min(args.main_count, len(rows)), notes=notes)
    atomic_write(out, lambda tmp: Path(tmp).write_text(report))
    if args.json:
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps([r.as_dict() for r in rows], indent=1)))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
