"""Cases -> VRS records (one per query) on top of `samples.build_samples`.

`build_samples` finds each target's GT key slice and boxes among the shown slices; here each sample
is expanded into one record per query phrasing of the chosen split, optionally for several shifted
slice sets (so the key slice moves between rows), with the oracle curve Q(z) from the frozen
propagator when asked.  Targets that are absent, empty or invisible are reported and skipped.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .records import VRSRecord
from .store import LoadedCase
from ..kits_lesions import INSTANCE_TARGETS, LESION_KINDS
from ..release_data import RELEASE_WINDOW
from ..windowing import window_for_target

# Targets that make sense for the embedded sample CT and the three M3D-Seg datasets.
DEFAULT_TARGETS = (
    "liver", "spleen", "kidneys", "kidney_right", "kidney_left", "gallbladder", "stomach", "pancreas",
    "urinary_bladder", "aorta", "lungs", "kidney_tumor", "kidney_cyst", "bone", "brain",
)
SIDED_SUFFIXES = ("_right", "_left")


@dataclass
class PrepareConfig:
    targets: Sequence[str] = DEFAULT_TARGETS
    num_views: int = 16
    image_size: int = 448
    window: Optional[str] = None
    query_split: str = "train"  # "train" | "held_out" | "all"
    max_queries_per_target: int = 0  # 0: all phrasings of the split
    query_kinds: tuple[str, ...] = ()  # only these kinds (e.g. ("paraphrase",) for KiTS23 (paraphrased)); (): all
    view_sets: int = 1  # >1: extra slice sets shifted along z (augmentation: the key slice moves)
    laterality: bool = True  # False for datasets whose orientation is not verified
    oracle_stride: int = 0  # >0: oracle curve Q(z) on every n-th shown slice showing the target (+ key slice)
    oracle_window: Optional[int] = None  # propagate +-W slices for Q(z) (None: whole volume)
    min_key_voxels: int = 10
    lesion_instances: bool = False  # KiTS23 as the release poses it: one record per tumour / cyst (kits_lesions)
    seed: int = 0


@dataclass
class PrepareReport:
    records: list[VRSRecord] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"case", "target", "reason"}


def shown_slice_sets(volume, num_views: int, view_sets: int, seed: int) -> list[list[int]]:
    """The default evenly spaced slice set, plus `view_sets - 1` copies shifted by up to half the gap."""
    from ..views import body_slice_range, select_slices

    base = list(select_slices(volume, num_views))
    sets = [base]
    low, high = body_slice_range(volume)
    gap = max(1.0, (high - low) / max(1, num_views - 1))
    rng = random.Random(seed)
    for _ in range(max(0, view_sets - 1)):
        shift = rng.uniform(-gap / 2, gap / 2)
        sets.append(sorted({int(np.clip(round(k + shift), 0, volume.num_slices - 1)) for k in base}))
    return sets


# With `lesion_instances`, these class targets become one target per lesion (kits_lesions.INSTANCE_TARGETS).
LESION_CLASS_TARGETS = {**LESION_KINDS, **{target: kind for kind, target in INSTANCE_TARGETS.items()}}  # target -> kind


def unused_channels(case: LoadedCase, targets: Sequence[str], lesion_kinds: Sequence[str]) -> list[dict]:
    """Label channels with voxels that no requested target reads: reported, so nothing is left out silently."""
    from ..queries import find_entry, normalise_name

    by_name: dict[str, list[int]] = {}
    for value, name in case.label_names.items():
        by_name.setdefault(normalise_name(name), []).append(int(value))
    used: set[int] = set()
    for t in targets:
        entry = find_entry(t)
        parts = entry.resolve(by_name) if entry is not None else None
        used |= {v for part in parts or [] for v in part}
    lesion_names = {kind: channel for channel, kind in LESION_KINDS.items()}
    used |= {v for kind in lesion_kinds for v in by_name.get(lesion_names[kind], [])}
    present = {int(v) for v in np.unique(case.label_map) if v != 0}
    return [{"case": case.source.case_id, "target": case.label_names.get(v, str(v)),
             "reason": "channel has voxels but no requested target reads it"} for v in sorted(present - used)]


def build_records(case: LoadedCase, config: PrepareConfig, *, propagator=None) -> PrepareReport:
    """All records of one case; with a propagator and `oracle_stride > 0` the oracle curve Q(z) is filled."""
    from ..samples import SampleSet, build_lesion_samples, build_samples

    report = PrepareReport()
    case_id = case.source.case_id
    targets = [t for t in config.targets if config.laterality or not t.endswith(SIDED_SUFFIXES)]
    for t in config.targets:
        if t not in targets:
            report.skipped.append({"case": case_id, "target": t, "reason": "laterality not allowed (orientation unverified)"})
    lesion_kinds: list[str] = []
    if config.lesion_instances:
        lesion_kinds = sorted({LESION_CLASS_TARGETS[t] for t in targets if t in LESION_CLASS_TARGETS}, reverse=True)
        targets = [t for t in targets if t not in LESION_CLASS_TARGETS]
    else:
        for t in [t for t in targets if t in INSTANCE_TARGETS.values()]:
            report.skipped.append({"case": case_id, "target": t, "reason": "per-lesion target outside lesion_instance_datasets"})
            targets.remove(t)
    report.skipped += unused_channels(case, targets, lesion_kinds)
    rng = random.Random(f"{config.seed}:{case_id}")
    for set_index, shown in enumerate(shown_slice_sets(case.volume, config.num_views, config.view_sets, config.seed)):
        result = build_samples(
            case.volume,
            case.label_map,
            case.label_names,
            case_id=case_id,
            targets=targets,
            shown_slices=shown,
            image_size=config.image_size,
            min_key_voxels=config.min_key_voxels,
        ) if targets else SampleSet([], [])
        if lesion_kinds:
            lesions = build_lesion_samples(
                case.volume, case.label_map, case.label_names, case_id=case_id, shown_slices=shown, image_size=config.image_size,
                kinds=lesion_kinds, min_key_voxels=config.min_key_voxels, allow_laterality=config.laterality,
            )
            result = SampleSet(result.samples + lesions.samples, result.skipped + lesions.skipped)
        for s in result.skipped:
            report.skipped.append({"case": case_id, "target": s.target, "reason": f"{s.reason} (slice set {set_index})"})
        for sample in result.samples:
            queries = sample.queries if config.query_split == "all" else sample.queries_for(config.query_split)
            if not config.laterality:
                queries = [q for q in queries if q.kind != "laterality"]
            if config.query_kinds:
                queries = [q for q in queries if q.kind in config.query_kinds]
            if config.max_queries_per_target and len(queries) > config.max_queries_per_target:
                queries = rng.sample(queries, config.max_queries_per_target)
            if not queries:
                report.skipped.append({"case": case_id, "target": sample.target, "reason": f"no {config.query_split} queries"})
                continue
            oracle: dict[str, float] = {}
            if propagator is not None and config.oracle_stride > 0:
                oracle = _oracle(propagator, case, sample, config)
            for n, query in enumerate(queries):
                report.records.append(
                    VRSRecord(
                        id=f"{case_id}/{_instance_key(sample)}/v{set_index}/q{n}",
                        case_id=case_id,
                        dataset=case.source.dataset,
                        target=sample.target,
                        parts=[[case.label_name(v) for v in part] for part in sample.parts],
                        labels=list(sample.label_values),
                        query=query.text,
                        query_kind=query.kind,
                        query_split=query.split,
                        slices=list(sample.shown_slices),
                        image_size=sample.image_size,
                        window=config.window or window_for_target(sample.target, sample.modality),
                        gt_slice=int(sample.key_slice),
                        gt_boxes=sample.boxes_pixel,
                        boxes_by_slice={str(k): v for k, v in sample.boxes_pixel_by_slice.items()},
                        areas=list(sample.slice_areas),
                        geometry=dict(sample.geometry),
                        oracle=oracle,
                    )
                )
    return report


def _instance_key(sample) -> str:
    """The record id's target part: the target, plus '#n' for one lesion instance."""
    from ..kits_lesions import decode_instance

    decoded = [decode_instance(v) for v in sample.label_values]
    return sample.target if not any(decoded) else f"{sample.target}#" + "+".join(str(d[1]) for d in decoded if d)


