"""The panel's .ui file against the module code, with PySide6 offscreen.  Slicer's own widgets are not in
PySide6: plain stand-ins take their class names (a node selector draws as a combo box, a collapsible
section as a titled box), so names, types and the layout are checkable and the screenshot shows the layout.

Proves: the .ui loads; every `self.ui.<name>` MedVolR1.py uses exists, with a type that has the
methods the code calls; every parameter-node binding names a real parameter; a screenshot of the panel.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtWidgets = pytest.importorskip("PySide6.QtWidgets")
from PySide6.QtCore import QFile  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402

import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedVolR1"))

ROOT = Path(__file__).resolve().parents[1]
UI_PATH = ROOT / "MedVolR1" / "Resources" / "UI" / "MedVolR1.ui"
MODULE_PATH = ROOT / "MedVolR1" / "MedVolR1.py"
SCREENSHOT = ROOT / "docs" / "slicer_panel.png"

EXPECTED_TYPES = {  # widgets whose Qt type matters to the module code
    "findEvidenceButton": QtWidgets.QPushButton,
    "segmentButton": QtWidgets.QPushButton,
    "cancelButton": QtWidgets.QPushButton,
    "progressBar": QtWidgets.QProgressBar,
    "propagatorComboBox": QtWidgets.QComboBox,
    "deviceComboBox": QtWidgets.QComboBox,
    "reasoningTextEdit": QtWidgets.QPlainTextEdit,
    "statusLabel": QtWidgets.QLabel,
    "deviceLabel": QtWidgets.QLabel,
    "queryLineEdit": QtWidgets.QLineEdit,
    "modelLineEdit": QtWidgets.QLineEdit,
    "adapterLineEdit": QtWidgets.QLineEdit,
    "samCheckpointLineEdit": QtWidgets.QLineEdit,
    "addBoxButton": QtWidgets.QPushButton,
    "removeBoxButton": QtWidgets.QPushButton,
    "undoButton": QtWidgets.QPushButton,
    "limitTopButton": QtWidgets.QPushButton,
    "limitBottomButton": QtWidgets.QPushButton,
    "clearLimitButton": QtWidgets.QPushButton,
    "evidenceListWidget": QtWidgets.QListWidget,
    "evidenceModelHintLabel": QtWidgets.QLabel,
    "extentLabel": QtWidgets.QLabel,
    "serverLineEdit": QtWidgets.QLineEdit,
}
# Words a radiologist should not meet outside the Advanced section (issue 8: plain words in the main panel).
JARGON = ("VLM", "LoRA", "propagat", "checkpoint", "CUDA")


class qMRMLNodeComboBox(QtWidgets.QComboBox):  # noqa: N801 - the .ui's class name
    """Stand-in for Slicer's node selector."""


class ctkCollapsibleButton(QtWidgets.QGroupBox):  # noqa: N801
    """Stand-in for CTK's collapsible section: a box titled with the section's text."""


class qMRMLWidget(QtWidgets.QWidget):  # noqa: N801
    """Stand-in for the panel's root widget."""


@pytest.fixture(scope="module")
def panel():
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    handle = QFile(str(UI_PATH))
    assert handle.open(QFile.ReadOnly)
    loader = QUiLoader()
    for stand_in in (qMRMLNodeComboBox, ctkCollapsibleButton, qMRMLWidget):
        loader.registerCustomWidget(stand_in)
    widget = loader.load(handle)
    handle.close()
    assert widget is not None, "QUiLoader could not load MedVolR1.ui"
    for section in widget.findChildren(ctkCollapsibleButton):
        section.setTitle(str(section.property("text")))
    yield widget
    widget.deleteLater()
    app.processEvents()


def _ui_names_used_by_module() -> set[str]:
    return set(re.findall(r"self\.ui\.([A-Za-z_][A-Za-z0-9_]*)", MODULE_PATH.read_text()))


