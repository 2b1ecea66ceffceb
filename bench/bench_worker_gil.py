"""Slicer's GIL blocker, measured: 100 ms polls until a propagation finishes, with the main thread idle
(GIL released between polls) versus holding the GIL between polls as Slicer's Qt event loop does.

    OMP_NUM_THREADS=1 python bench/bench_worker_gil.py [--workload propagate|find] [--propagator litemedsam] [--slices 16]

`propagate`: LiteMedSAM (real weights) on a crop of the sample CT, few large ops.  `find`: Find evidence with
the tiny random-weight Qwen2.5-VL (many small decoding ops, like a VLM on a GPU; it answers garbage, which
ends the run with a GroundingError just the same).

Two ways of running the model: the worker process (MedVolR1Lib.service, what the module does now) and a
Python thread in the GUI process (the old BackgroundJob).  Prints polls and the held/idle ratio for
each; each run uses a volume no cache has seen (its first slice is shifted by the run's number).
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path


def crop(slices: int, shift: int):
    from MedVolR1Lib.sample_data import fetch_sample
    from MedVolR1Lib.readers import load_volume
    from MedVolR1Lib.volume import Volume

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


QUERY = "segment the left kidney"


def worker_polls(client, config, volume, held: bool, limit: int, workload: str) -> int:
    from MedVolR1Lib.fixtures.gil_main_thread import polls_until_done
    from MedVolR1Lib.service import protocol as p

    if workload == "find":
        request = p.FindEvidence(volume.fingerprint, QUERY, p.config_to_dict(config))
    else:
        request = p.Propagate(volume.fingerprint, evidence(volume).to_dict(), "", p.config_to_dict(config))
    job = client.start(volume, request)
    polls = polls_until_done(lambda: job.poll().done, held, limit)
    job.wait()
    error = job.poll().error
    assert error is None or getattr(error, "error_class", "") == "GroundingError", error
    return polls


def _quietly(call):
    def run(*args):
        try:
            call(*args)
        except Exception as exc:  # noqa: BLE001 - the random-weight VLM's GroundingError ends the run like an answer
            if type(exc).__name__ != "GroundingError":
                raise

    return run


def thread_polls(pipeline, volume, held: bool, limit: int, workload: str) -> int:
    from MedVolR1Lib.fixtures.gil_main_thread import polls_until_done

    call, args = (pipeline.ground, (volume, QUERY)) if workload == "find" else (pipeline.propagate, (volume, evidence(volume)))
    worker = threading.Thread(target=_quietly(call), args=args, daemon=True)
    worker.start()
    polls = polls_until_done(lambda: not worker.is_alive(), held, limit)
    worker.join()  # past the limit: let it finish (time.sleep in join releases the GIL)
    return polls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="propagate", choices=("propagate", "find"))
    parser.add_argument("--propagator", default="litemedsam", choices=("litemedsam", "medsam2"))
    parser.add_argument("--sam-checkpoint")
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--limit-ratio", type=int, default=20, help="stop counting at this many times the idle polls")
    args = parser.parse_args()

    from MedVolR1Lib.pipeline import Pipeline, PipelineConfig
    from MedVolR1Lib.service.client import WorkerClient

    model = None
    if args.workload == "find":
        import tempfile

        from MedVolR1Lib.fixtures.tiny_qwen import build_tiny_qwen

        model = str(build_tiny_qwen(Path(tempfile.mkdtemp(prefix="bench_gil_")) / "tiny"))
    config = PipelineConfig(model=model, propagator=args.propagator, sam_checkpoint=args.sam_checkpoint, device="cpu",
                            num_views=4, image_size=112)
    client, pipeline = WorkerClient(), Pipeline(config)
    shift = iter(range(1, 1000))
    worker_polls(client, config, crop(args.slices, next(shift)), False, 10_000, args.workload)  # warm-up: models load once
    thread_polls(pipeline, crop(args.slices, next(shift)), False, 10_000, args.workload)
    rows = []
    for name, run in (("worker process", lambda v, h, n: worker_polls(client, config, v, h, n, args.workload)),
                      ("Python thread (old)", lambda v, h, n: thread_polls(pipeline, v, h, n, args.workload))):
        start = time.perf_counter()
        idle = run(crop(args.slices, next(shift)), False, 10_000)
        limit = args.limit_ratio * max(idle, 1)
        held = run(crop(args.slices, next(shift)), True, limit)
        shown = f">{held}" if held >= limit else str(held)
        rows.append((name, idle, shown, held / max(idle, 1), time.perf_counter() - start))
    client.close()
    what = "Find evidence (tiny Qwen2.5-VL)" if args.workload == "find" else f"{args.propagator} propagation"
    print(f"{what} on {args.slices} slices, polls of 100 ms until done:")
    print(f"{'runs in':22s} {'idle':>6s} {'GIL held':>9s} {'ratio':>7s}")
    for name, idle, held, ratio, _seconds in rows:
        print(f"{name:22s} {idle:6d} {held:>9s} {ratio:6.1f}x" + (" (stopped counting)" if held.startswith(">") else ""))


if __name__ == "__main__":
    main()
