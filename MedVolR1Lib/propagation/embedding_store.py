"""LiteMedSAM's per-volume image embeddings, kept compactly (fp16) and counted in bytes.

One slice's embedding is a (1, 256, 64, 64) tensor: 4 MiB in fp32, 2 MiB in fp16.  The encoder's output
is a layer norm's (|values| below 1 on CT), so fp16's 11-bit mantissa keeps it to a relative 5e-4;
the masks it gives match fp32's (Testing/test_preencode.py).  Reads return fp32: the decoder stays fp32.

The byte budget is what background pre-encoding may fill (`has_room`); a slice a request needs is always
stored, whatever the budget says, so a request never fails for memory the background could have used.
"""

from __future__ import annotations

import os
from typing import Iterator, Mapping, Optional

from ..memory import os_available_memory

BUDGET_ENV = "MEDVOLR1_EMBEDDING_BUDGET_MB"  # overrides the budget set from free RAM (tests, small machines)
FREE_RAM_SHARE = 0.25  # of the memory available when the budget is set
FALLBACK_BUDGET = 1 << 30  # where the free memory cannot be read


def default_budget_bytes() -> int:
    """`MEDVOLR1_EMBEDDING_BUDGET_MB` if set, else a quarter of the free RAM (1 GiB where it cannot be read)."""
    configured = os.environ.get(BUDGET_ENV, "").strip()
    if configured:
        try:
            megabytes = float(configured)
        except ValueError:
            raise ValueError(f"{BUDGET_ENV} must be a number of megabytes, got {configured!r}") from None
        if megabytes < 0:
            raise ValueError(f"{BUDGET_ENV} must not be negative, got {configured!r}")
        return int(megabytes * 2**20)
    free = os_available_memory()
    return int(free * FREE_RAM_SHARE) if free else FALLBACK_BUDGET


class EmbeddingStore(Mapping):
    """slice index -> embedding, stored as `dtype` (fp16 by default), read back as fp32.

    budget_bytes: what background encoding may fill (None: `default_budget_bytes()` when first asked, and asked
        again after `clear()`, e.g. for the next volume, as the free memory will have changed).
    """

    def __init__(self, budget_bytes: Optional[int] = None, dtype: str = "float16") -> None:
        import torch

        if dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"embedding dtype must be float16, bfloat16 or float32, got {dtype!r}")
        self.dtype = getattr(torch, dtype)
        self._budget = budget_bytes
        self._budget_given = budget_bytes is not None
        self._items: dict = {}
        self.nbytes = 0

    # ---------------------------------------------------------------------------------------------- Mapping
    def __getitem__(self, k: int):
        import torch

        return self._items[k].to(torch.float32)

    def __contains__(self, k: object) -> bool:
        return k in self._items

    def __iter__(self) -> Iterator[int]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    # -------------------------------------------------------------------------------------------- storing
    def put(self, k: int, embedding) -> None:
        """Keep one slice's embedding (a copy, in the store's dtype); fp16 overflow falls back to bfloat16."""
        import torch

        stored = embedding.detach().to(self.dtype).contiguous().clone()
        if self.dtype == torch.float16 and not torch.isfinite(stored).all():
            stored = embedding.detach().to(torch.bfloat16).contiguous().clone()
        old = self._items.get(k)
        if old is not None:
            self.nbytes -= old.element_size() * old.nelement()
        self._items[int(k)] = stored
        self.nbytes += stored.element_size() * stored.nelement()

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0
        if not self._budget_given:
            self._budget = None

    # -------------------------------------------------------------------------------------------- budget
    @property
    def budget_bytes(self) -> int:
        if self._budget is None:
            self._budget = default_budget_bytes()
        return self._budget

    @budget_bytes.setter
    def budget_bytes(self, value: Optional[int]) -> None:
        self._budget = None if value is None else max(0, int(value))
        self._budget_given = value is not None

    def has_room(self, slice_bytes: int) -> bool:
        """Whether one more slice of `slice_bytes` stays within the budget (background encoding asks this)."""
        return self.nbytes + slice_bytes <= self.budget_bytes

    def slice_bytes(self, shape=(1, 256, 64, 64)) -> int:
        """Bytes one slice takes in this store (fp16: 2 MiB for LiteMedSAM's 256 x 64 x 64)."""
        import torch

        n = 1
        for size in shape:
            n *= int(size)
        return n * torch.empty((), dtype=self.dtype).element_size()
