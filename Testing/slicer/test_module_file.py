"""The module file as Slicer loads it: the supported versions (an older Slicer gets one message), Reload that
reloads the library, and the hooks for scene close and application exit. The widget
(``MisMatchSegmentationLib/widget.py``) needs the application, so its wiring is read with ast; what it calls is
tested on its own elsewhere (test_safety, test_process)."""

from __future__ import annotations

import ast
import glob
import os
import shutil
import subprocess
import sys

import pytest

from conftest import MODULE_DIR

SOURCE = MODULE_DIR / "MisMatchSegmentation.py"
WIDGET = MODULE_DIR / "MisMatchSegmentationLib" / "widget.py"


def gate_namespace() -> dict:
    """The version check at the top of the module file, run on its own (it needs only ``sys``)."""
    tree = ast.parse(SOURCE.read_text())
    body = []
    for node in tree.body:
        if isinstance(node, ast.If) and "unsupportedReason" in ast.unparse(node.test):
            break
        body.append(node)
    namespace: dict = {}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(SOURCE), "exec"), namespace)
    return namespace


def old_python() -> str | None:
    """A Python 3.9 (Slicer 5.8's), if this machine has one."""
    for candidate in [shutil.which("python3.9")] + sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9"))):
        if candidate:
            try:
                subprocess.run([candidate, "-c", "pass"], check=True, capture_output=True, timeout=30)
                return candidate
            except (OSError, subprocess.SubprocessError):
                continue
    return None


def test_the_supported_versions_are_stated_and_checked_first():
    gate = gate_namespace()
    assert gate["MINIMUM_SLICER"] == "5.10" and gate["MINIMUM_PYTHON"] == (3, 12)
    assert gate["unsupportedReason"]((3, 12, 1)) is None and gate["unsupportedReason"]((3, 13, 0)) is None
    message = gate["unsupportedReason"]((3, 9, 10))
    assert message.startswith("MisMatch Segmentation needs 3D Slicer 5.10 or later (Python 3.12)")
    assert "this Slicer runs Python 3.9.10" in message and "download.slicer.org" in message
    # nothing but sys is imported before the check
    tree = ast.parse(SOURCE.read_text())
    before = []
    for node in tree.body:
        if isinstance(node, ast.If) and "unsupportedReason" in ast.unparse(node.test):
            assert "raise ImportError" in ast.unparse(node)
            break
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            before.append(ast.unparse(node))
    assert before == ["import sys"]


def test_the_module_file_parses_with_slicer_5_8s_grammar():
    ast.parse(SOURCE.read_text(), feature_version=(3, 9))


