"""bench/device_check.sh, the one GPU check a lent H100 runs: what can be checked without a GPU.

DRY_RUN=1 prints the commands and checks that the scripts take the flags they are given; TINY=1 runs the
release-recipe GRPO bench on CPU with the tiny Qwen3-VL and micro SAM2 (one step, 8 new tokens; ~2 min here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
                   "PYTHONPATH": str(REPO), **env}
    return subprocess.run(["bash", str(REPO / "bench" / "device_check.sh")], env=environment, capture_output=True,
                          text=True, timeout=900, cwd=REPO)


def test_dry_run_names_both_checks_with_the_release_recipe(tmp_path):
    done = _run(tmp_path, DRY_RUN="1")
    out = done.stdout
    assert "bench/gpu_bench_grpo.py --family qwen3-vl --recipe Training/configs/ctorg-release.yaml" in out
    assert "== eval_sharded" in out and "flag ok: bench/gpu_bench_grpo.py --recipe" in out
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "grpo_release: dry run" in summary and "eval_sharded: dry run" in summary
    assert not (tmp_path / "work").exists()  # nothing ran
    assert done.returncode == 0 and "flag MISSING" not in out and "flag ok: Training/evaluate.py --merge" in out


def test_tiny_grpo_release_bench_reports_tokens_per_second_and_step_time(tmp_path):
    done = _run(tmp_path, TINY="1", BENCHES="grpo_release")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "grpo_release.json").read_text())
    assert result["settings"]["rewards"]["reward_mode"] == "release" and result["settings"]["learning_rate"] == 1e-6
    assert list(result["reward_functions"]) == ["release_format_reward", "release_time_reward", "release_space_reward",
                                                "release_consistency_reward"]
    assert result["grpo"]["generation_tokens_per_s"] > 0 and result["grpo"]["first_step_s"]["step_total"] > 0
    assert "visual" in result["settings"]["lora_target_regex"]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert summary.startswith("grpo_release: ok") and "SUMMARY grpo:" in summary and "generated tokens/s" in summary


def test_tiny_sharded_evaluation_merges_two_shards(tmp_path):
    done = _run(tmp_path, TINY="1", BENCHES="eval_sharded")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "out" / "eval_sharded" / "results.csv").exists()
