"""The interface every propagator (MedSAM2, LiteMedSAM, test helpers) implements.

`prepare` computes what does not depend on the prompt (image features) once per volume and keeps it,
so re-propagating after a user edits a box, or scoring the 8 rollouts of a GRPO group, reuses it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Sequence

import numpy as np

from ..anchor import EvidenceAnchor
from ..evidence import Evidence
from ..errors import AnchorError
from ..progress import ProgressCallback
from ..volume import Volume


def resolve_slice_range(slice_range: Optional[tuple[int, int]], num_slices: int, key: int) -> tuple[int, int]:
    """Inclusive (lo, hi) clipped to the volume; AnchorError when the key slice lies outside it."""
    if slice_range is None:
        return 0, num_slices - 1
    lo, hi = (int(v) for v in slice_range)
    lo, hi = max(0, lo), min(num_slices - 1, hi)
    if not lo <= key <= hi:
        raise AnchorError(f"key slice {key} lies outside the slice range [{lo}, {hi}]")
    return lo, hi


class Propagator(ABC):
    """Anchor (key slice + boxes) -> (K, J, I) mask of the prepared volume."""

    name: str = "propagator"

    @abstractmethod
    def prepare(self, volume: Volume, progress: Optional[ProgressCallback] = None) -> None:
        """Bind to `volume` and cache prompt-independent work; same fingerprint again is free, another volume resets."""

    @abstractmethod
    def propagate(
        self,
        evidence: "Evidence | EvidenceAnchor",
        *,
        merge: bool = True,
        slice_range: Optional[tuple[int, int]] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> np.ndarray:
        """Segment from the evidence up and down through the volume.

        `evidence` is an `Evidence` (or a single `EvidenceAnchor`, see `Evidence.coerce`): between two anchors
        each slice takes what is tracked from them (MedSAM2: the nearer anchor's pass; LiteMedSAM: by default the
        nearer anchor's walk and the parts of the farther one's that touch it, see box_tracking.anchor_ranges);
        beyond the outermost anchors tracking goes outward; nothing passes `evidence.z_range`; points are for
        backends that take them (others raise AnchorError). Returns uint8 (K, J, I): 0/1 when `merge`, else label
        b+1 for box b of the first anchor (later boxes win overlaps). `slice_range` (inclusive) limits the work to
        a window (coherence reward).
        """

    def propagate_many(
        self,
        evidences: "Sequence[Evidence | EvidenceAnchor]",
        *,
        merge: bool = True,
        slice_ranges: Optional[Sequence[Optional[tuple[int, int]]]] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> list[np.ndarray]:
        """`propagate` for each evidence (a GRPO group's rollouts); backends that can track them together
        (LiteMedSAM: one decoder call per slice for all) override this."""
        ranges = list(slice_ranges) if slice_ranges is not None else [None] * len(evidences)
        if len(ranges) != len(evidences):
            raise ValueError(f"{len(evidences)} evidences but {len(ranges)} slice ranges")
        return [self.propagate(e, merge=merge, slice_range=r) for e, r in zip(evidences, ranges)]

    def describe(self) -> dict:
        """Identity for provenance (evidence.json): name, checkpoint path and hash."""
        return {"name": self.name}
