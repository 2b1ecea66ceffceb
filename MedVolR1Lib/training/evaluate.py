"""Evaluation over a split: policies side by side with the oracle row and two controls.

Rows ("methods"):
- ``oracle``: the GT anchor (key slice + GT boxes) through the same propagator: the ceiling.
- ``blind_prior``: per target, the most common key-slice position (as a fraction of the shown slices)
  and the mean GT box of the training records, never looking at the image.
- each checkpoint (base, SFT, SFT+GRPO, ...), and ``<checkpoint>+blank``: the same model shown black
  images (a constant volume on the same grid), so what it gains from looking is visible.
Anchor metrics: format validity, slice hit (the chosen slice shows the target), key-slice match,
matched box IoU on the chosen slice.  Mask metrics (with a propagator): Dice, IoU and NSD at native
resolution, on the same voxels for every method: the whole volume, or (`eval_window >= 0`, the cheap CI
setting) the GT key slice +- W.  Never a window around the method's own slice: a wrong-slice answer
would then be scored on empty-vs-empty slices and get Dice 1.
Test volumes must be unseen in training (the prior file's cases); `allow_seen_volumes` is the explicit
opt-in of the single-CT checks, and the report then says so in its first line.

NSD's tolerance is in mm where the scan's voxel size is known and in voxels where it is not (M3D-Seg
stores none); every row says which (`nsd_unit`) and the report's headers carry it.

Sharding (one GPU per shard): `shard="i/n"`, or RANK / WORLD_SIZE under torchrun or accelerate, gives
this process every n-th case (all records of a case stay together, so its volume loads once).  Each
shard writes its rows to ``<report_dir>/shards/``.  Under a launcher (torchrun / accelerate set
TORCHELASTIC_RUN_ID) rank 0 waits for the other shards of the same launch and merges them into the
same table one process would write; shards started by hand are merged with `--merge <report_dir>`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..anchor import EvidenceAnchor
from ..volume import Volume, atomic_write
from .records import VRSRecord, read_records
from .store import VolumeStore

ANCHOR_METRICS = ("format_valid", "slice_hit", "key_slice", "box_iou")
MASK_METRICS = ("dice", "iou", "nsd")


@dataclass
class EvalArguments:
    """Training/evaluate.py settings."""

    eval_data_dir: str = field(default="runs/data", metadata={"help": "prepared data folder"})
    eval_file: str = field(default="test", metadata={"help": "records file stem to evaluate"})
    prior_file: str = field(default="train", metadata={"help": "records the blind prior is fitted on"})
    checkpoints: str = field(default="", metadata={"help": "comma list name=path; path is a model folder/hub id or an adapter folder"})
    base_model: Optional[str] = field(default=None, metadata={"help": "base model for adapters without a manifest; 'tiny' allowed"})
    tiny_model_dir: str = "runs/tiny-qwen"
    blank_control: bool = field(default=True, metadata={"help": "add '<name>+blank' rows (images blanked)"})
    lenient: str = field(
        default="off_the_shelf",
        metadata={"help": "comma list of checkpoint names read in lenient mode (native grounding JSON accepted): the zero-shot "
                          "off-the-shelf Instruct row, e.g. --checkpoints off_the_shelf=Qwen/Qwen3-VL-4B-Instruct,..."},
    )
    propagator: str = field(default="litemedsam", metadata={"help": "litemedsam | medsam2 | none (anchor metrics only)"})
    sam_checkpoint: Optional[str] = None
    eval_window: int = field(default=-1, metadata={"help": "score the GT key slice +- W for every method; -1: whole volume"})
    allow_seen_volumes: bool = field(default=False, metadata={"help": "let test volumes be training volumes (single-CT checks only; the report says so)"})
    max_records: int = field(default=0, metadata={"help": "0: all"})
    max_new_tokens: int = 128
    report_dir: str = field(default="runs/eval", metadata={"help": "report.md, results.csv, per_record.csv, metrics.png"})
    nsd_tolerance_mm: float = 2.0
    device: str = "auto"
    eval_threads: int = field(default=0, metadata={"help": ">0: torch.set_num_threads"})
    shard: str = field(default="", metadata={"help": "i/n: evaluate shard i (0-based) of n; default RANK/WORLD_SIZE under torchrun/accelerate"})
    merge: Optional[str] = field(default=None, metadata={"help": "a sharded run's report_dir: merge its shards into one table and stop"})
    shard_wait_s: float = field(default=86400.0, metadata={"help": "how long rank 0 waits for the other shards before merging"})


# ---------------------------------------------------------------------------------------------- anchors


@dataclass
class AnchorGuess:
    slice_index: Optional[int]
    pixel_boxes: list
    anchor: Optional[EvidenceAnchor]
    raw: str = ""


class BlindPrior:
    """Per target: modal key-slice position (fraction of the shown-slice list) and mean GT box; no image."""

    def __init__(self, train: Sequence[VRSRecord]):
        positions: dict[str, list[float]] = defaultdict(list)
        boxes: dict[str, list[list[list[float]]]] = defaultdict(list)
        for r in train:
            positions[r.target].append(r.slices.index(r.gt_slice) / max(1, len(r.slices) - 1))
            boxes[r.target].append(r.gt_boxes)
        self.position = {t: Counter(round(p, 2) for p in v).most_common(1)[0][0] for t, v in positions.items()}
        self.boxes = {}
        for t, lists in boxes.items():
            count = Counter(len(b) for b in lists).most_common(1)[0][0]
            same = [sorted(b) for b in lists if len(b) == count]
            self.boxes[t] = np.mean(np.asarray(same, dtype=float), axis=0).tolist()

    def guess(self, record: VRSRecord) -> AnchorGuess:
        if record.target not in self.position:
            return AnchorGuess(None, [], None, "no prior for this target")
        n = len(record.slices)
        k = record.slices[int(round(self.position[record.target] * (n - 1)))]
        boxes = self.boxes[record.target]
        return AnchorGuess(k, boxes, _anchor(record, k, boxes))


def _geometry(record: VRSRecord):
    from ..views import ViewGeometry

    g = dict(record.geometry)
    g["shape_ji"] = tuple(int(n) for n in g["shape_ji"])
    return ViewGeometry(**g)


def _anchor(record: VRSRecord, k: int, pixel_boxes) -> Optional[EvidenceAnchor]:
    from ..anchor import ParsedAnswer
    from ..errors import AnchorError

    try:
        return _geometry(record).anchor_from_answer(ParsedAnswer(int(k), tuple(tuple(b) for b in pixel_boxes)), len(record.areas))
    except (AnchorError, ValueError):
        return None


def oracle_guess(record: VRSRecord) -> AnchorGuess:
    return AnchorGuess(record.gt_slice, record.gt_boxes, _anchor(record, record.gt_slice, record.gt_boxes))


def _blank_volume(volume: Volume) -> Volume:
    """Same grid, constant intensity: every rendered view is black."""
    return Volume(np.full(volume.shape, float(volume.array.min()), dtype=np.float32), volume.ijk_to_ras.copy(), volume.modality, volume.name + "_blank")


class PolicyRunner:
    """A checkpoint through the product's Grounder (the same call path the pipeline uses)."""

    def __init__(self, name: str, grounder, max_new_tokens: int, lenient: bool = False):
        from ..grounder import GenerationSettings

        self.name = name
        self.grounder = grounder
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens, retries=0, do_sample=False, lenient=lenient)
        self._blank: dict[str, Volume] = {}

    def guess(self, record: VRSRecord, volume: Volume, blank: bool = False) -> AnchorGuess:
        if blank:
            if volume.fingerprint not in self._blank:
                self._blank = {volume.fingerprint: _blank_volume(volume)}
            volume = self._blank[volume.fingerprint]
        result = self.grounder.ground(
            volume, record.query, slices=record.slices, image_size=record.image_size, window=record.window,
            settings=self.settings, raise_on_failure=False,
        )
        if result.anchor is None:
            partial = result.answer.slice_index if result.answer is not None else None
            return AnchorGuess(partial, [], None, result.raw_text)
        return AnchorGuess(result.anchor.slice_index, [list(b) for b in result.pixel_boxes], result.anchor, result.raw_text)


