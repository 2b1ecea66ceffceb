"""`python -m MedVolR1Lib.service.worker`: the model worker process the Slicer module starts and keeps warm.

Reads request frames on stdin, writes progress and reply frames on stdout, one request at a time, until
stdin closes.  Between requests it pre-encodes the volume the panel is showing (engine.background_step), one
slice at a time, checking for a request after each.  The real stdout is kept for frames only; anything a
library prints goes to stderr.
Heavy imports (torch, transformers) happen on the first model request or background step, after a request
is read, so the client never blocks writing to a worker that is still starting.
"""

from __future__ import annotations

import os
import select
import sys
import time
from typing import BinaryIO, Optional


def _frame_output() -> BinaryIO:
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # C-level and Python prints land in stderr, never inside a frame
    sys.stdout = sys.stderr
    return out


def _write(out: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = out.write(view)
        view = view[written:]


class _ThrottledProgress:
    """Progress frames at most every `interval` seconds (plus the last one), so a chatty model does not flood the pipe."""

    def __init__(self, out: BinaryIO, interval: float = 0.05) -> None:
        self._out, self._interval, self._last = out, interval, 0.0

    def __call__(self, fraction: float, message: str) -> None:
        from .protocol import Progress, to_frame

        now = time.monotonic()
        if now - self._last >= self._interval or fraction >= 1.0:
            self._last = now
            _write(self._out, to_frame(Progress(float(fraction), str(message))))


def _read_now(inp: int) -> Optional[bytes]:
    """The bytes waiting on `inp` (b"" at end of input), or None when nothing is there yet; never blocks."""
    try:
        readable, _, _ = select.select([inp], [], [], 0)
    except (OSError, ValueError):  # Windows: select() takes sockets only; read the pipe non-blocking instead
        os.set_blocking(inp, False)
        try:
            return os.read(inp, 1 << 20)
        except BlockingIOError:
            return None
        finally:
            os.set_blocking(inp, True)
    return os.read(inp, 1 << 20) if readable else None


def serve_pipes(inp: int, out: BinaryIO, engine=None) -> int:
    """Answer requests in order; between them, while the engine has background work (pre-encoding), do it one
    slice at a time and look for a request after each slice, so a request waits for at most one slice."""
    from .engine import Engine
    from .framing import FrameReader, ProtocolError
    from .protocol import REQUESTS, error_reply, from_frame, to_frame

    engine = engine if engine is not None else Engine(background=True)
    reader = FrameReader()
    progress = _ThrottledProgress(out)
    while True:
        if engine.background_pending() and not reader.partial:  # a half-read frame: its rest is on the way
            data = _read_now(inp)
            if data is None:
                engine.background_step()
                continue
        else:
            data = os.read(inp, 1 << 20)
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


def main() -> int:
    out = _frame_output()
    return serve_pipes(sys.stdin.fileno(), out)


if __name__ == "__main__":
    sys.exit(main())
