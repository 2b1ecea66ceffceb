"""How much LiteMedSAM Dice M3D-Seg's z-scored intensities cost, per window, from GT anchors on the sample CT.

    OMP_NUM_THREADS=1 nice -n 10 python Training/window_check.py --out docs/m3d_windows.md

The sample CT (HU) is z-scored the way SegVol made M3D-Seg (`m3d.segvol_normalise`), then propagated from the
same GT anchors with each candidate window; the HU abdomen window on the original scan is the reference.
Candidates: the percentile window (what a z-scored scan gets by default) and the abdomen HU window mapped
through this scan's foreground mean/std (a fixed z window; M3D-Seg does not store the per-case mean/std).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from oracle_table import kept_section  # Training/ is this script's folder

DEFAULT_TARGETS = ("kidney_right", "kidney_left", "spleen", "gallbladder", "liver")
CHOICE_HEADING = "## Choice"  # hand-written reading of the numbers, kept when the table is regenerated


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/m3d_windows.md")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from MedVolR1Lib.m3d import segvol_normalise
    from MedVolR1Lib.propagation.litemedsam import LiteMedSAMPropagator
    from MedVolR1Lib.propagation.oracle import oracle_rows
    from MedVolR1Lib.sample_data import fetch_sample
    from MedVolR1Lib.readers import load_label_map, load_volume
    from MedVolR1Lib.volume import Volume, atomic_write
    from MedVolR1Lib.windowing import CT_PRESETS, Window, percentile_window

    torch.set_num_threads(1)
    sample = fetch_sample()
    hu = load_volume(sample.ct_path)
    labels = load_label_map(sample.labels_path, hu)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    z = Volume(segvol_normalise(hu.array), hu.ijk_to_ras.copy(), "ZSCORE", hu.name + "_segvol", hu.source)
    a = hu.array.astype(np.float32)
    fg = a[a > a.mean()]
    mean, std = float(fg.mean()), float(fg.std())
    abdomen = Window.from_level_width(*CT_PRESETS["abdomen"])
    variants = [
        ("HU, abdomen window (reference)", hu, abdomen),
        ("z-scored, percentile window 0.5-99.5", z, percentile_window(z.array)),
        ("z-scored, abdomen window mapped to z", z, Window((abdomen.low - mean) / std, (abdomen.high - mean) / std)),
    ]
    results, started = [], time.perf_counter()
    for name, volume, window in variants:
        rows = oracle_rows(LiteMedSAMPropagator(window=window), volume, labels, sample.label_names, targets)
        results.append((name, window, {r.target: r for r in rows}))
        print(name, {r.target: round(r.dice, 3) for r in rows}, flush=True)
    reference = results[0][2]
    lines = [
        "# Windows for M3D-Seg's z-scored intensities (LiteMedSAM, GT anchors, sample CT)",
        "",
        "M3D-Seg stores intensities z-scored by SegVol's script, not HU, while the propagators were trained on "
        "HU-windowed images. The sample CT was z-scored the same way (`MedVolR1Lib.m3d.segvol_normalise`: foreground "
        "= voxels above the mean, clipped to its 0.05/99.95 percentiles, z-scored with its mean/std), then each window "
        "below was given to LiteMedSAM with the same GT anchors (max-area slice, one box per component). "
        f"Foreground mean {mean:.1f} HU, std {std:.1f} HU on this scan.",
        "",
        f"Command: `OMP_NUM_THREADS=1 nice -n 10 python Training/window_check.py --out {args.out}` "
        f"({time.perf_counter() - started:.0f} s on a shared 2-core CPU).",
        "",
        "| variant | window (array units) | " + " | ".join(targets) + " | mean Dice | mean change vs HU |",
        "|---|---|" + "---|" * len(targets) + "---|---|",
    ]
    for name, window, rows in results:
        mean_dice = float(np.mean([rows[t].dice for t in targets]))
        delta = float(np.mean([rows[t].dice - reference[t].dice for t in targets]))
        lines.append(f"| {name} | [{window.low:.2f}, {window.high:.2f}] | " + " | ".join(f"{rows[t].dice:.3f}" for t in targets)
                     + f" | {mean_dice:.3f} | {delta:+.3f} |")
    out = Path(args.out)
    kept = kept_section(out, CHOICE_HEADING).strip()
    lines += ["", kept or f"{CHOICE_HEADING}\n\n(not written yet)", ""]
    atomic_write(out, lambda tmp: Path(tmp).write_text("\n".join(lines)))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
