"""Client of `medvolr1 serve`: the same Job interface as the local worker, over one HTTP exchange per request.

The socket is non-blocking and pumped from `Job.poll()`, so the GUI thread never waits on the network.
Standard library only (it runs inside 3D Slicer, which ships no HTTP client package): the request is written
by hand and the answer read by `ResponseReader`, a small HTTP/1.1 response parser (status line, headers, a
body by Content-Length, chunked, or up to the close).  https:// works (TLS handshake at start).
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from typing import Optional
from urllib.parse import urlsplit

from . import protocol as p
from .client import ServiceClient
from .framing import Frame, FrameReader
from .jobs import Transport
from .server import MEDIA_TYPE, read_token

_CHUNK = 1 << 20
_CONTINUE_TIMEOUT_S = 1.0
_MAX_HEAD_BYTES = 64 << 10
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class HttpProtocolError(ValueError):
    """The server's answer is not well-formed HTTP/1.1."""


class ResponseReader:
    """Incremental HTTP/1.1 response parser: `feed(bytes)` -> events, `feed_eof()` at connection close.

    Events: ("informational", status) for 1xx, ("response", status, headers), ("data", bytes), ("end",).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._state = "head"  # head | length | chunk-size | chunk-data | chunk-crlf | trailer | close | done
        self._remaining = 0

    def feed(self, data: bytes) -> list[tuple]:
        self._buffer += data
        events: list[tuple] = []
        while self._step(events):
            pass
        return events

    def feed_eof(self) -> list[tuple]:
        if self._state == "close":
            self._state = "done"
            return [("data", bytes(self._buffer)), ("end",)] if self._buffer else [("end",)]
        if self._state == "done" or (self._state == "head" and not self._buffer):
            return []  # done, or closed before any answer (the caller reports that)
        raise HttpProtocolError("the connection closed in the middle of the answer")

    @property
    def done(self) -> bool:
        return self._state == "done"

    def _line(self) -> Optional[bytes]:
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > _MAX_HEAD_BYTES:
                raise HttpProtocolError("header line too long")
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    def _step(self, events: list[tuple]) -> bool:
        state = self._state
        if state == "head":
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > _MAX_HEAD_BYTES:
                    raise HttpProtocolError("response head too long")
                return False
            head = bytes(self._buffer[:end]).decode("iso-8859-1")
            del self._buffer[: end + 4]
            status_line, *header_lines = head.split("\r\n")
            parts = status_line.split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise HttpProtocolError(f"not an HTTP/1.1 status line: {status_line[:80]!r}")
            status = int(parts[1])
            headers: dict[str, str] = {}
            for line in header_lines:
                name, sep, value = line.partition(":")
                if not sep:
                    raise HttpProtocolError(f"malformed header line: {line[:80]!r}")
                headers[name.strip().lower()] = value.strip()
            if 100 <= status < 200:
                events.append(("informational", status))
                return True
            events.append(("response", status, headers))
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._state = "chunk-size"
            elif "content-length" in headers:
                try:
                    self._remaining = int(headers["content-length"])
                except ValueError:
                    raise HttpProtocolError(f"bad Content-Length {headers['content-length']!r}") from None
                self._state = "length"
            elif status in (204, 304):
                self._state = "done"
                events.append(("end",))
            else:
                self._state = "close"
            return True
        if state in ("length", "chunk-data"):
            if self._remaining == 0:
                if state == "length":
                    self._state = "done"
                    events.append(("end",))
                    return False
                self._state = "chunk-crlf"
                return True
            if not self._buffer:
                return False
            take = bytes(self._buffer[: self._remaining])
            del self._buffer[: len(take)]
            self._remaining -= len(take)
            events.append(("data", take))
            return True
        if state == "chunk-size":
            line = self._line()
            if line is None:
                return False
            try:
                self._remaining = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise HttpProtocolError(f"bad chunk size {line[:40]!r}") from None
            self._state = "trailer" if self._remaining == 0 else "chunk-data"
            return True
        if state == "chunk-crlf":
            line = self._line()
            if line is None:
                return False
            if line:
                raise HttpProtocolError("chunk not followed by CRLF")
            self._state = "chunk-size"
            return True
        if state == "trailer":
            line = self._line()
            if line is None:
                return False
            if not line:
                self._state = "done"
                events.append(("end",))
                return False
            return True
        if state == "close":
            if self._buffer:
                events.append(("data", bytes(self._buffer)))
                self._buffer.clear()
            return False
        return False


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
        self._http = ResponseReader()
        # Expect: 100-continue lets the server refuse (401, 413) before a large volume is sent at all.
        headers = [("Host", client.netloc), ("Content-Type", MEDIA_TYPE), ("Content-Length", str(len(payload))),
                   ("Connection", "close"), ("User-Agent", "medvolr1"), ("Expect", "100-continue")]
        if client.token:
            headers.append(("Authorization", f"Bearer {client.token}"))
        head = f"POST {client.path}/v1/run HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        self._out = bytearray(head.encode("latin-1"))
        self._body: Optional[bytes] = payload
        self._body_due = time.monotonic() + _CONTINUE_TIMEOUT_S  # servers that ignore Expect get the body anyway
        self._status: Optional[int] = None
        self._refusal = bytearray()
        self._reader = FrameReader()
        self._eof = False
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
                events: list[tuple] = []
                if readable or pending:
                    data = self._sock.recv(4 * _CHUNK)
                    events = self._http.feed(data) if data else self._http.feed_eof()
                    if not data:
                        self._eof = True
                    moved = True
            except _WOULD_BLOCK:
                events = []
            except HttpProtocolError as exc:
                raise p.ServiceError(f"the model server at {self._url} sent a broken HTTP answer: {exc}", "ConnectionError") from None
            except OSError as exc:
                raise p.ServiceError(f"lost the connection to the model server at {self._url}: {exc}", "ConnectionError") from None
            frames.extend(self._events(events))
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

    def _events(self, events: list[tuple]) -> list[Frame]:
        frames: list[Frame] = []
        for event in events:
            kind = event[0]
            if kind == "informational":
                if event[1] == 100:
                    self._release_body()
            elif kind == "response":
                self._status = event[1]
                self._body = None  # answered before the body was asked for (a refusal): never send it
            elif kind == "data":
                if self._status == 200:
                    frames.extend(self._reader.feed(event[1]))
                else:
                    self._refusal += event[1]
            elif kind == "end":
                self.closed = True
                if self._status not in (None, 200):
                    raise self._refused()
                return frames
        if self._eof and not self.closed:
            self.closed = True
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
