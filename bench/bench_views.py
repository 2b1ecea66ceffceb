"""Cost of getting a scan in front of the VLM: load + window + render K views, relative to a bare read.

Prints, for the real sample CT and a synthetic 512x512x300 CT written to a temp file, the time and
peak traced memory of each stage as ratios to a bare ``SimpleITK.ReadImage`` of the same file.
Usage: python bench/bench_views.py [--views 16] [--size 448] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MedVolR1Lib.sample_data import fetch_sample
from MedVolR1Lib.views import render_views
from MedVolR1Lib.readers import load_volume
from MedVolR1Lib.windowing import window_volume


def measure(fn, repeats: int) -> tuple[float, float]:
    """Best wall time (s) over repeats and peak traced memory (MB) of one call."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return best, peak / 2**20


def bench_file(label: str, path: Path, views: int, size: int, repeats: int) -> None:
    volume = load_volume(path)
    stages = {
        "bare SimpleITK read": lambda: sitk.GetArrayFromImage(sitk.ReadImage(str(path))),
        "load_volume (canonical)": lambda: load_volume(path),
        "window whole volume": lambda: window_volume(volume),
        f"render {views} views at {size}px": lambda: render_views(volume, num_views=views, image_size=size),
        "load + render (end to end)": lambda: render_views(load_volume(path), num_views=views, image_size=size),
    }
    results = {name: measure(fn, repeats) for name, fn in stages.items()}
    base_t, base_m = results["bare SimpleITK read"]
    print(f"\n{label}: shape (k,j,i) {volume.shape}, file {path.stat().st_size / 2**20:.1f} MB")
    print(f"{'stage':34s} {'time s':>8s} {'x read':>7s} {'peak MB':>8s} {'x read':>7s}")
    for name, (t, m) in results.items():
        print(f"{name:34s} {t:8.3f} {t / base_t:7.2f} {m:8.1f} {m / max(base_m, 1e-6):7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bench_file("real sample CT", fetch_sample().ct_path, args.views, args.size, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        array = (rng.normal(0, 300, (300, 512, 512)) - 200).astype(np.int16)
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.8, 0.8, 1.5))
        path = Path(tmp) / "synthetic_512x512x300.nii.gz"
        sitk.WriteImage(image, str(path), useCompression=False)
        bench_file("synthetic 512x512x300 CT", path, args.views, args.size, max(1, args.repeats - 1))


if __name__ == "__main__":
    main()
