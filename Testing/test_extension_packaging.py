"""The Slicer extension's build files list what the module needs, so an installed extension is complete.

Slicer's build copies only the scripts and resources named in MedVolR1/CMakeLists.txt; a glue module
added to the folder but not listed there would be missing from the packaged extension.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _listed(cmake_text: str, variable: str) -> set[str]:
    block = re.search(rf"set\({variable}\s+(.*?)\)", cmake_text, re.DOTALL)
    assert block, f"{variable} not set"
    return {item.replace("${MODULE_NAME}", "MedVolR1") for item in block.group(1).split()}


def test_every_module_file_is_listed_for_the_build():
    cmake = (REPO / "MedVolR1" / "CMakeLists.txt").read_text()
    scripts = _listed(cmake, "MODULE_PYTHON_SCRIPTS")
    on_disk = {str(p.relative_to(REPO / "MedVolR1")) for p in (REPO / "MedVolR1").rglob("*.py")}
    assert scripts == on_disk
    resources = _listed(cmake, "MODULE_PYTHON_RESOURCES")
    for resource in resources:
        assert (REPO / "MedVolR1" / resource).is_file(), resource
    assert "WITH_GENERIC_TESTS" in cmake and "slicer_add_python_unittest" in cmake


def test_extension_metadata_and_library_install():
    top = (REPO / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf"set\({key} \"[^\"]+\"\)", top), key
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top
    assert "add_subdirectory(MedVolR1)" in top and "MedVolR1Lib/*.py" in top
    s4ext = (REPO / "MedVolR1.s4ext").read_text()
    assert re.search(r"^depends\s+PyTorch", s4ext, re.MULTILINE)


def test_icon_is_a_real_png():
    import numpy as np
    from PIL import Image

    with Image.open(REPO / "MedVolR1" / "Resources" / "Icons" / "MedVolR1.png") as icon:
        assert icon.size == (128, 128)
        pixels = np.asarray(icon.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) >= 5  # a drawn icon, not a flat placeholder


# Keys of Slicer's Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json (additionalProperties: false).
CATALOG_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies", "dicom_support_rule",
                "build_subdirectory", "enabled", "tier"}


def test_extensions_index_entry_matches_the_s4ext():
    import json

    entry = json.loads((REPO / "MedVolR1.json").read_text())
    assert set(entry) <= CATALOG_KEYS and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert entry["build_dependencies"] == ["PyTorch"]
    s4ext = dict(line.split(None, 1) for line in (REPO / "MedVolR1.s4ext").read_text().splitlines()
                 if line.strip() and not line.startswith("#") and len(line.split(None, 1)) == 2)
    assert entry["scm_url"] == s4ext["scmurl"].removesuffix(".git") and entry["scm_revision"] == s4ext["scmrevision"]
    assert entry["category"] == s4ext["category"] and entry["build_subdirectory"] == s4ext["build_subdirectory"]


def test_license_description_and_cmake_minimum():
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text and len(license_text) > 10000
    top = (REPO / "CMakeLists.txt").read_text()
    # Slicer's current extension template (Utilities/Templates/Extensions/Default/CMakeLists.txt).
    assert top.startswith("cmake_minimum_required(VERSION 3.20.6...3.22.6 FATAL_ERROR)")
    description = re.search(r'set\(EXTENSION_DESCRIPTION "([^"]+)"\)', top).group(1)
    assert 1 <= description.count(". ") + 1 <= 2 and len(description) <= 300, description
    for jargon in ("VLM", "vision-language", "LoRA", "propagat"):
        assert jargon.lower() not in description.lower()
    assert description in (REPO / "MedVolR1.s4ext").read_text()


def _module_source() -> str:
    return (REPO / "MedVolR1" / "MedVolR1.py").read_text()


def test_the_minimum_slicer_is_said_in_the_readme_the_description_and_the_help():
    """One sentence, derived from the packages' Python floors (MedVolR1SlicerGlue.deps), in every place a user reads."""
    import sys

    sys.path.insert(0, str(REPO / "MedVolR1"))
    from MedVolR1SlicerGlue import deps

    sentence = f"3D Slicer {'.'.join(map(str, deps.MIN_SLICER))} or later"
    assert deps.SUPPORTED_SLICER_SENTENCE == f"MedVol-R1 needs {sentence}."
    assert deps.SUPPORTED_SLICER_SENTENCE in (REPO / "README.md").read_text()
    assert f"MedVol-R1 needs {sentence}." in _module_source()  # the module's help text
    top = (REPO / "CMakeLists.txt").read_text()
    description = re.search(r'set\(EXTENSION_DESCRIPTION "([^"]+)"\)', top).group(1)
    assert f"Needs {sentence}" in description
    assert f"Needs {sentence}" in (REPO / "MedVolR1.s4ext").read_text()


def test_contributors_help_link_and_category_follow_the_extensions_index():
    source = _module_source()
    contributors = re.search(r"self\.parent\.contributors = \[(.*?)\]", source).group(1)
    names = re.findall(r'"([^"]+)"', contributors)
    assert names and all(re.fullmatch(r"[^()]+ \([^()]+\)", name) for name in names), names  # "Name (Organisation)"
    top = (REPO / "CMakeLists.txt").read_text()
    assert re.search(r'set\(EXTENSION_CONTRIBUTORS "([^"]+)"\)', top).group(1) == ", ".join(names)
    assert re.search(r"^contributors (.+)$", (REPO / "MedVolR1.s4ext").read_text(), re.MULTILINE).group(1) == ", ".join(names)
    link = re.search(r'<a href="(https://github\.com/medvol-r1/SlicerMedVolR1/blob/main/([^"]+))">', source)
    assert link and (REPO / link.group(2)).is_file(), "help text links the module documentation"
    assert 'self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]' in source


def test_the_sample_ct_is_registered_with_sample_data():
    """As Slicer's scripted-module template: connected to startupCompleted, registered with
    SampleData.SampleDataLogic.registerCustomSampleDataSource (keywords of its Slicer 5.10 signature), with a
    thumbnail of about 260x280 pixels that the build installs."""
    import ast

    from PIL import Image

    source = _module_source()
    assert 'slicer.app.connect("startupCompleted()", registerSampleData)' in source
    tree = ast.parse(source)
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "registerCustomSampleDataSource")
    signature = {"category", "sampleName", "uris", "fileNames", "nodeNames", "customDownloader", "thumbnailFileName",
                 "loadFileTypes", "loadFiles", "loadFileProperties", "checksums", "loadFileType"}
    keywords = {k.arg for k in call.keywords}
    assert keywords <= signature and {"category", "sampleName", "thumbnailFileName", "customDownloader"} <= keywords
    thumbnail = REPO / "MedVolR1" / "Resources" / "Icons" / "MedVolR1AbdomenCT.png"
    with Image.open(thumbnail) as image:
        assert image.size == (260, 280)
    assert "Resources/Icons/MedVolR1AbdomenCT.png" in _listed((REPO / "MedVolR1" / "CMakeLists.txt").read_text(), "MODULE_PYTHON_RESOURCES")
