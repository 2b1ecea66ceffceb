"""Tell the model worker which volume and slice the user is reading, so it encodes slices in the background
(the first Segment then mostly decodes), and keep its readiness line ("40 of 112 slices ready") for the panel.

Quiet by design: it starts a request only when no run is in flight (a worker answers one request at a
time), ignores its own failures, and shows nothing for a server or a propagator that encodes on request
only.  Slice changes are debounced (a scroll is one request, sent when it settles).  The readiness is asked
again every few seconds while the worker is still encoding.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from MedVolR1Lib.errors import MedVolR1Error
from MedVolR1Lib.service import protocol as proto
from MedVolR1Lib.volume import Volume

from . import mrml_mapping as mm
from .settings import PanelSettings

SLICE_DEBOUNCE_MS = 300
STATUS_EVERY_S = 2.0
QUIET_STATES = ("off", "unsupported")


class BackgroundEncoding:
    """Follows the panel's input volume and the Red view's slice for one EvidenceSession (same model runner).

    timer: single-shot with `start(delay_ms, callback)` / `stop()` (a qt.QTimer adapter; tests fire it by hand).
    """

    def __init__(self, session, timer, *, delay_ms: int = SLICE_DEBOUNCE_MS, status_every_s: float = STATUS_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.session = session
        self._timer = timer
        self._delay_ms = delay_ms
        self._status_every = status_every_s
        self._clock = clock
        self._node: Any = None
        self._volume: Optional[Volume] = None
        self._volume_key: Optional[tuple] = None
        self._settings = PanelSettings()
        self._wanted: Optional[int] = None  # slice to send once the debounce fires (-1: readiness only)
        self._due = False
        self._job = None
        self._asked_at = float("-inf")
        self._paused = False
        self.status: Optional[proto.PreEncodeStatus] = None
        self.requests: list = []  # what was sent (tests check the slices)
        self.last_error: Optional[BaseException] = None

    # ---------------------------------------------------------------------------------------------- panel API
    def select(self, volume_node, settings: PanelSettings, slice_node=None) -> None:
        """The input volume (or the settings) changed: open it in the worker and start encoding at once, centred
        on the slice `slice_node` (the Red view) shows, else on the body's middle."""
        self._paused = False
        self._settings = settings
        if volume_node is not self._node:
            self._node, self.status = volume_node, None
        if volume_node is None:
            return
        volume = self._current_volume()
        shown = mm.slice_index_of_view(slice_node, volume) if slice_node is not None and volume is not None else -1
        self._wanted, self._due = shown, True
        self.poll()

    def slice_changed(self, slice_node) -> None:
        """The Red view moved (ModifiedEvent of its slice node): send its slice when the scrolling settles."""
        volume = self._current_volume()
        if volume is None or slice_node is None:
            return
        self._wanted = mm.slice_index_of_view(slice_node, volume)
        self._timer.start(self._delay_ms, self._debounced)

    def stop(self) -> None:
        """Cancel pressed: the worker was stopped with the run; nothing is sent until `resume` or `select`."""
        self._paused, self._due = True, False
        self._timer.stop()
        if self.status is not None:
            self.status = proto.PreEncodeStatus(self.status.volume_id, self.status.ready, self.status.total, "stopped")

    def resume(self) -> None:
        """A run finished: the worker is up again, so the background work may go on."""
        if self._paused and self._node is not None:
            self._paused, self._due = False, True

    def close(self) -> None:
        """The volume was closed (node removed, scene closed): the worker stops encoding it and frees it."""
        volume, self._node, self._volume, self._volume_key, self.status = self._volume, None, None, None, None
        self._timer.stop()
        self._due = False
        if volume is not None and not self.session.busy and not self._remote():
            self.finish()
            if self.session.runner.client(self._settings).alive:  # no worker, nothing to close: none is started
                self._send(None, proto.CloseVolume(volume.fingerprint))

    def finish(self, timeout: float = 120.0) -> None:
        """Wait for a request under way (the worker answers it after at most one slice; the first one also carries
        the volume).  The session calls this before starting a run on the same worker."""
        if self._job is not None:
            self._job.wait(timeout)
            self._collect()

    def poll(self) -> str:
        """Call often on the GUI thread (never blocks); returns the readiness line to show ("" for none)."""
        self._collect()
        if self._job is None and self._node is not None and not self._paused and not self.session.busy:
            refresh = self.status is not None and self.status.state == "encoding" and \
                self._clock() - self._asked_at >= self._status_every
            if self._due or refresh:
                self._ask(self._wanted if self._due else -1)
        return self.text

    @property
    def text(self) -> str:
        if self.status is None or self.status.state in QUIET_STATES:
            return ""
        return "Pre-encoding: " + self.status.text

    # ----------------------------------------------------------------------------------------------- internals
    def _debounced(self) -> None:
        self._due = True
        self.poll()

    def _remote(self) -> bool:
        return bool(self._settings.server_url.strip())

    def _current_volume(self) -> Optional[Volume]:
        """The input node as a Volume, rebuilt only when its voxels or geometry changed (fingerprinting is costly)."""
        node = self._node
        if node is None or node.GetImageData() is None:
            return None
        key = (node.GetID(), node.GetImageData().GetMTime(), tuple(mm.ijk_to_ras_of(node).ravel()))
        if key != self._volume_key:
            try:
                self._volume = mm.volume_from_node(node)
            except MedVolR1Error as exc:
                self._volume, self.last_error = None, exc
            self._volume_key = key
        return self._volume

    def _ask(self, slice_index: Optional[int]) -> None:
        self._due = False
        if self._remote():  # a server encodes on request; asking it on every scroll would only cost round trips
            return
        volume = self._current_volume()
        if volume is None:
            return
        slice_index = -1 if slice_index is None else int(slice_index)
        self._asked_at = self._clock()
        self._send(volume, proto.PreEncode(volume.fingerprint, slice_index, self.session._config(self._settings)))

    def _send(self, volume: Optional[Volume], request) -> None:
        try:
            self._job = self.session.runner.start(self._settings, volume, request, "pre-encoding")
            self.requests.append(request)
        except Exception as exc:  # noqa: BLE001 - the worker cannot start: the run itself will say why, loudly
            self._job, self.last_error = None, exc

    def _collect(self) -> None:
        if self._job is None:
            return
        state = self._job.poll()
        if not state.done:
            return
        self._job = None
        if isinstance(state.result, proto.PreEncodeStatus):
            self.status = state.result
        elif state.error is not None:
            self.last_error = state.error
