"""Frozen promptable segmenters that turn an evidence anchor into a 3D mask."""

from .base import Propagator

__all__ = ["Propagator"]
