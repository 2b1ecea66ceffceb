"""The model service: wire format, the worker process, and `medvolr1 serve` tested for real on loopback.

The Slicer-side flow through the worker (Find evidence -> ROIs -> Segment -> drag -> re-propagation, the
GIL-held main thread, a killed worker) is in test_slicer_mrml.py, which has the scene and the fixtures.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from MedVolR1Lib.service import protocol as p
from MedVolR1Lib.service.framing import FrameReader, ProtocolError, decode_frames, encode_frame
from MedVolR1Lib.volume import Volume

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- framing


def test_arrays_round_trip_with_dtype_and_shape_in_any_chunks():
    volume = Volume(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 50, np.diag([0.8, 0.8, 2.5, 1.0]), name="v")
    data = p.to_frame(p.OpenVolume.of(volume)) + p.to_frame(p.Stats())
    reader, frames = FrameReader(), []
    for i in range(0, len(data), 7):  # pipes and sockets deliver partial frames
        frames.extend(reader.feed(data[i : i + 7]))
    assert not reader.partial and len(frames) == 2
    opened = p.from_frame(frames[0], p.REQUESTS)
    assert opened.array.dtype == np.int16 and opened.array.shape == (4, 5, 6) and opened.array.flags.writeable
    np.testing.assert_array_equal(opened.array, volume.array)
    assert opened.to_volume().fingerprint == volume.fingerprint
    assert isinstance(p.from_frame(frames[1], p.REQUESTS), p.Stats)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"GARBAGE-GARBAGE-GARBAGE", "magic"),
        (encode_frame({"type": "Stats"})[:-3], "middle of a frame"),
        (encode_frame({"type": "Stats", "version": 1}, {"a": np.zeros(3)})[:-8], "middle of a frame"),
    ],
)
def test_malformed_bytes_are_protocol_errors(data, match):
    with pytest.raises(ProtocolError, match=match):
        decode_frames(data)


def _raw_frame(header: dict, payload: bytes = b"") -> bytes:
    """A frame written by hand, as a hostile or buggy sender could."""
    from MedVolR1Lib.service.framing import _PREFIX, MAGIC

    text = json.dumps(header).encode()
    return _PREFIX.pack(MAGIC, len(text), 0) + text + payload


def test_no_pickle_and_checked_fields():
    with pytest.raises(ProtocolError, match="dtype object"):
        encode_frame({"type": "x"}, {"a": np.array([{"x": 1}], dtype=object)})
    pickled = b"\x80\x04\x95" + b"\x00" * 13  # would be a pickle: refused by dtype, never loaded
    with pytest.raises(ProtocolError, match="not allowed"):
        decode_frames(_raw_frame({"type": "Stats", "version": 1, "arrays": [{"name": "a", "dtype": "object", "shape": [2]}]}, pickled))
    with pytest.raises(ProtocolError, match="middle of a frame"):  # shape says more bytes than were sent
        decode_frames(_raw_frame({"type": "Stats", "version": 1, "arrays": [{"name": "a", "dtype": "int16", "shape": [2, 8]}]}, b"\x00" * 8))
    with pytest.raises(ProtocolError, match="bad shape"):
        decode_frames(_raw_frame({"type": "Stats", "version": 1, "arrays": [{"name": "a", "dtype": "int16", "shape": [-2, 8]}]}))
    with pytest.raises(ProtocolError, match="JSON"):
        decode_frames(_raw_frame({}).replace(b"{}", b"{\xff"))
    with pytest.raises(ProtocolError, match="unknown field"):
        p.from_frame(decode_frames(encode_frame({"type": "Stats", "version": 1, "evil": 1}))[0], p.REQUESTS)
    with pytest.raises(ProtocolError, match="unexpected message type"):
        p.from_frame(decode_frames(encode_frame({"type": "MaskResult", "version": 1}))[0], p.REQUESTS)
    with pytest.raises(ProtocolError, match="version"):
        p.from_frame(decode_frames(encode_frame({"type": "Stats", "version": 99}))[0], p.REQUESTS)
    with pytest.raises(ProtocolError, match="query must be"):
        p.from_frame(decode_frames(encode_frame({"type": "FindEvidence", "version": 1, "volume_id": "v", "query": 3}))[0], p.REQUESTS)
    with pytest.raises(ProtocolError, match="exceed the limit"):
        decode_frames(p.to_frame(p.OpenVolume("x", np.zeros((8, 8, 8), np.int16), np.eye(4))), max_array_bytes=512)


# ------------------------------------------------------------------------------------------------ local worker


def test_a_worker_that_cannot_start_or_dies_gives_one_clear_line(tmp_path):
    from MedVolR1Lib.service.client import WorkerClient

    state = WorkerClient(str(tmp_path / "no-python")).start(None, p.Stats()).poll()
    assert state.done and "cannot start the model worker" in str(state.error) and "\n" not in str(state.error)
    client = WorkerClient("/bin/false")  # starts, reads nothing, exits 1: like a worker whose imports fail
    job = client.start(None, p.Stats())
    assert job.wait(30)
    state = job.poll()
    assert isinstance(state.error, p.WorkerCrashed) and "exit code 1" in str(state.error), state.error
    assert not client.alive


# ------------------------------------------------------------------------------------------- server on loopback


@pytest.fixture(scope="module")
def crop_path(tmp_path_factory, sample_ct):
    """16 slices of the real sample CT through the kidneys, as a NIfTI file (fast model runs)."""
    import SimpleITK as sitk

    path = tmp_path_factory.mktemp("crop") / "ct_crop.nii.gz"
    image = sitk.ReadImage(str(sample_ct.ct_path))
    sitk.WriteImage(image[:, :, 80:96], str(path))
    return path


def _model_flags(micro_sam2):
    flags = ["--propagator", "medsam2", "--sam-checkpoint", str(micro_sam2[0]), "--device", "cpu"]
    for override in micro_sam2[1]:
        flags += ["--sam-override", override]
    return flags


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, micro_sam2):
    """`medvolr1 serve` in its own process on a free loopback port, with a token and a 4 MB request limit."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    base = tmp_path_factory.mktemp("server")
    token_file = base / "token.txt"
    token_file.write_text(secrets.token_urlsafe(32) + "\n")
    launch_dir, cache_dir = base / "launch", base / "cache"
    launch_dir.mkdir()
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = open(base / "server.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "MedVolR1Lib.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--token-file",
         str(token_file), "--max-request-mb", "4", "--cache-dir", str(cache_dir), *_model_flags(micro_sam2)],
        cwd=launch_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
    deadline = time.time() + 120
    while True:
        assert process.poll() is None, (base / "server.log").read_text()
        try:
            if httpx.get(url + "/v1/health", headers=headers, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "the server did not come up"
        time.sleep(0.3)
    yield {"url": url, "token_file": token_file, "headers": headers, "launch_dir": launch_dir, "base": base}
    process.terminate()
    process.wait(timeout=30)
    log.close()


def _cli(*args) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "MedVolR1Lib.cli", *args], env=env, capture_output=True, text=True, timeout=600)
    return done.returncode, done.stderr


