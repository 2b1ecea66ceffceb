"""The local model worker: started with a chosen Python, kept warm across requests, killed (whole tree) to cancel.

`WorkerClient.start(volume, request)` returns a `Job` (jobs.py).  The volume is sent once per worker;
after a crash or a kill the next request starts a fresh worker and sends it again.  The worker connects back
over a loopback socket (loopback.py explains why not pipes) and is started in its own process group, or on
Windows hidden and killed with its children (process_tree.py).
"""

from __future__ import annotations

import os
import select
import shutil
import socket
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
from .loopback import Rendezvous
from .process_tree import kill_tree, popen_options

_CHUNK = 1 << 20
CONNECT_TIMEOUT_S = 180.0  # the worker connects before its heavy imports; this covers a slow interpreter start
LOGS_KEPT = 10  # worker logs kept per user (one per worker start), the oldest deleted first
LIBRARY_ROOT = Path(__file__).resolve().parents[2]  # the folder holding MedVolR1Lib, put on the worker's path


def default_python(configured: str = "") -> str:
    """The configured interpreter, else Slicer's `PythonSlicer` (sets Slicer's environment), else this Python."""
    if configured.strip():
        return configured.strip()
    return shutil.which("PythonSlicer") or sys.executable


def default_log_dir() -> Path:
    """The per-user log folder (e.g. ~/.local/state/medvolr1/log, ~/Library/Logs/medvolr1, %LOCALAPPDATA%)."""
    try:
        from platformdirs import user_log_dir

        return Path(user_log_dir("medvolr1", appauthor=False))
    except ImportError:  # platformdirs is a dependency, but Slicer's Python may lack it
        return Path.home() / ".medvolr1" / "logs"


def new_log_file(log_dir: Path, keep: int = LOGS_KEPT) -> Path:
    """An empty log for one worker start; older ones beyond `keep` are deleted, so logs never pile up."""
    log_dir.mkdir(parents=True, exist_ok=True)
    old = sorted(log_dir.glob("worker-*.log"), key=lambda f: f.stat().st_mtime if f.exists() else 0.0)
    for stale in old[: max(0, len(old) - (keep - 1))]:
        try:
            stale.unlink()
        except OSError:  # in use by another Slicer's worker (Windows) or already gone
            pass
    stamp = time.strftime("%Y%m%d-%H%M%S")
    handle, name = tempfile.mkstemp(prefix=f"worker-{stamp}-", suffix=".log", dir=log_dir)
    os.close(handle)
    return Path(name)


