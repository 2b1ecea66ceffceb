"""Fewer slices encoded on thin-slice scans: Dice and cold time per `slice_stride` (LiteMedSAM).

    OMP_NUM_THREADS=2 python bench/cold_start_stride.py [--strides 1,2,3,4] [--spacing 1.0]

The thin-slice volume is the sample CT (3 mm slices) resampled to `--spacing` mm in z: the image linearly
between neighbouring slices, the reference labels by nearest slice (a label's z-extent moves by at most half a
source slice).  It is a stand-in for a thin-slice scan: its in-between slices carry no detail the 3 mm scan
lacks, which favours interpolation a little; a real 1 mm scan would need re-measuring.

For each stride a fresh propagator runs the oracle table (GT anchor on each target's max-area slice,
`propagation.oracle.oracle_rows`) cold, so its time includes encoding; the Dice loss is against stride 1 on the
same volume.  `report()` returns the printed lines (bench/bench_cold_start.py prints them too).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np

MAIN_TARGETS = 10  # the oracle table's bold mean is over its first 10 targets


@dataclass(frozen=True)
class StrideRun:
    stride: int
    seconds: float
    encoded: int
    interpolated: int
    dice: dict  # target -> Dice vs the resampled reference labels

    def mean(self, count: int | None = None) -> float:
        values = list(self.dice.values())[:count]
        return float(np.mean(values))


def resample_z(volume, labels: np.ndarray, spacing_mm: float):
    """(volume, labels) on slices `spacing_mm` apart, from the first slice to the last (same in-plane grid)."""
    from MedVolR1Lib.volume import Volume

    step = volume.spacing[2]
    count = int(np.floor((volume.num_slices - 1) * step / spacing_mm + 1e-6)) + 1
    z = np.arange(count) * (spacing_mm / step)  # positions in source-slice units
    below = np.minimum(np.floor(z).astype(int), volume.num_slices - 1)
    above = np.minimum(below + 1, volume.num_slices - 1)
    t = (z - below).astype(np.float32)[:, None, None]
    array = (1.0 - t) * volume.array[below] + t * volume.array[above]
    nearest = np.minimum(np.rint(z).astype(int), volume.num_slices - 1)
    affine = volume.ijk_to_ras.copy()
    affine[:3, 2] *= spacing_mm / step
    thin = Volume(array.astype(np.float32), affine, modality=volume.modality, name=f"{volume.name}-z{spacing_mm:g}mm")
    return thin, labels[nearest]


def thin_slice_sample(spacing_mm: float = 1.0):
    """The sample CT and its reference labels resampled to `spacing_mm` in z, and the label names."""
    from MedVolR1Lib.readers import load_label_map, load_volume
    from MedVolR1Lib.sample_data import fetch_sample

    sample = fetch_sample()
    volume = load_volume(sample.ct_path)
    labels = load_label_map(sample.labels_path, volume)
    thin, thin_labels = resample_z(volume, labels, spacing_mm)
    return thin, thin_labels, sample.label_names


def run_strides(strides, spacing_mm: float = 1.0, targets=None, encoder: str = "auto") -> list[StrideRun]:
    """One cold oracle table per stride (a fresh propagator each), in the order given."""
    from MedVolR1Lib.propagation.litemedsam import LiteMedSAMPropagator
    from MedVolR1Lib.propagation.oracle import SAMPLE_CT_TARGETS, oracle_rows

    volume, labels, names = thin_slice_sample(spacing_mm)
    targets = list(targets or SAMPLE_CT_TARGETS)
    runs = []
    for stride in strides:
        prop = LiteMedSAMPropagator(encoder=encoder, slice_stride=stride, stride_max_spacing=max(1.5, spacing_mm))
        t0 = time.perf_counter()
        rows = oracle_rows(prop, volume, labels, names, targets)
        seconds = time.perf_counter() - t0
        runs.append(StrideRun(stride, seconds, prop.stats.encoded_slices, prop.stats.interpolated,
                              {r.target: r.dice for r in rows}))
        del prop  # its embeddings (4 MB per slice) go before the next stride's
    return runs


def render(runs: list[StrideRun], spacing_mm: float, encoder: str, slices: int) -> list[str]:
    base = next((r for r in runs if r.stride == 1), runs[0])
    lines = [f"stride study: sample CT resampled to {spacing_mm:g} mm in z ({slices} slices), oracle table of "
             f"{len(base.dice)} targets, cold, encoder {encoder}; loss = stride {base.stride}'s mean Dice minus the stride's"]
    for r in runs:
        drops = {t: base.dice[t] - d for t, d in r.dice.items()}
        worst = max(drops, key=drops.get)
        lines.append(
            f"  stride {r.stride}: {r.seconds:6.1f} s cold ({r.encoded} slices encoded, {r.interpolated} decodes on "
            f"interpolated embeddings), time {r.seconds / base.seconds:.2f}x stride {base.stride}'s; mean Dice "
            f"{r.mean(MAIN_TARGETS):.3f} (first {MAIN_TARGETS}) / {r.mean():.3f} (all {len(r.dice)}), loss "
            f"{base.mean(MAIN_TARGETS) - r.mean(MAIN_TARGETS):+.4f} / {base.mean() - r.mean():+.4f}; "
            f"largest drop {drops[worst]:+.3f} ({worst})")
    return lines


def report(strides=(1, 2, 3, 4), spacing_mm: float = 1.0, targets=None, encoder: str = "auto") -> list[str]:
    """Printed lines: per stride, the cold time of the oracle table and its Dice against stride 1's."""
    from MedVolR1Lib.propagation.lite_encoder import resolve_encoder

    runs = run_strides(strides, spacing_mm, targets, encoder)
    slices = thin_slice_sample(spacing_mm)[0].num_slices
    return render(runs, spacing_mm, resolve_encoder(encoder, "auto", "cpu"), slices)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strides", default="1,2,3,4")
    parser.add_argument("--spacing", type=float, default=1.0, help="slice spacing of the resampled volume (mm)")
    parser.add_argument("--targets", default="", help="comma-separated label names (default: the oracle table's 14)")
    parser.add_argument("--encoder", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    strides = [int(s) for s in args.strides.split(",") if s.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] or None
    for line in report(strides, args.spacing, targets, args.encoder):
        print(line, flush=True)


if __name__ == "__main__":
    main()