def _oracle(propagator, case: LoadedCase, sample, config: PrepareConfig) -> dict[str, float]:
    from ..anchor import VoxelBox
    from ..rewards import oracle_curve

    geometry = sample.view_geometry()
    visible = [k for k in sample.shown_slices if sample.slice_areas[k] > 0]
    chosen = sorted(set(visible[:: config.oracle_stride]) | {sample.key_slice})
    boxes = {k: [geometry.to_voxel_box(b) for b in sample.boxes_pixel_by_slice[k]] for k in chosen}
    boxes = {k: [VoxelBox(*b.as_list()) for b in v] for k, v in boxes.items()}
    curve = oracle_curve(propagator, case.volume, case.target_mask(sample.label_values), boxes, window=config.oracle_window)
    return {str(k): float(v) for k, v in curve.items()}


def summarise(report: PrepareReport) -> dict:
    by_target: dict[str, int] = {}
    for r in report.records:
        by_target[r.target] = by_target.get(r.target, 0) + 1
    return {"records": len(report.records), "by_target": by_target, "skipped": report.skipped}


def summary_text(report: PrepareReport) -> str:
    return json.dumps(summarise(report), indent=1)


@dataclass
class PrepareArguments:
    """Training/prepare_data.py: which cases, which targets, how views are rendered."""

    out_dir: str = field(default="runs/data", metadata={"help": "output folder (cases.json, train.jsonl, test.jsonl, report.json)"})
    sample_ct: bool = field(default=True, metadata={"help": "include the embedded real sample CT (a training volume)"})
    allow_seen_volumes: bool = field(default=False, metadata={"help": "also test on training volumes (held-out phrasings only): single-CT checks"})
    m3d_root: Optional[str] = field(default=None, metadata={"help": "M3D-Seg root folder (holds 0003/, 0004/, 0012/)"})
    m3d_datasets: str = field(default="0003,0004,0012", metadata={"help": "comma-separated dataset codes"})
    m3d_max_cases: int = field(default=0, metadata={"help": "per dataset and split; 0: all"})
    m3d_orientation: Optional[str] = field(default=None, metadata={"help": "override the assumed array orientation (e.g. RAS)"})
    m3d_laterality: bool = field(default=False, metadata={"help": "allow left/right queries on M3D-Seg (only after checking orientation)"})
    paraphrased_test_datasets: str = field(default="", metadata={"help": "dataset codes whose test queries are paraphrases only (Table 1: '0004', KiTS23 (paraphrased))"})
    lesion_instance_datasets: str = field(
        default="0004",
        metadata={"help": "dataset codes whose kidney_tumor / kidney_cyst targets become one record per lesion (the release's KiTS23 task); '' keeps the union"},
    )
    targets: str = field(default=",".join(DEFAULT_TARGETS), metadata={"help": "comma-separated target keys"})
    num_views: int = 16
    image_size: int = 448
    view_window: Optional[str] = field(default=None, metadata={"help": "CT window preset or 'percentile' (default: per target, windowing.window_for_target)"})
    train_view_sets: int = field(default=1, metadata={"help": "shifted slice sets per training case"})
    max_queries_per_target: int = 0
    oracle_stride: int = field(default=0, metadata={"help": ">0: oracle curve Q(z) with the propagator below"})
    oracle_propagator: str = field(default="litemedsam", metadata={"help": "litemedsam | medsam2"})
    oracle_window: int = field(default=-1, metadata={"help": "+-W slices for Q(z); -1: whole volume"})
    sam_checkpoint: Optional[str] = None
    prepare_seed: int = 0
    workers: int = field(default=1, metadata={"help": "parallel processes, one case each (output identical to 1 worker)"})
    ctorg_nifti_root: Optional[str] = field(
        default=None, metadata={"help": "raw CT-ORG download (volume-N / labels-N NIfTI): prepared as the release does, HU + WC40/WW400 + 512 px"})
    ctorg_split_file: Optional[str] = field(default=None, metadata={"help": "JSON {train: [case numbers], test: [...]} for ctorg_nifti_root"})
    ctorg_size: int = field(default=512, metadata={"help": "in-plane size of the raw CT-ORG slices (the release: 512; 0 keeps them)"})


