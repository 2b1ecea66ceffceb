"""The local worker's transport as Slicer runs it: Windows' pipe limits, PythonSlicer's launcher, Cancel, logs.

- Windows below Python 3.12 has no `os.set_blocking` and `select()` takes sockets only: both are imposed on
  the client and on the worker (Testing/windows_constraints.py), and a whole Segment runs through.
- PythonSlicer is a launcher that runs python-real as its child: a shell script does the same here, and the
  worker is held in a phase that writes nothing (a model load that takes long, simulated by a sleep in the
  child before the real engine answers).  Cancel must leave no process of the tree within 5 s; a client that
  dies without cancelling must not leave one either.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from MedVolR1Lib.anchor import EvidenceAnchor, VoxelBox
from MedVolR1Lib.evidence import Evidence
from MedVolR1Lib.service import protocol as p
from MedVolR1Lib.service.client import LOGS_KEPT, WorkerClient, new_log_file
from MedVolR1Lib.service.loopback import HELLO, Rendezvous, connect_back
from MedVolR1Lib.service.process_tree import CREATE_NO_WINDOW, STARTF_USESHOWWINDOW, SW_HIDE, popen_options, tree_kill_command
from MedVolR1Lib.volume import Volume

ROOT = Path(__file__).resolve().parents[1]
TESTING = Path(__file__).resolve().parent
posix_only = pytest.mark.skipif(os.name == "nt", reason="the launcher is a POSIX shell script")

SILENT_LOAD = """
from MedVolR1Lib.service import engine

_answer = engine.Engine.handle

def _slow_model_load(self, request, progress=None):  # a model load that takes minutes and reports nothing
    if type(request).__name__ == "Propagate":
        print("worker: loading the model (no output)", file=sys.stderr, flush=True)
        time.sleep(600)
    return _answer(self, request, progress)

engine.Engine.handle = _slow_model_load
"""

WINDOWS = f"""
sys.path.insert(0, {str(TESTING)!r})
import windows_constraints
windows_constraints.apply()
print("worker: Windows pipe constraints imposed", file=sys.stderr, flush=True)
"""


def _launcher(folder: Path, prelude: str) -> Path:
    """An executable that runs the worker as its child and waits for it, as PythonSlicer runs python-real."""
    child = folder / "python_real.py"
    child.write_text("import runpy, sys, time\n" + textwrap.dedent(prelude) + textwrap.dedent("""
        assert sys.argv[1:] == ["-m", "MedVolR1Lib.service.worker"], sys.argv
        sys.argv = [sys.argv[0]]
        runpy.run_module("MedVolR1Lib.service.worker", run_name="__main__", alter_sys=True)
        """))
    launcher = folder / "PythonSlicer"
    launcher.write_text(f'#!/bin/sh\n"{sys.executable}" "{child}" "$@"\nexit $?\n')  # a child, not exec
    launcher.chmod(0o755)
    return launcher


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan may wait for a reaper that a container's init never runs)."""
    try:
        import psutil

        return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - psutil.NoSuchProcess: gone between the two calls
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _tree(pid: int) -> set[int]:
    """`pid` and its descendants, from the parent links in /proc (or psutil)."""
    try:
        import psutil

        return {pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))}
    except ImportError:
        parents = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(stat.parent.name)] = int(fields[1])
        tree, grew = {pid}, True
        while grew:
            new = {child for child, parent in parents.items() if parent in tree} - tree
            tree |= new
            grew = bool(new)
        return tree