def test_propagate_through_the_server_gives_the_local_mask(server, micro_sam2, crop_path, tmp_path):
    import SimpleITK as sitk

    anchor = ["--slice", "8", "--box", "70,41,88,60", "--box-units", "voxels", "--name", "left kidney"]
    common = ["propagate", "--volume", str(crop_path), *anchor, *_model_flags(micro_sam2)]
    code, err = _cli(*common, "--out", str(tmp_path / "local"))
    assert code == 0, err
    code, err = _cli(*common, "--out", str(tmp_path / "remote"), "--server", server["url"], "--token-file", str(server["token_file"]))
    assert code == 0, err
    local, remote = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / d / "mask.nii.gz"))) for d in ("local", "remote"))
    assert local.any() and local.shape == (16, 101, 122)
    np.testing.assert_array_equal(remote, local)
    local_record, remote_record = (json.loads((tmp_path / d / "evidence.json").read_text()) for d in ("local", "remote"))
    assert remote_record["key_slice"] == local_record["key_slice"] and local_record["key_slice"]["canonical_k"] == 8
    assert remote_record["boxes"] == local_record["boxes"] and remote_record["mask"] == local_record["mask"]
    assert remote_record["provenance"]["propagator"]["sha256"] == local_record["provenance"]["propagator"]["sha256"]  # the server's model