def prepare_dataset(args: PrepareArguments) -> dict:
    """Write cases.json, train.jsonl (train phrasings, train cases), test.jsonl (held-out phrasings, test cases).

    Test sets hold only volumes never trained on: a test case that is also a training case is left out and
    reported.  The sample CT is a training volume; only with `allow_seen_volumes` (the single-CT learning
    check and smoke chain) does it also appear in test.jsonl, its rows then differing by phrasing only.
    """
    from .records import write_records
    from .store import CaseSource, write_cases

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    plans: list[tuple[CaseSource, str, bool]] = []  # (source, split, laterality)
    if args.sample_ct:
        plans += [(CaseSource("sample_ct", "sample_ct", dataset="sample"), split, True) for split in ("train", "test")]
    if args.m3d_root:
        from ..m3d import laterality_allowed, read_split

        for code in (c.strip() for c in args.m3d_datasets.split(",") if c.strip()):
            for split in ("train", "test"):
                refs = read_split(args.m3d_root, code, split)
                if args.m3d_max_cases:
                    refs = refs[: args.m3d_max_cases]
                for ref in refs:
                    source = CaseSource(ref.case_id, "m3d", image=str(ref.folder), labels=str(ref.label_path), orientation=args.m3d_orientation, dataset=code)
                    plans.append((source, split, args.m3d_laterality or laterality_allowed(ref.folder)))
    release, problems = release_plans(args)
    plans, skipped = exclude_seen_volumes(plans + release, args.allow_seen_volumes)
    skipped = problems + skipped
    paraphrased = {c.strip() for c in args.paraphrased_test_datasets.split(",") if c.strip()}
    lesion_datasets = {c.strip() for c in args.lesion_instance_datasets.split(",") if c.strip()}
    jobs = []
    for source, split, laterality in plans:
        window = args.view_window or (RELEASE_WINDOW if source.kind == "ctorg_nifti" else None)
        config = PrepareConfig(
            targets=targets, num_views=args.num_views, image_size=args.image_size, window=window,
            query_split="train" if split == "train" else "held_out", max_queries_per_target=args.max_queries_per_target,
            view_sets=args.train_view_sets if split == "train" else 1, laterality=laterality,
            query_kinds=("paraphrase",) if split == "test" and source.dataset in paraphrased else (),
            lesion_instances=source.dataset in lesion_datasets,
            oracle_stride=args.oracle_stride if split == "train" else 0,
            oracle_window=None if args.oracle_window < 0 else args.oracle_window,
            seed=args.prepare_seed,
        )
        jobs.append((source, split, config))
    oracle = (args.oracle_propagator, args.sam_checkpoint) if args.oracle_stride > 0 else None
    records: dict[str, list[VRSRecord]] = {"train": [], "test": []}
    notes: dict[str, dict] = {}  # per case: how its files were read (M3D-Seg axial axis and the reason)
    sources = {}
    for source, split, result in _run_jobs(jobs, oracle, args.workers):
        if "error" in result:
            skipped.append({"case": source.case_id, "target": "*", "reason": f"unreadable case: {result['error']}"})
            continue
        sources[source.case_id] = source
        if result["notes"]:
            notes[source.case_id] = result["notes"]
        records[split] += result["records"]
        skipped += [{**s, "split": split} for s in result["skipped"]]
    write_cases(out / "cases.json", list(sources.values()))
    for split, rows in records.items():
        write_records(out / f"{split}.jsonl", rows)
    summary = {
        "records": {split: len(rows) for split, rows in records.items()},
        "targets": {split: sorted({r.target for r in rows}) for split, rows in records.items()},
        "skipped": _dedupe(skipped),
        "cases": notes,
        "settings": {k: getattr(args, k) for k in args.__dataclass_fields__},
    }
    from ..volume import atomic_write

    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    return summary


