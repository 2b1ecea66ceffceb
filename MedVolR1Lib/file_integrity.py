"""Refuse an image file whose voxel data is shorter than its header declares, with the byte counts.

Why: an interrupted download or copy leaves a `.nii.gz` whose gzip stream stops early, or a raw file cut
short; SimpleITK reads such files without a word and fills the missing part with zeros, so the scan would
be segmented and measured with a block of empty slices.  Before SimpleITK sees a file, this reads the
header itself and streams the data once (compressed data is decompressed in bounded chunks and only
counted, never kept), for NIfTI (.nii, .nii.gz), NRRD (.nrrd inline, .nhdr detached; raw, gzip, bzip2)
and MetaImage (.mha inline, .mhd detached; raw or zlib-compressed).  Layouts it cannot measure (text
encodings, lists of data files, unknown element types) are passed on unchecked.
"""

from __future__ import annotations

import bz2
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import VolumeError

_CHUNK = 1 << 20  # compressed bytes read at a time
_MAX_OUT = 1 << 24  # decompressed bytes produced at a time (bounds memory on a 1000:1 stream)
_NIFTI_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8, 1536: 16, 1792: 16, 2048: 32, 2304: 4}
_NRRD_BYTES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort", "unsigned short",
                     "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t",
                     "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t", "double"), 8),
}
_MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


@dataclass(frozen=True)
class StreamSize:
    """What a compressed stream decompresses to, and whether it reached its end marker."""

    data_bytes: int
    compressed_bytes: int
    complete: bool
    head: bytes  # the first decompressed bytes (a NIfTI header inside a .nii.gz)


def _decompressor(kind: str):
    if kind == "gzip":
        return zlib.decompressobj(wbits=31)
    if kind == "zlib":
        return zlib.decompressobj(wbits=47)  # zlib or gzip header, detected
    return bz2.BZ2Decompressor()


def stream_size(path: Path, kind: str = "gzip", offset: int = 0, head_bytes: int = 0) -> StreamSize:
    """Decompress `path` from `offset` to its end, counting bytes; several gzip members are followed."""
    decompressor, total, compressed, head = _decompressor(kind), 0, 0, b""
    fresh = False  # a gzip member has just ended; what follows may be another member

    def count(out: bytes) -> None:
        nonlocal total, head
        if len(head) < head_bytes:
            head += out[: head_bytes - len(head)]
        total += len(out)

    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            while chunk := handle.read(_CHUNK):
                compressed += len(chunk)
                while chunk:
                    if fresh and not chunk.startswith(b"\x1f\x8b"):
                        return StreamSize(total, compressed, True, head)  # bytes after the last gzip member are ignored
                    fresh = False
                    count(decompressor.decompress(chunk, _MAX_OUT))
                    if kind == "bzip2":  # keeps unread input itself; drain what it holds
                        chunk = b""
                        while not decompressor.eof and not decompressor.needs_input:
                            count(decompressor.decompress(b"", _MAX_OUT))
                    else:
                        chunk = decompressor.unconsumed_tail
                    if decompressor.eof:
                        if kind != "gzip":
                            return StreamSize(total, compressed, True, head)  # bytes after the stream are ignored
                        decompressor, chunk, fresh = _decompressor(kind), decompressor.unused_data, True  # another member?
    except (zlib.error, OSError, EOFError) as exc:
        raise VolumeError(f"{path}: the {kind} data is corrupt after {compressed} compressed bytes ({exc}); "
                          f"download or copy the file again") from exc
    return StreamSize(total, compressed, fresh or bool(decompressor.eof), head)


def _cut_short(path: Path, declared: int, held: int, what: str = "the file holds") -> VolumeError:
    return VolumeError(f"{path}: data cut short: the header declares {declared} bytes of voxel data, {what} {held} "
                       f"({declared - held} missing); an interrupted download or copy? Get the file again")


def _check_stream(path: Path, kind: str, offset: int, declared: int, skip: int = 0) -> None:
    size = stream_size(path, kind, offset)
    if not size.complete:
        raise VolumeError(
            f"{path}: the {kind} stream ends early: {size.compressed_bytes} compressed bytes give {size.data_bytes - skip} bytes "
            f"of voxel data, the header declares {declared} ({declared - size.data_bytes + skip} missing); an interrupted "
            f"download or copy? Get the file again"
        )
    if size.data_bytes - skip < declared:
        raise _cut_short(path, declared, size.data_bytes - skip, "the compressed stream holds")


def _check_raw(path: Path, offset: int, declared: int) -> None:
    try:
        held = os.path.getsize(path) - offset
    except OSError as exc:
        raise VolumeError(f"{path}: cannot read the data file ({exc.strerror or exc})") from exc
    if held < declared:
        raise _cut_short(path, declared, max(held, 0))


# --- NIfTI -----------------------------------------------------------------------------------------------