class SocketTransport(Transport):
    """The worker's loopback connection, non-blocking and select()ed (works for sockets on every OS)."""

    def __init__(self, process: subprocess.Popen, rendezvous: Rendezvous, log_path: str,
                 connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        self.process, self.log_path = process, log_path
        self._rendezvous: Optional[Rendezvous] = rendezvous
        self._connect_timeout = connect_timeout
        self._connect_deadline = time.monotonic() + connect_timeout
        self._sock: Optional[socket.socket] = None
        self.worker_pid: Optional[int] = None  # the process that serves (the launcher's child), once connected
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
            moved = self._move(wait, frames) if self._sock is not None else self._await_worker(wait)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if moved:
                wait = 0.0
            elif self._sock is None:
                if not block:  # a GUI poll does not wait for the worker to start; the next poll looks again
                    break
                wait = min(remaining, 0.1)  # short waits: a worker that dies before connecting is noticed
            elif self._out or self._reader.partial or (block and not frames):
                wait = remaining if block else min(remaining, 0.01)
            else:
                break
        return frames, self.closed

    def _await_worker(self, wait: float) -> bool:
        rendezvous = self._rendezvous
        readable, _, _ = select.select(rendezvous.sockets(), [], [], wait)
        connected = rendezvous.step() if readable else None
        if connected is None:
            if self.process.poll() is not None:
                self.closed = True  # exited before connecting (bad interpreter, failed import): closed_error says why
            elif time.monotonic() > self._connect_deadline:
                raise p.ServiceError(f"the model worker did not connect within {self._connect_timeout:g} s (log: {self.log_path})",
                                     "WorkerStartError")
            return False
        self._sock, self.worker_pid, self._rendezvous = connected.sock, connected.worker_pid, None
        return True

    def _move(self, wait: float, frames: list[Frame]) -> bool:
        sock = self._sock
        readable, writable, _ = select.select([sock], [sock] if self._out else [], [], wait)
        moved = False
        if writable:
            try:
                sent = sock.send(self._out[:_CHUNK])
                del self._out[:sent]
                moved = True
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:  # reset or broken: the worker is gone
                self.closed = True
        if readable:
            try:
                data = sock.recv(4 * _CHUNK)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                self.closed = True
            elif data:
                frames.extend(self._reader.feed(data))
                moved = True
        return moved

    def abort(self) -> None:
        """Close the connection and kill the worker's whole process tree (the launcher and python-real)."""
        self.closed = True
        self._close_sockets()
        kill_tree(self.process)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Close the connection so the worker exits by itself; kill the tree if it has not within `timeout` s."""
        self._close_sockets()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        self.abort()

    def _close_sockets(self) -> None:
        if self._rendezvous is not None:
            self._rendezvous.close()
            self._rendezvous = None
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass

    def closed_error(self) -> BaseException:
        try:
            code = self.process.wait(timeout=2)  # the connection ended first; the exit follows at once
        except subprocess.TimeoutExpired:  # a launcher that lingers after its worker died
            kill_tree(self.process)
            code = self.process.returncode
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

    def __init__(self, python: str = "", *, log_dir: Optional[str] = None, connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        super().__init__()
        self.python = default_python(python)
        self._log_dir = Path(log_dir) if log_dir else default_log_dir()
        self._connect_timeout = connect_timeout
        self._transport: Optional[SocketTransport] = None
        self.starts = 0  # worker processes started (tests: one warm worker serves many requests)

    @property
    def pid(self) -> Optional[int]:
        """The process started (Slicer's launcher, or the worker itself when started with a plain Python)."""
        return self._transport.process.pid if self.alive else None

    @property
    def worker_pid(self) -> Optional[int]:
        """The process that runs the models (the launcher's child under PythonSlicer), once it has connected."""
        return self._transport.worker_pid if self.alive else None

    @property
    def log_path(self) -> Optional[str]:
        return self._transport.log_path if self._transport is not None else None

    @property
    def alive(self) -> bool:
        return self._transport is not None and not self._transport.closed and self._transport.process.poll() is None

    def kill(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        self._transport = None
        self._opened.clear()

    def close(self) -> None:
        """Close the connection so the worker exits by itself; kill its tree if it has not within a few seconds."""
        if self._transport is not None:
            self._transport.shutdown()
        self._transport = None
        self._opened.clear()

    # ------------------------------------------------------------------------------------------- internals
    def _open(self, payload: bytes) -> SocketTransport:
        if not self.alive:
            self.kill()
            self._spawn()
        self._transport.send(payload)
        return self._transport

    def _spawn(self) -> None:
        rendezvous = Rendezvous()
        env = {**os.environ, **rendezvous.environment()}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(LIBRARY_ROOT), env.get("PYTHONPATH", "")]))
        try:
            log_path = new_log_file(self._log_dir)
        except OSError as exc:
            rendezvous.close()
            raise p.ServiceError(f"cannot create the model worker's log in {self._log_dir}: {exc.strerror or exc}",
                                 "WorkerStartError") from None
        try:
            with open(log_path, "ab") as log:  # the worker's prints and tracebacks; its replies go over the socket
                process = subprocess.Popen(
                    [self.python, "-m", "MedVolR1Lib.service.worker"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, **popen_options(),
                )
        except OSError as exc:
            rendezvous.close()
            raise p.ServiceError(f"cannot start the model worker with {self.python}: {exc.strerror or exc}",
                                 "WorkerStartError") from None
        self._transport = SocketTransport(process, rendezvous, str(log_path), self._connect_timeout)
        self.starts += 1

    def __del__(self) -> None:
        try:
            self.kill()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
