"""Intensity windows: real HU windows for CT, a percentile window for MR and z-scored arrays.

Every renderer and propagator maps intensities to [0, 1] through one `Window`, so the VLM, the
propagator and the PNGs a user sees all look at the same contrast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import re

import numpy as np

from .errors import VolumeError


@dataclass(frozen=True)
class Window:
    """Intensity interval [low, high] mapped linearly to [0, 1]."""

    low: float
    high: float

    @classmethod
    def from_level_width(cls, level: float, width: float) -> "Window":
        return cls(level - width / 2.0, level + width / 2.0)

    def apply(self, array: np.ndarray) -> np.ndarray:
        scale = 1.0 / max(self.high - self.low, 1e-6)
        out = (np.asarray(array, dtype=np.float32) - np.float32(self.low)) * np.float32(scale)
        return np.clip(out, 0.0, 1.0, out=out)


# (level, width) in Hounsfield units.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "soft_tissue": (50.0, 350.0),
    "liver": (60.0, 160.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}


# (low, high) in z units for M3D-Seg's z-scored arrays: the abdomen HU window mapped through the sample CT's
# foreground mean/std (SegVol's normalisation).  Chosen over the percentile window by measurement
# (docs/m3d_windows.md: LiteMedSAM from GT anchors, mean Dice 0.902 vs 0.849).
ZSCORE_PRESETS: dict[str, tuple[float, float]] = {"m3d_abdomen": (-1.10, 2.03)}


# Target name -> CT preset, by the tissue the target is made of; first match wins, the rest get "abdomen".
# Names are label names or query keys (TotalSegmentator spelling: lung_lower_lobe_left, vertebrae_L3, rib_left_3).
# Matched against whole words of the name (split at "_", "-", spaces), by prefix ("rib" matches "ribs", not
# "fibula"); a trailing "$" asks for the whole word ("hip", not "hippocampus").
TARGET_WINDOW_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("lung", ("lung", "nodule", "trachea", "bronch", "airway")),  # lungs and lung lesions: air vs. tissue
    ("bone", ("vertebra", "rib", "sacrum", "sternum", "hip$", "femur", "humerus", "scapula", "clavicul",
              "skull", "bone", "spine", "costal")),
    ("brain", ("brain",)),
)


def window_for_target(target: Optional[str], modality: str = "CT") -> Optional[str]:
    """The CT preset a target's tissue needs (lung W1500/L-600, bone, brain, else abdomen W400/L40).

    None for non-CT scans and unknown targets (None target): `resolve_window` then takes the modality default.
    One place for the mapping: views for training, the propagators and the pipeline all ask here.
    """
    if modality != "CT" or not target:
        return None
    words = [w for w in re.split(r"[^a-z0-9]+", str(target).lower()) if w]
    for preset, prefixes in TARGET_WINDOW_RULES:
        if any(w == p[:-1] if p.endswith("$") else w.startswith(p) for w in words for p in prefixes):
            return preset
    return "abdomen"


def percentile_window(array: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> Window:
    """Window from the foreground's percentiles (voxels above the volume minimum); for MR / z-scored data."""
    flat = np.asarray(array, dtype=np.float32).ravel()
    if flat.size > 2_000_000:  # a strided sample is plenty for percentiles and keeps big scans fast
        flat = flat[:: flat.size // 2_000_000 + 1]
    foreground = flat[flat > flat.min()]
    if foreground.size == 0:
        foreground = flat
    low, high = np.percentile(foreground, [low_pct, high_pct])
    if high <= low:
        high = low + 1.0
    return Window(float(low), float(high))


def resolve_window(array: np.ndarray, modality: str, window: Union[None, str, Window, tuple] = None) -> Window:
    """Pick the window for a scan: a preset name, an explicit Window/(level, width), or the modality default."""
    if isinstance(window, Window):
        return window
    if isinstance(window, tuple):
        return Window.from_level_width(*window)
    if window is None:
        window = {"CT": "abdomen", "ZSCORE": "m3d_abdomen"}.get(modality, "percentile")
    if window == "percentile":
        return percentile_window(array)
    if window in ZSCORE_PRESETS:
        if modality != "ZSCORE":
            raise VolumeError(f"window {window!r} is for z-scored (M3D-Seg) arrays but the scan is {modality}")
        return Window(*ZSCORE_PRESETS[window])
    if window not in CT_PRESETS:
        raise VolumeError(f"unknown window {window!r}; choose one of {sorted(CT_PRESETS) + sorted(ZSCORE_PRESETS) + ['percentile']}")
    if modality != "CT":
        raise VolumeError(f"window {window!r} is a CT (HU) preset but the scan is {modality}; use 'percentile'")
    return Window.from_level_width(*CT_PRESETS[window])


def window_volume(volume, window: Union[None, str, Window, tuple] = None, out_dtype=np.float32) -> np.ndarray:
    """Whole volume windowed to [0, 1] (float32) or [0, 255] (uint8)."""
    resolved = resolve_window(volume.array, volume.modality, window)
    scaled = resolved.apply(volume.array)
    if out_dtype == np.uint8:
        return np.rint(scaled * 255.0).astype(np.uint8)
    return scaled
