"""`medvolr1 batch` throughput on CPU with the real LiteMedSAM weights, one process.

    OMP_NUM_THREADS=2 python bench/bench_batch.py [--threads 2] [--targets kidney_right,kidney_left,spleen]

Two manifests with the same rows (GT anchors of the targets on the real sample CT, in rendered pixels):
1. "one scan": every row on the sample CT: the scan is read once and LiteMedSAM's per-volume cache of slice
   embeddings serves every row (slices two targets share are encoded once);
2. "distinct scans": row n on its own copy of the CT, one corner voxel changed by n+1 HU so each copy is a
   different volume (its own read, its own embeddings) with the same anatomy, hence the same tracking work.
Prints rows (= scans, for 2) per hour per process, encoded slices, and the ratio of the two wall times.
A third run of manifest 1 shows the resume cost (every row skipped).  Wall clock is noisy on a shared
machine; compare the ratio within one run.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path


def _manifest(path: Path, rows) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "scan", "anchor", "target"])
        writer.writerows(rows)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--targets", default="kidney_right,kidney_left,spleen")
    args = parser.parse_args(argv)

    import SimpleITK as sitk
    import torch

    from MedVolR1Lib.batch import run_batch
    from MedVolR1Lib.metrics import dice as dice_score
    from MedVolR1Lib.pipeline import Pipeline, PipelineConfig
    from MedVolR1Lib.readers import load_label_map, load_volume
    from MedVolR1Lib.sample_data import fetch_sample
    from MedVolR1Lib.targets import profile_target
    from MedVolR1Lib.views import ViewGeometry

    torch.set_num_threads(args.threads)
    sample = fetch_sample()
    volume = load_volume(sample.ct_path)
    labels = load_label_map(sample.labels_path, volume)
    values = {name: value for value, name in sample.label_names.items()}
    geometry = ViewGeometry.for_volume(volume, 448)
    anchors = []
    for target in args.targets.split(","):
        profile = profile_target(labels == values[target], target)
        boxes = [geometry.to_pixel_box(b) for b in profile.boxes(profile.key_slice)]
        anchors.append((target, f"{profile.key_slice}:" + ";".join(",".join(f"{v:.3f}" for v in b) for b in boxes)))

    work = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    image = sitk.ReadImage(str(sample.ct_path))
    copies = []
    for n in range(len(anchors)):
        copy = sitk.Image(image)
        copy[0, 0, 0] = int(copy[0, 0, 0]) + n + 1
        copies.append(work / f"ct_copy{n}.nii.gz")
        sitk.WriteImage(copy, str(copies[-1]))
    one = _manifest(work / "one_scan.csv", [(t, str(sample.ct_path), a, t) for t, a in anchors])
    distinct = _manifest(work / "distinct.csv", [(t, str(copies[n]), a, t) for n, (t, a) in enumerate(anchors)])

    results = {}
    for label, manifest in (("distinct scans", distinct), ("one scan", one), ("resume (all rows done)", one)):
        pipeline = Pipeline(PipelineConfig(propagator="litemedsam", device="cpu"))
        out = work / ("out_" + manifest.stem)
        start = time.perf_counter()
        summary = run_batch(manifest, out, pipeline=pipeline, rank=0, world_size=1, show_progress=False)
        seconds = time.perf_counter() - start
        encoded = pipeline._propagator.stats.encoded_slices if pipeline._propagator is not None else 0
        dice = []
        for target, _ in anchors:
            path = out / target / "mask.nii.gz"
            if summary.written and path.exists():
                dice.append(round(float(dice_score(load_label_map(path, volume) > 0, labels == values[target])), 3))
        results[label] = {"rows": summary.rows, "written": summary.written, "skipped": summary.skipped,
                          "failed": len(summary.failures), "seconds": round(seconds, 1),
                          "rows_per_hour": round(3600 * summary.rows / seconds, 1), "encoded_slices": encoded, "dice": dice}
        print(label, json.dumps(results[label]), flush=True)
    ratio = results["distinct scans"]["seconds"] / results["one scan"]["seconds"]
    print(json.dumps({"threads": args.threads, "cpu": _cpu(), "targets": args.targets,
                      "scans_per_hour_per_process": results["distinct scans"]["rows_per_hour"],
                      "rows_per_hour_one_scan": results["one scan"]["rows_per_hour"],
                      "distinct_over_one_scan_time": round(ratio, 2), "work_dir": str(work)}, indent=2))
    return 0


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