def nifti_layout(head: bytes) -> Optional[tuple[int, int]]:
    """(data offset, data bytes) from a NIfTI-1 or -2 header; None when the bytes are not one."""
    if len(head) < 348:
        return None
    for order in "<>":
        size = struct.unpack(order + "i", head[:4])[0]
        if size == 348:
            dims = struct.unpack(order + "8h", head[40:56])
            datatype, bitpix = struct.unpack(order + "hh", head[70:74])
            offset = int(struct.unpack(order + "f", head[108:112])[0])
            break
        if size == 540 and len(head) >= 540:
            datatype, bitpix = struct.unpack(order + "hh", head[12:16])
            dims = struct.unpack(order + "8q", head[16:80])
            offset = int(struct.unpack(order + "q", head[168:176])[0])
            break
    else:
        return None
    rank = int(dims[0])
    if not 1 <= rank <= 7 or any(int(n) < 1 for n in dims[1:rank + 1]):
        return None
    voxels = 1
    for n in dims[1:rank + 1]:
        voxels *= int(n)
    item = _NIFTI_BYTES.get(int(datatype)) or (int(bitpix) // 8 if bitpix and bitpix % 8 == 0 else None)
    if not item:
        return None
    return max(offset, size), voxels * item


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def check_nifti(path: Path) -> None:
    if path.name.endswith(".gz") and is_gzip(path):  # zlib's gzopen, as ITK uses it, also reads a plain file named .gz
        size = stream_size(path, "gzip", head_bytes=540)
        layout = nifti_layout(size.head)
        if layout is None:
            if not size.complete:
                raise VolumeError(f"{path}: the gzip stream ends early after {size.compressed_bytes} compressed bytes "
                                  f"({size.data_bytes} bytes of data, not even a whole NIfTI header); get the file again")
            return
        offset, declared = layout
        held = size.data_bytes - offset
        if not size.complete:
            raise VolumeError(
                f"{path}: the gzip stream ends early: {size.compressed_bytes} compressed bytes give {max(held, 0)} bytes of voxel "
                f"data, the header declares {declared} ({declared - max(held, 0)} missing); an interrupted download or copy? "
                f"Get the file again"
            )
        if held < declared:
            raise _cut_short(path, declared, max(held, 0), "the compressed stream holds")
        return
    with open(path, "rb") as handle:
        layout = nifti_layout(handle.read(540))
    if layout is not None:
        _check_raw(path, layout[0], layout[1])


# --- NRRD ------------------------------------------------------------------------------------------------

def _text_header(path: Path, limit: int = 1 << 16) -> tuple[list[str], int]:
    """The header lines up to the first empty line, and the byte offset where the data starts."""
    with open(path, "rb") as handle:
        raw = handle.read(limit)
    match = re.search(rb"\r?\n\r?\n", raw)
    end = match.end() if match else len(raw)
    return raw[: match.start() if match else len(raw)].decode("latin-1").splitlines(), end


def check_nrrd(path: Path) -> None:
    lines, data_start = _text_header(path)
    if not lines or not lines[0].startswith("NRRD"):
        return
    fields = {}
    for line in lines[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.lstrip("=").strip()
    item = _NRRD_BYTES.get(fields.get("type", "").lower())
    encoding = fields.get("encoding", "raw").lower()
    try:
        sizes = [int(v) for v in fields.get("sizes", "").split()]
        byte_skip = int(fields.get("byte skip", fields.get("byteskip", "0")))
        line_skip = int(fields.get("line skip", fields.get("lineskip", "0")))
    except ValueError:
        return
    data_file = fields.get("data file", fields.get("datafile"))
    if not item or not sizes or line_skip or encoding not in ("raw", "gzip", "gz", "bzip2", "bz2"):
        return  # text / hex encodings, block type, skipped lines: not measured here
    if data_file and (data_file.startswith("LIST") or len(data_file.split()) > 1):
        return  # several data files
    declared = item
    for n in sizes:
        declared *= n
    target, offset = (path.parent / data_file, 0) if data_file else (path, data_start)
    if not target.is_file():
        raise VolumeError(f"{path}: its data file {target.name} is missing")
    if encoding == "raw":
        if byte_skip == -1:  # the data is the last bytes of the file
            _check_raw(target, 0, declared)
        else:
            _check_raw(target, offset + max(byte_skip, 0), declared)
    else:
        _check_stream(target, "gzip" if encoding.startswith("gz") else "bzip2", offset, declared, max(byte_skip, 0))


# --- MetaImage -------------------------------------------------------------------------------------------

def _meta_header(path: Path, limit: int = 1 << 16) -> tuple[dict, int]:
    """The `Key = Value` fields up to ElementDataFile (always the last), and the offset of inline data."""
    with open(path, "rb") as handle:
        raw = handle.read(limit)
    fields, position = {}, 0
    for line in raw.splitlines(keepends=True):
        position += len(line)
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            continue
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    return fields, position


def check_metaimage(path: Path) -> None:
    fields, data_start = _meta_header(path)
    item = _MET_BYTES.get(fields.get("ElementType", ""))
    data_file = fields.get("ElementDataFile", "")
    try:
        sizes = [int(v) for v in fields.get("DimSize", "").split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        header_size = int(fields.get("HeaderSize", "0"))
    except ValueError:
        return
    if not item or not sizes or not data_file or data_file.startswith("LIST") or "%" in data_file or len(data_file.split()) > 1:
        return
    declared = item * channels
    for n in sizes:
        declared *= n
    inline = data_file == "LOCAL"
    target = path if inline else path.parent / data_file
    if not target.is_file():
        raise VolumeError(f"{path}: its data file {data_file} is missing")
    offset = data_start if inline else max(header_size, 0)  # HeaderSize -1: the data ends the file, any length >= declared
    if fields.get("CompressedData", "False").lower() == "true":
        _check_stream(target, "zlib", offset, declared)
    else:
        _check_raw(target, offset, declared)


def check_complete(path: str | os.PathLike) -> None:
    """VolumeError with the byte counts when the file's voxel data is shorter than its header declares."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        check_nifti(path)
    elif name.endswith((".nrrd", ".nhdr")):
        check_nrrd(path)
    elif name.endswith((".mha", ".mhd")):
        check_metaimage(path)