def load_checkpoint(spec: str, args: EvalArguments) -> PolicyRunner:
    """'name=path': a full model folder / hub id, or an adapter folder (base from its manifest or --base_model)."""
    from ..grounder import Grounder
    from .checkpoints import read_manifest
    from .config import tiny_model_path

    name, _, path = spec.partition("=")
    if not path:
        name, path = Path(spec).name, spec
    base, adapter = path, None
    if (Path(path) / "adapter_config.json").exists():
        adapter = path
        base = read_manifest(path).get("base_model") or args.base_model
        if not base:
            raise ValueError(f"{path}: adapter without a training manifest; pass --base_model")
    base = tiny_model_path(base, args.tiny_model_dir) or base
    grounder = Grounder.from_pretrained(base, adapter=adapter, device=args.device)
    lenient = name.strip() in {n.strip() for n in args.lenient.split(",")}
    return PolicyRunner(name.strip(), grounder, args.max_new_tokens, lenient=lenient)


# ---------------------------------------------------------------------------------------------- scoring


def anchor_scores(record: VRSRecord, guess: AnchorGuess) -> dict[str, float]:
    from ..rewards import matched_box_score

    k = guess.slice_index
    shown = k is not None and k in record.slices
    hit = bool(shown and 0 <= k < len(record.areas) and record.areas[k] > 0)
    gt = record.boxes_by_slice.get(str(k), []) if shown else []
    return {
        "format_valid": float(guess.anchor is not None),
        "slice_hit": float(hit and guess.anchor is not None),
        "key_slice": float(guess.anchor is not None and k == record.gt_slice),
        "box_iou": float(matched_box_score(guess.pixel_boxes, gt)) if guess.anchor is not None and gt else 0.0,
    }