def test_an_older_slicers_python_gets_one_clear_message():
    python = old_python()
    if python is None:
        pytest.skip("no Python 3.9 here to stand for Slicer 5.8's")
    out = subprocess.run([python, str(SOURCE)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: MisMatch Segmentation needs 3D Slicer 5.10 or later (Python 3.12); "
                           "this Slicer runs Python 3.9"), out.stderr


def test_reload_reloads_every_library_module_in_dependency_order():
    from MisMatchSegmentationLib import reloading

    lib = MODULE_DIR / "MisMatchSegmentationLib"
    files = {p.stem for p in lib.glob("*.py")} - {"__init__"}
    assert set(reloading.SUBMODULES) == files, "a library module is missing from reloading.SUBMODULES"
    position = {name: n for n, name in enumerate(reloading.SUBMODULES)}
    for name in reloading.SUBMODULES:
        for node in ast.walk(ast.parse((lib / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                used = [node.module] if node.module else [a.name for a in node.names]
                for dependency in used:
                    assert position[dependency] < position[name], f"{name} imports {dependency}: reload it first"
    assert reloading.SUBMODULES[-1] == "widget"   # the panel imports the rest
    # a reload re-executes the loaded modules (run apart: reloading here would swap classes under other tests);
    # every module but the widget (it needs the application) is loaded here
    script = (f"import sys; sys.path.insert(0, {str(MODULE_DIR)!r})\n"
              "import importlib\n"
              "import MisMatchSegmentationLib.logic as logic, MisMatchSegmentationLib.process as process\n"
              "from MisMatchSegmentationLib import reloading\n"
              "for name in reloading.SUBMODULES[:-1]:\n"
              "    importlib.import_module('MisMatchSegmentationLib.' + name)\n"
              "old_process = process.EngineProcess\n"
              "logic.METHODS = None\n"
              "reloaded = reloading.reload_library()\n"
              "assert sys.modules['MisMatchSegmentationLib.logic'].METHODS['MisMatch'] == 'mismatch'\n"
              "assert sys.modules['MisMatchSegmentationLib.logic'].EngineProcess is not old_process\n"
              "assert 'MisMatchSegmentationLib.widget' not in sys.modules\n"
              "print(len(reloaded))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == len(reloading.SUBMODULES)   # the package and all but the widget


def widget_method(name: str) -> ast.FunctionDef:
    for node in ast.parse(WIDGET.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == "MisMatchSegmentationWidget":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return item
    raise AssertionError(f"MisMatchSegmentationWidget.{name} is missing")


def calls_in(function: ast.FunctionDef) -> list[str]:
    return [ast.unparse(c.func) for c in ast.walk(function) if isinstance(c, ast.Call)]


def test_the_widget_reloads_its_library_and_ends_jobs_on_reload_scene_close_and_exit():
    reload_calls = calls_in(widget_method("onReload"))
    assert reload_calls.index("reloading.reload_library") < reload_calls.index("ScriptedLoadableModuleWidget.onReload")
    assert "self.logic.shutdown" in reload_calls
    assert "self.logic.abandon" in calls_in(widget_method("onSceneStartClose"))
    assert "self.state.abort" in calls_in(widget_method("onSceneStartClose"))
    setup = ast.unparse(widget_method("setup"))
    assert "slicer.app.connect('aboutToQuit()', self.onAboutToQuit)" in setup
    assert {"self.logic.shutdown", "process.kill_all"} <= set(calls_in(widget_method("onAboutToQuit")))
    assert "self.logic.shutdown" in calls_in(widget_method("cleanup"))
    # a job that ends after the scene closed finds no parameter node: nothing is read from it
    done = ast.unparse(widget_method("_jobDone"))
    assert done.index("if self._parameterNode is None") < done.index("self._parameterNode.currentModelPath")


def test_the_module_file_is_the_face_slicer_expects_and_imports_its_widget():
    tree = ast.parse(SOURCE.read_text())
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    assert classes == ["MisMatchSegmentation", "MisMatchSegmentationParameterNode", "MisMatchSegmentationLogic",
                       "MisMatchSegmentationTest"]
    imported = [a.name for n in tree.body if isinstance(n, ast.ImportFrom)
                and n.module == "MisMatchSegmentationLib.widget" for a in n.names]
    assert imported == ["MisMatchSegmentationWidget"]
    assert "MisMatchSegmentationLogic()" in ast.unparse(ast.parse(WIDGET.read_text()))
    logic = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MisMatchSegmentationLogic")
    methods = [f.name for f in logic.body if isinstance(f, ast.FunctionDef)]
    assert all(m == m.lower() for m in methods if m not in ("__init__", "getParameterNode")), methods


def test_install_failures_open_an_error_dialog_with_details():
    ensure = widget_method("_ensureDependencies")
    text = ast.unparse(ensure)
    assert "install.InstallFailed" in text and "self.errorDisplay" in text and "detailedText=exc.details" in text
    assert "createProgressDialog" in text and "install.forward_log" in text and "WaitCursor" not in text


def test_the_in_slicer_test_case_runs_every_flow_without_torch_or_network():
    tree = ast.parse(SOURCE.read_text())
    case = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MisMatchSegmentationTest")
    assert [ast.unparse(b) for b in case.bases] == ["ScriptedLoadableModuleTest"]
    methods = {f.name: f for f in case.body if isinstance(f, ast.FunctionDef)}
    tests = [name for name in methods if name.startswith("test_")]
    listed = next(ast.literal_eval(a.value) for a in case.body
                  if isinstance(a, ast.Assign) and ast.unparse(a.targets[0]) == "TEST_METHODS")
    assert sorted(listed) == sorted(tests) and len(tests) >= 8, "runTest must run every test method"
    for flow in ("Train", "Fill", "Cancel", "SceneClosed", "InstallFailure", "OutputSelectors"):
        assert any(flow in name for name in tests), flow
    for name in tests:
        body = ast.unparse(methods[name])
        if name == "test_RealEngine":
            first = methods[name].body[0]
            assert "MISMATCH_TEST_REAL_ENGINE" in ast.unparse(first.test) and "return" in ast.unparse(first)
            continue
        assert "SampleData" not in body and "torch" not in body, f"{name} would need a download or torch"
    assert "MisMatchSegmentationTesting" in ast.unparse(case)


def test_the_scenarios_and_stand_ins_need_no_torch():
    folder = MODULE_DIR / "MisMatchSegmentationTesting"
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in {"torch", "qt", "mismatch"} for n in names), (path.name, names)


def test_the_external_ci_workflow_runs_the_self_test_headless():
    root = MODULE_DIR.parent
    text = (root / ".github" / "workflows" / "slicer-tests.yml").read_text()
    for needed in ("xvfb-run", "--no-main-window", "--exit-after-startup", "--testing", "--python-script",
                   "--additional-module-paths", "download.slicer.org", "Testing/slicer/run_in_slicer.py"):
        assert needed in text, needed
    runner = (root / "Testing" / "slicer" / "run_in_slicer.py").read_text()
    assert "MisMatchSegmentationTest" in runner and "slicer.util.exit" in runner
    try:
        import yaml
    except ImportError:
        return
    steps = yaml.safe_load(text)["jobs"]["slicer-self-test"]["steps"]
    assert any("--python-script" in step.get("run", "") for step in steps)


def test_the_test_command_runs_the_slicer_side_suite_on_python_3_12_too():
    root = MODULE_DIR.parent
    script = (root / "scripts" / "test.sh").read_text()
    assert "python3.12" in script and ".venv/slicer-py3.12" in script and "slicer-core" in script
    assert "Testing/slicer" in script and "torch" not in script.split("pip install -q", 2)[-1].split("\n")[0]
    assert "Python 3.12" in (root / "README.md").read_text()
