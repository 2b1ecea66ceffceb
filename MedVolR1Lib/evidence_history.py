"""Versions of the evidence and the mask each produced, so a correction can be undone in one step.

Kept in the library (not the Slicer module) because the CLI session, the worker process and the
simulated-user protocol all need the same undo semantics.  Masks are kept compressed (one bit per voxel,
then zlib) and the history is bounded by bytes as well as by count: inside Slicer, twenty full uint8
masks of a 512x512x400 CT would hold 2 GB; compressed, a typical organ mask takes tens of kilobytes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .evidence import Evidence

DEFAULT_MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class EvidenceVersion:
    evidence: Evidence
    packed: bytes  # zlib(np.packbits(mask)) for 0/1 masks, zlib(raw uint8 bytes) otherwise
    shape: tuple
    bits: bool = True

    @classmethod
    def of(cls, evidence: Evidence, mask: np.ndarray) -> "EvidenceVersion":
        mask = np.asarray(mask)
        binary = mask.dtype == np.bool_ or (mask.size == 0 or int(mask.max()) <= 1 and int(mask.min()) >= 0)
        raw = np.packbits(mask.astype(bool, copy=False)) if binary else np.ascontiguousarray(mask, dtype=np.uint8)
        return cls(evidence, zlib.compress(raw.tobytes(), 1), tuple(int(n) for n in mask.shape), bool(binary))

    @property
    def mask(self) -> np.ndarray:
        """The canonical (K, J, I) uint8 mask, as propagated from `evidence` (a fresh array on every call)."""
        raw = np.frombuffer(zlib.decompress(self.packed), dtype=np.uint8)
        count = int(np.prod(self.shape))
        flat = np.unpackbits(raw, count=count) if self.bits else raw.copy()
        return flat.reshape(self.shape)

    @property
    def nbytes(self) -> int:
        return len(self.packed)


class EvidenceHistory:
    """A bounded stack of versions; `undo` drops the newest and returns the one before it.

    At most `limit` versions and `max_bytes` of compressed masks; the oldest go first, the newest always stays."""

    def __init__(self, limit: int = 20, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if limit < 1:
            raise ValueError("the history must keep at least one version")
        self._limit = int(limit)
        self._max_bytes = int(max_bytes)
        self._versions: list[EvidenceVersion] = []

    def push(self, evidence: Evidence, mask: np.ndarray) -> EvidenceVersion:
        version = EvidenceVersion.of(evidence, mask)
        self._versions.append(version)
        del self._versions[: max(0, len(self._versions) - self._limit)]
        while len(self._versions) > 1 and self.nbytes > self._max_bytes:
            del self._versions[0]
        return version

    @property
    def nbytes(self) -> int:
        """Bytes the kept masks take (compressed)."""
        return sum(v.nbytes for v in self._versions)

    @property
    def current(self) -> Optional[EvidenceVersion]:
        return self._versions[-1] if self._versions else None

    @property
    def can_undo(self) -> bool:
        return len(self._versions) > 1

    def undo(self) -> EvidenceVersion:
        """Restore the previous version; ValueError when there is nothing to step back to."""
        if not self.can_undo:
            raise ValueError("nothing to undo: this is the first evidence of this segment")
        self._versions.pop()
        return self._versions[-1]

    def __len__(self) -> int:
        return len(self._versions)