def scored_slices(record: VRSRecord, num_slices: int, window: int) -> tuple[int, int]:
    """Inclusive slice range every method is scored on: fixed by the GT (key slice +- W), or the whole volume."""
    if window < 0:
        return 0, num_slices - 1
    return max(0, record.gt_slice - window), min(num_slices - 1, record.gt_slice + window)


def mask_scores(store: VolumeStore, record: VRSRecord, anchor: Optional[EvidenceAnchor], window: int, tolerance: float) -> dict:
    """Dice / IoU / NSD on `scored_slices`; the propagation also covers the anchor's slice when it lies outside.

    The NSD tolerance is in mm when the case knows its voxel size, else in voxels (`nsd_unit` says which).
    """
    from ..errors import DataError
    from ..metrics import array_spacing, score_masks

    case = store.case(record.case_id)
    unit = case.distance_unit
    z0, z1 = scored_slices(record, case.volume.num_slices, window)
    gt = case.target_mask(record.labels)[z0 : z1 + 1]
    if not gt.any():  # empty-vs-empty would score 1: a record without target voxels is a data error
        raise DataError(f"record {record.id}: no target voxels in the scored slices {z0}-{z1}")
    if anchor is None:
        return {"dice": 0.0, "iou": 0.0, "nsd": 0.0, "nsd_unit": unit}
    k = anchor.slice_index
    pred = np.asarray(store.propagator(record.case_id).propagate(anchor, merge=True, slice_range=(min(z0, k), max(z1, k)))) > 0
    spacing = array_spacing(case.volume) if case.spacing_known else None
    scores = score_masks(pred[z0 : z1 + 1], gt, spacing, tolerance)
    return {"dice": scores.dice, "iou": scores.iou, "nsd": scores.nsd, "nsd_unit": scores.unit}


