"""`medvolr1 serve` under abuse, measured: malformed and truncated requests, clients that vanish mid-upload,
two clients at once, a volume at the size limit.  After all of it the server must still answer and its
memory (RSS) must come back to within 10% of where it started.

    python bench/bench_server_robustness.py [--malformed 1000] [--disconnects 50] [--max-request-mb 16]

The server runs in its own process (LiteMedSAM, real weights, CPU) on a free loopback port with a token.
"Start" is the RSS after one warm-up propagation (the model loads on the first request and stays loaded,
by design); "end" is after every phase, once the server has been sent MAX_VOLUMES small volumes again (it
keeps the last few volumes it was sent, by design, so the big one must have left its cache).  Prints one
table of counts and RSS figures; exits 1 if the server stopped answering, any request got a 5xx or no
answer, the two concurrent clients got a wrong mask, or the end RSS is more than 10% above the start.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MedVolR1Lib.service import protocol as p  # noqa: E402
from MedVolR1Lib.service.engine import MAX_VOLUMES  # noqa: E402
from MedVolR1Lib.service.framing import encode_frame  # noqa: E402
from MedVolR1Lib.service.server import MEDIA_TYPE  # noqa: E402


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class RssSampler(threading.Thread):
    """The server's peak RSS, sampled every 50 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (OSError, RuntimeError):
                return
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raw_post(port: int, token: str, body: bytes, *, declared: int | None = None, extra: str = "", close_after: bool = False,
             timeout: float = 30.0) -> int:
    """POST /v1/run over a bare socket; returns the status code (0: no answer, -1: we hung up on purpose)."""
    length = len(body) if declared is None else declared
    head = (f"POST /v1/run HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: {MEDIA_TYPE}\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n{extra}\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(head + body)
        except OSError:
            pass  # the server may answer (413, 400) and close before the whole body is sent
        if close_after:
            time.sleep(0.05)  # the server is reading the body now
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST, like a crash
            return -1
        if declared is not None and declared > len(body):
            sock.shutdown(socket.SHUT_WR)  # the body ends before its declared length
        answer = b""
        try:
            while b"\r\n" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except OSError:
            pass
    try:
        return int(answer.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def malformed_bodies(n: int, rng: np.random.Generator, valid: bytes):
    """n bad requests of a dozen kinds, reproducible: (kind, body, declared length or None)."""
    header_only = encode_frame({"type": "Stats", "version": p.PROTOCOL_VERSION})
    kinds = ["random bytes", "truncated valid frame", "bad magic", "header not JSON", "huge declared array", "reply type",
             "unknown type", "bad dtype", "body shorter than Content-Length", "negative shape", "empty body", "two frames, second cut"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        declared = None
        if kind == "random bytes":
            body = rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()
        elif kind == "truncated valid frame":
            body = valid[: int(rng.integers(1, len(valid) - 1))]
        elif kind == "bad magic":
            body = b"XXXX" + valid[4:]
        elif kind == "header not JSON":
            junk = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
            body = b"MVR1" + len(junk).to_bytes(4, "little") + bytes(4) + junk
        elif kind == "huge declared array":
            text = ('{"type":"OpenVolume","version":%d,"volume_id":"x","arrays":[{"name":"array","dtype":"float32",'
                    '"shape":[100000,100000,1000]}]}' % p.PROTOCOL_VERSION).encode()
            body = b"MVR1" + len(text).to_bytes(4, "little") + bytes(4) + text
        elif kind == "reply type":
            body = p.to_frame(p.Progress(0.5, "a reply, not a request"))
        elif kind == "unknown type":
            body = encode_frame({"type": "DropTables", "version": p.PROTOCOL_VERSION})
        elif kind == "bad dtype":
            text = b'{"type":"OpenVolume","arrays":[{"name":"array","dtype":"object","shape":[2]}]}'
            body = b"MVR1" + len(text).to_bytes(4, "little") + bytes(4) + text + bytes(16)
        elif kind == "body shorter than Content-Length":
            body, declared = valid[: len(valid) // 2], len(valid)
        elif kind == "negative shape":
            text = b'{"type":"OpenVolume","arrays":[{"name":"array","dtype":"uint8","shape":[-4]}]}'
            body = b"MVR1" + len(text).to_bytes(4, "little") + bytes(4) + text
        elif kind == "empty body":
            body = b""
        else:
            body = header_only + valid[: len(valid) // 3]
        yield kind, body, declared


def crop_volume(k0: int, slices: int = 12):
    from MedVolR1Lib.readers import load_volume
    from MedVolR1Lib.sample_data import fetch_sample
    from MedVolR1Lib.volume import Volume

    full = load_volume(fetch_sample().ct_path)
    matrix = full.ijk_to_ras.copy()
    matrix[:3, 3] = full.ras_from_ijk([0, 0, k0])
    return Volume(np.ascontiguousarray(full.array[k0:k0 + slices]), matrix, modality="CT", name=f"crop{k0}")


def limit_volume(limit: int):
    """A volume whose OpenVolume frame is exactly `limit` bytes (the name pads the JSON header)."""
    from MedVolR1Lib.volume import Volume

    side, slices = 256, max(2, (limit // (4 * 256 * 256)) - 1)
    rng = np.random.default_rng(5)
    volume = Volume(rng.normal(0, 300, (slices, side, side)).astype(np.float32), np.eye(4), modality="CT", name="x")
    size = len(p.to_frame(p.OpenVolume.of(volume)))
    volume = Volume(volume.array, volume.ijk_to_ras, modality="CT", name="x" * (1 + limit - size))
    assert len(p.to_frame(p.OpenVolume.of(volume))) == limit
    return volume


def propagate(client, volume, anchor):
    from MedVolR1Lib.evidence import Evidence

    reply = client.call(volume, p.Propagate(volume.fingerprint, Evidence.coerce(anchor).to_dict(), "kidney"), timeout=600)
    if isinstance(reply, p.ErrorReply):
        raise RuntimeError(reply.message)
    return np.asarray(reply.mask)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--malformed", type=int, default=1000)
    parser.add_argument("--disconnects", type=int, default=50)
    parser.add_argument("--max-request-mb", type=int, default=16)
    parser.add_argument("--stalled", type=int, default=4, help="clients that send half a body, then nothing, during all phases")
    args = parser.parse_args()

    from MedVolR1Lib.anchor import EvidenceAnchor, VoxelBox
    from MedVolR1Lib.service.remote import RemoteClient

    limit = args.max_request_mb << 20
    work = Path(tempfile.mkdtemp(prefix="medvolr1-serverbench-"))
    token = secrets.token_urlsafe(32)
    (work / "token").write_text(token + "\n")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = open(work / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "MedVolR1Lib.cli", "serve", "--port", str(port), "--token-file", str(work / "token"),
                               "--max-request-mb", str(args.max_request_mb), "--cache-dir", str(work / "cache"),
                               "--propagator", "litemedsam", "--device", "cpu"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    client = RemoteClient(url, token=token)
    problems: list[str] = []
    try:
        deadline = time.time() + 180
        while True:
            try:
                client.call(None, p.Stats(), timeout=5)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if server.poll() is not None or time.time() > deadline:
                    print((work / "server.log").read_text())
                    return 1
                time.sleep(0.3)
        volume_a, volume_b = crop_volume(80), crop_volume(60)
        anchor_a = EvidenceAnchor(6, (VoxelBox(70, 41, 88, 60),))  # the left kidney in crop 80..92
        anchor_b = EvidenceAnchor(8, (VoxelBox(28, 46, 46, 69),))  # the right kidney in crop 60..72
        serial_a = propagate(client, volume_a, anchor_a)  # warm-up: loads LiteMedSAM, as any first request does
        serial_b = propagate(RemoteClient(url, token=token), volume_b, anchor_b)
        time.sleep(1.0)
        start = rss_bytes(server.pid)
        sampler = RssSampler(server.pid)
        sampler.start()
        t0 = time.time()

        # 0. stalled uploads, left open during every phase: the server must drop them (408) and keep serving
        stalled = []
        for _ in range(args.stalled):
            sock = socket.create_connection(("127.0.0.1", port), timeout=120)
            sock.sendall((f"POST /v1/run HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                          f"Content-Length: {8 << 20}\r\n\r\n").encode() + bytes(1 << 20))
            stalled.append(sock)

        # 1. malformed and truncated requests, a bounded loop
        rng = np.random.default_rng(0)
        valid = p.to_frame(p.OpenVolume.of(volume_a))
        statuses: Counter = Counter()
        by_kind: dict[str, Counter] = {}
        for kind, body, declared in malformed_bodies(args.malformed, rng, valid):
            status = raw_post(port, token, body, declared=declared)
            statuses[status] += 1
            by_kind.setdefault(kind, Counter())[status] += 1
        # no answer is right only for a body that never completes (the client hung up its sending side)
        bad = {kind: dict(c) for kind, c in by_kind.items() if any(s >= 500 or (s == 0 and kind != "body shorter than Content-Length") for s in c)}
        if bad:
            problems.append(f"malformed requests answered {bad}")
        t_malformed = time.time() - t0
        after = {"malformed": rss_bytes(server.pid)}

        # 2. clients that disconnect mid-upload (declared 8 MB, send 1 MB, reset the connection)
        upload = rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
        for _ in range(args.disconnects):
            raw_post(port, token, valid[:64] + upload, declared=8 << 20, close_after=True)
        t_back = time.time()
        while True:  # the server tears the dropped connections down; until then new ones may get 503
            try:
                alive_after_disconnects = client.call(None, p.Stats(), timeout=30) is not None
                break
            except p.ServiceError as exc:
                if "503" not in str(exc) or time.time() - t_back > 60:
                    alive_after_disconnects = False
                    problems.append(f"after the disconnects: {exc}")
                    break
                time.sleep(0.2)
        t_back = time.time() - t_back
        after["disconnects"] = rss_bytes(server.pid)

        # 3. two clients at once, on different volumes
        results: dict[str, np.ndarray] = {}
        errors: list[str] = []

        def run(name, volume, anchor):
            try:
                results[name] = propagate(RemoteClient(url, token=token), volume, anchor)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(f"{name}: {exc}")

        threads = [threading.Thread(target=run, args=("a", volume_a, anchor_a)), threading.Thread(target=run, args=("b", volume_b, anchor_b))]
        t_two = time.time()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        t_two = time.time() - t_two
        after["two clients"] = rss_bytes(server.pid)
        concurrent_ok = not errors and np.array_equal(results.get("a"), serial_a) and np.array_equal(results.get("b"), serial_b)
        if not concurrent_ok:
            problems.append(f"two clients at once: errors {errors}, masks equal to serial runs: "
                            f"{np.array_equal(results.get('a'), serial_a)}, {np.array_equal(results.get('b'), serial_b)}")

        # 4. a volume at the size limit (accepted), and one byte over (413)
        at_limit = limit_volume(limit)
        frame = p.to_frame(p.OpenVolume.of(at_limit))
        status_at_limit = raw_post(port, token, frame, timeout=300)
        opened = at_limit.fingerprint in client.call(None, p.Stats(), timeout=60).stats["volumes"]
        over = raw_post(port, token, frame + b"\0")
        del frame
        limit_ok = status_at_limit == 200 and opened and over == 413
        if not limit_ok:
            problems.append(f"size limit: at the limit answered {status_at_limit} (volume held: {opened}), one byte over answered {over}")
        del at_limit
        after["size limit"] = rss_bytes(server.pid)

        # the stalled uploads: each must have been answered 408 and closed
        stalled_answers: Counter = Counter()
        for sock in stalled:
            try:
                stalled_answers[int(sock.recv(64).split(b" ", 2)[1])] += 1
            except (OSError, IndexError, ValueError):
                stalled_answers[0] += 1
            sock.close()
        t_stalled = time.time() - t0
        if set(stalled_answers) != {408}:
            problems.append(f"stalled uploads answered {dict(stalled_answers)}")

        # back to the normal working set: small volumes push the big one out of the server's volume cache
        for k in range(MAX_VOLUMES):
            client.call(crop_volume(40 + 4 * k, slices=4), p.Stats(), timeout=60)
        time.sleep(1.0)
        answers = client.call(None, p.Stats(), timeout=30) is not None
        end = rss_bytes(server.pid)
        sampler.stop.set()
        growth = end / start - 1.0
        if not answers:
            problems.append("the server stopped answering")
        if growth > 0.10:
            problems.append(f"RSS grew by {growth:.1%} (more than 10%)")

        print(f"server: LiteMedSAM on CPU, --max-request-mb {args.max_request_mb}; python {sys.version.split()[0]}")
        print(f"malformed/truncated requests: {args.malformed} in {t_malformed:.1f} s; answers: "
              + ", ".join(f"{s or 'none'}: {n}" for s, n in sorted(statuses.items())))
        for kind, counts in by_kind.items():
            print(f"    {kind:34s} " + ", ".join(f"{s or 'none'}: {n}" for s, n in sorted(counts.items())))
        print(f"disconnects mid-upload: {args.disconnects}; server answered afterwards: {alive_after_disconnects} "
              f"(after {t_back:.1f} s)")
        print(f"two clients at once (different volumes): {t_two:.1f} s, masks equal to serial runs: {concurrent_ok}")
        print(f"volume at the size limit ({limit} bytes): answered {status_at_limit}, volume held {opened}; one byte over: {over}")
        print(f"stalled uploads: {args.stalled}, open during all phases; answers {dict(stalled_answers)} (by {t_stalled:.0f} s)")
        log_text = (work / "server.log").read_bytes().decode(errors="replace")
        print(f"server log: {log_text.count('Exceeded concurrency limit')} connections refused with 503 (more than 16 at once), "
              f"{log_text.count('Traceback')} tracebacks")
        print(f"RSS start {start / 2**20:.1f} MiB, peak {sampler.peak / 2**20:.1f} MiB, end {end / 2**20:.1f} MiB "
              f"({growth:+.1%}); still answering: {answers}")
        print("RSS after each phase: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in after.items()))
        for problem in problems:
            print("PROBLEM:", problem)
        return 1 if problems else 0
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        print(f"server log: {work / 'server.log'}")


if __name__ == "__main__":
    sys.exit(main())
