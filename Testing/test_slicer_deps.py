"""Which packages the Slicer module asks to install, and the Python-version guard (Slicer 5.6/5.8 embed Python 3.9)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedVolR1"))

from MedVolR1SlicerGlue import deps  # noqa: E402
from MedVolR1Lib.propagation.factory import resolve_propagator_name  # noqa: E402


@pytest.mark.parametrize("propagator,checkpoint", [("auto", ""), ("auto", "/x/MedSAM2.pt"), ("litemedsam", "/x.pt"), ("medsam2", "/x.pt")])
def test_sam2_is_wanted_exactly_when_the_core_could_pick_medsam2(propagator, checkpoint):
    could_pick = resolve_propagator_name(propagator, checkpoint or None, device="cuda") == "medsam2"
    assert deps.needs_sam2(propagator, checkpoint) == could_pick


def test_missing_sam2_on_python_39_is_a_clear_error_not_a_failed_pip_run(monkeypatch):
    monkeypatch.setattr(deps, "is_installed", lambda r: r.import_name != "sam2")
    assert deps.missing_requirements("litemedsam", "", python_version=(3, 9)) == []
    with pytest.raises(deps.UnsupportedPython, match=r"sam2 .*Python >= 3\.10.*3\.9"):
        deps.missing_requirements("medsam2", "/x.pt", python_version=(3, 9))
    assert deps.missing_requirements("medsam2", "/x.pt", python_version=(3, 12)) == [deps.SAM2]


def test_torch_bounds_cover_sam2_requirements():
    from importlib.metadata import requires

    declared = {r.split(">=")[0].strip(): r.split(">=")[1].split(";")[0].strip() for r in requires("sam2") if ">=" in r}
    assert deps.TORCH_VERSION_REQUIREMENT == ">=" + declared["torch"]
    assert deps.TORCHVISION_VERSION_REQUIREMENT == ">=" + declared["torchvision"]
