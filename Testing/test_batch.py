"""`medvolr1 batch` on a real 3-row manifest over the sample CT (micro SAM2, random weights: wiring, not accuracy).

Two rows carry GT anchors (right kidney in rendered pixels, spleen in voxels), the third names a missing
file.  The good rows' folders are written whole, failures.csv holds the third, the two good rows share
one feature encoding of the scan, and a rerun skips them without building a propagator.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from MedVolR1Lib import batch, cli
from MedVolR1Lib.batch import BatchRow, read_failures, read_manifest, rows_for_rank, run_batch
from MedVolR1Lib.errors import DataError
from MedVolR1Lib.pipeline import Pipeline, PipelineConfig
from MedVolR1Lib.targets import profile_target
from MedVolR1Lib.views import ViewGeometry

KIDNEY_RIGHT, SPLEEN = 2, 1


@pytest.fixture(scope="module")
def micro_config(micro_sam2):
    path, overrides = micro_sam2
    return PipelineConfig(propagator="medsam2", sam_checkpoint=str(path), sam_overrides=overrides, device="cpu")


def _spec(k, boxes) -> str:
    return f"{k}:" + ";".join(",".join(f"{v:.3f}" for v in box) for box in boxes)


@pytest.fixture()
def manifest(tmp_path, sample_ct, sample_volume, sample_labels):
    kidney = profile_target(sample_labels == KIDNEY_RIGHT, "kidney_right")
    spleen = profile_target(sample_labels == SPLEEN, "spleen")
    geometry = ViewGeometry.for_volume(sample_volume, 448)
    kidney_px = [geometry.to_pixel_box(b) for b in kidney.boxes(kidney.key_slice)]
    spleen_vox = [b.as_list() for b in spleen.boxes(spleen.key_slice)]
    path = tmp_path / "cases.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "scan", "anchor", "box_units", "target"])
        writer.writerow(["kidney", str(sample_ct.ct_path), _spec(kidney.key_slice, kidney_px), "", "right kidney"])
        writer.writerow(["missing", "nowhere/scan.nii.gz", _spec(40, [(10, 10, 20, 20)]), "voxels", ""])
        writer.writerow(["spleen", str(sample_ct.ct_path), _spec(spleen.key_slice, spleen_vox), "voxels", "spleen"])
    return path


def test_batch_writes_good_rows_records_the_failure_and_resumes(manifest, micro_config, tmp_path, sample_volume, capsys):
    out = tmp_path / "out"
    pipeline = Pipeline(micro_config)
    first = run_batch(manifest, out, pipeline=pipeline, rank=0, world_size=1, show_progress=False)
    assert (first.written, first.skipped, len(first.failures)) == (2, 0, 1)
    # both rows on the one scan share one encoding of its slices (the per-volume feature cache)
    assert pipeline.propagator.encoded_frames == sample_volume.num_slices
    for name, target in (("kidney", "right kidney"), ("spleen", "spleen")):
        folder = out / name
        assert sorted(p.name for p in folder.iterdir()) == ["evidence.json", "evidence.png", "mask.nii.gz",
                                                                "segmentation.seg.nrrd", "statistics.csv"]
        record = json.loads((folder / "evidence.json").read_text())
        assert record["target_name"] == target
        assert record["provenance"]["batch"]["row"]["name"] == name
        assert len(record["provenance"]["batch"]["scan_sha256"]) == 64
    assert not (out / "missing").exists()
    with open(out / "failures.csv", newline="") as handle:
        failures = list(csv.DictReader(handle))
    assert [(f["name"], f["line"]) for f in failures] == [("missing", "3")]
    assert "not found" in failures[0]["error"] and "\n" not in failures[0]["error"]
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "failures.csv"}

    rerun_pipeline = Pipeline(micro_config)
    second = run_batch(manifest, out, pipeline=rerun_pipeline, rank=0, world_size=1, show_progress=False)
    assert (second.written, second.skipped, len(second.failures)) == (0, 2, 1)
    assert rerun_pipeline._propagator is None  # no model was even built: nothing propagated
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

    # the command line: same resume, exit code 1 because a row failed, the summary on stdout
    code = cli.main(["batch", "--manifest", str(manifest), "--out", str(out), "--propagator", "medsam2",
                     "--sam-checkpoint", micro_config.sam_checkpoint, "--device", "cpu",
                     *[a for o in micro_config.sam_overrides for a in ("--sam-override", o)]])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1 and (summary["written"], summary["skipped"], summary["failed"]) == (0, 2, 1)
    assert [f["name"] for f in read_failures(out)] == ["missing"]

    # a changed row (here only its segment name) no longer matches its hash, a deleted mask makes its row unfinished
    manifest.write_text(manifest.read_text().replace("right kidney", "kidney R"))
    (out / "spleen" / "mask.nii.gz").unlink()
    third = run_batch(manifest, out, pipeline=pipeline, rank=0, world_size=1, show_progress=False)
    assert (third.written, third.skipped) == (2, 0)
    assert (out / "spleen" / "mask.nii.gz").is_file()
    assert json.loads((out / "kidney" / "evidence.json").read_text())["target_name"] == "kidney R"
    assert pipeline.propagator.encoded_frames == sample_volume.num_slices  # same scan: features still cached

    # --formats reaches every row and is part of the row hash: asking for the NIfTI only redoes both rows without a .seg.nrrd
    fourth = run_batch(manifest, out, pipeline=pipeline, rank=0, world_size=1, show_progress=False, formats=("nifti",))
    assert (fourth.written, fourth.skipped) == (2, 0)
    assert (out / "kidney" / "mask.nii.gz").is_file() and not list((out / "kidney").glob("*.seg.nrrd"))


def test_ranks_split_whole_scans_and_cover_every_row_once():
    rows = [BatchRow(n + 2, f"r{n}", s, s) for n, s in enumerate("aabbbcdde")]
    shards = [rows_for_rank(rows, rank, 3) for rank in range(3)]
    names = sorted(r.name for shard in shards for group in shard for r in group)
    assert names == sorted(r.name for r in rows)
    owners = {r.scan: rank for rank, shard in enumerate(shards) for group in shard for r in group}
    assert all(owners[r.scan] == rank for rank, shard in enumerate(shards) for g in shard for r in g)
    assert sorted(sum(len(g) for g in shard) for shard in shards) == [3, 3, 3]


def test_ranked_failures_are_merged_on_read(manifest, micro_config, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    summary = run_batch(manifest, out, pipeline=Pipeline(micro_config), show_progress=False)
    assert summary.failures_path.name == "failures.rank1.csv"
    assert summary.rows == 1 and [f.name for f in summary.failures] == ["missing"]  # rank 0 holds the CT's two rows
    assert not (out / "kidney").exists()
    assert [f["name"] for f in read_failures(out)] == ["missing"]
    shutil.copy(summary.failures_path, out / "failures.csv")  # a later single-process run listed it too
    assert [f["name"] for f in read_failures(out)] == ["missing"]


def test_torchrun_splits_the_manifest_and_all_ranks_exit_together(sample_ct, micro_config, tmp_path):
    """The real launcher: 2 processes, whole scans per rank, one failure -> every rank exits 1 after its rows."""
    image = sitk.ReadImage(str(sample_ct.ct_path))[:, :, 70:82]
    for n in range(2):
        copy = sitk.Image(image)
        copy[0, 0, 0] = int(copy[0, 0, 0]) + n + 1  # two distinct scans
        sitk.WriteImage(copy, str(tmp_path / f"crop{n}.nii.gz"))
    manifest = tmp_path / "cases.csv"
    manifest.write_text('name,scan,anchor\na,crop0.nii.gz,"6:150,150,260,260"\nb,crop1.nii.gz,"6:150,150,260,260"\n'
                        'gone,missing.nii.gz,"6:150,150,260,260"\n')
    overrides = [a for o in micro_config.sam_overrides for a in ("--sam-override", o)]
    command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2", "-m",
               "MedVolR1Lib.cli", "batch", "--manifest", str(manifest), "--out", str(tmp_path / "out"),
               "--propagator", "medsam2", "--sam-checkpoint", micro_config.sam_checkpoint, "--device", "cpu", *overrides]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    summaries = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]  # one line per rank
    assert run.returncode != 0 and sorted(s["rank"] for s in summaries) == [0, 1], (run.stdout[-2000:], run.stderr[-3000:])
    assert all(s["failed_all_ranks"] == 1 and s["world_size"] == 2 for s in summaries)
    ranks = {json.loads((tmp_path / "out" / n / "evidence.json").read_text())["provenance"]["batch"]["rank"] for n in "ab"}
    assert ranks == {0, 1}  # one scan per process
    assert [f["name"] for f in read_failures(tmp_path / "out")] == ["gone"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("name,scan\na,x.nii.gz\n", "query or anchor"),
        ("name,scan,query\na,x.nii.gz,liver\na,y.nii.gz,spleen\n", "also on line 2"),
        ("name,scan,query\n../a,x.nii.gz,liver\n", "plain folder name"),
        ("name,scan,query\n", "no rows"),
    ],
)
def test_bad_manifests_are_refused_before_any_work(tmp_path, text, message):
    path = tmp_path / "m.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_manifest(path)


def test_row_errors_are_one_line(manifest, tmp_path, sample_ct):
    path = tmp_path / "m.csv"
    path.write_text(f"name,scan,query,anchor\nboth,{sample_ct.ct_path},liver,3:1,1,5,5\nbad,{sample_ct.ct_path},,3:1,1,5\n")
    out = tmp_path / "out"
    summary = run_batch(path, out, PipelineConfig(propagator="litemedsam", device="cpu"), rank=0, world_size=1, show_progress=False)
    errors = {f.name: f.error for f in summary.failures}
    assert "either a query or an anchor" in errors["both"]
    assert "not four finite numbers" in errors["bad"]
    assert sorted(p.name for p in out.iterdir()) == ["failures.csv"]
    assert batch.one_line(ValueError("two\nlines")) == "two lines"
