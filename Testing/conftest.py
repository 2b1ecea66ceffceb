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
    from MedVolR1Lib.volume import load_volume

    return load_volume(sample_ct.ct_path)


@pytest.fixture(scope="session")
def sample_labels(sample_ct, sample_volume):
    from MedVolR1Lib.volume import load_label_map

    return load_label_map(sample_ct.labels_path, sample_volume)
