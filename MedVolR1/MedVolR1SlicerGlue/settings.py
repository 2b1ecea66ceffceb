"""Panel settings -> PipelineConfig, and the checks that can fail fast on the GUI thread (before a model loads)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from MedVolR1Lib.errors import CheckpointError, DeviceError

from .model_source import looks_like_path

PROPAGATOR_CHOICES = ("auto", "litemedsam", "medsam2")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class PanelSettings:
    """What the model-settings box of the panel holds (mirrors the parameter node)."""

    model: str = ""
    adapter: str = ""
    propagator: str = "auto"
    sam_checkpoint: str = ""
    device: str = "auto"
    server_url: str = ""  # "" = models run in a local worker process; else http://HOST:PORT of `medvolr1 serve`
    server_token_file: str = ""  # file holding the server's access token (required for non-loopback servers)
    python_executable: str = ""  # interpreter for the local worker; "" = Slicer's own PythonSlicer / sys.executable

    def to_config(self):
        from MedVolR1Lib.pipeline import PipelineConfig

        return PipelineConfig(
            model=self.model.strip() or None,
            adapter=self.adapter.strip() or None,
            propagator=self.propagator,
            sam_checkpoint=self.sam_checkpoint.strip() or None,
            device=self.device,
        )


def has_evidence_model(settings: PanelSettings) -> bool:
    return bool(settings.model.strip())


NO_EVIDENCE_MODEL_HINT = (
    "Finding evidence needs a trained evidence model: open Advanced and set 'Evidence model' to its "
    "Hugging Face name or folder. Without one, draw an evidence box on the key slice and press Segment."
)


@dataclass(frozen=True)
class DeviceInfo:
    choices: tuple[str, ...]
    summary: str


NOT_CHECKED = DeviceInfo(DEVICE_CHOICES, "checked when a run starts")


def detect_devices() -> DeviceInfo:
    """Devices usable here, and a one-line summary for the panel ("CUDA: NVIDIA ..." or "CPU only").

    Imports torch and touches CUDA: never call it while the panel opens (slow, and a CUDA context in
    Slicer's process), only when the user asks or a run needs it."""
    if importlib.util.find_spec("torch") is None:
        return DeviceInfo(("auto", "cpu"), "PyTorch not installed yet (installed on first run)")
    import torch

    choices = ["auto", "cpu"]
    parts = []
    if torch.cuda.is_available():
        choices.append("cuda")
        parts.append(f"CUDA: {torch.cuda.get_device_name(0)}")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        choices.append("mps")
        parts.append("Apple MPS")
    return DeviceInfo(tuple(choices), "; ".join(parts) if parts else f"CPU only ({os.cpu_count()} cores)")


def check_settings(settings: PanelSettings, *, cuda_available: Optional[bool] = None) -> None:
    """Raise CheckpointError / DeviceError / ValueError with what to do, before any thread or model starts."""
    if settings.propagator not in PROPAGATOR_CHOICES:
        raise ValueError(f"unknown propagator {settings.propagator!r}; choose one of {PROPAGATOR_CHOICES}")
    if settings.device not in DEVICE_CHOICES:
        raise ValueError(f"unknown device {settings.device!r}; choose one of {DEVICE_CHOICES}")
    if settings.device == "cuda" and cuda_available is None:
        cuda_available = "cuda" in detect_devices().choices  # only then: other choices never touch CUDA here
    if settings.device == "cuda" and not cuda_available:
        raise DeviceError(
            "CUDA was selected but no CUDA GPU is usable here (no NVIDIA GPU, or PyTorch is a CPU build); "
            "choose device 'cpu' or 'auto'"
        )
    checkpoint = settings.sam_checkpoint.strip()
    if settings.propagator == "medsam2" and not checkpoint:
        raise CheckpointError(
            "MedSAM2 needs a checkpoint file: download MedSAM2_latest.pt from https://huggingface.co/wanglab/MedSAM2 "
            "and choose it under 'MedSAM2 checkpoint', or pick the LiteMedSAM propagator (bundled, runs on CPU)"
        )
    if checkpoint and not Path(checkpoint).expanduser().is_file():
        raise CheckpointError(f"MedSAM2 checkpoint not found: {checkpoint}")
    adapter = settings.adapter.strip()
    if adapter and not Path(adapter).expanduser().is_dir():
        raise CheckpointError(f"LoRA adapter folder not found: {adapter}")
    model = settings.model.strip()
    if model and looks_like_path(model) and not Path(model).expanduser().is_dir():
        raise CheckpointError(f"VLM folder not found: {model}")
