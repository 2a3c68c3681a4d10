"""The Qt Designer file against the code, without Qt: the .ui is parsed with ElementTree, the module with ast.

- every ``self.ui.<name>`` the code uses exists in the .ui, with a class that has what the code calls on it;
- every ``SlicerParameterName`` is a field of the parameter node, on a widget that fits the field's type,
  range, choices and default;
- every field the user sets has a widget (bound by name, or bound by the code: ``MANUALLY_BOUND``).
"""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET

import pytest

from conftest import MODULE_DIR

UI = MODULE_DIR / "Resources" / "UI" / "MisMatchSegmentation.ui"
SOURCE = MODULE_DIR / "MisMatchSegmentation.py"
WIDGET = MODULE_DIR / "MisMatchSegmentationLib" / "widget.py"

# what the code calls or connects on a widget -> the classes that have it
MEMBERS = {
    "setMRMLPlotViewNode": {"qMRMLPlotWidget"},
    "setSelectedSegmentIDs": {"qMRMLSegmentSelectorWidget"},
    "selectedSegmentIDs": {"qMRMLSegmentSelectorWidget"},
    "setCurrentNode": {"qMRMLSegmentSelectorWidget", "qMRMLNodeComboBox"},
    "addItem": {"QComboBox"}, "findData": {"QComboBox"}, "itemData": {"QComboBox"}, "currentData": {"QComboBox"},
    "setCurrentIndex": {"QComboBox"}, "clear": {"QComboBox", "QLineEdit", "QPlainTextEdit"}, "blockSignals": None,
    "appendPlainText": {"QPlainTextEdit"}, "plainText": {"QPlainTextEdit"}, "collapsed": {"ctkCollapsibleButton"},
    "click": {"QPushButton"},
    "setMinimumHeight": None, "objectName": None, "enabled": None, "visible": None, "toolTip": None,
    "text": {"QPushButton", "QLabel", "QLineEdit"}, "value": {"QProgressBar", "QSpinBox", "QDoubleSpinBox"},
    "connect": None,
}
SIGNALS = {
    "clicked(bool)": {"QPushButton"},
    "currentIndexChanged(int)": {"QComboBox"},
    "segmentSelectionChanged(QStringList)": {"qMRMLSegmentSelectorWidget"},
    "currentNodeChanged(vtkMRMLNode*)": {"qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget"},
}


def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def prop(widget: ET.Element, name: str):
    for p in widget.findall("property"):
        if p.get("name") == name:
            value = p[0]
            if value.tag == "stringlist":
                return [s.text for s in value]
            if value.tag == "bool":
                return value.text == "true"
            if value.tag == "number":
                return int(value.text)
            if value.tag == "double":
                return float(value.text)
            return value.text
    return None


def parameter_fields() -> dict[str, dict]:
    """Fields of the @parameterNodeWrapper class: annotation source, default, Choice and WithinRange."""
    tree = ast.parse(SOURCE.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list):
            fields = {}
            for item in node.body:
                if isinstance(item, ast.AnnAssign):
                    ann = ast.unparse(item.annotation)
                    info = {"annotation": ann, "default": ast.literal_eval(item.value) if item.value else None}
                    for call in ast.walk(item.annotation):
                        if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "Choice":
                            info["choices"] = ast.literal_eval(call.args[0])
                        if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "WithinRange":
                            info["range"] = tuple(ast.literal_eval(a) for a in call.args)
                    info["type"] = ann.split("[", 1)[1].split(",")[0].strip() if ann.startswith("Annotated") else ann
                    fields[item.target.id] = info
            return fields
    raise AssertionError("no @parameterNodeWrapper class in the module")


