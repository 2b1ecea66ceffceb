"""Benchmark the MedSAM2 propagator at real size: SAM2.1 hiera-tiny at 512 px, bf16 autocast on CUDA.

RANDOM WEIGHTS: no MedSAM2_latest.pt is needed (nor used). The script builds the real-size architecture with
seeded random weights, saves it as {"model": state_dict} in a temporary folder and loads it through the
propagator's normal checkpoint path. Timings and memory are those of the real model (same shapes, same
kernels); the masks mean nothing. Tracking runs with stop_after_absent=None so every slice is tracked.

GPU:  python bench/gpu_bench_medsam2.py                       (512x512x200 synthetic CT; a few minutes at most)
CPU:  python bench/gpu_bench_medsam2.py --device cpu --slices 8   (smoke check, ~1 min on 2 cores)
Prints: prepare time, time per slice of propagation, re-propagation / first ratio, the user-facing speed-up
(prepare + first propagation) / re-propagation (the issue's 5x target), encoder passes, peak memory.

--compare-options (docs/medsam2_review.md): GT anchors for the sample CT's 14 targets, each with its own window,
under each input option that departs from or returns to MedSAM2's official script: stop after 2 absent slices
vs track every slice, transposed (training layout) vs radiological frames, hole filling on/off, largest
component per target vs never. Prints Dice, NSD, slices decoded and seconds per target and variant. Dice
means something only with real weights: pass --checkpoint MedSAM2_latest.pt (not reachable from this project's
machines); without it the real-size random model (or --micro on CPU) measures costs only.
  python bench/gpu_bench_medsam2.py --compare-options --checkpoint MedSAM2_latest.pt
  python bench/gpu_bench_medsam2.py --compare-options --device cpu --micro     (wiring/cost smoke, ~3 min)
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_ct(slices: int, size: int, seed: int = 0):
    """Body ellipse (soft tissue) with two 'kidneys' and noise, in HU, 0.8 x 0.8 x 2.5 mm."""
    from MedVolR1Lib.volume import volume_from_array

    rng = np.random.default_rng(seed)
    jj, ii = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = ((ii - 0.5) / 0.42) ** 2 + ((jj - 0.5) / 0.33) ** 2 < 1.0
    left = ((ii - 0.32) / 0.06) ** 2 + ((jj - 0.6) / 0.08) ** 2 < 1.0
    right = ((ii - 0.68) / 0.06) ** 2 + ((jj - 0.6) / 0.08) ** 2 < 1.0
    arr = np.full((slices, size, size), -1000.0, dtype=np.float32)
    z0, z1 = int(slices * 0.3), max(int(slices * 0.7), int(slices * 0.3) + 1)
    for k in range(slices):
        plane = arr[k]
        plane[body] = 40.0
        if z0 <= k < z1:
            plane[left | right] = 150.0
    arr += rng.normal(0.0, 15.0, arr.shape).astype(np.float32)
    return volume_from_array(arr, np.diag([0.8, 0.8, 2.5, 1.0]), modality="CT", name="bench")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512, help="in-plane size of the synthetic volume")
    parser.add_argument("--boxes", type=int, default=1, choices=(1, 2), help="objects tracked (2: both kidneys)")
    parser.add_argument("--encode-batch", type=int, default=8)
    parser.add_argument("--window", type=int, default=16, help="half-width of the slice_range run (coherence reward)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--compare-options", action="store_true", help="the input-option table on the sample CT")
    parser.add_argument("--checkpoint", help="real MedSAM2_latest.pt for --compare-options (else random weights)")
    parser.add_argument("--micro", action="store_true", help="--compare-options with the micro SAM2 (CPU smoke)")
    parser.add_argument("--targets", help="comma-separated sample CT labels for --compare-options (default: 14)")
    args = parser.parse_args(argv)
    if args.compare_options:
        return compare_options(args)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench_medsam2: CUDA is not available on this machine; run it on a GPU machine, "
              "or smoke-test here with: --device cpu --slices 8", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*cannot import name '_C'.*")

    from MedVolR1Lib.anchor import EvidenceAnchor, VoxelBox
    from MedVolR1Lib.fixtures.micro_sam2 import save_random_sam2_checkpoint
    from MedVolR1Lib.propagation.medsam2 import MedSAM2Propagator

    cuda = args.device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t0

    results: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "weights": "random (real-size SAM2.1 hiera-tiny, MedSAM2 t512 config); timings only",
        "torch": torch.__version__,
        "volume_kji": [args.slices, args.size, args.size],
        "boxes": args.boxes,
    }
    volume = synthetic_ct(args.slices, args.size)
    key = args.slices // 2
    s = args.size
    kidney_l = VoxelBox(0.26 * s, 0.52 * s, 0.38 * s, 0.68 * s)
    kidney_r = VoxelBox(0.62 * s, 0.52 * s, 0.74 * s, 0.68 * s)
    anchor = EvidenceAnchor(key, (kidney_l, kidney_r)[: args.boxes])
    moved = EvidenceAnchor(key, tuple(VoxelBox(b.i0 + 6, b.j0 - 4, b.i1 + 6, b.j1 - 4) for b in anchor.boxes))

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "random_sam2.1_hiera_t512.pt"
        _, results["build_checkpoint_s"] = timed(lambda: save_random_sam2_checkpoint(ckpt, [], seed=0))
        prop, results["load_model_s"] = timed(
            lambda: MedSAM2Propagator(ckpt, device=args.device, stop_after_absent=None, encode_batch=args.encode_batch)
        )
    results["dtype"] = prop.dtype
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        results["cuda_mem_model_mib"] = round(torch.cuda.memory_allocated() / 2**20, 1)

    _, results["prepare_s"] = timed(lambda: prop.prepare(volume))
    results["prepare_per_slice_s"] = results["prepare_s"] / args.slices
    results["encoder_passes_after_prepare"] = prop.encoded_frames
    if cuda:
        results["cuda_mem_after_prepare_mib"] = round(torch.cuda.memory_allocated() / 2**20, 1)
    _, results["prepare_again_s"] = timed(lambda: prop.prepare(volume))

    def tracked_frames():
        return sum(len(v) for v in prop.last_trace.visited.values())

    mask, results["propagate_first_s"] = timed(lambda: prop.propagate(anchor, merge=False))
    frames = tracked_frames()
    results["frames_tracked_per_run"] = frames
    results["propagate_first_per_slice_s"] = results["propagate_first_s"] / frames
    _, results["propagate_moved_box_s"] = timed(lambda: prop.propagate(moved, merge=False))
    results["repropagate_over_first"] = results["propagate_moved_box_s"] / results["propagate_first_s"]
    # What a user feels: the first result costs encoding + tracking, an edited box only tracking.
    results["first_result_over_repropagation_x"] = (results["prepare_s"] + results["propagate_first_s"]) / results["propagate_moved_box_s"]
    results["propagate_moved_per_slice_s"] = results["propagate_moved_box_s"] / tracked_frames()
    window = (key - args.window, key + args.window)
    _, results[f"propagate_window_pm{args.window}_s"] = timed(lambda: prop.propagate(anchor, slice_range=window))
    results["encoder_passes_after_propagations"] = prop.encoded_frames
    results["encoder_rerun_on_repropagation"] = prop.encoded_frames != args.slices
    results["mask_shape_ok"] = tuple(mask.shape) == volume.shape and mask.dtype == np.uint8
    if cuda:
        results["cuda_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        results["cuda_peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    results["cpu_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    for name, value in results.items():
        print(f"{name:36s} {value:.4f}" if isinstance(value, float) else f"{name:36s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


COMPARE_TARGETS = ("liver", "spleen", "kidney_right", "kidney_left", "pancreas", "stomach", "gallbladder",
                   "urinary_bladder", "aorta", "vertebrae_L3", "inferior_vena_cava", "duodenum", "vertebrae_L1", "sacrum")
# name -> MedSAM2Propagator options; "as_run" is this project's default, each other row changes one thing
VARIANTS: dict[str, dict] = {
    "as_run": {},
    "track_every_slice": {"stop_after_absent": None},
    "radiological_frames": {"frame_orientation": "radiological"},
    "no_hole_filling": {"fill_hole_area": 0},
    "largest_component_per_target": {"largest_component": "per_target"},
}


def compare_options(args) -> int:
    """GT-anchor table per input option (see the module docstring); one propagator per variant."""
    import tempfile

    import torch

    from MedVolR1Lib.fixtures.micro_sam2 import build_micro_sam2_checkpoint, save_random_sam2_checkpoint
    from MedVolR1Lib.propagation.medsam2 import MedSAM2Propagator
    from MedVolR1Lib.propagation.oracle import oracle_rows
    from MedVolR1Lib.sample_data import fetch_sample
    from MedVolR1Lib.targets import propagation_settings
    from MedVolR1Lib.readers import load_label_map, load_volume

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench_medsam2: CUDA is not available; use --device cpu --micro for a smoke run", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*cannot import name '_C'.*")
    sample = fetch_sample()
    volume = load_volume(sample.ct_path)
    labels = load_label_map(sample.labels_path, volume)
    targets = [t for t in (args.targets.split(",") if args.targets else COMPARE_TARGETS) if t]
    tmp = tempfile.TemporaryDirectory()
    overrides: list[str] = []
    if args.checkpoint:
        ckpt, weights = Path(args.checkpoint), f"real: {args.checkpoint}"
    elif args.micro:
        ckpt, weights = Path(tmp.name) / "micro.pt", "RANDOM micro SAM2 (wiring and relative cost only; Dice meaningless)"
        overrides = build_micro_sam2_checkpoint(ckpt, image_size=128)
    else:
        ckpt, weights = Path(tmp.name) / "random.pt", "RANDOM real-size SAM2.1-tiny t512 (cost only; Dice meaningless)"
        save_random_sam2_checkpoint(ckpt, [], seed=0)
    print(f"weights: {weights}\nvolume: {volume.shape} {volume.name}\ntargets: {len(targets)}")
    rows = []
    for variant, options in VARIANTS.items():
        for name in targets:
            settings = propagation_settings(name)
            kwargs = dict(options)
            if kwargs.get("largest_component") == "per_target":
                kwargs["largest_component"] = settings.largest_component
            prop = _compare_propagator(MedSAM2Propagator, ckpt, overrides, args, settings.window, kwargs)
            (row,) = oracle_rows(prop, volume, labels, sample.label_names, [name])
            decoded = sum(len(v) for v in prop.last_trace.visited.values())
            rows.append({"variant": variant, "target": name, "window": settings.window, "dice": row.dice,
                         "nsd": row.nsd, "slices_decoded": decoded, "seconds": row.seconds})
            print(f"{variant:30s} {name:20s} {settings.window:8s} Dice {row.dice:.3f} NSD {row.nsd:.3f} "
                  f"decoded {decoded:4d} {row.seconds:7.2f} s", flush=True)
    print("\nmean per variant (Dice, NSD, slices decoded, seconds):")
    for variant in VARIANTS:
        sel = [r for r in rows if r["variant"] == variant]
        print(f"{variant:30s} {np.mean([r['dice'] for r in sel]):.3f} {np.mean([r['nsd'] for r in sel]):.3f} "
              f"{np.mean([r['slices_decoded'] for r in sel]):7.1f} {np.mean([r['seconds'] for r in sel]):7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"weights": weights, "rows": rows}, indent=1))
    tmp.cleanup()
    return 0


_PROPAGATORS: dict = {}


def _compare_propagator(cls, ckpt, overrides, args, window, kwargs):
    """One loaded model per variant and window (features are cached per volume and window inside it)."""
    key = (window, tuple(sorted(kwargs.items())))
    if key not in _PROPAGATORS:
        _PROPAGATORS[key] = cls(ckpt, device=args.device, hydra_overrides=overrides, window=window,
                                encode_batch=args.encode_batch, **kwargs)
    return _PROPAGATORS[key]


if __name__ == "__main__":
    raise SystemExit(main())
