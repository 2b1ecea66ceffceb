"""File checksums for provenance (evidence.json) and download verification."""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike, block_size: int = 1 << 22) -> str:
    """Streaming sha256 of a file (checkpoints are hundreds of MB; never read whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()
