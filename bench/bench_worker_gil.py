"""Slicer's GIL blocker, measured: 100 ms polls until a propagation finishes, with the main thread idle
(GIL released between polls) versus holding the GIL between polls as Slicer's Qt event loop does.

    OMP_NUM_THREADS=1 python bench/bench_worker_gil.py [--propagator litemedsam] [--slices 16]

Two ways of running the model: the worker process (MedVolR1Lib.service, what the module does now) and a
Python thread in the GUI process (the old BackgroundJob).  Prints polls and the held/idle ratio for
each; each run uses a volume no cache has seen (its first slice is shifted by the run's number).
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np


def crop(slices: int, shift: int):
    from MedVolR1Lib.sample_data import fetch_sample
    from MedVolR1Lib.volume import Volume, load_volume

    full = load_volume(fetch_sample().ct_path)
    k0 = 88 - slices // 2
    matrix = full.ijk_to_ras.copy()
    matrix[:3, 3] = full.ras_from_ijk([0, 0, k0])
    array = full.array[k0 : k0 + slices].copy()
    array[0, 0, 0] += shift  # a new fingerprint: no cached features
    return Volume(array, matrix, modality=full.modality, name=f"crop{shift}")


def evidence(volume):
    from MedVolR1Lib.anchor import EvidenceAnchor, VoxelBox
    from MedVolR1Lib.evidence import Evidence

    return Evidence.single(EvidenceAnchor(volume.num_slices // 2, (VoxelBox.from_voxels(70, 41, 88, 60),)))


def worker_polls(client, config, volume, held: bool, limit: int) -> int:
    from MedVolR1Lib.fixtures.gil_main_thread import polls_until_done
    from MedVolR1Lib.service import protocol as p

    job = client.start(volume, p.Propagate(volume.fingerprint, evidence(volume).to_dict(), "", p.config_to_dict(config)))
    polls = polls_until_done(lambda: job.poll().done, held, limit)
    job.wait()
    assert job.poll().error is None, job.poll().error
    return polls


def thread_polls(pipeline, volume, held: bool, limit: int) -> int:
    from MedVolR1Lib.fixtures.gil_main_thread import polls_until_done

    worker = threading.Thread(target=pipeline.propagate, args=(volume, evidence(volume)), daemon=True)
    worker.start()
    polls = polls_until_done(lambda: not worker.is_alive(), held, limit)
    worker.join()  # past the limit: let it finish (time.sleep in join releases the GIL)
    return polls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--propagator", default="litemedsam", choices=("litemedsam", "medsam2"))
    parser.add_argument("--sam-checkpoint")
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--limit-ratio", type=int, default=20, help="stop counting at this many times the idle polls")
    args = parser.parse_args()

    from MedVolR1Lib.pipeline import Pipeline, PipelineConfig
    from MedVolR1Lib.service.client import WorkerClient

    config = PipelineConfig(propagator=args.propagator, sam_checkpoint=args.sam_checkpoint, device="cpu")
    client, pipeline = WorkerClient(), Pipeline(config)
    shift = iter(range(1, 1000))
    worker_polls(client, config, crop(args.slices, next(shift)), False, 10_000)  # warm-up: models load once
    thread_polls(pipeline, crop(args.slices, next(shift)), False, 10_000)
    rows = []
    for name, run in (("worker process", lambda v, h, n: worker_polls(client, config, v, h, n)),
                      ("Python thread (old)", lambda v, h, n: thread_polls(pipeline, v, h, n))):
        start = time.perf_counter()
        idle = run(crop(args.slices, next(shift)), False, 10_000)
        limit = args.limit_ratio * max(idle, 1)
        held = run(crop(args.slices, next(shift)), True, limit)
        shown = f">{held}" if held >= limit else str(held)
        rows.append((name, idle, shown, held / max(idle, 1), time.perf_counter() - start))
    client.close()
    print(f"{args.propagator} propagation of {args.slices} slices, polls of 100 ms until done:")
    print(f"{'runs in':22s} {'idle':>6s} {'GIL held':>9s} {'ratio':>7s}")
    for name, idle, held, ratio, _seconds in rows:
        print(f"{name:22s} {idle:6d} {held:>9s} {ratio:6.1f}x" + (" (stopped counting)" if held.startswith(">") else ""))


if __name__ == "__main__":
    main()
