"""The local worker's connection: a loopback TCP socket the worker connects back to, proven by a one-time secret.

Why a socket and not the worker's stdin/stdout: Windows has non-blocking pipes only from Python 3.12
(`os.set_blocking`) and its `select()` takes sockets only, so a GUI thread that must never wait could not
poll a pipe there; a reader thread is no way out either, because Slicer's main thread holds the GIL while Qt
idles.  Non-blocking sockets and `select()` on sockets work on every OS and Python version.  Nor does the
socket depend on how Slicer's launcher (`PythonSlicer` runs `python-real` as its child) passes its streams on.

The connection ties the worker to its client: when it closes (Cancel, Slicer quits or crashes) the worker
exits on its own, even in the middle of a model load that writes nothing (`exit_when_closed`).

Security: the listener binds 127.0.0.1 only, on a port the OS picks, and drops any peer whose first bytes are
not the 32-byte secret; the worker's address is accepted only if it is loopback.  The secret reaches the worker
in its environment (readable by the same user only, who could start the worker anyway), never on the command
line, and the worker removes it from its environment at once.
"""

from __future__ import annotations

import hmac
import os
import secrets
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

ADDRESS_ENV = "MEDVOLR1_WORKER_ADDRESS"
SECRET_ENV = "MEDVOLR1_WORKER_SECRET"
HELLO = struct.Struct("<32sQ")  # the secret, then the pid of the process that serves (the launcher's child)
HELLO_TIMEOUT_S = 10.0  # a peer that connects but does not prove itself within this is dropped
_LOOPBACK = "127.0.0.1"


@dataclass
class _Candidate:
    sock: socket.socket
    deadline: float
    received: bytearray = field(default_factory=bytearray)


@dataclass
class Connected:
    """The authenticated worker: its socket (non-blocking), its pid, and any bytes it sent after the hello."""

    sock: socket.socket
    worker_pid: int
    leftover: bytes


class Rendezvous:
    """Client side: listens on loopback, gives the worker its address and secret, authenticates without blocking."""

    def __init__(self) -> None:
        self._secret = secrets.token_bytes(32)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if hasattr(socket, "SO_EXCLUSIVEADDRUSE"):  # Windows: no other process may bind the same port
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        listener.bind((_LOOPBACK, 0))
        listener.listen(4)
        listener.setblocking(False)
        self._listener: Optional[socket.socket] = listener
        self._candidates: list[_Candidate] = []

    def environment(self) -> dict[str, str]:
        """What the worker process needs in its environment to connect back."""
        host, port = self._listener.getsockname()[:2]
        return {ADDRESS_ENV: f"{host}:{port}", SECRET_ENV: self._secret.hex()}

    def sockets(self) -> list[socket.socket]:
        """What to select() on for readability while waiting for the worker."""
        return ([self._listener] if self._listener is not None else []) + [c.sock for c in self._candidates]

    def step(self) -> Optional[Connected]:
        """Accept pending connections and read their hellos (never blocks); the worker once it has proven itself."""
        if self._listener is None:
            return None
        while True:
            try:
                sock, _peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # e.g. a peer that reset before accept: ignore it, keep listening
                break
            sock.setblocking(False)
            self._candidates.append(_Candidate(sock, time.monotonic() + HELLO_TIMEOUT_S))
        for candidate in list(self._candidates):
            verdict = self._read_hello(candidate)
            if verdict is None:
                continue
            self._candidates.remove(candidate)
            if isinstance(verdict, Connected):
                self.close()  # one worker per rendezvous: stop listening, drop the other candidates
                return verdict
            candidate.sock.close()
        return None

    def _read_hello(self, candidate: _Candidate):
        """Connected when the secret matches, False to drop the peer, None while its hello is incomplete."""
        try:
            data = candidate.sock.recv(HELLO.size - len(candidate.received))
        except (BlockingIOError, InterruptedError):
            return None if time.monotonic() < candidate.deadline else False
        except OSError:
            return False
        if not data:
            return False
        candidate.received += data
        if len(candidate.received) < HELLO.size:
            return None if time.monotonic() < candidate.deadline else False
        secret, pid = HELLO.unpack(bytes(candidate.received))
        if not hmac.compare_digest(secret, self._secret):
            return False
        return Connected(candidate.sock, int(pid), b"")

    def close(self) -> None:
        for candidate in self._candidates:
            candidate.sock.close()
        self._candidates.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None


def connect_back(environ=os.environ, timeout: float = 60.0) -> socket.socket:
    """Worker side: connect to the client named in the environment and prove who we are; a blocking socket."""
    address, secret = environ.pop(ADDRESS_ENV, ""), environ.pop(SECRET_ENV, "")
    if not address or not secret:
        raise SystemExit(f"this is the model worker of MedVolR1Lib.service.client.WorkerClient; it needs {ADDRESS_ENV} "
                         f"and {SECRET_ENV}")
    host, _, port = address.rpartition(":")
    if host != _LOOPBACK:
        raise SystemExit(f"the model worker connects to {_LOOPBACK} only, not {host!r}")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.settimeout(None)
    sock.sendall(HELLO.pack(bytes.fromhex(secret), os.getpid()))
    return sock


def exit_when_closed(sock: socket.socket, poll_s: float = 0.2) -> threading.Thread:
    """Worker side: a daemon thread that ends the process as soon as the client's end of `sock` closes.

    The main thread notices end-of-input only when it reads, which it does not while a model loads or runs;
    this thread peeks (never consumes) so the worker stops within moments of Cancel or Slicer's exit, whatever
    it is doing (bytes the main thread has not read yet hide the close until it reads them).  os._exit: the
    main thread may be deep inside a C call that cannot be interrupted."""

    def watch() -> None:
        while True:
            try:
                data = sock.recv(1, socket.MSG_PEEK)
            except OSError:
                data = b""
            if not data:
                print("medvolr1 worker: the client closed the connection; exiting", file=sys.stderr, flush=True)
                os._exit(0)
            time.sleep(poll_s)  # a request is waiting for the main thread: look again shortly

    thread = threading.Thread(target=watch, name="medvolr1-client-watch", daemon=True)
    thread.start()
    return thread
