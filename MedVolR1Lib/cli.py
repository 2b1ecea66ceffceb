"""`medvolr1` command line: fetch the sample CT, derive VRS samples, propagate an anchor, segment a query.

Every long step shows a progress bar; every known failure ends with one clear line and exit code 2.
Each output file is written whole or not at all (see outputs.py); when the result was saved but an output
format could not be written, one line names it and the exit code is 3 (OUTPUT_MISSING).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

SAMPLE = "sample"
OUTPUT_MISSING = 3  # exit code: the result was written, but an output format is missing (docs/outputs.md)


class _Bar:
    """tqdm progress bar driven by the library's (fraction, message) callbacks."""

    def __init__(self, description: str):
        from tqdm import tqdm

        self._bar = tqdm(total=1000, desc=description, unit="‰", leave=False, file=sys.stderr)

    def __call__(self, fraction: float, message: str) -> None:
        self._bar.n = int(fraction * 1000)
        self._bar.set_postfix_str(message[:60], refresh=True)

    def close(self) -> None:
        self._bar.close()


def _load(volume_arg: str, modality: Optional[str] = None, fill_nonfinite: bool = False, series: Optional[str] = None):
    from .readers import load_volume

    if volume_arg == SAMPLE:
        from .sample_data import fetch_sample

        volume_arg = fetch_sample(progress=_Bar("sample CT")).ct_path
    volume = load_volume(volume_arg, modality=modality, fill_nonfinite=fill_nonfinite, series_uid=series)
    for statement in getattr(volume.dicom_series, "statements", ()):  # what the series check regularised
        print(f"note: {statement}", file=sys.stderr)
    return volume


def _parse_box(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"box {text!r}: expected four numbers x1,y1,x2,y2") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"box {text!r}: expected four numbers x1,y1,x2,y2")
    return values  # type: ignore[return-value]


