"""The first mask without waiting: click-to-mask time through the worker protocol, at once and after reading.

    OMP_NUM_THREADS=2 python bench/bench_cold_start.py [--targets gallbladder,kidney_right] [--reads 0,30,75]
                                 [--ready 24] [--viewed key|middle] [--skip-encoder] [--skip-stride]

On a 512 x 512 CT (the sample CT's 112 slices resampled in-plane, MedVolR1Lib/fixtures/ct512.py), for each
target and each reading time T: a fresh worker process is sent the volume and a PreEncode (what the panel
sends when the volume is selected) at t = 0; after T seconds the Propagate of the target's GT box on its key
slice is sent, and its click-to-mask time (request sent -> mask received, including the model's load when it
has not happened yet) is printed, with how many slices were ready when it was sent.  --ready N also clicks
once the worker reports N slices ready (reading time counted in encoder work: on a loaded machine 75 s buy
few slices).  --viewed says which slice the user looks at while reading: the key slice (drawing the box
there) or the volume's middle (Slicer's default view) until the click.  Every mask is compared with the
click-at-once mask (Dice: background-encoded embeddings must not change it).

Then the encoder's ms per slice for each precision and the stride's Dice and time, from
bench/cold_start_encoder.py and bench/cold_start_stride.py where present (each has `report() -> list[str]`).
Wall-clock numbers are noisy on a shared machine; compare within one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

CONFIG = {"propagator": "litemedsam", "device": "cpu"}


def click_to_mask(ct, evidence, target: str, read_s: float, viewed: str, ready: int = 0) -> dict:
    """A fresh worker: volume + PreEncode at t = 0, Propagate after `read_s` seconds (or, with `ready`, once the
    worker reports that many slices ready: the reading time counted in encoder work, whatever the load)."""
    from MedVolR1Lib.service import protocol as p
    from MedVolR1Lib.service.client import WorkerClient

    volume = ct.volume
    key = evidence.primary.slice_index
    look = key if viewed == "key" else volume.num_slices // 2
    client = WorkerClient()
    try:
        opened = time.perf_counter()
        client.call(volume, p.PreEncode(volume.fingerprint, look, CONFIG), timeout=600)
        time.sleep(max(0.0, read_s - (time.perf_counter() - opened)))
        while ready and client.call(None, p.PreEncode(volume.fingerprint, -1, CONFIG), timeout=600).ready < ready:
            time.sleep(1.0)
        read_s = time.perf_counter() - opened
        # Just before the click the key slice is on screen (the panel sends it when the scrolling settles; the
        # readiness comes back); the click-to-mask time is the Propagate's, from sending it to its mask.  A click
        # at once skips that query (it would wait for the model's load, which the click must include).
        if read_s > 0.5:
            before = client.call(None, p.PreEncode(volume.fingerprint, key, CONFIG), timeout=600)
        else:
            before = p.PreEncodeStatus(volume.fingerprint, 0, volume.num_slices, "encoding")
        sent = time.perf_counter()
        reply = client.call(volume, p.Propagate(volume.fingerprint, evidence.to_dict(), target, CONFIG), timeout=3600)
        elapsed = time.perf_counter() - sent
    finally:
        client.close()
    return {"read_s": read_s, "click_to_mask_s": elapsed, "ready": before.ready, "total": before.total,
            "mask": reply.mask}


def bench_targets(targets, reads, viewed: str, readies=()) -> list[str]:
    from MedVolR1Lib.fixtures.ct512 import sample_ct_512, target_evidence
    from MedVolR1Lib.metrics import dice

    ct = sample_ct_512()
    lines = [f"CT {ct.volume.shape[1]}x{ct.volume.shape[2]}x{ct.volume.num_slices} (sample CT resampled in-plane), "
             f"LiteMedSAM, viewed slice while reading: {viewed}"]
    for target in targets:
        evidence = target_evidence(ct, target)
        runs = [click_to_mask(ct, evidence, target, read, viewed) for read in reads]
        runs += [click_to_mask(ct, evidence, target, 0.0, viewed, ready) for ready in readies]
        first = runs[0]
        for run in runs:
            speedup = first["click_to_mask_s"] / run["click_to_mask_s"]
            lines.append(
                f"  {target:<14} click after {run['read_s']:>4.0f} s: {run['click_to_mask_s']:7.2f} s to the mask "
                f"({speedup:5.1f}x the click at once); {run['ready']}/{run['total']} slices ready at the click; "
                f"Dice to the click-at-once mask {dice(run['mask'], first['mask']):.4f}")
    return lines


def _section(name: str) -> list[str]:
    path = HERE / f"{name}.py"
    if not path.is_file():
        return [f"  (skipped: bench/{name}.py is not in this checkout)"]
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return ["  " + line for line in module.report()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="gallbladder,kidney_right")
    parser.add_argument("--reads", default="0,30,75", help="seconds of reading before the click")
    parser.add_argument("--ready", default="", help="also click once the worker has this many slices ready, e.g. 24")
    parser.add_argument("--viewed", choices=("key", "middle"), default="key")
    parser.add_argument("--skip-encoder", action="store_true")
    parser.add_argument("--skip-stride", action="store_true")
    args = parser.parse_args(argv)
    reads = [float(r) for r in args.reads.split(",")]
    print(f"# bench_cold_start {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {os.getloadavg()[0]:.1f}")
    print("[1] click-to-mask through the worker protocol (fresh worker per click)")
    readies = [int(r) for r in args.ready.split(",") if r.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for line in bench_targets(targets, reads, args.viewed, readies):
        print(line, flush=True)
    if not args.skip_encoder:
        print("[2] encoder ms per slice for each precision")
        print("\n".join(_section("cold_start_encoder")), flush=True)
    if not args.skip_stride:
        print("[3] stride on a thin-slice volume: Dice and time")
        print("\n".join(_section("cold_start_stride")), flush=True)
    print(f"# load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