def module_constant(name: str):
    for node in ast.parse(SOURCE.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not found")


def ui_uses() -> list[tuple[str, str | None, str | None]]:
    """``(widget, member, signal)`` for every ``self.ui.<widget>[.<member>]`` in the panel."""
    out = []
    for node in ast.walk(ast.parse(WIDGET.read_text())):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and getattr(node.value.value, "id", None) == "self"):
            out.append((node.attr, None, None))
    for node in ast.walk(ast.parse(WIDGET.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                and isinstance(node.value.value, ast.Attribute) and node.value.value.attr == "ui":
            out.append((node.value.attr, node.attr, None))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect":
            target = node.func.value
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Attribute) \
                    and target.value.attr == "ui" and node.args and isinstance(node.args[0], ast.Constant):
                out.append((target.attr, "connect", node.args[0].value))
    return out


def test_the_ui_file_is_designer_xml_with_a_qmrmlwidget_root():
    root = ET.parse(UI).getroot()
    assert root.tag == "ui" and root.find("class").text == "MisMatchSegmentation"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "MisMatchSegmentation"
    declared = {c.find("class").text for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    assert {c for c in used if not c.startswith("Q")} <= declared, "custom widget classes must be declared"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"


def test_every_mrml_widget_gets_the_scene():
    root = ET.parse(UI).getroot()
    receivers = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"}
    mrml = {w.get("name") for w in root.iter("widget") if w.get("class").startswith("qMRML")} - {"MisMatchSegmentation"}
    assert mrml and mrml <= receivers


def test_every_widget_the_code_uses_exists_with_a_fitting_class():
    widgets = ui_widgets()
    uses = ui_uses()
    assert len({w for w, _, _ in uses}) >= 15
    for name, member, signal in uses:
        assert name in widgets, f"the code uses self.ui.{name}, which is not in the .ui file"
        cls = widgets[name].get("class")
        if member is not None:
            assert member in MEMBERS, f"self.ui.{name}.{member}: add the member to MEMBERS in this test"
            allowed = MEMBERS[member]
            assert allowed is None or cls in allowed, f"self.ui.{name}.{member} needs {allowed}, the .ui has {cls}"
        if signal is not None:
            assert signal in SIGNALS and cls in SIGNALS[signal], f"{name} ({cls}) has no signal {signal}"


def test_main_widgets_have_the_classes_slicer_users_expect():
    widgets = ui_widgets()
    expected = {"inputVolumeSelector": "qMRMLNodeComboBox", "labelSegmentationSelector": "qMRMLNodeComboBox",
                "segmentSelector": "qMRMLSegmentSelectorWidget", "trainButton": "QPushButton",
                "segmentButton": "QPushButton", "fillButton": "QPushButton", "progressBar": "QProgressBar", "statusLabel": "QLabel",
                "lossPlotWidget": "qMRMLPlotWidget", "reliabilityPlotWidget": "qMRMLPlotWidget",
                "nextUncertainButton": "QPushButton", "inputsCollapsibleButton": "ctkCollapsibleButton",
                "stepsSpinBox": "QSpinBox", "deviceComboBox": "QComboBox",
                "emptySlicesLineEdit": "QLineEdit", "markEmptySliceButton": "QPushButton"}
    assert {n: widgets[n].get("class") for n in expected} == expected
    assert prop(widgets["segmentSelector"], "multiSelection") is True


def test_every_parameter_name_is_a_field_on_a_fitting_widget():
    fields = parameter_fields()
    bound = {}
    for name, w in ui_widgets().items():
        param = prop(w, "SlicerParameterName")
        if param is None:
            continue
        assert param in fields, f"{name} is bound to {param!r}, which is not a parameter-node field"
        assert param not in bound, f"{param} is bound twice"
        bound[param] = w
        f, cls = fields[param], w.get("class")
        if f["type"].startswith("vtkMRML"):
            assert cls == "qMRMLNodeComboBox" and prop(w, "nodeTypes") == [f["type"]], param
        elif f["type"] == "int":
            assert cls == "QSpinBox", param
            assert (prop(w, "minimum"), prop(w, "maximum")) == f["range"], f"{param}: range differs"
            assert prop(w, "value") == f["default"], f"{param}: default differs"
        elif f["type"] == "float":
            assert cls == "QDoubleSpinBox", param
            assert (prop(w, "minimum"), prop(w, "maximum")) == pytest.approx(f["range"]), param
            assert prop(w, "value") == pytest.approx(f["default"]), param
            assert f["default"] >= 10 ** -prop(w, "decimals"), f"{param}: too few decimals to show the default"
        elif "choices" in f:
            assert cls == "QComboBox", param
            items = [i.find("property/string").text for i in w.findall("item")]
            assert items == f["choices"] and f["default"] in f["choices"], param
        else:
            assert f["type"] == "str" and cls == "QLineEdit", param


def test_every_user_field_has_a_widget():
    fields = parameter_fields()
    bound = {prop(w, "SlicerParameterName") for w in ui_widgets().values()} - {None}
    manual = module_constant("MANUALLY_BOUND")
    internal = module_constant("INTERNAL_FIELDS")
    widgets = ui_widgets()
    for field in fields:
        if field in internal:
            assert field not in bound
            continue
        assert field in bound or field in manual, f"parameter {field!r} has no widget"
    for field, widget in manual.items():
        assert field in fields and widget in widgets


def test_the_library_never_imports_qt_but_in_the_widget():
    for path in (MODULE_DIR / "MisMatchSegmentationLib").glob("*.py"):
        if path.name == WIDGET.name:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for n in names:
                assert n.split(".")[0] not in {"qt", "ctk", "PythonQt"}, f"{path.name} imports {n}"


def test_names_the_module_imports_from_its_library_exist():
    import importlib

    for node in ast.parse(SOURCE.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module == "MisMatchSegmentationLib.widget":
            # the panel needs the application: its names are read, not imported
            defined = {n.name for n in ast.parse(WIDGET.read_text()).body if isinstance(n, ast.ClassDef)}
            assert {a.name for a in node.names} <= defined
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("MisMatchSegmentationLib"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):  # a submodule: ``from package import module``
                    importlib.import_module(f"{node.module}.{alias.name}")


def test_empty_slices_row_and_requests():
    widgets = ui_widgets()
    edit = widgets["emptySlicesLineEdit"]
    assert prop(edit, "SlicerParameterName") == "emptySlices"
    assert prop(edit, "placeholderText") == "e.g. 0-3, 40 (optional)"
    assert "without the structure" in prop(edit, "toolTip") and "where the structure is not" in prop(edit, "toolTip")
    assert prop(widgets["markEmptySliceButton"], "text") == "Mark current slice empty"
    assert prop(widgets["emptySlicesLabel"], "text") == "Empty slices:"
    assert parameter_fields()["emptySlices"]["default"] == ""
    assert ("markEmptySliceButton", "connect", "clicked(bool)") in ui_uses()
    # both requests carry the parsed empty slices
    tree = ast.parse(SOURCE.read_text())
    builders = {f.name: f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
    for name, request in (("training_request", "TrainingRequest"), ("segment_request", "SegmentRequest")):
        calls = [c for c in ast.walk(builders[name])
                 if isinstance(c, ast.Call) and getattr(c.func, "id", "") == request]
        assert len(calls) == 1 and "empty_slices" in {k.arg for k in calls[0].keywords}, name
        keyword = next(k for k in calls[0].keywords if k.arg == "empty_slices")
        assert "p.emptySlices" in ast.unparse(keyword.value), name
