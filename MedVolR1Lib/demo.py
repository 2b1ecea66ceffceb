"""The main job on the embedded default (the real sample CT), as `medvolr1 demo` and `medvolr1 samples`.

1. derive VRS samples (queries + GT anchors) from the sample CT's labels and draw one key slice;
2. propagate GT anchors with the real LiteMedSAM weights and score the masks (Dice, NSD 2 mm);
3. run a query end to end through the tiny local Qwen2.5-VL (random weights: its answers are noise
   until a trained model is used; the point is the whole query path, typed failures included).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .anchor import EvidenceAnchor, VoxelBox
from .volume import atomic_write

DEFAULT_TARGETS = ("kidneys", "spleen")
DEMO_QUERY = "Which organ stores bile?"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _load_sample():
    from .sample_data import fetch_sample
    from .readers import load_label_map, load_volume

    sample = fetch_sample()
    volume = load_volume(sample.ct_path)
    return sample, volume, load_label_map(sample.labels_path, volume)


def draw_key_slice(volume, sample, path: Path) -> Path:
    """PNG of a sample's key slice with its GT boxes, in the rendered view the VLM sees."""
    from PIL import Image, ImageDraw

    from .views import render_views

    views = render_views(volume, [sample.key_slice], image_size=sample.image_size)
    image = Image.fromarray(views.images[0])
    draw = ImageDraw.Draw(image)
    for box in sample.boxes_pixel:
        draw.rectangle(box, outline=(255, 220, 0), width=2)
    draw.text((4, 4), f"{sample.target}: slice {sample.key_slice} (A top, patient R on left)", fill=(255, 255, 255))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def describe_samples(out_dir: Path, num_views: int = 16, image_size: int = 448, show: str = "kidneys"):
    """Print the VRS samples of the sample CT, write them as JSONL and draw one key slice."""
    from .samples import build_samples

    sample_ct, volume, labels = _load_sample()
    sample_set = build_samples(volume, labels, sample_ct.label_names, num_views=num_views, image_size=image_size)
    _say(f"Sample CT {volume.shape} (k,j,i) at {volume.spacing} mm; {sample_ct.credit}")
    _say(f"{len(sample_set.samples)} VRS samples, {len(sample_set.skipped)} labels skipped (reasons in skipped.json)")
    _say(f"{'target':24s} {'labels':>10s} {'key k':>5s}  GT boxes (pixels of the {image_size}px view)      example queries")
    for s in sample_set.samples:
        boxes = " ".join(str([round(v) for v in b]) for b in s.boxes_pixel)
        kinds = {}
        for q in s.queries:
            kinds.setdefault(q.kind, q.text)
        examples = " | ".join(list(kinds.values())[:3])
        labels_text = ",".join(map(str, s.label_values)) if len(s.label_values) < 4 else f"{len(s.label_values)} labels"
        _say(f"{s.target:24s} {labels_text:>10s} {s.key_slice:5d}  {boxes:42s} {examples}")
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = "\n".join(s.to_json() for s in sample_set.samples) + "\n"
    atomic_write(out_dir / "samples.jsonl", lambda tmp: Path(tmp).write_text(lines))
    skipped = [{"target": k.target, "reason": k.reason} for k in sample_set.skipped]
    atomic_write(out_dir / "skipped.json", lambda tmp: Path(tmp).write_text(json.dumps(skipped, indent=1)))
    chosen = next((s for s in sample_set.samples if s.target == show), sample_set.samples[0])
    png = draw_key_slice(volume, chosen, out_dir / f"key_slice_{chosen.target}.png")
    _say(f"wrote {out_dir / 'samples.jsonl'} and {png}")
    return volume, labels, sample_set


def run_demo(out_dir: Path, targets: Optional[Sequence[str]] = None, with_grounder: bool = True) -> dict:
    from .metrics import dice, normalized_surface_dice
    from .outputs import write_outputs
    from .pipeline import Pipeline, PipelineConfig

    volume, labels, sample_set = describe_samples(out_dir / "samples")
    by_target = {s.target: s for s in sample_set.samples}
    pipeline = Pipeline(PipelineConfig(propagator="litemedsam", device="cpu"))
    scores = {}
    _say("\nGT anchor (max-area slice among the shown ones, GT boxes) -> LiteMedSAM (real weights) -> Dice vs reference labels")
    for name in targets or DEFAULT_TARGETS:
        if name not in by_target:
            raise ValueError(f"unknown demo target {name!r}; choose from {sorted(by_target)}")
        sample = by_target[name]
        anchor = EvidenceAnchor(sample.key_slice, tuple(VoxelBox(*b) for b in sample.boxes_voxel))
        result = pipeline.propagate(volume, anchor, query=f"segment the {name.replace('_', ' ')}", progress=_progress(name))
        truth = np.isin(labels, sample.label_values)
        record = {
            "dice": round(float(dice(result.mask > 0, truth)), 3),
            "nsd_2mm": round(float(normalized_surface_dice(result.mask > 0, truth, volume.spacing[::-1], 2.0)), 3),
            "mask_ml": round(result.volume_ml, 1),
            "reference_ml": round(float(truth.sum() * np.prod(volume.spacing) / 1000.0), 1),
            "seconds": round(sum(result.timings.values()), 1),
        }
        scores[name] = record
        write_outputs(result, out_dir / name, {"propagator": pipeline.propagator.describe(), "reference_scores": record})
        _say(f"  {name:14s} Dice {record['dice']:.3f}  NSD@2mm {record['nsd_2mm']:.3f}  {record['mask_ml']} ml vs {record['reference_ml']} ml  ({record['seconds']} s)")
    if with_grounder:
        scores["query_demo"] = _query_demo(volume, pipeline, out_dir)
        scores["answering_fixture_demo"] = _answering_fixture_demo(volume, labels, by_target, pipeline, out_dir)
    atomic_write(out_dir / "demo_summary.json", lambda tmp: Path(tmp).write_text(json.dumps(scores, indent=2)))
    _say(f"\noutputs in {out_dir}/ (mask.nii.gz on the input grid, evidence.json, evidence.png per target)")
    return scores


