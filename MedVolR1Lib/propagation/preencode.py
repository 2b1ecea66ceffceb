"""Encode a volume's slices while the radiologist reads it, one slice per step, most useful slices first.

LiteMedSAM's encoder is the cost of a first mask (about 0.6 s per slice on two cores); its embeddings do
not depend on the prompt.  The worker calls `step()` whenever no request is waiting, so a request waits
for at most the one slice under way.  Order: outward from the slice the user is looking at, interleaved
with outward from the middle of the body (where a box is most likely drawn before the user has scrolled);
slices without body come last.  Encoding stops when the embedding store's byte budget is reached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..views import body_slice_range
from ..volume import Volume

CURRENT_SLICE_WEIGHT = 2  # slices near the viewed slice are encoded twice as fast as near the body's middle


@dataclass(frozen=True)
class PreEncodeState:
    """What the worker reports (protocol.PreEncodeStatus): `ready` of `total` slices encoded; `state`: encoding,
    done, budget (the byte budget is reached), stopped (cancelled, closed, or the propagator moved to another
    volume) or unsupported."""

    ready: int
    total: int
    state: str
    current: int  # the slice the order is centred on (-1: the body's middle only)
    nbytes: int
    budget_bytes: int


def slice_priority(num_slices: int, middle: int, body: tuple[int, int], current: Optional[int]) -> np.ndarray:
    """Lower first: distance to the viewed slice, or twice the distance to the body's middle, whichever is
    smaller; slices outside the body range after every slice inside it.  Ties go to the viewed side."""
    k = np.arange(num_slices)
    priority = np.abs(k - middle).astype(np.float64) * (CURRENT_SLICE_WEIGHT if current is not None else 1)
    if current is not None:
        priority = np.minimum(priority, np.abs(k - current) - 0.5)  # -0.5: a tie goes to the viewed slice
    outside = (k < body[0]) | (k > body[1])
    priority[outside] += 4 * num_slices
    return priority


def encode_order(num_slices: int, middle: int, body: tuple[int, int], current: Optional[int]) -> list[int]:
    """Every slice once, in the order background encoding visits them (stable: lower index first on ties)."""
    return [int(k) for k in np.argsort(slice_priority(num_slices, middle, body, current), kind="stable")]


class PreEncoder:
    """Background encoding of one volume into a LiteMedSAM propagator's embedding store.

    load: returns the propagator (called by the first `step()`, so opening a volume never waits for a model
    to load); pre-encoding needs its `prepare`, `encode`, `embedding_store` and `bound_fingerprint`
    (LiteMedSAMPropagator), and stops as "unsupported" for a propagator without them (MedSAM2 encodes whole
    videos on request).  Steps: load the model, bind (window) the volume, then one slice per step.
    """

    def __init__(self, load: Callable[[], object], volume: Volume, current: Optional[int] = None) -> None:
        self._load = load
        self.propagator = None
        self.volume = volume
        self.total = volume.num_slices
        self.body = body_slice_range(volume)
        self.middle = (self.body[0] + self.body[1]) // 2
        self.current: Optional[int] = None
        self.steps = 0  # slices this pre-encoder encoded (tests count them)
        self._stopped: Optional[str] = None  # "stopped" or "unsupported" once it ended early
        self._order: list[int] = []
        self._bound = False
        self.look_at(current)

    def look_at(self, slice_index: Optional[int]) -> None:
        """Re-centre the order on the slice the user is looking at (None or -1 keeps the current one)."""
        if slice_index is not None and slice_index >= 0:
            self.current = int(min(slice_index, self.total - 1))
        self._order = encode_order(self.total, self.middle, self.body, self.current)

    def _store(self):
        """The embedding store while it holds this volume, else None."""
        if not self._bound or self.propagator.bound_fingerprint != self.volume.fingerprint:
            return None
        return self.propagator.embedding_store

    def next_slice(self) -> Optional[int]:
        store = self._store() or {}
        return next((k for k in self._order if k not in store), None)

    @property
    def pending(self) -> bool:
        """True while a `step()` has work to do (not stopped, not done, the budget has room)."""
        return self._state() == "encoding"

    def step(self) -> bool:
        """One unit of work: load the model, or bind the volume, or encode the next slice.  False: nothing to do."""
        if self._state() != "encoding":
            return False
        if self.propagator is None:
            propagator = self._load()
            if not all(hasattr(propagator, name) for name in ("embedding_store", "bound_fingerprint", "encode")):
                self._stopped = "unsupported"
                return False
            self.propagator = propagator
            return True
        if not self._bound:
            self.propagator.prepare(self.volume)
            self._bound = True
            return True
        self.propagator.encode([self.next_slice()])
        self.steps += 1
        return True

    def stop(self, release: bool = False) -> None:
        """No more steps; `release` also frees the embeddings when the propagator still holds this volume."""
        store = self._store()
        if self._stopped is None:
            self._stopped = "stopped"
        if release and store is not None:
            store.clear()

    def _state(self) -> str:
        if self._stopped is not None:
            return self._stopped
        if self.propagator is None or not self._bound:
            return "encoding"
        store = self._store()
        if store is None:  # a request on another volume re-bound the propagator: this volume's cache is gone
            self._stopped = "stopped"
            return "stopped"
        if self.next_slice() is None:
            return "done"
        return "encoding" if store.has_room(store.slice_bytes()) else "budget"

    def status(self) -> PreEncodeState:
        state = self._state()
        store = self._store()
        return PreEncodeState(
            ready=len(store) if store is not None else 0,
            total=self.total,
            state=state,
            current=self.current if self.current is not None else -1,
            nbytes=store.nbytes if store is not None else 0,
            budget_bytes=store.budget_bytes if store is not None else 0,
        )