def seen_volumes(test: Sequence[VRSRecord], train: Sequence[VRSRecord]) -> list[str]:
    """Test cases that are also training cases (split contamination)."""
    return sorted({r.case_id for r in test} & {r.case_id for r in train})


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; ValueError with the expected form otherwise."""
    index, sep, count = str(text).strip().partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = -1
    if not sep or n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard must be 'i/n' with 0 <= i < n (e.g. 0/8), got {text!r}")
    return i, n


def shard_of(args: EvalArguments, environ=None) -> Optional[tuple[int, int]]:
    """This process's shard: `--shard`, else RANK/WORLD_SIZE (torchrun, accelerate) when the world has > 1 process."""
    environ = os.environ if environ is None else environ
    if args.shard:
        return parse_shard(args.shard)
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        return parse_shard(f"{environ.get('RANK', '0')}/{world}")
    return None


def bind_local_gpu(environ) -> Optional[int]:
    """Under torchrun / accelerate, make LOCAL_RANK's GPU the current one, so "auto" puts this shard's model and
    propagator there instead of every shard on GPU 0.  Returns the GPU index, None when there is nothing to bind."""
    local = environ.get("LOCAL_RANK")
    if local is None:
        return None
    import torch

    if not torch.cuda.is_available() or int(local) >= torch.cuda.device_count():
        return None
    torch.cuda.set_device(int(local))
    return int(local)


def shard_positions(records: Sequence[VRSRecord], index: int, count: int) -> list[int]:
    """Positions of the records of shard `index`: cases dealt round robin in order of first appearance."""
    cases: dict[str, int] = {}
    for r in records:
        cases.setdefault(r.case_id, len(cases))
    return [n for n, r in enumerate(records) if cases[r.case_id] % count == index]


def shard_path(report_dir: Path, index: int, count: int) -> Path:
    return Path(report_dir) / "shards" / f"shard-{index:03d}-of-{count:03d}.json"


def _shard_settings(args: EvalArguments) -> dict:
    """The settings every shard of one run must share (shard and merge options left out)."""
    return {k: getattr(args, k) for k in args.__dataclass_fields__ if k not in ("shard", "merge", "shard_wait_s")}