def _query_demo(volume, pipeline, out_dir: Path) -> dict:
    """The whole query path with the tiny random-weight VLM: its answers are noise by design."""
    from .errors import MedVolR1Error
    from .fixtures.tiny_qwen import build_tiny_qwen
    from .outputs import write_outputs
    from .pipeline import Pipeline, PipelineConfig
    from .sample_data import cache_dir

    model_dir = build_tiny_qwen(cache_dir() / "tiny-qwen2.5-vl")
    _say(f"\nQuery path with the tiny local Qwen2.5-VL ({model_dir}); RANDOM weights, so the answer is noise:")
    query_pipeline = Pipeline(PipelineConfig(model=str(model_dir), propagator="litemedsam", device="cpu"),
                              propagator=pipeline.propagator)
    try:
        result = query_pipeline.segment(volume, DEMO_QUERY, progress=_progress("query"))
    except MedVolR1Error as exc:
        raw = getattr(exc, "raw_text", "") or ""
        reason = getattr(exc, "reason", type(exc).__name__)
        _say(f"  {DEMO_QUERY!r} -> no usable evidence ({type(exc).__name__}, reason: {reason}); "
             f"raw answer starts {raw[:60].encode('ascii', 'backslashreplace').decode()!r}")
        _say("  (expected from random weights; train with Training/sft.py and Training/grpo.py, then pass --model/--adapter)")
        return {"query": DEMO_QUERY, "status": "failed", "reason": reason, "raw_text": raw}
    write_outputs(result, out_dir / "query_demo", {"grounder": query_pipeline.grounder.describe()})
    _say(f"  {DEMO_QUERY!r} -> slice {result.anchor.slice_index}, {len(result.anchor.boxes)} box(es), {result.volume_ml:.1f} ml")
    return {"query": DEMO_QUERY, "status": "ok", "slice": result.anchor.slice_index, "mask_ml": round(result.volume_ml, 2)}


def _answering_fixture_demo(volume, labels, by_target, pipeline, out_dir: Path) -> dict:
    """The same query path completed: a tiny model TAUGHT the GT answer for this one prompt (a wiring fixture).

    It shows what a valid answer becomes (anchor -> 3D mask -> files); it has learned no anatomy.
    """
    from .fixtures.answering_qwen import build_answering_tiny_qwen
    from .metrics import dice
    from .outputs import write_outputs
    from .pipeline import Pipeline, PipelineConfig
    from .sample_data import cache_dir

    sample = by_target["gallbladder"]
    answer = sample.answer_text(think="The gallbladder lies under the liver on the patient's right; one box.")
    model_dir = build_answering_tiny_qwen(cache_dir() / "answering-tiny-qwen-gallbladder", volume=volume, query=DEMO_QUERY,
                                          answer_text=answer, slices=sample.shown_slices, image_size=sample.image_size)
    _say("\nSame path with a tiny model TAUGHT the reference answer for this prompt (wiring fixture, no anatomy learned):")
    answering = Pipeline(PipelineConfig(model=str(model_dir), propagator="litemedsam", device="cpu",
                                        num_views=len(sample.shown_slices), image_size=sample.image_size),
                         propagator=pipeline.propagator)
    result = answering.segment(volume, DEMO_QUERY, progress=_progress("taught query"))
    truth = np.isin(labels, sample.label_values)
    score = round(float(dice(result.mask > 0, truth)), 3)
    write_outputs(result, out_dir / "answering_fixture_demo", {"grounder": answering.grounder.describe(), "note": "wiring fixture"})
    _say(f"  {DEMO_QUERY!r} -> reasoning {result.grounding.reasoning!r}; slice {result.anchor.slice_index}; "
         f"gallbladder Dice {score} ({result.volume_ml:.1f} ml)")
    return {"query": DEMO_QUERY, "slice": result.anchor.slice_index, "dice_gallbladder": score}


def _progress(label: str):
    def callback(fraction: float, message: str) -> None:
        sys.stderr.write(f"\r  [{label}] {fraction * 100:5.1f}% {message[:50]:50s}")
        if fraction >= 1.0:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return callback
