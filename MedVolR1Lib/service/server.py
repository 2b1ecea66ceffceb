"""`medvolr1 serve`: the same engine and messages over HTTP, for a GPU box that serves Slicer on laptops.

POST /v1/run with a body of request frames; the answer streams progress and reply frames back.  The
server decides the models (its own flags); clients cannot name files or downloads on it.  A token
(Authorization: Bearer) is required unless the server listens on loopback only; bodies over the size
limit get 413, malformed ones 400, and one request runs at a time (the GPU is shared).

A client that vanishes mid-upload costs nothing: a disconnect ends its request quietly (no traceback in
the log), and an upload that stalls for `BODY_IDLE_TIMEOUT_S` is dropped with 408, so stalled clients
cannot hold the connection slots (uvicorn answers 503 once `limit_concurrency` are taken).  Measured
under abuse with bench/bench_server_robustness.py (docs/slicer_worker.md).
"""


import asyncio
import ctypes
import ctypes.util
import hmac
import ipaddress
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import Cancelled, MedVolR1Error
from ..pipeline import PipelineConfig
from . import protocol as p
from .engine import Engine
from .framing import ProtocolError, decode_frames

MEDIA_TYPE = "application/x-medvolr1-frames"
DEFAULT_MAX_REQUEST_MB = 1024
BODY_IDLE_TIMEOUT_S = 60.0  # an upload that sends nothing for this long is dropped (408)


class ServerConfigError(MedVolR1Error):
    """The server cannot start as asked (e.g. a non-loopback address without a token)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: Optional[str]) -> Optional[str]:
    """The token is the file's first line; an empty or missing file is an error, not 'no token'."""
    if not path:
        return None
    try:
        token = Path(path).expanduser().read_text(encoding="utf-8").strip().splitlines()[0].strip()
    except (OSError, IndexError):
        raise ServerConfigError(f"token file {path} is missing or empty") from None
    if len(token) < 16:
        raise ServerConfigError(f"the token in {path} is shorter than 16 characters; use e.g. `python -c \"import secrets; print(secrets.token_urlsafe(32))\"`")
    return token


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8765
    token: Optional[str] = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_MB << 20
    body_idle_timeout_s: float = BODY_IDLE_TIMEOUT_S

    def check(self) -> None:
        if self.token is None and not is_loopback(self.host):
            raise ServerConfigError(
                f"refusing to listen on {self.host} without a token: pass --token-file (or bind to 127.0.0.1 and use an SSH tunnel)"
            )


def create_app(engine: Engine, settings: ServerSettings):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.requests import ClientDisconnect

    app = FastAPI(title="MedVol-R1 model server", docs_url=None, redoc_url=None, openapi_url=None)
    # One model request at a time, always on the same thread: with glibc each new thread that runs the models grows
    # its own malloc arena (measured: +130 MiB RSS, never returned, the first time two clients overlapped on the
    # default executor's threads)
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medvolr1-model")

    def refuse(status: int, detail: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status)

    def authorised(request: Request) -> bool:
        if settings.token is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {settings.token}".encode())

    @app.get("/v1/health")
    async def health(request: Request):
        if not authorised(request):
            return refuse(401, "missing or wrong token")
        return {"status": "ok", "protocol": p.PROTOCOL_VERSION}

    @app.post("/v1/run")
    async def run(request: Request):
        if not authorised(request):
            return refuse(401, "missing or wrong token")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > settings.max_request_bytes):
            return refuse(413, f"request larger than the server's limit of {settings.max_request_bytes >> 20} MB")
        body = bytearray()
        chunks = request.stream().__aiter__()
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(chunks.__anext__(), settings.body_idle_timeout_s)
                except StopAsyncIteration:
                    break
                body += chunk
                if len(body) > settings.max_request_bytes:
                    return refuse(413, f"request larger than the server's limit of {settings.max_request_bytes >> 20} MB")
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening; ends the request without a logged traceback
        except asyncio.TimeoutError:
            return refuse(408, f"the request body stalled for {settings.body_idle_timeout_s:g} s")
        try:
            requests = [p.from_frame(f, p.REQUESTS) for f in decode_frames(body, settings.max_request_bytes)]
        except ProtocolError as exc:
            return refuse(400, f"malformed request: {exc}")
        finally:
            del body  # the decoded arrays own their bytes; the raw upload is not kept while the model runs
        if not requests:
            return refuse(400, "malformed request: no request frames")
        return StreamingResponse(_answer(engine, model_thread, requests), media_type=MEDIA_TYPE)

    return app


def _libc_malloc_trim():
    """glibc's malloc_trim, or None elsewhere (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_freed_memory() -> None:
    """Hand memory freed by a request (uploads, volumes, features of evicted volumes) back to the OS.

    Why: glibc keeps freed heap pages of a long-running process; after a volume near the size limit the
    server's RSS otherwise stays near its peak although Python holds nothing of the volume.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


async def _answer(engine: Engine, executor: ThreadPoolExecutor, requests: list):
    """Run the requests on a worker thread (the event loop keeps serving) and stream their frames as they come."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def emit(message) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, p.to_frame(message))

    def progress(fraction: float, message: str) -> None:
        if stop.is_set():
            raise Cancelled("the client went away")
        emit(p.Progress(float(fraction), str(message)))

    def work() -> None:
        try:
            for request in requests:
                emit(engine.handle(request, None if isinstance(request, (p.OpenVolume, p.Stats)) else progress))
            requests.clear()  # the uploaded arrays go now, not when the response ends
            release_freed_memory()
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    loop.run_in_executor(executor, work)
    try:
        while True:
            frame = await queue.get()
            if frame is None:
                break
            yield frame
    finally:
        stop.set()  # the client disconnected or we are done: a running model stops at its next progress report


def serve(config: PipelineConfig, settings: ServerSettings, cache_dir: Optional[str] = None) -> int:
    """Run until interrupted; models load on the first request and stay loaded."""
    import uvicorn

    settings.check()
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        os.chdir(cache_dir)  # anything a library drops in the working folder lands in the cache, not where serve was started
    app = create_app(Engine(fixed_config=config), settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False,
                timeout_keep_alive=5, limit_concurrency=16)
    return 0