def evaluate(args: EvalArguments, *, runners: Optional[list[PolicyRunner]] = None, environ=None) -> dict:
    """Score every method on every record (or this process's shard); write report.md, results.csv, per_record.csv
    and metrics.png.  A shard writes its rows; rank 0 then waits for the rest and merges."""
    if args.merge:
        return merge_shards(Path(args.merge))
    if args.eval_threads > 0:
        import torch

        torch.set_num_threads(args.eval_threads)
    shard = shard_of(args, environ)
    if shard is not None:
        bind_local_gpu(os.environ if environ is None else environ)
    data = Path(args.eval_data_dir)
    records = read_records(data / f"{args.eval_file}.jsonl")
    if args.max_records:
        records = records[: args.max_records]
    train = read_records(data / f"{args.prior_file}.jsonl")
    seen = seen_volumes(records, train)
    if seen and not args.allow_seen_volumes:
        from ..errors import DataError

        raise DataError(f"test volumes {', '.join(seen)} are training volumes ({args.prior_file}); evaluate on unseen volumes "
                        "(allow_seen_volumes only for single-CT checks)")
    positions = list(range(len(records))) if shard is None else shard_positions(records, *shard)
    prior = BlindPrior(train)
    factory = None
    if args.propagator != "none":
        from ..propagation.factory import build_propagator

        factory = lambda: build_propagator(args.propagator, sam_checkpoint=args.sam_checkpoint)  # noqa: E731
    store = VolumeStore.from_dir(data, propagator_factory=factory)
    if runners is None:
        runners = [load_checkpoint(spec.strip(), args) for spec in args.checkpoints.split(",") if spec.strip()]
    methods = ["oracle", "blind_prior"] + [n for r in runners for n in ([r.name, f"{r.name}+blank"] if args.blank_control else [r.name])]
    rows: list[dict] = []
    started = time.perf_counter()
    for position in positions:
        record = records[position]
        volume = store.volume(record.case_id)
        guesses: list[tuple[str, AnchorGuess]] = [("oracle", oracle_guess(record)), ("blind_prior", prior.guess(record))]
        for runner in runners:
            guesses.append((runner.name, runner.guess(record, volume)))
            if args.blank_control:
                guesses.append((f"{runner.name}+blank", runner.guess(record, volume, blank=True)))
        for method, guess in guesses:
            row = {"method": method, "record": record.id, "dataset": record.dataset, "target": record.target,
                   "query_split": record.query_split, **anchor_scores(record, guess)}
            if factory is not None:
                row.update(mask_scores(store, record, guess.anchor, args.eval_window, args.nsd_tolerance_mm))
            row["answer"] = guess.raw[:200]
            rows.append(row)
    seconds = time.perf_counter() - started
    if shard is None:
        return _finish(Path(args.report_dir), rows, methods if records else [], [seconds], seen, args)
    index, count = shard
    run_id = (os.environ if environ is None else environ).get("TORCHELASTIC_RUN_ID")
    payload = {"shard": [index, count], "run_id": run_id, "records": len(records), "positions": positions, "rows": rows,
               "methods": methods, "seconds": seconds, "seen_volumes": seen, "settings": _shard_settings(args)}
    path = shard_path(Path(args.report_dir), index, count)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, default=str)))
    done = {"shard": [index, count], "rows": len(rows), "seconds": seconds, "path": str(path)}
    if index != 0 or run_id is None:  # by-hand shards cannot tell a finished peer from a stale file: merge by hand
        return {**done, "merge": f"python Training/evaluate.py --merge {args.report_dir}"}
    _wait_for_shards(Path(args.report_dir), count, run_id, args.shard_wait_s)
    return merge_shards(Path(args.report_dir))


