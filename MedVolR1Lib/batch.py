"""`medvolr1 batch`: one query or anchor per manifest row over a cohort, resumable, one output folder per row.

Manifest (CSV, header required): `name` (the row's output folder), `scan` (file, DICOM folder, M3D-Seg case
folder or 'sample'; relative paths are taken from the manifest's folder), then either `query` or `anchor`
(``K:x1,y1,x2,y2[;...]`` as --anchor), optional `box_units` (pixels | voxels, default pixels), `target`
(segment name for anchor rows) and `series` (the Series Instance UID to read from a DICOM folder holding
several series).  Full description: docs/batch.md.

- Rows are grouped by scan: each scan is read once and the propagator's per-volume feature cache serves every
  row on it (one Pipeline for the whole batch).
- Resume: a row is finished when its evidence.json records the same row hash (row content + the settings that
  change a mask) and the same scan sha256; finished rows are skipped without loading anything.
- A failing row gets one line in failures.csv and the batch goes on; `run_batch` reports the count and the CLI
  exits with 1 when any row failed.  A row whose result was written but one output format was not (e.g. a
  DICOM SEG the source series cannot carry) is such a failure too, and is redone on the next run.
- Several processes (``torchrun`` / ``accelerate launch``): each reads RANK and WORLD_SIZE, takes whole scan
  groups (balanced by row count, the same split on every rank), writes only its own row folders and its own
  ``failures.rank{N}.csv``; `read_failures` merges them.  No locks and no shared files; at the very end the
  ranks exchange only their failure counts, so all exit together with the same code (a launcher stops every
  rank as soon as one exits non-zero).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .errors import DataError, MedVolR1Error, one_line
from .hashing import file_sha256
from .volume import atomic_write

SAMPLE = "sample"
BOX_UNITS = ("pixels", "voxels")
FAILURE_COLUMNS = ("name", "scan", "line", "error", "row_sha256")


@dataclass(frozen=True)
class BatchRow:
    """One manifest row; `line` is its line number in the CSV (header = 1)."""

    line: int
    name: str
    scan: str  # as written in the manifest
    scan_path: str  # resolved path (or 'sample')
    query: str = ""
    anchor: str = ""
    box_units: str = "pixels"
    target: str = ""
    series: str = ""  # Series Instance UID within a DICOM folder; empty: the folder's only series

    def content(self) -> dict:
        content = {"name": self.name, "scan": self.scan, "query": self.query, "anchor": self.anchor,
                   "box_units": self.box_units, "target": self.target}
        return {**content, "series": self.series} if self.series else content  # rows without one keep their hash


@dataclass(frozen=True)
class BatchFailure:
    name: str
    scan: str
    line: int
    error: str  # one line
    row_sha256: str = ""


@dataclass
class BatchSummary:
    rank: int
    world_size: int
    rows: int  # rows of this rank
    written: int = 0
    skipped: int = 0
    failures: list[BatchFailure] = field(default_factory=list)
    failures_path: Optional[Path] = None
    failed_all_ranks: Optional[int] = None  # under torchrun / accelerate: failures summed over every rank

    @property
    def any_failed(self) -> bool:
        return bool(self.failures) or bool(self.failed_all_ranks)


def _check_name(name: str, line: int) -> None:
    if not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\:") or name != name.strip():
        raise DataError(f"manifest line {line}: name {name!r} must be a plain folder name (no slashes, not hidden)")


def read_manifest(path: str | os.PathLike) -> list[BatchRow]:
    """Parse and check the manifest; DataError for what would make rows collide or be unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = {(c or "").strip().lower(): c for c in (reader.fieldnames or [])}
        missing = [c for c in ("name", "scan") if c not in columns]
        if missing or not ({"query", "anchor"} & set(columns)):
            raise DataError(f"{path}: the header needs name, scan and query or anchor columns; it has {sorted(columns)}")
        rows, seen = [], {}
        for line, record in enumerate(reader, start=2):
            value = {key: (record.get(original) or "").strip() for key, original in columns.items()}
            if not any(value.values()):
                continue
            name = value["name"]
            _check_name(name, line)
            if name in seen:
                raise DataError(f"manifest line {line}: name {name!r} is also on line {seen[name]}; each row needs its own output folder")
            seen[name] = line
            scan = value["scan"]
            scan_path = scan if scan in ("", SAMPLE) else str((path.parent / scan) if not Path(scan).is_absolute() else Path(scan))
            rows.append(BatchRow(line, name, scan, scan_path, value.get("query", ""), value.get("anchor", ""),
                                 value.get("box_units", "") or "pixels", value.get("target", ""), value.get("series", "")))
    if not rows:
        raise DataError(f"{path}: the manifest has no rows")
    return rows


def launcher_rank() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun / accelerate launch set them; (0, 1) when run alone."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DataError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} are not whole numbers") from None
    if world < 1 or not 0 <= rank < world:
        raise DataError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return rank, world


def group_by_scan(rows: Sequence[BatchRow]) -> list[list[BatchRow]]:
    """Rows grouped by scan (and series within a DICOM folder), groups in order of first appearance, rows in manifest order."""
    groups: dict[tuple[str, str], list[BatchRow]] = {}
    for row in rows:
        groups.setdefault((row.scan_path, row.series), []).append(row)
    return list(groups.values())


