"""Per-target window and component settings (issue 10 item 5): one mapping for views and propagators."""

from __future__ import annotations

import numpy as np
import pytest

from MedVolR1Lib.targets import keeps_largest_component, propagation_settings
from MedVolR1Lib.windowing import resolve_window, window_for_target

pytestmark = pytest.mark.filterwarnings("ignore:cannot import name '_C'")


@pytest.mark.parametrize(
    "target, preset",
    [
        ("lungs", "lung"),
        ("lung_lower_lobe_left", "lung"),
        ("lung_nodule", "lung"),
        ("trachea", "lung"),
        ("vertebrae_L3", "bone"),
        ("rib_left_3", "bone"),
        ("sacrum", "bone"),
        ("hip_right", "bone"),
        ("hippocampus", "abdomen"),  # a whole-word rule, not a prefix of every word
        ("kidneys", "abdomen"),
        ("liver", "abdomen"),
        ("pancreas", "abdomen"),
        ("brain", "brain"),
    ],
)
def test_window_for_target(target, preset):
    assert window_for_target(target) == preset


def test_unknown_or_non_ct_keeps_the_modality_default():
    assert window_for_target(None) is None
    assert window_for_target("lungs", "MR") is None


def test_largest_component_only_for_single_connected_targets():
    assert keeps_largest_component("liver") and keeps_largest_component("kidney_right")
    assert keeps_largest_component("vertebrae_L3")
    for name in ("kidneys", "lungs", "adrenal_glands", "vertebrae", "liver_tumor", "lesion", "no_such_target", None):
        assert not keeps_largest_component(name), name
    assert propagation_settings("lungs").window == "lung" and not propagation_settings("lungs").largest_component


def test_lung_tissue_no_longer_saturates(sample_volume, sample_labels, sample_ct):
    lung_values = [v for v, name in sample_ct.label_names.items() if name.startswith("lung_")]
    lung = np.isin(sample_labels, lung_values)
    assert lung.sum() > 1000, "the sample CT has lung lobes at its top"
    hu = sample_volume.array[lung]
    abdomen = resolve_window(hu, "CT", None).apply(hu)  # what every target got before
    own = resolve_window(hu, "CT", window_for_target("lungs")).apply(hu)
    assert (abdomen == 0).mean() > 0.9  # black
    assert ((own == 0) | (own == 1)).mean() < 0.05  # lung tissue keeps its grey levels
    assert np.std(own) > 10 * np.std(abdomen)


def test_factory_uses_the_target_settings(tmp_path):
    from MedVolR1Lib.fixtures.micro_sam2 import build_micro_sam2_checkpoint
    from MedVolR1Lib.propagation.factory import build_propagator

    assert build_propagator("litemedsam", device="cpu", target="lungs").window == "lung"
    assert build_propagator("litemedsam", device="cpu", target="lungs", window="abdomen").window == "abdomen"
    path = tmp_path / "MedSAM2_micro.pt"
    overrides = build_micro_sam2_checkpoint(path, image_size=64)
    liver = build_propagator("medsam2", sam_checkpoint=str(path), device="cpu", sam_overrides=overrides, target="liver")
    kidneys = build_propagator("medsam2", sam_checkpoint=str(path), device="cpu", sam_overrides=overrides, target="kidneys")
    assert liver.largest_component and liver.window == "abdomen"
    assert not kidneys.largest_component
    plain = build_propagator("medsam2", sam_checkpoint=str(path), device="cpu", sam_overrides=overrides)
    assert plain.window is None and not plain.largest_component