def _shard_run_id(path: Path) -> Optional[str]:
    try:
        return json.loads(path.read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def _wait_for_shards(report_dir: Path, count: int, run_id: str, timeout_s: float, poll_s: float = 1.0) -> None:
    """Until every shard of this launch (same run id, so no stale file of an earlier run counts) is written."""
    deadline = time.monotonic() + max(0.0, timeout_s)
    while True:
        missing = [i for i in range(count) if _shard_run_id(shard_path(report_dir, i, count)) != run_id]
        if not missing:
            return
        if time.monotonic() >= deadline:
            from ..errors import DataError

            raise DataError(f"{report_dir}/shards: shards {missing} of {count} did not finish within {timeout_s:g} s; "
                            f"merge later with --merge {report_dir}")
        time.sleep(poll_s)


def merge_shards(report_dir: Path) -> dict:
    """Merge ``<report_dir>/shards/shard-*-of-N.json`` into the one-process report (rows in record order).

    Refuses a missing shard, shards of different runs (another N, launch, record count or settings) and a
    record scored twice, naming what is wrong.  The report's settings are the shards' own.
    """
    from ..errors import DataError

    folder = Path(report_dir) / "shards"
    files = sorted(folder.glob("shard-*-of-*.json"))
    if not files:
        raise DataError(f"{folder}: no shard files to merge (run Training/evaluate.py with --shard i/n first)")
    shards = []
    for path in files:
        try:
            shards.append(json.loads(path.read_text()))
        except ValueError as exc:
            raise DataError(f"{path}: not a shard file ({exc})") from exc
    counts = {s["shard"][1] for s in shards}
    if len(counts) != 1:
        raise DataError(f"{folder}: shards of different splits (n = {sorted(counts)}); remove the stale ones")
    count = counts.pop()
    missing = sorted(set(range(count)) - {s["shard"][0] for s in shards})
    if missing:
        raise DataError(f"{folder}: shards {missing} of {count} are missing")
    first = shards[0]
    for s in shards[1:]:
        if (s["records"] != first["records"] or s["settings"] != first["settings"] or s["methods"] != first["methods"]
                or s.get("run_id") != first.get("run_id")):
            raise DataError(f"{folder}: shard {s['shard'][0]} comes from another run (records, methods or settings differ)")
    by_position: dict[int, list[dict]] = {}
    for s in shards:
        rows_per_record = len(s["methods"])
        for n, position in enumerate(s["positions"]):
            if position in by_position:
                raise DataError(f"{folder}: record {position} was scored by two shards")
            by_position[position] = s["rows"][n * rows_per_record : (n + 1) * rows_per_record]
    if len(by_position) != first["records"]:
        raise DataError(f"{folder}: the shards hold {len(by_position)} of {first['records']} records")
    rows = [row for position in sorted(by_position) for row in by_position[position]]
    args = EvalArguments(**{k: v for k, v in first["settings"].items() if k in EvalArguments.__dataclass_fields__})
    args.report_dir = str(report_dir)
    summary = _finish(Path(report_dir), rows, first["methods"] if first["records"] else [], [s["seconds"] for s in shards],
                      first["seen_volumes"], args)
    summary["shards"] = count
    return summary


def _finish(folder: Path, rows: list[dict], methods: Sequence[str], seconds: Sequence[float], seen: list[str], args: EvalArguments) -> dict:
    summary = summarise(rows, methods)
    summary["seconds"] = max(seconds) if seconds else 0.0
    summary["shard_seconds"] = list(seconds)
    summary["settings"] = _shard_settings(args)
    summary["seen_volumes"] = seen
    write_report(folder, rows, summary, args)
    return summary


def summarise(rows: list[dict], methods: Sequence[str]) -> dict:
    """Means per (method, "all", "all"), (method, dataset, "all") and (method, dataset, target), over records."""
    metrics = [m for m in ANCHOR_METRICS + MASK_METRICS if rows and m in rows[0]]
    table: list[dict] = []
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], "all", "all")].append(row)
        groups[(row["method"], row["dataset"], "all")].append(row)
        groups[(row["method"], row["dataset"], row["target"])].append(row)
    order = {m: n for n, m in enumerate(methods)}
    for (method, dataset, target), members in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1] != "all", kv[0][1], kv[0][2] != "all", kv[0][2])):
        entry = {"method": method, "dataset": dataset, "target": target, "n": len(members)}
        for m in metrics:
            entry[m] = float(np.mean([r[m] for r in members]))
        if "nsd" in metrics:
            units = sorted({r.get("nsd_unit", "mm") for r in members})
            entry["nsd_unit"] = units[0] if len(units) == 1 else "mm+voxels"
        table.append(entry)
    return {"metrics": metrics, "table": table, "methods": list(methods)}


def dataset_title(code: str) -> str:
    from ..m3d import DATASETS
    from ..release_data import CTORG_DATASET, CTORG_TITLE

    if code == CTORG_DATASET:
        return CTORG_TITLE
    return f"{DATASETS[code].name} ({code})" if code in DATASETS else ("sample CT" if code == "sample" else code)


