"""Panel settings -> PipelineConfig, and the checks that can fail fast on the GUI thread (before a model loads)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Protocol
from urllib.parse import urlsplit

from MedVolR1Lib.errors import CheckpointError, DeviceError

from .model_source import looks_like_path

PROPAGATOR_CHOICES = ("auto", "litemedsam", "medsam2")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class PanelSettings:
    """What a run uses: the model choices (parameter node, saved with the scene) and where the models run
    (server, token file, worker Python: the user's application settings, never the scene)."""

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


@dataclass(frozen=True)
class DeviceInfo:
    choices: tuple[str, ...]
    summary: str


def device_choices(mode: str = "slicer", system: Optional[str] = None, machine: Optional[str] = None) -> tuple[str, ...]:
    """Devices the computer running the models can have: CUDA on Windows and Linux, Apple MPS on macOS on
    Apple silicon.  Slicer's own macOS Python is x86_64 (no MPS); a separate worker Python on such a Mac
    is arm64; a server is another computer, which checks its own devices."""
    system = system if system is not None else sys.platform
    machine = (machine if machine is not None else platform.machine()).lower()
    if mode == "server":
        return DEVICE_CHOICES
    if system == "darwin":
        apple_silicon = machine == "arm64" or (mode == "worker" and _is_apple_silicon(system))
        return ("auto", "cpu", "mps") if apple_silicon else ("auto", "cpu")
    return ("auto", "cpu", "cuda")


def _is_apple_silicon(system: str) -> bool:
    """True on an Apple-silicon Mac, also from an x86_64 process under Rosetta (sysctl.proc_translated)."""
    if system != "darwin":
        return False
    try:
        out = subprocess.run(["sysctl", "-in", "hw.optional.arm64"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.stdout.strip() == "1"


NOT_CHECKED_SUMMARY = "checked when a run starts"

# Run by the worker's interpreter, never in Slicer's process: importing torch and touching CUDA there is slow
# and leaves a CUDA context in the application.
_PROBE = (
    "import json, os, importlib.util\n"
    "if importlib.util.find_spec('torch') is None:\n"
    "    print(json.dumps({'torch': None})); raise SystemExit\n"
    "import torch\n"
    "cuda = torch.cuda.is_available()\n"
    "mps = getattr(torch.backends, 'mps', None)\n"
    "print(json.dumps({'torch': torch.__version__, 'cuda': torch.cuda.get_device_name(0) if cuda else None,\n"
    "                  'mps': bool(mps is not None and mps.is_available()), 'cores': os.cpu_count()}))\n"
)


def detect_devices(python: str, timeout: float = 120.0, run=subprocess.run) -> DeviceInfo:
    """Devices usable by `python` (the worker's interpreter: PythonSlicer or the chosen Worker Python), asked
    in a separate process, and a one-line summary for the panel ("CUDA: NVIDIA ..." or "CPU only")."""
    try:
        out = run([python, "-c", _PROBE], capture_output=True, text=True, timeout=timeout)
        found = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return DeviceInfo(("auto", "cpu"), f"could not ask {python} for its devices")
    if found.get("torch") is None:
        return DeviceInfo(("auto", "cpu"), "PyTorch not installed yet (installed on first run)")
    choices, parts = ["auto", "cpu"], []
    if found.get("cuda"):
        choices.append("cuda")
        parts.append(f"CUDA: {found['cuda']}")
    if found.get("mps"):
        choices.append("mps")
        parts.append("Apple MPS")
    return DeviceInfo(tuple(choices), "; ".join(parts) if parts else f"CPU only ({found.get('cores')} cores)")


# ------------------------------------------------------------------------------ settings that stay with the user

# Application settings (QSettings in Slicer), never the parameter node: a shared scene must not name a program
# to run, a server to send a scan to, or a token to send with it.
USER_SETTING_KEYS = {
    "python_executable": "MedVolR1/WorkerPython",
    "server_url": "MedVolR1/ServerURL",
    "server_token_file": "MedVolR1/ServerTokenFile",
}
APPROVED_HOSTS_KEY = "MedVolR1/UploadApprovedServers"
# What the parameter node (and so a saved scene) may hold: the model choices only.
SCENE_PARAMETERS = {"model": "model", "adapter": "adapter", "propagator": "propagator", "sam_checkpoint": "samCheckpoint",
                    "device": "device"}


class SettingsStore(Protocol):
    """Key -> text storage: Slicer's qt.QSettings (adapter in MedVolR1.py) or MemoryStore in tests."""

    def value(self, key: str) -> str: ...

    def set_value(self, key: str, value: str) -> None: ...


class MemoryStore:
    def __init__(self, values: Optional[dict] = None) -> None:
        self.values = dict(values or {})

    def value(self, key: str) -> str:
        return str(self.values.get(key, ""))

    def set_value(self, key: str, value: str) -> None:
        self.values[key] = value


@dataclass(frozen=True)
class UserSettings:
    """Where the models run, chosen by this computer's user."""

    python_executable: str = ""
    server_url: str = ""
    server_token_file: str = ""


def load_user_settings(store: SettingsStore) -> UserSettings:
    return UserSettings(**{name: (store.value(key) or "").strip() for name, key in USER_SETTING_KEYS.items()})


def save_user_settings(store: SettingsStore, user: UserSettings) -> None:
    for name, key in USER_SETTING_KEYS.items():
        store.set_value(key, getattr(user, name).strip())


def scene_values(parameter_node) -> dict:
    """The model choices a scene's parameter node holds (vtkMRMLScriptedModuleNode parameters), nothing else."""
    if parameter_node is None:
        return {}
    return {name: parameter_node.GetParameter(parameter) or "" for name, parameter in SCENE_PARAMETERS.items()
            if parameter_node.GetParameter(parameter)}


def panel_settings(scene: Mapping[str, str], user: UserSettings) -> PanelSettings:
    """The run's settings: model choices from the scene, where to run (worker, server, token) from the user."""
    known = {name: str(scene[name]) for name in SCENE_PARAMETERS if name in scene}
    python = user.python_executable.strip()
    return PanelSettings(**known, server_url=user.server_url.strip(), server_token_file=user.server_token_file.strip(),
                         python_executable=os.path.expanduser(python) if python else "")  # "~/medvolr1-worker/bin/python"


def server_identity(url: str) -> str:
    """'scheme://host:port' of a server URL: what an upload approval is remembered for."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"server address {url!r} must look like http://HOST:PORT")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname.lower()
    return f"{parts.scheme}://{'[' + host + ']' if ':' in host else host}:{port}"


def approved_servers(store: SettingsStore) -> list[str]:
    return [line for line in (store.value(APPROVED_HOSTS_KEY) or "").splitlines() if line.strip()]


def upload_approved(store: SettingsStore, url: str) -> bool:
    return server_identity(url) in approved_servers(store)


def upload_question(url: str) -> str:
    return (f"Send the scan to the model server {server_identity(url)}? The whole volume leaves this computer "
            "(for every later run too). The answer is remembered for this server; change it by clearing the "
            "server address in MedVol-R1's Advanced settings.")


def confirm_upload(store: SettingsStore, url: str, ask: Callable[[str], bool]) -> bool:
    """True when the user has agreed to send scans to this server: asked once per server, then remembered.
    Every server is asked about, loopback included (an SSH tunnel makes a remote server look local)."""
    if upload_approved(store, url):
        return True
    if not ask(upload_question(url)):
        return False
    store.set_value(APPROVED_HOSTS_KEY, "\n".join([*approved_servers(store), server_identity(url)]))
    return True


def forget_upload_approvals(store: SettingsStore) -> None:
    store.set_value(APPROVED_HOSTS_KEY, "")


def check_settings(settings: PanelSettings, *, cuda_available: Optional[bool] = None) -> None:
    """Raise CheckpointError / DeviceError / ValueError with what to do, before any thread or model starts."""
    if settings.propagator not in PROPAGATOR_CHOICES:
        raise ValueError(f"unknown propagator {settings.propagator!r}; choose one of {PROPAGATOR_CHOICES}")
    if settings.device not in DEVICE_CHOICES:
        raise ValueError(f"unknown device {settings.device!r}; choose one of {DEVICE_CHOICES}")
    # cuda_available None: not known here (Slicer's process never probes CUDA); the worker says so if missing.
    if settings.device == "cuda" and cuda_available is False:
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
