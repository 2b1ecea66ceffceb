"""`medvolr1 serve` when clients misbehave: stalled and abandoned uploads, a request at the size limit.

The app runs under a real uvicorn on a loopback port in a thread (no model is loaded: OpenVolume and Stats
need none), with a 1 MiB limit and a 1 s upload idle timeout so the test takes seconds.  The long version,
with 1,000 malformed requests, two concurrent propagations and memory figures, is
bench/bench_server_robustness.py (docs/slicer_worker.md).
"""

from __future__ import annotations

import secrets
import socket
import threading
import time

import numpy as np
import pytest

from MedVolR1Lib.pipeline import PipelineConfig
from MedVolR1Lib.service import protocol as p
from MedVolR1Lib.volume import Volume

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

LIMIT = 1 << 20


@pytest.fixture(scope="module")
def server():
    from MedVolR1Lib.service.engine import Engine
    from MedVolR1Lib.service.server import ServerSettings, create_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    token = secrets.token_urlsafe(24)
    settings = ServerSettings(port=port, token=token, max_request_bytes=LIMIT, body_idle_timeout_s=1.0)
    app = create_app(Engine(fixed_config=PipelineConfig(device="cpu")), settings)
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", limit_concurrency=16))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not instance.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield {"port": port, "token": token, "state": instance.server_state}
    instance.should_exit = True
    thread.join(30)


def _head(server, length: int) -> bytes:
    return (f"POST /v1/run HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server['token']}\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode()


def _post(server, body: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=30) as sock:
        try:
            sock.sendall(_head(server, len(body)) + body)
        except OSError:
            pass  # answered (413) and closed before the whole body went out
        answer = b""
        try:
            while chunk := sock.recv(1 << 16):
                answer += chunk
        except ConnectionResetError:  # a refusal closes with our unread body pending: the kernel resets
            assert answer, "reset before any answer"
    head, _, rest = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


def _stats(server) -> dict:
    status, body = _post(server, p.to_frame(p.Stats()))
    assert status == 200
    return body


def test_a_stalled_upload_gets_408_and_frees_its_connection(server):
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=20) as sock:
        sock.sendall(_head(server, 4096) + bytes(1000))  # then nothing more
        started = time.time()
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"stalled" in answer
    assert time.time() - started < 15
    _stats(server)


def test_clients_that_reset_mid_upload_leave_nothing_behind(server):
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", server["port"]), timeout=20)
        sock.sendall(_head(server, 800_000) + bytes(200_000))
        time.sleep(0.02)  # the server is reading the body now
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset, as a crash
        sock.close()
    deadline = time.time() + 10
    while len(server["state"].tasks) > 0 and time.time() < deadline:  # every abandoned request has ended
        time.sleep(0.05)
    assert len(server["state"].tasks) == 0
    _stats(server)


def test_a_request_of_exactly_the_size_limit_is_served_one_byte_more_is_413(server):
    rng = np.random.default_rng(0)
    volume = Volume(rng.normal(0, 100, (15, 64, 256)).astype(np.float32), np.eye(4), modality="CT", name="x")
    padding = LIMIT - len(p.to_frame(p.OpenVolume.of(volume)))
    assert padding > 0
    volume = Volume(volume.array, volume.ijk_to_ras, modality="CT", name="x" * (1 + padding))
    frame = p.to_frame(p.OpenVolume.of(volume))
    assert len(frame) == LIMIT
    status, body = _post(server, frame)
    assert status == 200 and volume.fingerprint.encode() in body  # VolumeOpened
    status, body = _post(server, frame + b"\0")
    assert status == 413 and b"limit" in body