def _parameter_names() -> set[str]:
    tree = ast.parse(MODULE_PATH.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "MedVolR1ParameterNode":
            return {stmt.target.id for stmt in node.body if isinstance(stmt, ast.AnnAssign)}
    raise AssertionError("MedVolR1ParameterNode not found in MedVolR1.py")


def _no_model_hint() -> str:
    """The literal text MedVolR1.py gives `_()` for the no-evidence-model hint (a literal, so it can be translated)."""
    tree = ast.parse(MODULE_PATH.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "noModelHint":
            return node.value.args[0].value
    raise AssertionError("noModelHint not found in MedVolR1.py")


def _translated_calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("_", "translate"):
            yield node


def test_every_translated_text_is_a_literal():
    """lupdate extracts only literal strings: every `_()`/`translate()` argument is one (ExtensionsIndex review)."""
    tree = ast.parse(MODULE_PATH.read_text())
    calls = list(_translated_calls(tree))
    assert len(calls) > 40
    bad = [ast.unparse(c) for c in calls if not all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in c.args)]
    assert not bad, bad
    # The category is translated as Slicer's scripted-module template does it.
    assert 'translate("qSlicerAbstractCoreModule", "Segmentation")' in MODULE_PATH.read_text()


def test_every_widget_the_module_uses_exists(panel):
    used = _ui_names_used_by_module()
    assert {"findEvidenceButton", "segmentButton", "cancelButton", "progressBar", "reasoningTextEdit"} <= used
    missing = sorted(name for name in used if panel.findChild(QtWidgets.QWidget, name) is None)
    assert not missing, f"MedVolR1.py uses widgets absent from MedVolR1.ui: {missing}"
    for name, cls in EXPECTED_TYPES.items():
        assert isinstance(panel.findChild(QtWidgets.QWidget, name), cls), name


def test_parameter_bindings_name_real_parameters(panel):
    parameters = _parameter_names()
    bound = {}
    for widget in panel.findChildren(QtWidgets.QWidget):
        name = widget.property("SlicerParameterName")
        if name:
            bound[str(name)] = widget.objectName()
    assert set(bound) <= parameters, f"unknown parameters bound in the .ui: {set(bound) - parameters}"
    # Combo boxes are synced in code (_syncCombos); everything else is bound in the .ui.
    assert set(bound) == parameters - {"propagator", "device"}
    assert bound["inputVolume"] == "inputVolumeSelector" and bound["query"] == "queryLineEdit"
    # Worker Python, server and token file are the user's application settings: no parameter, no binding.
    for widget in ("serverLineEdit", "serverTokenLineEdit", "pythonLineEdit"):
        assert panel.findChild(QtWidgets.QLineEdit, widget).property("SlicerParameterName") is None, widget
    assert not {name for name in parameters if re.search("server|python|token|executable", name, re.IGNORECASE)}
    assert "never in the scene" in panel.findChild(QtWidgets.QLineEdit, "serverLineEdit").toolTip()


def test_main_panel_speaks_plainly_and_says_research_use(panel):
    advanced = panel.findChild(QtWidgets.QWidget, "advancedCollapsibleButton")
    assert advanced is not None
    texts = []
    for widget in panel.findChildren(QtWidgets.QWidget):
        if widget is advanced or advanced.isAncestorOf(widget):
            continue
        for prop in ("text", "toolTip", "placeholderText", "title"):
            value = widget.property(prop)
            if isinstance(value, str) and value:
                texts.append((widget.objectName(), value))
    offending = [(name, text) for name, text in texts if any(word.lower() in text.lower() for word in JARGON)]
    assert not offending, offending
    notice = panel.findChild(QtWidgets.QLabel, "researchNoticeLabel")
    assert "research use only" in notice.text().lower()
    # The disabled Find evidence says what to set, in words (no flag names, no jargon), in the main panel.
    hint = _no_model_hint()
    assert "evidenceModelHintLabel.text" in MODULE_PATH.read_text() and "--" not in hint and "Evidence model" in hint
    assert not any(word.lower() in hint.lower() for word in JARGON)
    for name in ("inputVolumeSelector", "outputSegmentationSelector"):
        assert isinstance(panel.findChild(QtWidgets.QWidget, name), qMRMLNodeComboBox), name


def test_screenshot_of_the_panel(panel):
    panel.resize(460, 980)
    combo = panel.findChild(QtWidgets.QComboBox, "propagatorComboBox")
    combo.addItems(["auto", "litemedsam", "medsam2"])
    panel.findChild(QtWidgets.QComboBox, "deviceComboBox").addItems(["auto", "cpu"])
    panel.findChild(QtWidgets.QLabel, "deviceLabel").setText("CPU only")
    panel.findChild(QtWidgets.QLineEdit, "queryLineEdit").setText("segment the left kidney")
    panel.findChild(QtWidgets.QPlainTextEdit, "reasoningTextEdit").setPlainText(
        "(illustration) The left kidney is largest on slice 57, lateral to the spine; one box.")
    panel.findChild(QtWidgets.QProgressBar, "progressBar").setValue(40)
    panel.findChild(QtWidgets.QComboBox, "inputVolumeSelector").addItem("(illustration) example CT")
    panel.findChild(QtWidgets.QComboBox, "outputSegmentationSelector").addItem("Create new segmentation")
    boxes = panel.findChild(QtWidgets.QListWidget, "evidenceListWidget")
    boxes.addItems(["(illustration) Evidence 1: slice 57 (S -402.0 mm)", "(illustration) Evidence 2: slice 64 (S -381.0 mm)"])
    panel.findChild(QtWidgets.QPushButton, "addBoxButton").setText("Add box on this slice")
    panel.findChild(QtWidgets.QLabel, "extentLabel").setText("Extent: from slice 50 (S -423.0 mm) up to slice 70 (S -363.0 mm)")
    panel.findChild(QtWidgets.QLabel, "statusLabel").setText("(illustration) Segment 'left kidney': 152.3 mL from key slice 57 (S -402.0 mm)")
    panel.findChild(QtWidgets.QLabel, "evidenceModelHintLabel").setText(_no_model_hint())
    panel.show()
    QtWidgets.QApplication.processEvents()
    image = panel.grab().toImage()
    assert image.width() >= 400 and image.height() >= 600
    if not SCREENSHOT.exists() or os.environ.get("MEDVOLR1_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        assert image.save(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 1000