_WORKER_PROPAGATOR: dict = {}  # per process: the oracle propagator, built once


def prepare_case(source, config: PrepareConfig, oracle: Optional[tuple[str, Optional[str]]]) -> dict:
    """One case -> {"records", "skipped", "notes"}, or {"error"} for a case that cannot be read (reported, not fatal)."""
    from ..errors import MedVolR1Error
    from .store import load_case

    try:
        case = load_case(source)
    except MedVolR1Error as exc:  # a corrupt case is reported, the rest of the split still prepared
        return {"error": str(exc)}
    propagator = None
    if oracle is not None and config.oracle_stride > 0:
        if oracle not in _WORKER_PROPAGATOR:
            from ..propagation.factory import build_propagator

            _WORKER_PROPAGATOR[oracle] = build_propagator(oracle[0], sam_checkpoint=oracle[1])
        propagator = _WORKER_PROPAGATOR[oracle]
    report = build_records(case, config, propagator=propagator)
    return {"records": report.records, "skipped": report.skipped, "notes": case.notes}


def _prepare_job(job) -> dict:
    source, _, config, oracle = job
    return prepare_case(source, config, oracle)


def _worker_init(threads: int, uses_torch: bool) -> None:
    """Share the cores between workers (only the oracle's propagator runs torch)."""
    if uses_torch:
        import torch

        torch.set_num_threads(max(1, threads))