def _formats(text: str):
    from .outputs import parse_formats

    try:
        return parse_formats(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _config(args) -> "PipelineConfig":
    from .pipeline import PipelineConfig

    return PipelineConfig(
        model=getattr(args, "model", None),
        adapter=getattr(args, "adapter", None),
        propagator=args.propagator,
        sam_checkpoint=args.sam_checkpoint,
        sam_overrides=tuple(args.sam_override),
        device=args.device,
        num_views=getattr(args, "num_views", 16),
        image_size=args.image_size,
        window=args.window,
        lenient=getattr(args, "lenient", False),
        encoder=getattr(args, "encoder", "auto"),
        slice_stride=getattr(args, "slice_stride", 1),
    )


def _reference_scores(result, reference: Optional[str], labels: Sequence[int]) -> Optional[dict]:
    """Dice / NSD of the result against a label file on the same grid (optional)."""
    if not reference:
        return None
    import numpy as np

    from .metrics import dice, normalized_surface_dice
    from .sample_data import fetch_sample
    from .readers import load_label_map

    path = fetch_sample().labels_path if reference == SAMPLE else reference
    label_map = load_label_map(path, result.volume)
    truth = np.isin(label_map, list(labels))
    return {
        "labels": list(labels),
        "dice": round(float(dice(result.mask > 0, truth)), 4),
        "nsd_2mm": round(float(normalized_surface_dice(result.mask > 0, truth, result.volume.spacing[::-1], 2.0)), 4),
    }


def _finish(result, args, provenance: dict, scores: Optional[dict]) -> None:
    from .outputs import write_outputs
    from .user_input import input_adjustments

    provenance = {**provenance, "input_adjustments": input_adjustments(result)}
    if scores:
        provenance["reference_scores"] = scores
    from .errors import OutputsIncomplete

    try:
        written, missing = write_outputs(result, args.out, provenance, image_size=args.image_size, formats=args.formats), None
    except OutputsIncomplete as exc:  # the result is saved; say so, then the one-line error and exit code 3
        written, missing = exc.written, exc
    summary = {
        "key_slice": result.anchor.slice_index,
        "boxes_voxels": [b.as_list() for b in result.anchor.boxes],
        "mask_voxels": result.voxel_count,
        "mask_ml": round(result.volume_ml, 2),
        "timings_s": {k: round(v, 2) for k, v in result.timings.items()},
        **({"reference": scores} if scores else {}),
        "outputs": {k: str(v) for k, v in written.items()},
    }
    print(json.dumps(summary, indent=2))
    if missing is not None:
        raise missing


def cmd_fetch_sample(args) -> int:
    from .sample_data import fetch_sample

    bar = _Bar("sample CT")
    sample = fetch_sample(progress=bar)
    bar.close()
    print(f"CT:     {sample.ct_path}\nlabels: {sample.labels_path}  ({len(sample.label_names)} label names)\n{sample.credit}")
    return 0


def cmd_propagate(args) -> int:
    from .anchor import VoxelBox
    from .corrections import evidence_from_specs
    from .pipeline import Pipeline
    from .user_input import require_boxes_in_image, require_inside_volume
    from .views import ViewGeometry

    volume = _load(args.volume, args.modality, args.fill_nonfinite, args.series)
    geometry = ViewGeometry.for_volume(volume, args.image_size)
    if (args.slice is None) != (not args.box):
        raise ValueError("--slice and --box go together (the one-anchor shorthand); or use --anchor K:x1,y1,x2,y2")
    pixels = args.box_units == "pixels"

    def pixel_box(box):
        require_boxes_in_image([box], geometry)  # a typed box is never clipped silently
        return geometry.to_voxel_box(box)

    evidence = evidence_from_specs(
        to_voxel_box=pixel_box if pixels else (lambda b: VoxelBox(*b)),
        # a click's pixel -> the voxel under it (centre coordinates); voxel units are voxel indices already
        to_voxel_point=(lambda x, y: tuple(v - 0.5 for v in geometry.voxel_from_pixel(x, y))) if pixels else (lambda x, y: (x, y)),
        key=(args.slice, args.box) if args.slice is not None else None,
        anchors=args.anchor, z_range=args.z_range, points=args.point,
    )
    evidence = require_inside_volume(evidence, volume.shape)
    bar = _Bar("propagating")
    if args.server:
        from .service.commands import remote_propagate

        result, provenance = remote_propagate(args.server, args.token_file, volume, evidence, args.name, progress=bar)
    else:
        pipeline = Pipeline(_config(args))
        result = pipeline.propagate(volume, evidence, progress=bar, query=args.name)
        provenance = pipeline.describe()
    bar.close()
    _finish(result, args, provenance, _reference_scores(result, args.reference, args.label))
    return 0


def cmd_segment(args) -> int:
    from .pipeline import Pipeline

    volume = _load(args.volume, args.modality, args.fill_nonfinite, args.series)
    bar = _Bar("segmenting")
    if args.server:
        from .service.commands import remote_segment

        result, provenance = remote_segment(args.server, args.token_file, volume, args.query, progress=bar)
    else:
        pipeline = Pipeline(_config(args))
        result = pipeline.segment(volume, args.query, progress=bar)
        provenance = pipeline.describe()
    bar.close()
    print(f"reasoning: {result.grounding.reasoning!r}", file=sys.stderr)
    _finish(result, args, provenance, _reference_scores(result, args.reference, args.label))
    return 0


def _print_whole_line(text: str) -> None:
    """One write() of the whole line: under a launcher every rank prints its summary at the same moment, and
    separate writes of two ranks interleave on the shared stdout (seen with torchrun)."""
    import io
    import os

    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):  # captured or redirected in-process
        print(text, flush=True)
        return
    os.write(fd, (text + "\n").encode())


def cmd_batch(args) -> int:
    from .batch import leave_ranks, run_batch

    if args.reference or args.label:
        raise ValueError("--reference/--label score one scan; they are not available in batch")
    if args.series:
        raise ValueError("--series chooses the series of one scan; in batch, give it in the manifest's `series` column")
    summary = run_batch(args.manifest, args.out, _config(args), fill_nonfinite=args.fill_nonfinite, modality=args.modality,
                        formats=args.formats)
    _print_whole_line(json.dumps({"rank": summary.rank, "world_size": summary.world_size, "rows": summary.rows, "written": summary.written,
                      "skipped": summary.skipped, "failed": len(summary.failures),
                      "failed_all_ranks": summary.failed_all_ranks,
                      "failures": str(summary.failures_path) if summary.failures else None}))
    leave_ranks()
    return 1 if summary.any_failed else 0


