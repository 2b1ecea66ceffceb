"""Which packages the Slicer module asks to install, and the Python-version guard (Slicer 5.6/5.8 embed Python 3.9)."""

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


def test_missing_sam2_on_python_39_is_a_clear_error_not_a_failed_pip_run(monkeypatch):
    monkeypatch.setattr(deps, "is_installed", lambda r: r.import_name != "sam2")
    assert deps.missing_requirements("litemedsam", "", python_version=(3, 9)) == []
    with pytest.raises(deps.UnsupportedPython, match=r"sam2 .*Python >= 3\.10.*3\.9"):
        deps.missing_requirements("medsam2", "/x.pt", python_version=(3, 9))
    assert deps.missing_requirements("medsam2", "/x.pt", python_version=(3, 12)) == [deps.SAM2]


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


def test_restart_is_asked_only_for_changed_packages_already_imported():
    before = {"transformers": "4.50.0", "peft": "0.14.0", "numpy": "2.0.0"}
    after = {"transformers": "4.51.3", "peft": "0.15.0", "numpy": "2.0.0", "sam2": "1.1.0"}
    changed = deps.restart_needed(before, after, modules={"transformers": object(), "numpy": object()})
    assert changed == ["transformers 4.50.0 -> 4.51.3"]
    assert "torch" in deps.installed_versions()


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
    glue += ["MedVolR1SlicerGlue." + name for name in ("deps", "evidence_edits", "model_source", "mrml_mapping", "settings")]
    code = (f"import sys; sys.path.insert(0, {str(module.parent)!r}); import importlib\n"
            f"for name in {glue!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'sam2', 'huggingface_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_no_model_path_does_not_ask_for_the_evidence_models_packages(monkeypatch):
    monkeypatch.setattr(deps, "is_installed", lambda r: r.import_name not in ("transformers", "peft"))
    assert [r.import_name for r in deps.missing_requirements("litemedsam")] == ["transformers", "peft"]
    assert deps.missing_requirements("litemedsam", evidence_model=False) == []