def _run_jobs(jobs: list, oracle, workers: int):
    """(source, split, result) per job, in job order whatever the worker count: the output is the same bytes."""
    if workers <= 1 or len(jobs) <= 1:
        for source, split, config in jobs:
            yield source, split, prepare_case(source, config, oracle)
        return
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    workers = min(workers, len(jobs))
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # no forked copies of torch's thread pools
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(threads, oracle is not None)) as pool:
        results = pool.map(_prepare_job, [(source, split, config, oracle) for source, split, config in jobs])
        for (source, split, _), result in zip(jobs, results):
            yield source, split, result


def release_plans(args) -> tuple[list, list[dict]]:
    """CT-ORG from raw NIfTI as the release prepares it (`release_data`), when `ctorg_nifti_root` is set.

    Returns (plans, problems): unpaired files and split entries without files are reported, not dropped silently.
    """
    if not args.ctorg_nifti_root:
        return [], []
    from ..errors import DataError
    from ..release_data import CTORG_DATASET, find_ctorg_pairs, read_ctorg_split
    from .store import CaseSource

    if not args.ctorg_split_file:
        raise DataError("ctorg_nifti_root needs ctorg_split_file ({\"train\": [case numbers], \"test\": [...]}): "
                        "the release's split files are not public")
    pairs, problems = find_ctorg_pairs(args.ctorg_nifti_root)
    by_number = {p.number: p for p in pairs}
    plans = []
    for split, numbers in read_ctorg_split(args.ctorg_split_file).items():
        for number in numbers:
            pair = by_number.get(number)
            if pair is None:
                problems.append({"case": f"{CTORG_DATASET}/volume-{number}", "target": "*", "split": split,
                                 "reason": f"in the split file but no volume/labels pair under {args.ctorg_nifti_root}"})
                continue
            source = CaseSource(pair.case_id, "ctorg_nifti", image=str(pair.volume), labels=str(pair.labels),
                                dataset=CTORG_DATASET, resize=args.ctorg_size)
            plans.append((source, split, False))  # laterality: CT-ORG's targets here have no sides to check
    return plans, problems


def exclude_seen_volumes(plans: list, allow: bool) -> tuple[list, list[dict]]:
    """Drop (and report) test plans whose case is also a training case, unless explicitly allowed."""
    trained = {source.case_id for source, split, _ in plans if split == "train"}
    kept, skipped = [], []
    for plan in plans:
        source, split, _ = plan
        if split == "test" and source.case_id in trained and not allow:
            skipped.append({"case": source.case_id, "target": "*", "reason": "training volume left out of the test split", "split": split})
        else:
            kept.append(plan)
    return kept, skipped


def _dedupe(skipped: list[dict]) -> list[dict]:
    seen, out = set(), []
    for s in skipped:
        key = (s.get("case"), s.get("target"), s.get("reason", "").split(" (slice set")[0], s.get("split"))
        if key not in seen:
            seen.add(key)
            out.append({**s, "reason": key[2]})
    return out
