"""Simulated-user corrections on the real sample CT: Dice / NSD after 0..5 corrections, as markdown.

    OMP_NUM_THREADS=2 python Training/corrections_table.py --out docs/corrections_litemedsam.md
    python Training/corrections_table.py --propagator medsam2 --sam-checkpoint MedSAM2_latest.pt --device cuda

LiteMedSAM ships with its wheel; MedSAM2 needs its checkpoint (a GPU server: about 0.3-0.5 s per slice on a CPU).

The protocol is library code (MedVolR1Lib.propagation.simulated_user); this file parses flags, runs it twice
(plain, and with the GT extent as the first correction) and writes the report.  A "## Notes" section already
in the output file is kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from oracle_table import DEFAULT_TARGETS, NOTES_HEADING, _machine, kept_section  # Training/ is this script's folder

STEPS = (0, 1, 2, 3, 5)


def _table(curves, title: str, ceilings=None) -> list[str]:
    """Markdown rows; `ceilings` (target -> (Dice, NSD) with GT boxes on every slice) adds the curve's limit."""
    head = " | ".join(f"Dice {s}" for s in STEPS) + " | " + " | ".join(f"NSD {s}" for s in STEPS)
    extra = " | Dice, every slice boxed | NSD, every slice boxed" if ceilings else ""
    lines = [f"### {title}", "", f"| target | {head}{extra} | corrections made |",
             "|---|" + "---|" * (2 * len(STEPS) + 1 + (2 if ceilings else 0))]
    for c in curves:
        cells = " | ".join(f"{c.at(s):.3f}" for s in STEPS) + " | " + " | ".join(f"{c.at(s, 'nsd'):.3f}" for s in STEPS)
        if ceilings:
            cells += " | {:.3f} | {:.3f}".format(*ceilings[c.target])
        lines.append(f"| {c.target} | {cells} | {'; '.join(c.actions) or 'none needed'} |")
    mean = " | ".join(f"**{sum(c.at(s) for c in curves) / len(curves):.3f}**" for s in STEPS)
    mean_nsd = " | ".join(f"**{sum(c.at(s, 'nsd') for c in curves) / len(curves):.3f}**" for s in STEPS)
    if ceilings:
        mean_nsd += " | " + " | ".join(f"**{sum(ceilings[c.target][m] for c in curves) / len(curves):.3f}**" for m in (0, 1))
    auc = sum(sum(c.at(s) for s in range(6)) / 6 for c in curves) / len(curves)
    lines += [f"| **mean ({len(curves)})** | {mean} | {mean_nsd} | Dice-AUC over 0..5 (mean of the 6 points): {auc:.3f} |", ""]
    return lines


TITLES = {"litemedsam": "LiteMedSAM", "medsam2": "MedSAM2"}


def render(plain, extent, *, command: str, machine: str, seconds: float, describe: dict, notes: str,
           ceilings=None, propagator: str = "litemedsam") -> str:
    lines = [
        f"# Simulated-user corrections: {TITLES[propagator]} on the sample CT",
        "",
        "Protocol (MedVolR1Lib/propagation/simulated_user.py): start from the GT anchor (max-area slice, GT component "
        "boxes, as docs/oracle_litemedsam.md); each correction goes to the slice without an anchor that has the most "
        "wrong voxels (missed + leaked): if the target is on it, the user draws its GT boxes there (a new anchor: "
        "LiteMedSAM's walk restarts from that box, MedSAM2 takes it as one more prompted frame); if not (a leak "
        "past the target's end), the user limits the extent on that side at the target's last slice. Up to 5 "
        "corrections; a target with no wrong slice left keeps its last score. Scores vs the reference labels "
        "(TotalSegmentator's own predictions) at 3 mm: Dice, NSD 2 mm. "
        "\"Every slice boxed\" is the curve's limit: the GT boxes on every slice of the target, each slice keeping "
        "the segmenter's own mask for them (`simulated_user.every_slice_scores`).",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine}",
        f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Propagator(s): `{json.dumps(describe)}`",
        f"- Whole run: {seconds:.0f} s wall (both tables, embeddings shared).",
        "",
    ]
    lines += _table(plain, "Corrections: boxes where the mask is most wrong", ceilings)
    lines += _table(extent, "First correction = the GT z-range as the extent limit, then boxes")
    lines += [notes.strip() if notes.strip() else f"{NOTES_HEADING}\n\n(none yet)", ""]
    return "\n".join(lines)


def _write_json(path, runs, ceilings, atomic_write) -> None:
    data = {"plain": [c.as_dict() for c in runs[False]], "extent_first": [c.as_dict() for c in runs[True]],
            "every_slice_boxed": {name: {"dice": d, "nsd": n} for name, (d, n) in ceilings.items()}}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))


