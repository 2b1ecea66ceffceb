"""Versions of the evidence and the mask each produced, so a correction can be undone in one step.

Kept in the library (not the Slicer module) because the CLI session, the worker process and the
simulated-user protocol all need the same undo semantics.  Masks are stored as given (no copy):
callers hand over arrays they no longer mutate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .evidence import Evidence


@dataclass(frozen=True)
class EvidenceVersion:
    evidence: Evidence
    mask: np.ndarray  # canonical (K, J, I) uint8, as propagated from `evidence`


class EvidenceHistory:
    """A bounded stack of versions; `undo` drops the newest and returns the one before it."""

    def __init__(self, limit: int = 20) -> None:
        if limit < 1:
            raise ValueError("the history must keep at least one version")
        self._limit = int(limit)
        self._versions: list[EvidenceVersion] = []

    def push(self, evidence: Evidence, mask: np.ndarray) -> EvidenceVersion:
        version = EvidenceVersion(evidence, mask)
        self._versions.append(version)
        del self._versions[: max(0, len(self._versions) - self._limit)]
        return version

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
