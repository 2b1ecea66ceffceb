"""Fewer slices encoded on thin-slice scans: Dice and cold time per `slice_stride` (LiteMedSAM).

    OMP_NUM_THREADS=2 python bench/cold_start_stride.py [--strides 1,2,3,4] [--spacing 1.0]

The thin-slice volume is the sample CT (3 mm slices) resampled to `--spacing` mm in z: the image linearly
between neighbouring slices, the reference labels by nearest slice (a label's z-extent moves by at most half a
source slice).  It is a stand-in for a thin-slice scan: its in-between slices carry no detail the 3 mm scan
lacks, which favours interpolation a little; a real 1 mm scan would need re-measuring.

For each stride a propagator with an empty cache runs the oracle table on five targets (GT anchor on each
target's max-area slice, `propagation.oracle.oracle_rows`; `--targets all` for its 14); the Dice loss is against stride 1 on the same volume.  Only stride 1
runs the encoder for every slice it needs (timed); the strided runs take those slices' embeddings from it instead
of encoding them again (identical: the encoder is deterministic) and their cold time is modelled as their own
wall time plus their encoded-slice count times stride 1's measured encoder time per slice.
`report()` returns the printed lines (bench/bench_cold_start.py prints them too).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np

# Five of the oracle table's targets, small to mid-sized: at 1 mm the whole table's decoding alone takes some
# 20 CPU-minutes per stride on this machine; these five take about a third of that.
STUDY_TARGETS = ("spleen", "kidney_right", "kidney_left", "pancreas", "gallbladder")


@dataclass(frozen=True)
class StrideRun:
    stride: int
    seconds: float
    encoded: int
    interpolated: int
    dice: dict  # target -> Dice vs the resampled reference labels

    def mean(self) -> float:
        return float(np.mean(list(self.dice.values())))


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


def _propagator_classes():
    """Stride 1 times its encoder calls; the strided runs replay its embeddings (the encoder is deterministic, so a
    replayed slice equals a re-encoded one) and encode for real only slices stride 1 never visited."""
    from MedVolR1Lib.propagation.litemedsam import LiteMedSAMPropagator

    class Timed(LiteMedSAMPropagator):
        encode_seconds = 0.0

        def encode(self, slices, progress=None):
            t0 = time.perf_counter()
            super().encode(slices, progress)
            self.encode_seconds += time.perf_counter() - t0

    class Replay(Timed):
        source: dict = {}

        def encode(self, slices, progress=None):
            todo = [int(k) for k in dict.fromkeys(slices) if int(k) not in self._embeddings]
            replayed = [k for k in todo if k in self.source]
            for k in replayed:
                self._embeddings[k] = self.source[k]
            self.stats.encoded_slices += len(replayed)
            self.stats.encoded.extend(replayed)
            super().encode([k for k in todo if k not in self.source], progress)

    return Timed, Replay


def run_strides(strides, spacing_mm: float = 1.0, targets=None, encoder: str = "auto", on_run=None) -> list[StrideRun]:
    """The oracle table once per stride, each from an empty cache: stride 1 encodes (timed), the others replay its
    embeddings, and their cold time is modelled as their own wall time plus their encoded slices times stride 1's
    measured encoder time per slice."""
    from MedVolR1Lib.propagation.oracle import SAMPLE_CT_TARGETS, oracle_rows

    volume, labels, names = thin_slice_sample(spacing_mm)
    targets = list(targets or SAMPLE_CT_TARGETS)
    Timed, Replay = _propagator_classes()
    settings = dict(encoder=encoder, stride_max_spacing=max(1.5, spacing_mm))
    base = Timed(slice_stride=1, **settings)
    runs, per_slice = [], None
    for stride in [1] + [s for s in strides if s != 1]:
        prop = base if stride == 1 else Replay(slice_stride=stride, **settings)
        if stride != 1:
            prop.source = base._embeddings
        t0 = time.perf_counter()
        rows = oracle_rows(prop, volume, labels, names, targets)
        wall = time.perf_counter() - t0
        if stride == 1:
            per_slice = base.encode_seconds / max(base.stats.encoded_slices, 1)
            seconds = wall
        else:  # replayed slices cost what stride 1 measured; slices it had to encode are in the wall time already
            replayed = prop.stats.encoded_slices - len([k for k in prop.stats.encoded if k not in base._embeddings])
            seconds = wall + replayed * per_slice
        runs.append(StrideRun(stride, seconds, prop.stats.encoded_slices, prop.stats.interpolated,
                              {r.target: r.dice for r in rows}))
        if on_run:
            on_run(runs[-1])
    return [r for s in strides for r in runs if r.stride == s]


def render(runs: list[StrideRun], spacing_mm: float, encoder: str, slices: int) -> list[str]:
    base = next((r for r in runs if r.stride == 1), runs[0])
    lines = [f"stride study: sample CT resampled to {spacing_mm:g} mm in z ({slices} slices), oracle table of "
             f"{len(base.dice)} targets from an empty cache, encoder {encoder}; loss = stride {base.stride}'s mean Dice minus "
             f"the stride's; time: stride 1 measured, the others modelled (its ms per encoded slice)"]
    for r in runs:
        drops = {t: base.dice[t] - d for t, d in r.dice.items()}
        worst = max(drops, key=drops.get)
        lines.append(
            f"  stride {r.stride}: {r.seconds:6.1f} s ({r.encoded} slices encoded, {r.interpolated} decodes on "
            f"interpolated embeddings), time {r.seconds / base.seconds:.2f}x stride {base.stride}'s; mean Dice "
            f"{r.mean():.4f}, loss {base.mean() - r.mean():+.4f}; "
            f"largest drop {drops[worst]:+.3f} ({worst})")
    return lines


def report(strides=(1, 2, 3, 4), spacing_mm: float = 1.0, targets=STUDY_TARGETS, encoder: str = "auto",
           on_run=None) -> list[str]:
    """Printed lines: per stride, the cold time of the oracle table and its Dice against stride 1's."""
    from MedVolR1Lib.propagation.lite_encoder import resolve_encoder

    runs = run_strides(strides, spacing_mm, targets, encoder, on_run)
    slices = thin_slice_sample(spacing_mm)[0].num_slices
    return render(runs, spacing_mm, resolve_encoder(encoder, "auto", "cpu"), slices)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strides", default="1,2,3,4")
    parser.add_argument("--spacing", type=float, default=1.0, help="slice spacing of the resampled volume (mm)")
    parser.add_argument("--targets", default=",".join(STUDY_TARGETS),
                        help="comma-separated label names; 'all' for the oracle table's 14")
    parser.add_argument("--encoder", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    strides = [int(s) for s in args.strides.split(",") if s.strip()]
    targets = None if args.targets == "all" else [t.strip() for t in args.targets.split(",") if t.strip()]
    on_run = lambda r: print(f"  (stride {r.stride} done: {r.seconds:.0f} s, mean Dice {r.mean():.4f}, {r.dice})", flush=True)  # noqa: E731
    for line in report(strides, args.spacing, targets, args.encoder, on_run):
        print(line, flush=True)


if __name__ == "__main__":
    main()
