"""Turn user drags of evidence ROIs into one re-propagation request each, without Qt.

A drag ends with PointEndInteractionEvent; geometry set from code fires only ModifiedEvent, so
observing the former alone means our own ROI updates can never re-trigger a run.  A click on a handle
that does not move it also ends an interaction: the ROI's geometry at PointStartInteractionEvent is
kept and an end with the same geometry is ignored, so a click triggers nothing.  Several end events
in a short burst (resizing two handles, moving two boxes) are merged by a single-shot timer; the
timer is injected so Slicer passes a qt.QTimer and tests a manual one.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence

import numpy as np


class SingleShotTimer(Protocol):
    def start(self, delay_ms: int, callback: Callable[[], None]) -> None:
        """(Re)start: `callback` runs once, `delay_ms` after the last start."""

    def stop(self) -> None:
        ...


class RoiEditWatcher:
    """Observes PointEndInteractionEvent on a set of ROI nodes and calls `on_edit(last_edited_roi)` once per burst."""

    def __init__(self, on_edit: Callable[[object], None], timer: SingleShotTimer, delay_ms: int = 400) -> None:
        self._on_edit = on_edit
        self._timer = timer
        self._delay_ms = int(delay_ms)
        self._observations: list[tuple[object, int]] = []
        self._pending: Optional[object] = None
        self._at_start: dict[int, tuple] = {}  # id(roi) -> geometry when the interaction started
        self.enabled = True

    @property
    def watched(self) -> list:
        return list(dict.fromkeys(node for node, _ in self._observations))

    def watch(self, rois: Sequence) -> None:
        """Replace the watched set (e.g. after 'Find evidence' placed new ROIs)."""
        self.clear()
        for roi in rois:
            self.add(roi)

    def add(self, roi) -> None:
        """Watch one more ROI (a box the user just added), keeping the others."""
        if roi in self.watched:
            return
        for event, handler in ((roi.PointStartInteractionEvent, self._on_interaction_start), (roi.PointEndInteractionEvent, self._on_interaction_end)):
            self._observations.append((roi, roi.AddObserver(event, handler)))

    def clear(self) -> None:
        for roi, tag in self._observations:
            roi.RemoveObserver(tag)
        self._observations = []
        self._pending = None
        self._at_start = {}
        self._timer.stop()

    def _on_interaction_start(self, caller, _event=None) -> None:
        self._at_start[id(caller)] = _geometry(caller)

    def _on_interaction_end(self, caller, _event=None) -> None:
        if not self.enabled:
            return
        started = self._at_start.pop(id(caller), None)
        if started is not None and np.allclose(started, _geometry(caller), rtol=0.0, atol=1e-9):
            return  # a click on a handle without a move: nothing changed, nothing to run
        self._pending = caller
        self._timer.start(self._delay_ms, self._fire)

    def _fire(self) -> None:
        roi, self._pending = self._pending, None
        if roi is not None and self.enabled:
            self._on_edit(roi)


def _geometry(roi) -> tuple:
    """Centre and size of an ROI node, to tell a real drag from a click."""
    center = [0.0, 0.0, 0.0]
    roi.GetCenter(center)
    return (*center, *roi.GetSize())
