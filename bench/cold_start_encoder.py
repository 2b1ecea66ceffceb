"""LiteMedSAM's encoder per slice on each CPU path (lite_encoder.ENCODERS), with the CPU features detected.

    OMP_NUM_THREADS=2 python bench/cold_start_encoder.py [--rounds 5] [--slices 3]

Slices of the sample CT around the right kidney, batch 1 (the CPU default), `--threads` threads for every path.
The paths run interleaved, one slice each in turn, for `--rounds` rounds (a change of load on a shared machine
hits them all); the line gives the median ms per slice and each path's speed against PyTorch fp32 from the same
rounds, and how far its embeddings are from fp32's (relative L2 over the slices; bf16 autocast is ~0.05).
`report()` returns the printed lines (bench/bench_cold_start.py prints them too).
"""

from __future__ import annotations

import argparse
import statistics
import time


def measure(rounds: int = 5, slices: int = 3, encoders=None) -> dict:
    """{path: {"ms": [per round], "relative_error": float}} and the chosen path, from one interleaved run."""
    import torch

    from MedVolR1Lib.hashing import file_sha256
    from MedVolR1Lib.propagation.lite_encoder import ENCODERS, build_encoder, onnxruntime_available
    from MedVolR1Lib.propagation.litemedsam import LiteMedSAMPropagator
    from MedVolR1Lib.propagation.oracle import gt_profile
    from MedVolR1Lib.readers import load_label_map, load_volume
    from MedVolR1Lib.sample_data import fetch_sample

    sample = fetch_sample()
    volume = load_volume(sample.ct_path)
    labels = load_label_map(sample.labels_path, volume)
    key = gt_profile(labels, {v: k for k, v in sample.label_names.items()}["kidney_right"], "kidney_right").key_slice
    prop = LiteMedSAMPropagator(precision="fp32")  # the loaded, BN-folded, channels-last encoder every path wraps
    prop.prepare(volume)
    images = prop._preprocess(list(range(key - slices // 2, key - slices // 2 + slices)))
    names = [n for n in (encoders or ENCODERS) if not n.startswith("onnx") or onnxruntime_available()]
    cache_key = file_sha256(prop.checkpoint)[:16]
    backends = {n: build_encoder(n, prop._net.image_encoder, prop.device, cache_key) for n in names}
    reference = backends["torch-fp32"](images) if "torch-fp32" in backends else None
    result: dict = {}
    for name, encode in backends.items():  # warm-up (first-call allocations, ORT's graph set-up) and the error
        out = torch.cat([encode(images[n : n + 1]) for n in range(slices)])
        error = float(torch.linalg.vector_norm(out - reference) / torch.linalg.vector_norm(reference)) if reference is not None else float("nan")
        result[name] = {"ms": [], "relative_error": error}
    for r in range(rounds):
        for name, encode in backends.items():
            t0 = time.perf_counter()
            encode(images[r % slices : r % slices + 1])
            result[name]["ms"].append(1000.0 * (time.perf_counter() - t0))
    return result


def report(rounds: int = 5, slices: int = 3, threads: int | None = None) -> list[str]:
    """Printed lines: the CPU features, the path `choose_encoder` picks, and ms per slice per path."""
    import torch

    from MedVolR1Lib.propagation.lite_encoder import choose_encoder, detect_cpu_features, onnxruntime_available

    if threads:
        torch.set_num_threads(threads)
    features = detect_cpu_features()
    chosen = choose_encoder(features, onnxruntime_available())
    lines = [f"encoder per slice (batch 1, {torch.get_num_threads()} threads, {rounds} interleaved rounds): CPU features "
             f"{features.describe()}; torch says {torch.backends.cpu.get_cpu_capability()}; auto picks {chosen}"]
    result = measure(rounds, slices)
    base = result.get("torch-fp32")
    for name, r in result.items():
        median = statistics.median(r["ms"])
        ratio = ""
        if base is not None:
            per_round = [b / m for b, m in zip(base["ms"], r["ms"])]
            ratio = f", {statistics.median(per_round):.2f}x torch-fp32 (median of per-round ratios)"
        lines.append(f"  {name:10s} {median:7.0f} ms/slice{ratio}; embeddings vs fp32: relative L2 "
                     f"{r['relative_error']:.3f}{'  <- auto' if name == chosen else ''}")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slices", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    for line in report(args.rounds, args.slices, args.threads):
        print(line, flush=True)


if __name__ == "__main__":
    main()