def rows_for_rank(rows: Sequence[BatchRow], rank: int, world_size: int) -> list[list[BatchRow]]:
    """This rank's scan groups: whole groups (one scan is read by one process), balanced by row count.

    Deterministic from the manifest alone, so every rank computes the same split without talking to the others.
    """
    loads = [0] * world_size
    mine: list[list[BatchRow]] = []
    for group in sorted(group_by_scan(rows), key=lambda g: (-len(g), g[0].line)):
        target = min(range(world_size), key=lambda r: (loads[r], r))
        loads[target] += len(group)
        if target == rank:
            mine.append(group)
    return sorted(mine, key=lambda g: g[0].line)


def scan_sha256(path: str | os.PathLike) -> str:
    """sha256 of a scan file; of an M3D case, its image.npy; of a DICOM folder, every file's name and hash."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    if (path / "image.npy").exists():
        return file_sha256(path / "image.npy")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def row_sha256(row: BatchRow, settings: dict) -> str:
    """Hash of what decides a row's result: its manifest content and the batch settings (models, sizes)."""
    text = json.dumps({"row": row.content(), "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def batch_settings(config, fill_nonfinite: bool = False, modality: Optional[str] = None,
                   formats: Optional[Sequence[str]] = None) -> dict:
    """The PipelineConfig fields (and load options) that change a mask; part of every row hash."""
    return {**asdict(config), "sam_overrides": list(config.sam_overrides), "fill_nonfinite": bool(fill_nonfinite), "modality": modality,
            **({"formats": sorted(formats)} if formats else {})}


def finished_record(folder: Path) -> Optional[dict]:
    """The `batch` block of a row folder's evidence.json (written last, so it marks a complete row), or None.

    None also when the mask file evidence.json names has gone (deleted by hand): the row is then redone.
    """
    try:
        record = json.loads((folder / "evidence.json").read_text())
        mask_file = (record.get("mask") or {}).get("file")
        if mask_file and not (folder / mask_file).is_file():
            return None
        if (record.get("outputs") or {}).get("failed"):  # an output format was missing: the row is redone
            return None
        return dict(record["provenance"]["batch"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def is_finished(folder: Path, row_hash: str, scan_hash: str) -> bool:
    record = finished_record(folder)
    return bool(record) and record.get("row_sha256") == row_hash and record.get("scan_sha256") == scan_hash


def failures_path(out_dir: Path, rank: int, world_size: int) -> Path:
    return out_dir / ("failures.csv" if world_size == 1 else f"failures.rank{rank}.csv")


def _write_failures(path: Path, failures: Sequence[BatchFailure]) -> None:
    if not failures:
        path.unlink(missing_ok=True)
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FAILURE_COLUMNS)
    writer.writeheader()
    for failure in failures:
        writer.writerow(asdict(failure))
    atomic_write(path, lambda tmp: Path(tmp).write_text(buffer.getvalue()))


def read_failures(out_dir: str | os.PathLike) -> list[dict]:
    """failures.csv and every failures.rank{N}.csv merged, without rows that have since finished.

    A row listed by several files (a rerun with another number of processes) appears once, from the newest file.
    """
    out_dir = Path(out_dir)
    merged: dict[str, dict] = {}
    for path in sorted(out_dir.glob("failures*.csv"), key=lambda p: p.stat().st_mtime_ns, reverse=True):
        with open(path, newline="") as handle:
            for entry in csv.DictReader(handle):
                record = finished_record(out_dir / entry["name"])
                if entry["name"] in merged or (record and record.get("row_sha256") == entry.get("row_sha256")):
                    continue
                merged[entry["name"]] = entry
    return sorted(merged.values(), key=lambda e: int(e.get("line") or 0))


def _bind_local_gpu(device: str) -> None:
    """Under a launcher on a multi-GPU host, 'cuda' means this process's GPU (LOCAL_RANK)."""
    local = os.environ.get("LOCAL_RANK")
    if local is None or device == "cpu":
        return
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(local) % torch.cuda.device_count())


def failures_over_ranks(local: int, world_size: int) -> Optional[int]:
    """Sum of every rank's failure count, once all ranks are done (None when not under a launcher).

    Why: torchrun and accelerate stop the other ranks as soon as one exits non-zero, so a rank with a failed
    row must not exit 1 while others still work.  Every rank waits here for the slowest, then all exit with
    the same code.  Only counts travel (gloo, over the launcher's rendezvous); no file is shared or locked.
    """
    if world_size < 2 or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    try:
        import datetime

        import torch
        import torch.distributed as dist
    except ImportError:
        return None
    if not dist.is_initialized():  # kept until `leave_ranks`: the ranks also meet once more before exiting
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))  # waits for the slowest rank's rows
    total = torch.tensor([local], dtype=torch.int64)
    dist.all_reduce(total)
    return int(total.item())


