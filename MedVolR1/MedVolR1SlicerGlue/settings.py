"""Panel settings -> PipelineConfig, and the checks that can fail fast on the GUI thread (before a model loads)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from MedVolR1Lib.errors import CheckpointError, DeviceError

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


def _looks_like_path(text: str) -> bool:
    """A Hugging Face id is 'org/name'; anything else with a separator, '~' or a drive letter is a folder."""
    return text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1 or (len(text) > 1 and text[1] == ":")


@dataclass(frozen=True)
class DeviceInfo:
    choices: tuple[str, ...]
    summary: str


def detect_devices() -> DeviceInfo:
    """Devices usable here, and a one-line summary for the panel ("CUDA: NVIDIA ..." or "CPU only")."""
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
    if cuda_available is None:
        cuda_available = "cuda" in detect_devices().choices
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
    if model and _looks_like_path(model) and not Path(model).expanduser().is_dir():
        raise CheckpointError(f"VLM folder not found: {model}")
