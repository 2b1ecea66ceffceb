"""One frame = 8-byte length + JSON header + raw array bytes.  No pickle: arrays are checked against dtype/shape.

The header lists each array as {"name", "dtype", "shape"}; the bytes follow in that order, C-contiguous,
little-endian.  `FrameReader` accepts bytes in any chunks (pipes and sockets deliver partial frames) and
yields whole frames, so the same code serves the worker's stdin/stdout and the HTTP bodies.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from ..errors import MedVolR1Error

MAGIC = b"MVR1"
_PREFIX = struct.Struct("<4sII")  # magic, header length, reserved
MAX_HEADER_BYTES = 4 * 1024 * 1024
DTYPES = ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float32", "float64")


class ProtocolError(MedVolR1Error):
    """A frame or message is malformed (wrong magic, bad JSON, unknown dtype, sizes that do not add up)."""


@dataclass
class Frame:
    header: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def _array_spec(name: str, array: np.ndarray) -> tuple[dict, bytes]:
    dtype = np.dtype(array.dtype)
    if dtype.name not in DTYPES:
        raise ProtocolError(f"array {name!r}: dtype {dtype.name} cannot be sent (allowed: {', '.join(DTYPES)})")
    data = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()
    return {"name": name, "dtype": dtype.name, "shape": [int(n) for n in array.shape]}, data


def encode_frame(header: dict, arrays: Optional[dict[str, np.ndarray]] = None) -> bytes:
    specs, blobs = [], []
    for name, array in (arrays or {}).items():
        spec, data = _array_spec(name, np.asarray(array))
        specs.append(spec)
        blobs.append(data)
    text = json.dumps({**header, "arrays": specs}, separators=(",", ":")).encode("utf-8")
    return _PREFIX.pack(MAGIC, len(text), 0) + text + b"".join(blobs)


def _parse_header(text: bytes, max_array_bytes: int) -> tuple[dict, list[tuple[str, np.dtype, tuple[int, ...], int]]]:
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"frame header is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("arrays", []), list):
        raise ProtocolError("frame header must be a JSON object with an 'arrays' list")
    layout, total = [], 0
    for spec in header.pop("arrays", []):
        try:
            name, dtype_name, shape = str(spec["name"]), str(spec["dtype"]), tuple(int(n) for n in spec["shape"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(f"bad array description {spec!r}: needs name, dtype and shape") from None
        if dtype_name not in DTYPES:
            raise ProtocolError(f"array {name!r}: dtype {dtype_name!r} is not allowed")
        if len(shape) > 4 or any(n < 0 for n in shape):
            raise ProtocolError(f"array {name!r}: bad shape {shape}")
        dtype = np.dtype(dtype_name).newbyteorder("<")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        total += nbytes
        if total > max_array_bytes:
            raise ProtocolError(f"arrays of {total} bytes exceed the limit of {max_array_bytes} bytes")
        layout.append((name, dtype, shape, nbytes))
    return header, layout


class FrameReader:
    """Feed bytes, get whole frames; raises ProtocolError on the first malformed byte (the stream is then unusable)."""

    def __init__(self, max_array_bytes: int = 1 << 34) -> None:
        self._buffer = bytearray()
        self._max = max_array_bytes
        self._pending: Optional[tuple[dict, list, int]] = None  # parsed header, array layout, header end offset

    def feed(self, data: bytes) -> Iterator[Frame]:
        self._buffer += data
        while True:
            frame = self._next()
            if frame is None:
                return
            yield frame

    @property
    def partial(self) -> bool:
        """True while a frame has started but not ended (a transfer is under way)."""
        return bool(self._buffer) or self._pending is not None

    def _next(self) -> Optional[Frame]:
        if self._pending is None:
            if len(self._buffer) < _PREFIX.size:
                return None
            magic, length, _reserved = _PREFIX.unpack_from(self._buffer)
            if magic != MAGIC:
                raise ProtocolError("not a MedVol-R1 frame (bad magic bytes)")
            if length > MAX_HEADER_BYTES:
                raise ProtocolError(f"frame header of {length} bytes exceeds {MAX_HEADER_BYTES}")
            end = _PREFIX.size + length
            if len(self._buffer) < end:
                return None
            header, layout = _parse_header(bytes(self._buffer[_PREFIX.size : end]), self._max)
            self._pending = (header, layout, end)
        header, layout, offset = self._pending
        if len(self._buffer) < offset + sum(n for *_, n in layout):
            return None
        arrays = {}
        for name, dtype, shape, nbytes in layout:
            chunk = bytearray(self._buffer[offset : offset + nbytes])  # a writable copy the array owns
            arrays[name] = np.frombuffer(chunk, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)
            offset += nbytes
        del self._buffer[:offset]
        self._pending = None
        return Frame(header, arrays)


def decode_frames(data: bytes, max_array_bytes: int = 1 << 34) -> list[Frame]:
    """Every frame of a complete byte string (an HTTP body); trailing partial bytes are a ProtocolError."""
    reader = FrameReader(max_array_bytes)
    frames = list(reader.feed(data))
    if reader.partial:
        raise ProtocolError("the message ends in the middle of a frame")
    return frames