def table1(summary: dict, cell, *, units: bool = False) -> list[str]:
    """Rows = methods, columns = datasets (Table 1's layout); `cell(entry)` formats one cell.

    `units=True` (the NSD table) adds each column's distance unit to its title: "[mm]" or "[voxels]".
    """
    entries = {(e["method"], e["dataset"]): e for e in summary["table"] if e["target"] == "all"}
    datasets = sorted({d for _, d in entries if d != "all"})
    columns = datasets + (["all"] if len(datasets) > 1 else [])

    def title(d: str) -> str:
        text = dataset_title(d) if d != "all" else "all records"
        unit = next((e.get("nsd_unit") for (_, dd), e in entries.items() if dd == d and e.get("nsd_unit")), None)
        return f"{text} [{unit}]" if units and unit else text

    lines = ["| method | " + " | ".join(title(d) for d in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for method in summary["methods"]:
        lines.append(f"| {method} | " + " | ".join(cell(entries[(method, d)]) if (method, d) in entries else "-" for d in columns) + " |")
    return lines


def write_report(folder: Path, rows: list[dict], summary: dict, args: EvalArguments) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    metrics = summary["metrics"]

    def write_csv(path: Path, data: list[dict], fields: list[str]) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(data)

        atomic_write(path, write)

    write_csv(folder / "results.csv", summary["table"], ["method", "dataset", "target", "n", *metrics, *(["nsd_unit"] if "nsd" in metrics else [])])
    if rows:
        write_csv(folder / "per_record.csv", rows, list(rows[0].keys()))
    overall = [e for e in summary["table"] if e["dataset"] == "all"]
    seen = summary.get("seen_volumes") or []
    scope = f"the GT key slice +- {args.eval_window} (the same slices for every method)" if args.eval_window >= 0 else "the whole volume"
    lines = ["# MedVol-R1 evaluation", ""]
    if seen:
        lines += [f"**Test volumes seen in training: {', '.join(seen)}.** Only the query phrasings (and slice sets) are held out; "
                  "this is not a result on unseen scans.", ""]
    lines += [
        f"Split `{args.eval_file}` of `{args.eval_data_dir}`, {len({r['record'] for r in rows})} records; propagator "
        f"`{args.propagator}`, masks scored on {scope}.",
        "`oracle` = GT anchor through the same propagator (ceiling); `blind_prior` = per-target modal key-slice position and "
        "mean box, no image; `<name>+blank` = the same model shown black images.",
        "",
    ]
    if "dice" in metrics:
        lines += ["## DSC (IoU) per dataset, % (Table 1 layout)", ""]
        lines += table1(summary, lambda e: f"{100 * e['dice']:.2f} ({100 * e['iou']:.2f})")
        tol = f"{args.nsd_tolerance_mm:g}"
        lines += ["", f"## NSD per dataset, % (tolerance {tol} mm where the scan's voxel size is known, {tol} voxels where "
                      "it is not: M3D-Seg stores no spacing; each column names its unit)", ""]
        lines += table1(summary, lambda e: f"{100 * e['nsd']:.2f}", units=True)
        lines += [""]
    unit_head, unit_rule = (" nsd unit |", "---|") if "nsd" in metrics else ("", "")

    def cells(e: dict) -> str:
        return " | ".join(f"{e[m]:.3f}" for m in metrics) + " |" + (f" {e.get('nsd_unit', '')} |" if unit_head else "")

    lines += ["## Overall", "", "| method | n | " + " | ".join(metrics) + " |" + unit_head, "|---|---|" + "---|" * len(metrics) + unit_rule]
    lines += [f"| {e['method']} | {e['n']} | " + cells(e) for e in overall]
    lines += ["", "## Per dataset and class", "", "| method | dataset | target | n | " + " | ".join(metrics) + " |" + unit_head,
              "|---|---|---|---|" + "---|" * len(metrics) + unit_rule]
    lines += [f"| {e['method']} | {e['dataset']} | {e['target']} | {e['n']} | " + cells(e) for e in summary["table"] if e["dataset"] != "all"]
    lines += ["", f"Wall time {summary.get('seconds', 0.0):.1f} s. Plot: metrics.png. Per record: per_record.csv.", ""]
    atomic_write(folder / "report.md", lambda tmp: Path(tmp).write_text("\n".join(lines)))
    atomic_write(folder / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1, default=str)))
    _plot(folder / "metrics.png", overall, metrics)


def _plot(path: Path, overall: list[dict], metrics: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(metrics) * max(1, len(overall)) / 2), 3.6))
    width = 0.8 / max(1, len(overall))
    x = np.arange(len(metrics))
    for n, entry in enumerate(overall):
        ax.bar(x + n * width, [entry[m] for m in metrics], width, label=entry["method"])
    ax.set_xticks(x + width * (len(overall) - 1) / 2, metrics)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean over records")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
