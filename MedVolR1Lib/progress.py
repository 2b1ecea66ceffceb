"""Progress reporting and cancellation shared by long operations (encoding, propagation, training data)."""

from __future__ import annotations

from typing import Callable, Optional

# progress(fraction in [0, 1], message). A callback may raise errors.Cancelled to stop the work.
ProgressCallback = Callable[[float, str], None]


def report(progress: Optional[ProgressCallback], fraction: float, message: str) -> None:
    """Call the callback if one was given; Cancelled propagates to the caller on purpose."""
    if progress is not None:
        progress(min(max(float(fraction), 0.0), 1.0), message)