def _parent(pid: int) -> int:
    try:
        import psutil

        return psutil.Process(pid).ppid()
    except ImportError:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _wait_gone(pids: set[int], seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = {pid for pid in pids if _running(pid)}
        if not alive:
            return alive
        time.sleep(0.05)
    return {pid for pid in pids if _running(pid)}


def _wait_for_log(path: str, text: str, job=None, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while text not in Path(path).read_text(errors="replace"):
        if job is not None:
            state = job.poll()
            assert not state.done, state.message
        assert time.monotonic() < deadline, Path(path).read_text(errors="replace")
        time.sleep(0.05)


def _small_volume() -> Volume:
    rng = np.random.default_rng(0)
    return Volume(rng.integers(-200, 200, (6, 32, 32)).astype(np.int16), np.diag([1.0, 1.0, 2.0, 1.0]), name="v")


def _propagate(volume: Volume, config=None) -> p.Propagate:
    anchor = EvidenceAnchor(3, (VoxelBox.from_voxels(8, 8, 20, 20),))
    return p.Propagate(volume.fingerprint, Evidence.coerce(anchor).to_dict(), "left kidney", p.config_to_dict(config))


# --------------------------------------------------------------------------------- Windows' pipes, simulated


KIDNEY_LEFT = 3  # the sample CT's label


def _kidney_crop(sample_volume, sample_labels, k0: int = 84, k1: int = 92):
    """8 slices of the real sample CT through the kidneys, and the left kidney's mask on them."""
    matrix = sample_volume.ijk_to_ras.copy()
    matrix[:3, 3] = sample_volume.ras_from_ijk([0, 0, k0])
    volume = Volume(sample_volume.array[k0:k1].copy(), matrix, modality=sample_volume.modality, name="kidney crop")
    return volume, (sample_labels[k0:k1] == KIDNEY_LEFT).astype(np.uint8)


@posix_only
def test_a_whole_segment_runs_where_pipes_cannot_be_polled(monkeypatch, tmp_path, sample_volume, sample_labels, micro_sam2):
    """Query -> VLM -> key slice and box -> MedSAM2 propagation, in a worker under a launcher, with Windows' pipe
    limits on both sides.  The tiny Qwen is taught the answer that points at the left kidney (a wiring fixture)."""
    from MedVolR1Lib.anchor import parse_answer
    from MedVolR1Lib.fixtures.answering_qwen import answer_for_mask, build_answering_tiny_qwen
    from MedVolR1Lib.pipeline import Pipeline, PipelineConfig
    from MedVolR1Lib.views import ViewGeometry
    import windows_constraints

    volume, kidney = _kidney_crop(sample_volume, sample_labels)
    query = "segment the left kidney"
    answer = answer_for_mask(volume, kidney, num_views=4, image_size=112, think="left kidney")
    model = build_answering_tiny_qwen(tmp_path / "qwen", volume=volume, query=query, answer_text=answer, num_views=4, image_size=112)
    config = PipelineConfig(model=str(model), propagator="medsam2", sam_checkpoint=str(micro_sam2[0]), sam_overrides=micro_sam2[1],
                            device="cpu", num_views=4, image_size=112)
    expected = ViewGeometry.for_volume(volume, 112).anchor_from_answer(parse_answer(answer), volume.num_slices)
    local = Pipeline(config).propagate(volume, expected).mask  # the reference, in this process before the constraints

    for module, name, replacement in windows_constraints.constraints():
        if replacement is None:
            monkeypatch.delattr(module, name)
        else:
            monkeypatch.setattr(module, name, replacement)
    read_end, write_end = os.pipe()
    try:  # the simulation bites: what the old pipe transport did now fails as on Windows
        assert not hasattr(os, "set_blocking")
        import select

        with pytest.raises(OSError, match="not a socket"):
            select.select([read_end], [], [], 0)
    finally:
        os.close(read_end)
        os.close(write_end)

    client = WorkerClient(str(_launcher(tmp_path, WINDOWS)), log_dir=str(tmp_path / "logs"))
    try:
        reply = client.call(volume, p.Segment(volume.fingerprint, query, p.config_to_dict(config)), timeout=600)
        assert "Windows pipe constraints imposed" in Path(client.log_path).read_text()
        assert client.worker_pid != client.pid and _parent(client.worker_pid) == client.pid  # served by the launcher's child
        result = p.segmentation_result(reply, volume)
        assert result.anchor.slice_index == expected.slice_index and len(result.anchor.boxes) == len(expected.boxes)
        assert all(np.allclose(a.as_list(), b.as_list(), atol=1e-5) for a, b in zip(result.anchor.boxes, expected.boxes))
        assert result.mask.any() and (result.mask & kidney).any()
        np.testing.assert_array_equal(result.mask, local)
        stats = client.call(None, p.Stats(), timeout=60).stats  # the warm worker answers again and holds the volume
        assert volume.fingerprint in stats["volumes"] and stats["grounder_runs"] == 1 and client.starts == 1
    finally:
        client.close()


# ---------------------------------------------------------------------- Cancel: the whole tree, in a silent phase


@posix_only
def test_cancel_during_a_silent_model_load_leaves_no_worker_process(tmp_path):
    client = WorkerClient(str(_launcher(tmp_path, SILENT_LOAD)), log_dir=str(tmp_path / "logs"))
    volume = _small_volume()
    job = client.start(volume, _propagate(volume), name="segment")
    _wait_for_log(_poll_until_started(client, job), "loading the model (no output)", job)
    launcher, worker = client.pid, client.worker_pid
    assert worker != launcher and _parent(worker) == launcher  # python-real under its launcher, as in Slicer
    tree = _tree(launcher)
    assert {launcher, worker} <= tree
    job.cancel()
    left = _wait_gone(tree, 5.0)
    assert not left, f"still running 5 s after Cancel: {left}"
    state = job.poll()
    assert state.done and state.cancelled and state.error is None
    # ... and the next click starts a fresh worker, which answers
    assert client.call(None, p.Stats(), timeout=60).stats["requests"] == 1 and client.starts == 2
    client.close()


def _poll_until_started(client: WorkerClient, job, seconds: float = 60.0) -> str:
    """Pump the job until the worker has connected; its log path."""
    deadline = time.monotonic() + seconds
    while client.worker_pid is None:
        state = job.poll()
        assert not state.done, state.message
        assert time.monotonic() < deadline, "the worker did not connect"
        time.sleep(0.02)
    return client.log_path


@posix_only
def test_killing_only_the_launcher_orphans_the_worker_and_a_closed_connection_ends_it(tmp_path):
    """Why the tree must be killed (the launcher's death alone leaves python-real running), and the second line of
    defence: when the client's process dies without cancelling (Slicer crashes), the worker exits by itself."""
    client_script = tmp_path / "slicer.py"
    client_script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(TESTING)!r})
        from test_worker_transport import _poll_until_started, _propagate, _small_volume
        from MedVolR1Lib.service.client import WorkerClient
        client = WorkerClient(sys.argv[1], log_dir=sys.argv[2])
        volume = _small_volume()
        job = client.start(volume, _propagate(volume))
        log = _poll_until_started(client, job)
        print(client.pid, client.worker_pid, log, flush=True)
        time.sleep(600)
        """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    slicer = subprocess.Popen([sys.executable, str(client_script), str(_launcher(tmp_path, SILENT_LOAD)), str(tmp_path / "logs")],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        launcher, worker, log = slicer.stdout.readline().split()
        launcher, worker = int(launcher), int(worker)
        _wait_for_log(log, "loading the model (no output)")
        os.kill(launcher, signal.SIGKILL)  # what the old Cancel did: Popen.kill() on PythonSlicer
        time.sleep(1.0)
        assert not _running(launcher) and _running(worker), "the child should outlive its launcher (the issue's orphan)"
        slicer.kill()  # the client dies without a word: its connection closes
        slicer.wait(30)
        left = _wait_gone({worker}, 5.0)
        assert not left, "the worker did not exit within 5 s of its client's connection closing"
        assert "client closed the connection" in Path(log).read_text()
    finally:
        if slicer.poll() is None:
            slicer.kill()
            slicer.wait(30)
        if _running(worker):
            os.kill(worker, signal.SIGKILL)


# ---------------------------------------------------------------------------------------- the connect-back


@posix_only
def test_a_worker_that_never_connects_is_reported_and_stopped(tmp_path):
    hung = tmp_path / "hung-python"
    hung.write_text("#!/bin/sh\nsleep 600\nexit 0\n")  # an interpreter that hangs before running anything
    hung.chmod(0o755)
    client = WorkerClient(str(hung), log_dir=str(tmp_path / "logs"), connect_timeout=1.0)
    job = client.start(None, p.Stats())
    deadline = time.monotonic() + 10
    while len(tree := _tree(client.pid)) < 2 and time.monotonic() < deadline:  # the script has started `sleep`
        time.sleep(0.02)
    assert len(tree) == 2
    assert job.wait(30)
    state = job.poll()
    assert isinstance(state.error, p.ServiceError) and state.error.error_class == "WorkerStartError"
    assert "did not connect within 1 s" in str(state.error) and "\n" not in str(state.error)
    assert not _wait_gone(tree, 5.0) and not client.alive



def test_only_the_worker_with_the_secret_is_accepted():
    rendezvous = Rendezvous()
    env = rendezvous.environment()
    host, port = env["MEDVOLR1_WORKER_ADDRESS"].rsplit(":", 1)
    assert host == "127.0.0.1" and env["MEDVOLR1_WORKER_SECRET"] not in " ".join(sys.argv)
    impostor = socket.create_connection((host, int(port)))
    impostor.sendall(HELLO.pack(b"x" * 32, 1))
    impostor.settimeout(0.05)
    deadline, dropped = time.monotonic() + 10, False
    while not dropped and time.monotonic() < deadline:
        assert rendezvous.step() is None
        try:
            dropped = impostor.recv(1) == b""  # the client closed it
        except socket.timeout:
            pass
    assert dropped
    worker = connect_back(dict(env))
    connected = None
    while connected is None and time.monotonic() < deadline:
        connected = rendezvous.step()
    assert connected is not None and connected.worker_pid == os.getpid()
    connected.sock.sendall(b"ping")
    assert worker.recv(4) == b"ping"
    for sock in (impostor, worker, connected.sock):
        sock.close()
    with pytest.raises(SystemExit, match="127.0.0.1 only"):
        connect_back({"MEDVOLR1_WORKER_ADDRESS": "10.1.2.3:80", "MEDVOLR1_WORKER_SECRET": "00" * 32})
    with pytest.raises(SystemExit, match="needs MEDVOLR1_WORKER_ADDRESS"):
        connect_back({})


# ---------------------------------------------------------------------------------- Windows start, logs


def test_the_windows_worker_starts_hidden_and_is_killed_as_a_tree(monkeypatch):
    class StartupInfo:  # subprocess.STARTUPINFO exists on Windows only; its fields start at zero there
        def __init__(self):
            self.dwFlags, self.wShowWindow = 0, 1

    monkeypatch.setattr(subprocess, "STARTUPINFO", StartupInfo, raising=False)
    options = popen_options("win32")
    assert options["startupinfo"].dwFlags & STARTF_USESHOWWINDOW and options["startupinfo"].wShowWindow == SW_HIDE
    assert options["creationflags"] & CREATE_NO_WINDOW and "start_new_session" not in options
    assert popen_options("linux") == {"start_new_session": True} == popen_options("darwin")
    assert tree_kill_command(4242) == ["taskkill", "/T", "/F", "/PID", "4242"]
    if os.name == "nt":  # the constants are Win32's own
        assert (STARTF_USESHOWWINDOW, SW_HIDE, CREATE_NO_WINDOW) == (subprocess.STARTF_USESHOWWINDOW, subprocess.SW_HIDE,
                                                                     subprocess.CREATE_NO_WINDOW)


def test_worker_logs_are_per_user_and_do_not_pile_up(tmp_path):
    logs = tmp_path / "logs"
    made = [new_log_file(logs) for _ in range(LOGS_KEPT + 5)]
    kept = sorted(logs.glob("worker-*.log"))
    assert len(kept) == LOGS_KEPT and made[-1] in kept and made[0] not in kept
    client = WorkerClient(log_dir=str(logs))
    client.call(None, p.Stats(), timeout=60)
    assert Path(client.log_path).parent == logs and len(list(logs.glob("worker-*.log"))) == LOGS_KEPT
    client.close()
    assert not client.alive
