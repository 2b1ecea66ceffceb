"""Shared pytest fixtures. Each helper module appends its own fixtures below; keep them session-scoped and cheap."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def sample_ct():
    """The real sample CT (TotalSegmentator example), fetched once into the user cache."""
    from MedVolR1Lib.sample_data import fetch_sample

    return fetch_sample()


@pytest.fixture(scope="session")
def sample_volume(sample_ct):
    from MedVolR1Lib.readers import load_volume

    return load_volume(sample_ct.ct_path)


@pytest.fixture(scope="session")
def sample_labels(sample_ct, sample_volume):
    from MedVolR1Lib.readers import load_label_map

    return load_label_map(sample_ct.labels_path, sample_volume)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """The offline tiny Qwen2.5-VL checkpoint folder (random weights), built once per session."""
    from MedVolR1Lib.fixtures.tiny_qwen import build_tiny_qwen

    return build_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen") / "model")


@pytest.fixture(scope="session")
def tiny_lora_dir(tiny_qwen_dir, tmp_path_factory):
    """A PEFT LoRA adapter for the tiny Qwen (non-zero B, so it changes outputs)."""
    from MedVolR1Lib.fixtures.tiny_qwen import build_tiny_lora_adapter

    return build_tiny_lora_adapter(tiny_qwen_dir, tmp_path_factory.mktemp("tiny_lora") / "adapter")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    """The offline tiny Qwen3-VL checkpoint folder (random weights), built once per session through the CLI."""
    from MedVolR1Lib.cli import main

    folder = tmp_path_factory.mktemp("tiny_qwen3") / "model"
    assert main(["make-tiny-model", "--family", "qwen3-vl", "--out", str(folder)]) == 0
    return folder


@pytest.fixture(scope="session")
def micro_sam2(tmp_path_factory):
    """A micro SAM2 saved as MedSAM2 checkpoints are ({"model": state_dict}) and its hydra overrides; built once."""
    pytest.importorskip("sam2")
    from MedVolR1Lib.fixtures.micro_sam2 import build_micro_sam2_checkpoint

    path = tmp_path_factory.mktemp("sam2") / "micro.pt"
    return path, tuple(build_micro_sam2_checkpoint(path))
