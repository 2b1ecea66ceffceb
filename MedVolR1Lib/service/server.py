"""`medvolr1 serve`: the same engine and messages over HTTP, for a GPU box that serves Slicer on laptops.

POST /v1/run with a body of request frames; the answer streams progress and reply frames back.  The
server decides the models (its own flags); clients cannot name files or downloads on it.  A token
(Authorization: Bearer) is required unless the server listens on loopback only; bodies over the size
limit get 413, malformed ones 400, and one request runs at a time (the GPU is shared).
"""


import asyncio
import hmac
import ipaddress
import os
import threading
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

    def check(self) -> None:
        if self.token is None and not is_loopback(self.host):
            raise ServerConfigError(
                f"refusing to listen on {self.host} without a token: pass --token-file (or bind to 127.0.0.1 and use an SSH tunnel)"
            )


def create_app(engine: Engine, settings: ServerSettings):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="MedVol-R1 model server", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()  # one model request at a time

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
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_request_bytes:
                return refuse(413, f"request larger than the server's limit of {settings.max_request_bytes >> 20} MB")
        try:
            requests = [p.from_frame(f, p.REQUESTS) for f in decode_frames(bytes(body), settings.max_request_bytes)]
        except ProtocolError as exc:
            return refuse(400, f"malformed request: {exc}")
        if not requests:
            return refuse(400, "malformed request: no request frames")
        return StreamingResponse(_answer(engine, lock, requests), media_type=MEDIA_TYPE)

    return app


async def _answer(engine: Engine, lock: threading.Lock, requests: list):
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
            with lock:
                for request in requests:
                    emit(engine.handle(request, None if isinstance(request, (p.OpenVolume, p.Stats)) else progress))
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    loop.run_in_executor(None, work)
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