def leave_ranks() -> None:
    """Last meeting of the ranks, after each has printed its summary: none exits (and gets the others killed
    by the launcher, when its code is non-zero) before every rank has said what it did."""
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _row_result(pipeline, volume, row: BatchRow, image_size: int):
    from .evidence import parse_anchor_spec
    from .user_input import user_anchor

    if bool(row.query) == bool(row.anchor):
        raise DataError("give either a query or an anchor in this row, not both or neither")
    if row.anchor:
        if row.box_units not in BOX_UNITS:
            raise DataError(f"box_units {row.box_units!r}: expected one of {BOX_UNITS}")
        slice_index, boxes = parse_anchor_spec(row.anchor)
        anchor = user_anchor(volume, slice_index, boxes, units=row.box_units, image_size=image_size)
        return pipeline.propagate(volume, anchor, query=row.target or None)
    return pipeline.segment(volume, row.query)


def run_batch(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    config=None,
    *,
    pipeline=None,
    fill_nonfinite: bool = False,
    modality: Optional[str] = None,
    formats: Optional[Sequence[str]] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    show_progress: bool = True,
    on_row: Optional[Callable[[BatchRow, str], None]] = None,
) -> BatchSummary:
    """Run this rank's rows of the manifest; finished rows are skipped, failures recorded, outputs whole or absent.

    `on_row(row, status)` is told 'written', 'skipped' or 'failed' for each row (for callers that log).
    """
    from tqdm import tqdm

    from .outputs import write_outputs
    from .pipeline import Pipeline, PipelineConfig
    from .readers import load_volume
    from .user_input import input_adjustments

    rows = read_manifest(manifest)
    if rank is None or world_size is None:
        rank, world_size = launcher_rank()
    pipeline = pipeline or Pipeline(config or PipelineConfig())
    config = pipeline.config
    _bind_local_gpu(config.device)
    settings = batch_settings(config, fill_nonfinite, modality, formats)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = rows_for_rank(rows, rank, world_size)
    summary = BatchSummary(rank, world_size, sum(len(g) for g in groups), failures_path=failures_path(out, rank, world_size))

    def notify(row: BatchRow, status: str) -> None:
        if on_row is not None:
            on_row(row, status)

    def fail(row: BatchRow, exc: BaseException, row_hash: str = "") -> None:
        summary.failures.append(BatchFailure(row.name, row.scan, row.line, one_line(exc), row_hash))
        _write_failures(summary.failures_path, summary.failures)  # kept current: a crash loses nothing
        notify(row, "failed")

    # What is left to do: hash each scan once, compare with each row's evidence.json.
    work: list[tuple[str, str, str, list[tuple[BatchRow, str]]]] = []
    hashes: dict[str, str] = {}  # a DICOM folder read as several series (the `series` column) is hashed once
    for group in groups:
        scan_path = group[0].scan_path
        try:
            if not scan_path:
                raise DataError("the scan column is empty")
            if scan_path == SAMPLE:
                from .sample_data import fetch_sample

                scan_path = str(fetch_sample().ct_path)
            if not Path(scan_path).exists():
                raise DataError(f"{group[0].scan}: file or folder not found")
            if scan_path not in hashes:
                hashes[scan_path] = scan_sha256(scan_path)
            scan_hash = hashes[scan_path]
        except (MedVolR1Error, OSError) as exc:
            for row in group:
                fail(row, exc, row_sha256(row, settings))
            continue
        pending = []
        for row in group:
            row_hash = row_sha256(row, settings)
            if is_finished(out / row.name, row_hash, scan_hash):
                summary.skipped += 1
                notify(row, "skipped")
            else:
                pending.append((row, row_hash))
        if pending:
            work.append((scan_path, group[0].series, scan_hash, pending))

    total = sum(len(p) for *_, p in work)
    label = "batch" if world_size == 1 else f"batch rank {rank}"
    with tqdm(total=total, desc=label, unit="row", position=rank if world_size > 1 else 0, file=sys.stderr,
              disable=not show_progress or total == 0, dynamic_ncols=True) as bar:
        for scan_path, series, scan_hash, pending in work:
            try:
                volume = load_volume(scan_path, modality=modality, fill_nonfinite=fill_nonfinite, series_uid=series or None)
            except MedVolR1Error as exc:
                for row, row_hash in pending:
                    fail(row, exc, row_hash)
                    bar.update(1)
                continue
            for row, row_hash in pending:
                bar.set_postfix_str(row.name[:40])
                try:
                    result = _row_result(pipeline, volume, row, config.image_size)
                    provenance = {
                        **pipeline.describe(),
                        "input_adjustments": input_adjustments(result),
                        "batch": {"manifest_line": row.line, "row": row.content(), "row_sha256": row_hash,
                                  "scan_sha256": scan_hash, "rank": rank, "world_size": world_size},
                    }
                    write_outputs(result, out / row.name, provenance, image_size=config.image_size, formats=formats)
                    summary.written += 1
                    notify(row, "written")
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:  # one bad row must not stop a cohort run; recorded in failures.csv
                    fail(row, exc, row_hash)
                bar.update(1)
            del volume
    _write_failures(summary.failures_path, summary.failures)
    summary.failed_all_ranks = failures_over_ranks(len(summary.failures), world_size)
    return summary