def main(argv=None) -> int:
    from MedVolR1Lib.propagation.box_tracking import BETWEEN_MODES
    from MedVolR1Lib.propagation.lite_encoder import ENCODERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="markdown report (default docs/corrections_<propagator>.md)")
    parser.add_argument("--propagator", default="litemedsam", choices=tuple(TITLES))
    parser.add_argument("--sam-checkpoint", help="MedSAM2_latest.pt (--propagator medsam2)")
    parser.add_argument("--sam-override", action="append", default=[], help="hydra override for MedSAM2 (repeatable)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated label names")
    parser.add_argument("--corrections", type=int, default=5)
    parser.add_argument("--precision", default="auto", choices=("fp32", "bf16", "auto"), help="LiteMedSAM's encoder")
    parser.add_argument("--encoder", default="auto", choices=("auto", *ENCODERS),
                        help="LiteMedSAM's encoder path (auto: the one --precision names, or this CPU's fastest)")
    parser.add_argument("--between", default="linked_union", choices=BETWEEN_MODES,
                        help="which anchor's walk a slice between two anchors takes (box_tracking.anchor_ranges)")
    parser.add_argument("--bridge", action=argparse.BooleanOptionalAction, default=True,
                        help="fill slices between two anchors that no walk reached with interpolated boxes")
    parser.add_argument("--min-overlap", type=float, default=None,
                        help="walk guard: least overlap of a slice's mask with the previous one (default: TrackingRules')")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the curves as JSON here")
    parser.add_argument("--target-windows", action=argparse.BooleanOptionalAction, default=True,
                        help="window each target for its tissue (bone for vertebrae, lung, else abdomen: "
                             "windowing.window_for_target); --no-target-windows: the abdomen window for all")
    args = parser.parse_args(argv)
    if not any(t.strip() for t in args.targets.split(",")):
        parser.error("--targets names no target")
    if args.propagator == "medsam2" and not args.sam_checkpoint:
        parser.error("--propagator medsam2 needs --sam-checkpoint PATH (MedSAM2_latest.pt from "
                     "https://huggingface.co/wanglab/MedSAM2)")

    import torch

    from MedVolR1Lib.propagation.box_tracking import TrackingRules
    from MedVolR1Lib.propagation.factory import build_propagator
    from MedVolR1Lib.propagation.litemedsam import LiteMedSAMPropagator
    from MedVolR1Lib.propagation.oracle import gt_profile
    from MedVolR1Lib.propagation.simulated_user import correction_curves, every_slice_scores
    from MedVolR1Lib.sample_data import fetch_sample
    from MedVolR1Lib.readers import load_label_map, load_volume
    from MedVolR1Lib.targets import keeps_largest_component
    from MedVolR1Lib.volume import atomic_write
    from MedVolR1Lib.windowing import window_for_target

    torch.set_num_threads(args.threads)
    sample = fetch_sample()
    volume = load_volume(sample.ct_path)
    labels = load_label_map(sample.labels_path, volume)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    ids = {name: value for value, name in sample.label_names.items()}
    propagators: dict = {}  # one per window (and MedSAM2 component setting): each keeps its own feature cache

    def propagator_for(name: str):
        window = window_for_target(name, volume.modality) if args.target_windows else None
        if args.propagator == "medsam2":  # None would mean the target's window there, so name the CT default
            window = window or "abdomen"
            key = (window, keeps_largest_component(name))
            if key not in propagators:
                propagators[key] = build_propagator("medsam2", sam_checkpoint=args.sam_checkpoint, device=args.device,
                                                    window=window, sam_overrides=args.sam_override, target=name)
            return propagators[key]
        if window not in propagators:
            rules = TrackingRules() if args.min_overlap is None else replace(TrackingRules(), min_overlap=args.min_overlap)
            propagators[window] = LiteMedSAMPropagator(precision=args.precision, encoder=args.encoder, between=args.between, bridge=args.bridge,
                                                       window=window, rules=rules, device=args.device)
        return propagators[window]

    t0 = time.perf_counter()
    runs: dict = {False: [], True: []}
    ceilings: dict = {}
    for n, name in enumerate(targets):  # both variants per target, so partial results are complete rows
        for extent_first in (False, True):
            runs[extent_first] += correction_curves(propagator_for(name), volume, labels, sample.label_names, [name],
                                                    corrections=args.corrections, extent_first=extent_first)
            curve = runs[extent_first][-1]
            print(f"[{n + 1}/{len(targets)}] {name} {'extent first' if extent_first else 'boxes'}: Dice "
                  + " ".join(f"{d:.3f}" for d in curve.dice) + f" ({'; '.join(curve.actions)}) "
                  f"{sum(curve.seconds):.0f} s", flush=True)
        ceilings[name] = every_slice_scores(propagator_for(name), volume, gt_profile(labels, ids[name], name))
        print(f"[{n + 1}/{len(targets)}] {name} every slice boxed: Dice {ceilings[name][0]:.3f}", flush=True)
        if args.json:
            _write_json(args.json, runs, ceilings, atomic_write)
    seconds = time.perf_counter() - t0

    out = Path(args.out or f"docs/corrections_{args.propagator}.md")
    notes = kept_section(out, NOTES_HEADING)
    command = f"OMP_NUM_THREADS={args.threads} python " + " ".join(
        shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    report = render(runs[False], runs[True], command=command, machine=_machine(), seconds=seconds,
                    describe=[p.describe() for p in propagators.values()], notes=notes, ceilings=ceilings,
                    propagator=args.propagator)
    atomic_write(out, lambda tmp: Path(tmp).write_text(report))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