def cmd_serve(args) -> int:
    from .service.commands import run_server

    return run_server(_config(args), args.host, args.port, args.token_file, args.max_request_mb, args.cache_dir)


def cmd_samples(args) -> int:
    from .demo import describe_samples

    describe_samples(out_dir=Path(args.out), num_views=args.num_views, image_size=args.image_size)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out_dir=Path(args.out), targets=args.target, with_grounder=not args.no_grounder)
    return 0


def cmd_make_tiny_model(args) -> int:
    from .fixtures.tiny_qwen import build_tiny_qwen

    print(build_tiny_qwen(args.out, family=args.family))
    return 0


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", help="run on a `medvolr1 serve` server (http://HOST:PORT); its own model settings apply")
    parser.add_argument("--token-file", help="file holding the server's access token")


def _add_model_flags(parser: argparse.ArgumentParser, outputs: bool = True) -> None:
    parser.add_argument("--propagator", default="auto", choices=("auto", "litemedsam", "medsam2"),
                        help="auto: MedSAM2 when --sam-checkpoint is given and CUDA is present, else LiteMedSAM")
    parser.add_argument("--sam-checkpoint", help="MedSAM2 checkpoint (MedSAM2_latest.pt from huggingface.co/wanglab/MedSAM2)")
    parser.add_argument("--sam-override", action="append", default=[],
                        help="extra hydra override for the MedSAM2 model config (advanced; e.g. test models)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--window", help="CT window preset (abdomen, lung, bone, soft_tissue, liver, brain) or 'percentile'")
    parser.add_argument("--image-size", type=int, default=448, help="rendered view size in pixels (multiple of 28)")
    parser.add_argument("--encoder", default="auto",
                        choices=("auto", "torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8"),
                        help="LiteMedSAM's encoder path (auto: the fastest measured for this CPU; docs/benchmarks.md)")
    parser.add_argument("--slice-stride", type=_positive_int, default=1,
                        help="LiteMedSAM on scans with slices <= 1.5 mm apart: encode every n-th slice (default 1: all)")
    if not outputs:
        return
    parser.add_argument("--modality", choices=("CT", "MR", "ZSCORE"), help="override the guessed modality")
    parser.add_argument("--series", help="Series Instance UID to read from a DICOM folder holding several series (docs/dicom_input.md)")
    parser.add_argument("--reference", help="label map on the same grid to score the mask against ('sample' for the sample CT's labels)")
    parser.add_argument("--label", type=int, action="append", default=[], help="label value(s) of the target in --reference")
    parser.add_argument("--fill-nonfinite", action="store_true",
                        help="replace NaN/Inf voxels with the scan's minimum (recorded in evidence.json) instead of refusing the scan")
    parser.add_argument("--out", required=True, help="output folder (mask, .seg.nrrd, DICOM SEG, statistics.csv, evidence.json/png; docs/outputs.md)")
    parser.add_argument("--formats", type=_formats, help="comma list of nifti, seg-nrrd, dicom-seg (default: nifti,seg-nrrd, "
                        "plus dicom-seg for a DICOM input); statistics.csv and evidence files are always written")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medvolr1", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch-sample", help="download the sample CT (TotalSegmentator example) into the user cache")
    p.set_defaults(func=cmd_fetch_sample)

    p = sub.add_parser("samples", help="derive VRS samples (queries + GT anchors) from the sample CT and draw one")
    p.add_argument("--out", default="medvolr1-samples")
    p.add_argument("--num-views", type=int, default=16)
    p.add_argument("--image-size", type=int, default=448)
    p.set_defaults(func=cmd_samples)

    p = sub.add_parser("demo", help="main job on the sample CT: GT anchors -> LiteMedSAM masks with Dice, then a query through the tiny local VLM")
    p.add_argument("--out", default="medvolr1-demo")
    p.add_argument("--target", action="append", default=None, help="sample label name(s), default: kidney_right, spleen")
    p.add_argument("--no-grounder", action="store_true", help="skip the tiny-VLM query demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("propagate", help="3D mask from a manual anchor (key slice + boxes), no VLM")
    p.add_argument("--volume", required=True, help="scan file, DICOM folder, M3D-Seg case folder, or 'sample'")
    p.add_argument("--slice", type=int, help="key slice k (canonical axial index, inferior -> superior); with --box")
    p.add_argument("--box", type=_parse_box, action="append", default=[], help="x1,y1,x2,y2 (repeat for several parts)")
    p.add_argument("--anchor", action="append", default=[], metavar="K:x1,y1,x2,y2[;...]",
                   help="an anchor: slice K and its boxes (repeat for corrections on other slices)")
    p.add_argument("--z-range", metavar="K0:K1", help="extent limit: lowest and highest slice the mask may reach")
    p.add_argument("--point", action="append", default=[], metavar="K:x,y[:neg]",
                   help="positive (or :neg negative) click on an anchor's slice (MedSAM2 only)")
    p.add_argument("--box-units", choices=("pixels", "voxels"), default="pixels",
                   help="pixels of the rendered slice (as in evidence.png) or canonical voxels (box edges i0,j0,i1,j1; point indices i,j)")
    p.add_argument("--name", help="segment name recorded in evidence.json")
    _add_model_flags(p)
    _add_server_flags(p)
    p.set_defaults(func=cmd_propagate)

    p = sub.add_parser("segment", help="query -> evidence anchor (VLM) -> 3D mask")
    p.add_argument("--volume", required=True, help="scan file, DICOM folder, M3D-Seg case folder, or 'sample'")
    p.add_argument("--query", required=True)
    p.add_argument("--model", help="Qwen2.5-VL / Qwen3-VL hub id or local folder (required unless --server)")
    p.add_argument("--lenient", action="store_true",
                   help="also accept the model's native grounding JSON (to try an off-the-shelf Instruct model untrained)")
    p.add_argument("--adapter", help="LoRA adapter folder from Training/sft.py or grpo.py")
    p.add_argument("--num-views", type=int, default=16)
    _add_model_flags(p)
    _add_server_flags(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("batch", help="one query or anchor per manifest row over many scans; resumable, one folder per row (docs/batch.md)")
    p.add_argument("--manifest", required=True, help="CSV with name, scan, and query or anchor (K:x1,y1,x2,y2[;...]); optional box_units, target")
    p.add_argument("--model", help="Qwen2.5-VL hub id or local folder (needed by query rows)")
    p.add_argument("--adapter", help="LoRA adapter folder from Training/sft.py or grpo.py")
    p.add_argument("--num-views", type=int, default=16)
    _add_model_flags(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("serve", help="serve the models over HTTP (a GPU box for Slicer on laptops); see docs/slicer_worker.md")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but loopback needs --token-file")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token-file", help="file whose first line is the access token clients must send")
    p.add_argument("--max-request-mb", type=int, default=1024, help="largest request body accepted (413 above)")
    p.add_argument("--cache-dir", help="working folder of the server (default: the user cache)")
    p.add_argument("--model", help="Qwen2.5-VL hub id or local folder (Find evidence); none: propagation only")
    p.add_argument("--adapter", help="LoRA adapter folder")
    p.add_argument("--num-views", type=int, default=16)
    _add_model_flags(p, outputs=False)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("make-tiny-model", help="build a tiny random-weight Qwen2.5-VL or Qwen3-VL for tests and demos (offline)")
    p.add_argument("--out", required=True)
    p.add_argument("--family", default="qwen2.5-vl", choices=("qwen2.5-vl", "qwen3-vl"))
    p.set_defaults(func=cmd_make_tiny_model)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .errors import MedVolR1Error, OutputsIncomplete

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except OutputsIncomplete as exc:
        print(f"medvolr1 {args.command}: output missing: {exc}", file=sys.stderr)
        return OUTPUT_MISSING
    except (MedVolR1Error, ValueError) as exc:
        print(f"medvolr1 {args.command}: error: {exc}", file=sys.stderr)
        raw = getattr(exc, "raw_text", None)
        if raw and "Raw output" not in str(exc):
            print(f"raw model output: {raw[:2000]!r}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medvolr1 {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
