"""Evaluation that cannot flatter: GT-fixed scoring window, no empty-vs-empty Dice 1, unseen test volumes.

The wrong-slice case runs the real LiteMedSAM on the real sample CT: the review found that an anchor on a
slice without the target and a 1-px box scored Dice 1.0 / NSD 1.0 when the window followed the answer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def liver(tmp_path_factory):
    from MedVolR1Lib.propagation.factory import build_propagator
    from MedVolR1Lib.training.prepare import PrepareConfig, build_records
    from MedVolR1Lib.training.records import write_records
    from MedVolR1Lib.training.store import CaseSource, VolumeStore, load_case, write_cases

    folder = tmp_path_factory.mktemp("eval_liver")
    source = CaseSource("sample_ct", "sample_ct", dataset="sample")
    report = build_records(load_case(source), PrepareConfig(targets=("liver",), num_views=4, image_size=112, max_queries_per_target=1))
    write_cases(folder / "cases.json", [source])
    write_records(folder / "train.jsonl", report.records)
    store = VolumeStore.from_dir(folder, propagator_factory=lambda: build_propagator("litemedsam"))
    return report.records[0], store, folder


@pytest.mark.parametrize("window", [1, 8])
def test_wrong_slice_one_pixel_box_scores_zero(liver, window):
    from MedVolR1Lib.anchor import EvidenceAnchor, VoxelBox
    from MedVolR1Lib.training.evaluate import mask_scores

    record, store, _ = liver
    volume = store.volume(record.case_id)
    areas = np.asarray(record.areas)
    empty = np.flatnonzero(areas == 0)
    k = int(empty[np.argmax(np.abs(empty - record.gt_slice))])  # the target-free slice farthest from the key slice
    assert areas[k] == 0 and abs(k - record.gt_slice) > window
    rows, cols = volume.array.shape[1:]
    anchor = EvidenceAnchor(k, (VoxelBox.from_voxels(cols // 2, rows // 2, cols // 2, rows // 2),))
    scores = mask_scores(store, record, anchor, window, 2.0)
    assert scores["dice"] == 0.0 and scores["nsd"] == 0.0 and scores["iou"] == 0.0
    oracle = mask_scores(store, record, EvidenceAnchor(record.gt_slice, tuple(
        VoxelBox(*b) for b in (_voxel(record, box) for box in record.gt_boxes))), window, 2.0)
    assert oracle["dice"] > 0.5  # the same slices score a right answer well: the zero is not an empty scorer


def _voxel(record, pixel_box):
    from MedVolR1Lib.training.evaluate import _geometry

    return _geometry(record).to_voxel_box(pixel_box).as_list()


def test_scored_slices_are_fixed_by_the_ground_truth(liver):
    from MedVolR1Lib.training.evaluate import scored_slices

    record, store, _ = liver
    n = store.volume(record.case_id).num_slices
    assert scored_slices(record, n, 3) == (max(0, record.gt_slice - 3), min(n - 1, record.gt_slice + 3))
    assert scored_slices(record, n, -1) == (0, n - 1)


def test_evaluation_refuses_test_volumes_seen_in_training(liver, tmp_path):
    from MedVolR1Lib.errors import DataError
    from MedVolR1Lib.training.evaluate import EvalArguments, evaluate
    from MedVolR1Lib.training.records import read_records, write_records

    record, _, folder = liver
    write_records(tmp_path / "train.jsonl", read_records(folder / "train.jsonl"))
    write_records(tmp_path / "test.jsonl", [record])
    (tmp_path / "cases.json").write_text((folder / "cases.json").read_text())
    args = EvalArguments(eval_data_dir=str(tmp_path), propagator="none", report_dir=str(tmp_path / "eval"))
    with pytest.raises(DataError, match="sample_ct"):
        evaluate(args, runners=[])
    args.allow_seen_volumes = True
    summary = evaluate(args, runners=[])
    assert summary["seen_volumes"] == ["sample_ct"]
    assert (tmp_path / "eval" / "report.md").read_text().splitlines()[2].startswith("**Test volumes seen in training: sample_ct")


def test_prepare_leaves_training_volumes_out_of_the_test_split(tmp_path):
    from MedVolR1Lib.training.prepare import PrepareArguments, exclude_seen_volumes, prepare_dataset
    from MedVolR1Lib.training.store import CaseSource

    a, b = CaseSource("a", "m3d", dataset="0003"), CaseSource("b", "m3d", dataset="0003")
    kept, skipped = exclude_seen_volumes([(a, "train", False), (a, "test", False), (b, "test", False)], allow=False)
    assert [(s.case_id, split) for s, split, _ in kept] == [("a", "train"), ("b", "test")] and skipped[0]["case"] == "a"
    summary = prepare_dataset(PrepareArguments(out_dir=str(tmp_path), targets="spleen", num_views=4, image_size=56))
    assert summary["records"]["train"] > 0 and summary["records"]["test"] == 0
    assert (tmp_path / "test.jsonl").read_text() == ""
    assert any(s["reason"] == "training volume left out of the test split" for s in json.loads((tmp_path / "report.json").read_text())["skipped"])


def test_report_has_table1_layout_with_dsc_iou_cells_and_nsd():
    from MedVolR1Lib.training.evaluate import summarise, table1

    rows = [{"method": m, "record": f"r{n}", "dataset": d, "target": "liver", "dice": dice, "iou": dice / 2, "nsd": dice}
            for n, (m, d, dice) in enumerate([("sft", "0003", 0.8), ("sft", "0012", 0.6), ("oracle", "0003", 1.0), ("oracle", "0012", 0.9)])]
    lines = table1(summarise(rows, ["sft", "oracle"]), lambda e: f"{100 * e['dice']:.2f} ({100 * e['iou']:.2f})")
    assert lines[0] == "| method | AbdomenCT-1K (0003) | CT-ORG (0012) | all records |"
    assert lines[2] == "| sft | 80.00 (40.00) | 60.00 (30.00) | 70.00 (35.00) |"
    assert lines[3].startswith("| oracle | 100.00 (50.00) |")


# ---------------------------------------------------------------------------------------------- sharding

def _m3d_cases(root, cases, shape=(32, 32, 12), seed=0):
    """M3D-Seg layout (AbdomenCT-1K code 0003, built-in label table): a liver block and two kidney blocks per case."""
    from scipy import sparse

    rng = np.random.default_rng(seed)
    meta = {"train": [], "test": []}
    for n, (case, split) in enumerate(cases):
        x, y, z = shape
        image = rng.normal(-2.0, 0.1, size=shape).astype(np.float32)
        image[1 : x - 1, 1 : y - 3] += 2.0
        onehot = np.zeros((4, *shape), dtype=bool)
        onehot[0, 4 + n : 14 + n, 4:14, 2:9] = True  # liver
        onehot[1, 4:9, 18:24, 3 + n % 3 : 8 + n % 3] = True  # kidney, one side
        onehot[1, 22:27, 18:24, 3:8] = True  # kidney, other side
        image[onehot[0]] = 1.5
        image[onehot[1]] = 2.5
        folder = root / "0003" / case
        folder.mkdir(parents=True)
        np.save(folder / "image.npy", image[None])
        grid = ", ".join(str(v) for v in shape)
        sparse.save_npz(folder / f"mask_(4, {grid}).npz", sparse.csr_matrix(onehot.reshape(4, -1).astype(np.float64)))
        meta[split].append({"image": f"0003/{case}/image.npy", "label": f"0003/{case}/mask_(4, {grid}).npz"})
    (root / "0003" / "0003.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def sharded_data(tmp_path_factory):
    """Prepared test split of three M3D-Seg cases (NSD in voxels) and a raw CT-ORG NIfTI case (NSD in mm)."""
    from test_release_data import write_ctorg_case

    from MedVolR1Lib.training.prepare import PrepareArguments, prepare_dataset

    root = tmp_path_factory.mktemp("shard_m3d")
    _m3d_cases(root, [("c1", "train"), ("c2", "test"), ("c3", "test"), ("c4", "test")])
    raw = tmp_path_factory.mktemp("shard_ctorg")
    write_ctorg_case(raw, 5)
    (raw / "split.json").write_text(json.dumps({"train": [], "test": [5]}))
    out = tmp_path_factory.mktemp("shard_data")
    prepare_dataset(PrepareArguments(out_dir=str(out), sample_ct=False, allow_seen_volumes=True, m3d_root=str(root), m3d_datasets="0003",
                                     ctorg_nifti_root=str(raw), ctorg_split_file=str(raw / "split.json"), ctorg_size=56,
                                     targets="liver,kidneys", num_views=4, image_size=56, max_queries_per_target=1))
    return out


def _eval_args(data, report, **kw):
    from MedVolR1Lib.training.evaluate import EvalArguments

    settings = {"propagator": "litemedsam", "eval_window": 1, "allow_seen_volumes": True, "eval_threads": 1, **kw}
    return EvalArguments(eval_data_dir=str(data), report_dir=str(report), **settings)


def test_two_torchrun_shards_merge_into_the_one_process_table(sharded_data, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from MedVolR1Lib.training.evaluate import evaluate

    one = tmp_path / "one"
    single = evaluate(_eval_args(sharded_data, one), runners=[])
    assert {e["nsd_unit"] for e in single["table"] if e["dataset"] != "all"} == {"mm", "voxels"}
    two = tmp_path / "two"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(repo / "Training" / "evaluate.py"),
           "--eval_data_dir", str(sharded_data), "--report_dir", str(two), "--propagator", "litemedsam", "--eval_window", "1",
           "--allow_seen_volumes", "true", "--eval_threads", "1", "--checkpoints", ""]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = sorted((two / "shards").glob("shard-*.json"))
    assert len(shards) == 2 and all(json.loads(p.read_text())["rows"] for p in shards)  # both ranks scored records
    assert all(json.loads(p.read_text())["run_id"] for p in shards)
    for name in ("results.csv", "per_record.csv"):
        assert (two / name).read_text() == (one / name).read_text(), name
    report = (two / "report.md").read_text()
    assert "AbdomenCT-1K (0003) [voxels]" in report and "CT-ORG (raw HU, WC40/WW400, 512 px) [mm]" in report


def test_merge_by_hand_and_its_refusals(sharded_data, tmp_path):
    from MedVolR1Lib.errors import DataError
    from MedVolR1Lib.training.evaluate import evaluate, merge_shards, shard_of, shard_path, parse_shard

    one = tmp_path / "one"
    evaluate(_eval_args(sharded_data, one, propagator="none"), runners=[])
    hand = tmp_path / "hand"
    parts = [evaluate(_eval_args(sharded_data, hand, propagator="none", shard=f"{i}/3"), runners=[], environ={}) for i in range(3)]
    assert all("merge" in p for p in parts)  # no launcher: every shard, rank 0 included, leaves the merge to the user
    assert not (hand / "results.csv").exists()
    merged = evaluate(_eval_args(sharded_data, tmp_path / "elsewhere", merge=str(hand)), runners=[])
    assert merged["shards"] == 3
    assert (hand / "results.csv").read_text() == (one / "results.csv").read_text()
    shard_path(hand, 1, 3).unlink()
    with pytest.raises(DataError, match=r"shards \[1\] of 3 are missing"):
        merge_shards(hand)
    evaluate(_eval_args(sharded_data, hand, propagator="none", shard="1/3", max_records=2), runners=[], environ={})
    with pytest.raises(DataError, match="another run"):
        merge_shards(hand)
    with pytest.raises(ValueError, match="i/n"):
        parse_shard("3/3")
    assert shard_of(_eval_args(sharded_data, hand), {"RANK": "2", "WORLD_SIZE": "4"}) == (2, 4)
    assert shard_of(_eval_args(sharded_data, hand), {"RANK": "0", "WORLD_SIZE": "1"}) is None


def test_nsd_tolerance_is_in_voxels_without_a_spacing_and_in_mm_with_one():
    from MedVolR1Lib.metrics import score_masks

    gt = np.zeros((12, 12, 12), bool)
    gt[3:9, 3:9, 3:9] = True
    pred = np.roll(gt, 2, axis=2)  # surfaces 2 voxels apart along i
    voxels = score_masks(pred, gt, None, 2.0)
    fine = score_masks(pred, gt, (0.5, 0.5, 0.5), 2.0)  # 2 voxels = 1 mm: inside a 2 mm tolerance
    coarse = score_masks(pred, gt, (2.0, 2.0, 2.0), 2.0)  # 2 voxels = 4 mm: the shifted faces fall outside
    assert (voxels.unit, fine.unit, coarse.unit) == ("voxels", "mm", "mm")
    assert voxels.nsd == pytest.approx(1.0) and fine.nsd == pytest.approx(1.0) and coarse.nsd < 0.9