def test_refusals_are_clean_and_the_server_keeps_answering(server, crop_path, tmp_path):
    import httpx

    from MedVolR1Lib.service.remote import RemoteClient
    from MedVolR1Lib.readers import load_volume

    url, run = server["url"], server["url"] + "/v1/run"
    # Wrong or missing token: 401, and one clear line on the client.
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("x" * 32)
    code, err = _cli("propagate", "--volume", str(crop_path), "--slice", "8", "--box", "70,41,88,60", "--box-units", "voxels",
                     "--out", str(tmp_path / "never"), "--server", url, "--token-file", str(wrong))
    assert code == 2 and "401" in err and "token" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "never").exists()
    assert httpx.post(run, content=p.to_frame(p.Stats())).status_code == 401
    with pytest.raises(p.AuthError, match="401"):
        RemoteClient(url, token="y" * 32).call(None, p.Stats(), timeout=60)
    # Over the size limit: 413, whether the length is declared or the body is just too long.
    big = Volume(np.zeros((40, 256, 256), np.int16), np.eye(4))  # 5 MB > the 4 MB limit
    assert httpx.post(run, content=p.to_frame(p.OpenVolume.of(big)), headers=server["headers"]).status_code == 413
    with pytest.raises(p.ServiceError, match="413"):
        RemoteClient(url, token_file=str(server["token_file"])).call(big, p.Stats(), timeout=60)
    # Malformed: 400 with a one-line reason; typed errors for well-formed but wrong requests.
    for body in (b"not a frame at all", p.to_frame(p.Progress(0.5, "a reply, not a request")), _raw_frame({"type": "Stats"})[:-2], b""):
        answer = httpx.post(run, content=body, headers=server["headers"])
        assert answer.status_code == 400 and "malformed" in answer.json()["detail"], (body[:20], answer.text)
    client = RemoteClient(url, token_file=str(server["token_file"]))
    with pytest.raises(p.ServiceError, match="not open"):  # the UnknownVolume error of a volume never sent
        client.call(None, p.Propagate("0" * 32, {"anchors": []}), timeout=60)
    volume = load_volume(crop_path)
    with pytest.raises(Exception, match="no evidence boxes|anchor"):  # AnchorError from the server, re-raised here
        client.call(volume, p.Propagate(volume.fingerprint, {"anchors": []}), timeout=60)
    # ... and it still answers, keeps the volume it was sent, and wrote nothing where it was started.
    stats = client.call(None, p.Stats(), timeout=60).stats
    assert volume.fingerprint in stats["volumes"] and stats["requests"] >= 3
    assert list(server["launch_dir"].iterdir()) == []


def test_a_public_address_needs_a_token(capsys):
    from MedVolR1Lib.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0 without a token" in err and len(err.strip().splitlines()) == 1


def test_the_panel_session_runs_on_the_server(server, micro_sam2, crop_path):
    """The Slicer session with a Server set: Segment from an evidence ROI, then a drag re-propagates on the server
    without re-encoding; the segment equals the local pipeline's mask."""
    slicer = pytest.importorskip("slicer")
    sys.path.insert(0, str(ROOT / "MedVolR1"))
    from MedVolR1SlicerGlue import mrml_mapping as mm
    from MedVolR1SlicerGlue.session import EvidenceSession
    from MedVolR1SlicerGlue.settings import PanelSettings

    from MedVolR1Lib.anchor import EvidenceAnchor, VoxelBox
    from MedVolR1Lib.pipeline import Pipeline, PipelineConfig

    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(crop_path))
    assert storage.ReadData(node)
    volume = mm.volume_from_node(node)
    anchor = EvidenceAnchor(8, (VoxelBox.from_voxels(70, 41, 88, 60),))
    rois = mm.place_evidence_rois(scene, node, volume, anchor)
    settings = PanelSettings(server_url=server["url"], server_token_file=str(server["token_file"]))
    session = EvidenceSession(scene)
    session.start_segment(node, "left kidney", settings)
    outcome = session.wait(timeout=300)
    assert outcome.status == "ok", outcome.message
    config = PipelineConfig(propagator="medsam2", sam_checkpoint=str(micro_sam2[0]), sam_overrides=micro_sam2[1], device="cpu")
    local = Pipeline(config).propagate(volume, anchor).mask
    np.testing.assert_array_equal(session.result.mask, local)
    np.testing.assert_array_equal(mm.segment_array(scene, session.segmentation_node, outcome.segment_id, node), volume.to_source_array(local))
    encoded = session.worker_stats()["encoded_slices"]
    assert encoded >= volume.num_slices
    center, _ = mm.roi_center_size(rois[0])
    rois[0].SetCenter(center[0], center[1], center[2] + volume.spacing[2])
    session.on_roi_edited(rois[0], settings)
    moved = session.wait(timeout=300)
    assert moved.status == "ok" and moved.anchor.slice_index == 9, moved.message
    assert session.worker_stats()["encoded_slices"] == encoded  # the server kept the features
    session.runner.shutdown()
