"""The local model worker: started with a chosen Python, kept warm across requests, killed to cancel.

`WorkerClient.start(volume, request)` returns a `Job` (jobs.py).  The volume is sent once per worker;
after a crash or a kill the next request starts a fresh worker and sends it again.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from ..volume import Volume
from . import protocol as p
from .framing import Frame, FrameReader
from .jobs import Job, Transport, run_blocking

_CHUNK = 1 << 20
_SELECT_WORKS_ON_PIPES = os.name != "nt"  # Windows: non-blocking pipes (Python >= 3.12) polled with short sleeps
LIBRARY_ROOT = Path(__file__).resolve().parents[2]  # the folder holding MedVolR1Lib, put on the worker's path


def default_python(configured: str = "") -> str:
    """The configured interpreter, else Slicer's `PythonSlicer` (sets Slicer's environment), else this Python."""
    if configured.strip():
        return configured.strip()
    return shutil.which("PythonSlicer") or sys.executable


class PipeTransport(Transport):
    """Non-blocking stdin/stdout pipes of the worker process (select() on POSIX, short sleeps on Windows)."""

    def __init__(self, process: subprocess.Popen, log_path: str) -> None:
        self.process, self.log_path = process, log_path
        self._w, self._r = process.stdin.fileno(), process.stdout.fileno()
        os.set_blocking(self._w, False)
        os.set_blocking(self._r, False)
        self._out = bytearray()
        self._reader = FrameReader()
        self.closed = False

    def send(self, payload: bytes) -> None:
        self._out += payload

    def pump(self, max_wait: float, *, block: bool) -> tuple[list[Frame], bool]:
        frames: list[Frame] = []
        deadline = time.monotonic() + max_wait
        wait = 0.0
        while not self.closed:
            if _SELECT_WORKS_ON_PIPES:
                readable, writable, _ = select.select([self._r], [self._w] if self._out else [], [], wait)
            else:
                time.sleep(min(wait, 0.005))
                readable, writable = [self._r], [self._w] if self._out else []
            moved = False
            if writable:
                try:
                    written = os.write(self._w, self._out[:_CHUNK])
                    del self._out[:written]
                    moved = True
                except BlockingIOError:
                    pass
                except (BrokenPipeError, OSError):
                    self.closed = True
            if readable:
                try:
                    data = os.read(self._r, 4 * _CHUNK)
                except BlockingIOError:
                    data = None
                if data == b"":
                    self.closed = True
                elif data:
                    frames.extend(self._reader.feed(data))
                    moved = True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if moved:
                wait = 0.0
            elif self._out or self._reader.partial or (block and not frames):
                wait = min(remaining, 0.01 if not block else remaining)
            else:
                break
        return frames, self.closed

    def abort(self) -> None:
        self.closed = True
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def closed_error(self) -> BaseException:
        code = self.process.wait()
        return p.WorkerCrashed(
            f"the model worker stopped unexpectedly (exit code {code}{_last_line(self.log_path)}); the scene was not "
            f"changed and the next run starts a new worker (log: {self.log_path})",
            "WorkerCrashed",
        )


def _last_line(path: str) -> str:
    try:
        lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return f": {lines[-1][:200]}" if lines else ""


class ServiceClient:
    """What the local worker and the remote server share: send a volume once, retry with it when it was dropped."""

    def __init__(self) -> None:
        self._opened: set[str] = set()

    @property
    def alive(self) -> bool:
        return True

    def _open(self, payload: bytes) -> Transport:
        raise NotImplementedError

    def kill(self) -> None:
        self._opened.clear()

    def close(self) -> None:
        self.kill()

    def start(self, volume: Optional[Volume], request, name: str = "job") -> Job:
        if volume is None:
            attempts = [[request]]
        elif volume.fingerprint in self._opened and self.alive:
            attempts = [[request], [p.OpenVolume.of(volume), request]]
        else:
            attempts = [[p.OpenVolume.of(volume), request]]
        return Job(attempts, self._open, self._bookkeep, name=name)

    def call(self, volume: Optional[Volume], request, timeout: Optional[float] = None):
        return run_blocking(self.start(volume, request, name=type(request).__name__), timeout)

    def _bookkeep(self, request, reply) -> None:
        if isinstance(reply, p.VolumeOpened):
            self._opened.add(reply.volume_id)
        elif isinstance(reply, p.ErrorReply) and reply.error_class == "UnknownVolume":
            self._opened.discard(getattr(request, "volume_id", ""))


class WorkerClient(ServiceClient):
    """One warm worker process; one job at a time."""

    def __init__(self, python: str = "", *, log_dir: Optional[str] = None) -> None:
        super().__init__()
        self.python = default_python(python)
        self._log_dir = log_dir or tempfile.gettempdir()
        self._transport: Optional[PipeTransport] = None
        self.starts = 0  # worker processes started (tests: one warm worker serves many requests)

    @property
    def pid(self) -> Optional[int]:
        return self._transport.process.pid if self.alive else None

    @property
    def alive(self) -> bool:
        return self._transport is not None and not self._transport.closed and self._transport.process.poll() is None

    def kill(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        self._transport = None
        self._opened.clear()

    def close(self) -> None:
        """Let the worker exit on end-of-input; kill it if it does not within a few seconds."""
        if self._transport is None:
            return
        try:
            self._transport.process.stdin.close()
            self._transport.process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()

    # ------------------------------------------------------------------------------------------- internals
    def _open(self, payload: bytes) -> PipeTransport:
        if not self.alive:
            self.kill()
            self._spawn()
        self._transport.send(payload)
        return self._transport

    def _spawn(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(LIBRARY_ROOT), env.get("PYTHONPATH", "")]))
        log = tempfile.NamedTemporaryFile(prefix="medvolr1-worker-", suffix=".log", dir=self._log_dir, delete=False)
        try:
            process = subprocess.Popen(
                [self.python, "-m", "MedVolR1Lib.service.worker"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, bufsize=0,
            )
        except OSError as exc:
            raise p.ServiceError(f"cannot start the model worker with {self.python}: {exc.strerror or exc}", "WorkerStartError") from None
        finally:
            log.close()
        self._transport = PipeTransport(process, log.name)
        self.starts += 1

    def __del__(self) -> None:
        try:
            self.kill()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
