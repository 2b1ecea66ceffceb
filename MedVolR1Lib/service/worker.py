"""`python -m MedVolR1Lib.service.worker`: the model worker process the Slicer module starts and keeps warm.

Connects back to its client over loopback (loopback.py), reads request frames and writes progress and
reply frames there, one request at a time, until the client closes the connection; it also exits then in
the middle of any work.  Between requests it pre-encodes the volume the panel is showing
(engine.background_step), one slice at a time, looking for a waiting request after each slice.
stdout and stderr go to the worker's log file.  Heavy imports (torch, transformers) happen on the first
model request or background step, after the connection is made, so the client sees a start failure at once.
"""

from __future__ import annotations

import select
import sys
import time
from typing import BinaryIO, Callable, Optional


def _write(out: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = out.write(view)
        view = view[written:]


class _ThrottledProgress:
    """Progress frames at most every `interval` seconds (plus the last one), so a chatty model does not flood the connection."""

    def __init__(self, out: BinaryIO, interval: float = 0.05) -> None:
        self._out, self._interval, self._last = out, interval, 0.0

    def __call__(self, fraction: float, message: str) -> None:
        from .protocol import Progress, to_frame

        now = time.monotonic()
        if now - self._last >= self._interval or fraction >= 1.0:
            self._last = now
            _write(self._out, to_frame(Progress(float(fraction), str(message))))


def serve(read: Callable[[int], bytes], out: BinaryIO, engine=None,
          waiting: Optional[Callable[[], bool]] = None) -> int:
    """Answer requests in order until `read` returns b"" (the client closed the connection).

    Between requests, while the engine has background work (pre-encoding) and `waiting` can tell without
    blocking whether a request has arrived, do that work one slice at a time and look after each slice, so
    a request waits for at most one slice's encoding."""
    from .engine import Engine
    from .framing import FrameReader, ProtocolError
    from .protocol import REQUESTS, error_reply, from_frame, to_frame

    engine = engine if engine is not None else Engine(background=True)
    reader = FrameReader()
    progress = _ThrottledProgress(out)
    while True:
        # a half-read frame: its rest is on the way, so read it before any background work
        if waiting is not None and engine.background_pending() and not reader.partial and not waiting():
            engine.background_step()
            continue
        data = read(1 << 20)
        if not data:
            return 0
        try:
            frames = list(reader.feed(data))
        except ProtocolError as exc:  # the byte stream is out of step: say why and stop; the client starts a new worker
            _write(out, to_frame(error_reply(exc)))
            return 2
        for frame in frames:
            try:
                request = from_frame(frame, REQUESTS)
            except ProtocolError as exc:
                _write(out, to_frame(error_reply(exc)))
                continue
            _write(out, to_frame(engine.handle(request, progress)))


def readable_now(source) -> Callable[[], bool]:
    """Whether `source` (a socket; a pipe on POSIX) has bytes or end-of-input waiting, without blocking.
    select() takes sockets on every OS, which is why the worker's connection is a socket."""
    return lambda: bool(select.select([source], [], [], 0)[0])


def main() -> int:
    from .loopback import connect_back, exit_when_closed

    connection = connect_back()
    exit_when_closed(connection)
    try:
        return serve(connection.recv, connection.makefile("wb", buffering=0), waiting=readable_now(connection))
    except ConnectionError:  # the client went away mid-answer (Cancel, Slicer closed): nothing left to do
        return 0


if __name__ == "__main__":
    sys.exit(main())
