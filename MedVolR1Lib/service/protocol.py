"""The messages the Slicer module, the CLI, the worker process and the HTTP server exchange (typed dataclasses).

Requests: OpenVolume (voxels + geometry, keyed by the volume's fingerprint), FindEvidence, Segment, Propagate,
Stats, PreEncode, CloseVolume.  Replies: Progress (any number), then one final reply per request: VolumeOpened,
EvidenceFound, MaskResult, StatsReply, PreEncodeStatus, VolumeClosed or ErrorReply (the error's class name and a
one-line message).  Each message is one
frame (framing.py); its "type" field names the class.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..anchor import EvidenceAnchor
from ..errors import AnchorError, MedVolR1Error
from ..evidence import Evidence
from ..pipeline import PipelineConfig
from ..volume import Volume
from .framing import Frame, ProtocolError, encode_frame

PROTOCOL_VERSION = 1


# --------------------------------------------------------------------------------------------------- requests


@dataclass
class OpenVolume:
    """Voxels (canonical k, j, i) and geometry; the worker keeps it under `volume_id` (the content fingerprint)."""

    volume_id: str
    array: np.ndarray
    ijk_to_ras: np.ndarray
    modality: str = "CT"
    name: str = "volume"

    @classmethod
    def of(cls, volume: Volume) -> "OpenVolume":
        return cls(volume.fingerprint, volume.array, volume.ijk_to_ras, volume.modality, volume.name)

    def to_volume(self) -> Volume:
        volume = Volume(self.array, self.ijk_to_ras, modality=self.modality, name=self.name)
        if volume.fingerprint != self.volume_id:
            raise ProtocolError("the volume's voxels do not match its id (corrupted in transfer?)")
        return volume


@dataclass
class FindEvidence:
    volume_id: str
    query: str
    config: Optional[dict] = None  # PipelineConfig fields; a server uses its own and ignores this


@dataclass
class Segment:
    """Query -> evidence -> mask in one request (the VLM's evidence, then propagation)."""

    volume_id: str
    query: str
    config: Optional[dict] = None


@dataclass
class Propagate:
    """Mask from given evidence (Evidence.to_dict()); a re-propagation on the same volume reuses cached features."""

    volume_id: str
    evidence: dict
    query: str = ""
    config: Optional[dict] = None


@dataclass
class Stats:
    """What the worker holds and how much encoder work it has done (tests prove cache reuse with it)."""

    config: Optional[dict] = None


# ---------------------------------------------------------------------------------------------------- replies


@dataclass
class Progress:
    fraction: float
    message: str


@dataclass
class VolumeOpened:
    volume_id: str


@dataclass
class EvidenceFound:
    """The VLM's evidence and what it said; the panel shows the reasoning and places one ROI per box."""

    anchor: Optional[dict]  # EvidenceAnchor.to_dict()
    reasoning: str
    raw_text: str
    query: str
    slices: tuple[int, ...] = ()
    timings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.slices = tuple(int(k) for k in self.slices)

    @property
    def evidence_anchor(self) -> Optional[EvidenceAnchor]:
        return Evidence.from_dict({"anchors": [self.anchor]}).primary if self.anchor else None


@dataclass
class MaskResult:
    mask: np.ndarray  # canonical (K, J, I) uint8
    evidence: dict  # Evidence.to_dict() of what was propagated
    query: str
    target_name: str
    timings: dict = field(default_factory=dict)
    grounding: Optional[dict] = None  # EvidenceFound fields when a VLM chose the evidence
    provenance: dict = field(default_factory=dict)  # grounder/propagator describe() for evidence.json


@dataclass
class StatsReply:
    stats: dict


@dataclass
class ErrorReply:
    error_class: str
    message: str
    raw_text: str = ""


# ------------------------------------------------------------------------- background pre-encoding (worker)


def _check_ints(message, *names: str) -> None:
    for name in names:
        value = getattr(message, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}")


@dataclass
class PreEncode:
    """Start or steer the worker's background encoding of an opened volume; also the panel's readiness query.

    slice_index: the slice the user is looking at (canonical k; -1 leaves it as it was).  Answered at once
    with PreEncodeStatus; the encoding runs between requests, one slice at a time."""

    volume_id: str
    slice_index: int = -1
    config: Optional[dict] = None

    def __post_init__(self) -> None:
        _check_ints(self, "slice_index")


@dataclass
class CloseVolume:
    """The user closed the volume: stop its background encoding and free it (voxels and embeddings)."""

    volume_id: str


@dataclass
class PreEncodeStatus:
    """`ready` of `total` slices encoded; state: encoding, done, budget (byte budget reached), stopped, unsupported
    (the propagator encodes on request only) or off (a server, which encodes on request)."""

    volume_id: str
    ready: int
    total: int
    state: str
    current: int = -1  # the slice the order is centred on (-1: the body's middle)
    nbytes: int = 0  # bytes of embeddings held for this volume
    budget_bytes: int = 0  # what background encoding may fill

    def __post_init__(self) -> None:
        _check_ints(self, "ready", "total", "current", "nbytes", "budget_bytes")
        if not isinstance(self.state, str):
            raise TypeError("state must be a string")

    @property
    def text(self) -> str:
        line = f"{self.ready} of {self.total} slices ready"
        if self.state == "budget":
            line += " (memory budget reached)"
        elif self.state == "stopped":
            line += " (stopped)"
        return line


@dataclass
class VolumeClosed:
    volume_id: str


BACKGROUND_REQUESTS = (PreEncode, CloseVolume)
BACKGROUND_REPLIES = (PreEncodeStatus, VolumeClosed)

REQUESTS = (OpenVolume, FindEvidence, Segment, Propagate, Stats) + BACKGROUND_REQUESTS
REPLIES = (Progress, VolumeOpened, EvidenceFound, MaskResult, StatsReply, ErrorReply) + BACKGROUND_REPLIES
FINAL_REPLIES = (VolumeOpened, EvidenceFound, MaskResult, StatsReply, ErrorReply) + BACKGROUND_REPLIES
_TYPES = {cls.__name__: cls for cls in REQUESTS + REPLIES}


# --------------------------------------------------------------------------------------------------- encoding


def to_frame(message) -> bytes:
    header: dict[str, Any] = {"type": type(message).__name__, "version": PROTOCOL_VERSION}
    arrays = {}
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if isinstance(value, np.ndarray):
            arrays[f.name] = value
        else:
            header[f.name] = list(value) if isinstance(value, tuple) else value
    return encode_frame(header, arrays)


def from_frame(frame: Frame, allowed=REQUESTS + REPLIES):
    """The typed message of a frame; ProtocolError names what is wrong (unknown type, missing or extra field)."""
    header = dict(frame.header)
    name = header.pop("type", None)
    version = header.pop("version", None)
    cls = _TYPES.get(name) if isinstance(name, str) else None
    if cls is None or cls not in allowed:
        raise ProtocolError(f"unexpected message type {name!r}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} is not {PROTOCOL_VERSION}: update the client or the server")
    values = {**header, **frame.arrays}
    names = {f.name for f in dataclasses.fields(cls)}
    if set(values) - names:
        raise ProtocolError(f"{name}: unknown field(s) {sorted(set(values) - names)}")
    try:
        message = cls(**values)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{name}: {exc}") from None
    _check_types(message)
    return message


_SCALARS = {"volume_id": str, "query": str, "modality": str, "name": str, "message": str, "error_class": str,
            "raw_text": str, "reasoning": str, "target_name": str, "fraction": (int, float)}
_DICTS = ("config", "evidence", "timings", "stats", "provenance", "grounding", "anchor")


def _check_types(message) -> None:
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if f.name in _SCALARS and not isinstance(value, _SCALARS[f.name]):
            raise ProtocolError(f"{type(message).__name__}.{f.name} must be {_SCALARS[f.name]}, got {type(value).__name__}")
        if f.name in _DICTS and value is not None and not isinstance(value, dict):
            raise ProtocolError(f"{type(message).__name__}.{f.name} must be an object")
    if isinstance(message, OpenVolume) and (message.array.ndim != 3 or message.ijk_to_ras.shape != (4, 4)):
        raise ProtocolError("OpenVolume needs a 3D array and a 4x4 ijk_to_ras matrix")
    if isinstance(message, MaskResult) and message.mask.ndim != 3:
        raise ProtocolError("MaskResult.mask must be 3D")


def config_to_dict(config: Optional[PipelineConfig]) -> Optional[dict]:
    return None if config is None else {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def config_from_dict(data: Optional[dict]) -> PipelineConfig:
    names = {f.name for f in dataclasses.fields(PipelineConfig)}
    data = data or {}
    if set(data) - names:
        raise ProtocolError(f"unknown pipeline setting(s) {sorted(set(data) - names)}")
    values = dict(data)
    if "sam_overrides" in values:
        values["sam_overrides"] = tuple(str(v) for v in values["sam_overrides"] or ())
    return PipelineConfig(**values)


def evidence_from_dict(data: dict) -> Evidence:
    try:
        return Evidence.from_dict(data)
    except AnchorError:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed record is the sender's error
        raise AnchorError(f"malformed evidence record: {exc}") from None


def segmentation_result(reply: MaskResult, volume: Volume):
    """The library's SegmentationResult on the caller's own Volume (outputs, panel and CLI take it as is)."""
    from ..pipeline import SegmentationResult

    if tuple(reply.mask.shape) != volume.shape:
        raise ProtocolError(f"mask shape {tuple(reply.mask.shape)} does not match the volume {volume.shape}")
    evidence = evidence_from_dict(reply.evidence)
    return SegmentationResult(
        volume=volume,
        anchor=evidence.primary,
        mask=np.asarray(reply.mask, dtype=np.uint8),
        query=reply.query or None,
        grounding=EvidenceFound(**reply.grounding) if reply.grounding else None,
        timings=dict(reply.timings),
        target_name=reply.target_name,
        evidence=evidence,
    )


# ------------------------------------------------------------------------------------------------------ errors


class ServiceError(MedVolR1Error):
    """An error raised in the worker or on the server; `error_class` names the original type."""

    def __init__(self, message: str, error_class: str = "ServiceError", raw_text: str = "") -> None:
        super().__init__(message)
        self.error_class = error_class
        self.raw_text = raw_text


class WorkerCrashed(ServiceError):
    """The worker process ended without answering (killed, out of memory, crashed); the next request starts a new one."""


class AuthError(ServiceError):
    """The server refused the token (HTTP 401)."""


def error_reply(exc: BaseException) -> ErrorReply:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ErrorReply(type(exc).__name__, text, getattr(exc, "raw_text", "") or "")


def raise_for(reply: ErrorReply) -> None:
    """Re-raise a reply as the library's own error class when it is a plain one, else as ServiceError."""
    from .. import errors

    known = {c.__name__: c for c in (errors.VolumeError, errors.AnchorError, errors.CheckpointError, errors.DeviceError,
                                     errors.DataError, errors.Cancelled, ProtocolError)}
    cls = known.get(reply.error_class)
    if cls is not None:
        exc = cls(reply.message)
        exc.error_class, exc.raw_text = reply.error_class, reply.raw_text  # type: ignore[attr-defined]
        raise exc
    raise ServiceError(reply.message, reply.error_class, reply.raw_text)
