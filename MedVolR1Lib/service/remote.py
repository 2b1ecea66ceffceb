"""Client of `medvolr1 serve`: the same Job interface as the local worker, over one HTTP exchange per request.

The socket is non-blocking and pumped from `Job.poll()` with h11 (the HTTP/1.1 state machine uvicorn
and httpx use), so the GUI thread never waits on the network.  https:// works (TLS handshake at start).
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from typing import Optional
from urllib.parse import urlsplit

import h11

from . import protocol as p
from .client import ServiceClient
from .framing import Frame, FrameReader
from .jobs import Transport
from .server import MEDIA_TYPE, read_token

_CHUNK = 1 << 20
_CONTINUE_TIMEOUT_S = 1.0
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class HttpTransport(Transport):
    """POST /v1/run with the request frames; the streamed answer is fed to a FrameReader as it arrives."""

    def __init__(self, client: "RemoteClient", payload: bytes) -> None:
        self._url = client.url
        try:
            sock = socket.create_connection((client.host, client.port), timeout=client.connect_timeout)
            if client.tls:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=client.host)
        except OSError as exc:
            raise p.ServiceError(f"cannot reach the model server at {client.url}: {exc}", "ConnectionError") from None
        sock.setblocking(False)
        self._sock = sock
        self._http = h11.Connection(h11.CLIENT)
        # Expect: 100-continue lets the server refuse (401, 413) before a large volume is sent at all.
        headers = [("Host", client.netloc), ("Content-Type", MEDIA_TYPE), ("Content-Length", str(len(payload))),
                   ("Connection", "close"), ("User-Agent", "medvolr1"), ("Expect", "100-continue")]
        if client.token:
            headers.append(("Authorization", f"Bearer {client.token}"))
        self._out = bytearray(self._http.send(h11.Request(method="POST", target=client.path + "/v1/run", headers=headers)))
        self._body: Optional[bytes] = self._http.send(h11.Data(data=payload)) + self._http.send(h11.EndOfMessage())
        self._body_due = time.monotonic() + _CONTINUE_TIMEOUT_S  # servers that ignore Expect get the body anyway
        self._status: Optional[int] = None
        self._refusal = bytearray()
        self._reader = FrameReader()
        self.closed = False

    def pump(self, max_wait: float, *, block: bool) -> tuple[list[Frame], bool]:
        frames: list[Frame] = []
        deadline = time.monotonic() + max_wait
        wait = 0.0
        while not self.closed:
            if self._body is not None and not self._out and time.monotonic() >= self._body_due:
                self._release_body()
            pending = isinstance(self._sock, ssl.SSLSocket) and self._sock.pending() > 0
            wait = min(wait, 0.05) if self._body is not None else wait
            readable, writable, _ = select.select([self._sock], [self._sock] if self._out else [], [], 0.0 if pending else wait)
            moved = False
            try:
                if writable:
                    try:
                        sent = self._sock.send(self._out[:_CHUNK])
                        del self._out[:sent]
                    except (BrokenPipeError, ConnectionResetError):  # refused mid-body: its answer may still be readable
                        self._out.clear()
                    moved = True
                if readable or pending:
                    data = self._sock.recv(4 * _CHUNK)
                    self._http.receive_data(data)
                    moved = True
            except _WOULD_BLOCK:
                pass
            except (OSError, h11.RemoteProtocolError) as exc:
                raise p.ServiceError(f"lost the connection to the model server at {self._url}: {exc}", "ConnectionError") from None
            frames.extend(self._events())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if moved:
                wait = 0.0
            elif self._out or self._body is not None or self._reader.partial or (block and not frames):
                wait = remaining if block else min(remaining, 0.01)
            else:
                break
        return frames, self.closed

    def _events(self) -> list[Frame]:
        frames: list[Frame] = []
        while True:
            try:
                event = self._http.next_event()
            except h11.RemoteProtocolError as exc:
                raise p.ServiceError(f"the model server at {self._url} sent a broken HTTP answer: {exc}", "ConnectionError") from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return frames
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 100:
                    self._release_body()
            elif isinstance(event, h11.Response):
                self._status = event.status_code
                self._body = None  # answered before the body was asked for (a refusal): never send it
            elif isinstance(event, h11.Data):
                if self._status == 200:
                    frames.extend(self._reader.feed(bytes(event.data)))
                else:
                    self._refusal += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                self.closed = True
                if self._status not in (None, 200):
                    raise self._refused()
                return frames

    def _release_body(self) -> None:
        if self._body is not None:
            self._out += self._body
            self._body = None

    def _refused(self) -> p.ServiceError:
        import json

        try:
            detail = str(json.loads(bytes(self._refusal).decode("utf-8"))["detail"])
        except Exception:  # noqa: BLE001 - a proxy's HTML error page, say
            detail = bytes(self._refusal[:200]).decode("utf-8", "replace").strip()
        if self._status == 401:
            return p.AuthError(f"the model server at {self._url} refused the token (401): check the token file", "AuthError")
        if self._status == 413:
            return p.ServiceError(f"the model server refused a request this large (413): {detail}", "RequestTooLarge")
        return p.ServiceError(f"the model server answered {self._status}: {detail}", f"HTTP{self._status}")

    def abort(self) -> None:
        """Close the connection; the server stops the model at its next progress report."""
        self.closed = True
        try:
            self._sock.close()
        except OSError:
            pass

    def closed_error(self) -> BaseException:
        return p.ServiceError(f"the model server at {self._url} closed the connection without answering", "ConnectionError")


class RemoteClient(ServiceClient):
    """`medvolr1 serve` at `url` (http://HOST:PORT or https://...), with the token from `token_file`."""

    def __init__(self, url: str, *, token_file: Optional[str] = None, token: Optional[str] = None, connect_timeout: float = 10.0) -> None:
        super().__init__()
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"server address {url!r} must look like http://HOST:PORT")
        self.url, self.tls = url.strip(), parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.netloc = parts.netloc
        self.path = parts.path.rstrip("/")
        self.token = token or read_token(token_file)
        self.connect_timeout = connect_timeout

    def _open(self, payload: bytes) -> HttpTransport:
        return HttpTransport(self, payload)
