"""Fixtures for the module's tests outside 3D Slicer.

``slicer-core`` (PyPI) gives the real MRML classes and a copy of ``slicer.util``, but not the application:
``slicer.mrmlScene``, ``slicer.app`` and ``slicer.modules`` do not exist. ``slicer_scene`` creates them once
per test session (each creation re-registers the segmentation converter rules), the way the application
does: a scene, an application logic with the colour logic and default colour nodes, and the Volumes,
Segmentations, Subject hierarchy, Tables and Plots logics. ``scene`` clears it before each test.

Modules that need the Qt application (the widget, parameterNodeWrapper) are checked by parsing, never
imported here.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "MisMatchSegmentation"
ENGINE_DIR = ROOT / "Trainer"
for path in (MODULE_DIR, ENGINE_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


class _Module:
    """Stands for ``slicer.modules.<name>``: only ``logic()`` is used."""

    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


class _Modules:
    pass


@pytest.fixture(scope="session")
def slicer_scene():
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the 'slicer' package here is not slicer-core")
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    color_logic = slicer.vtkSlicerColorLogic()
    color_logic.SetMRMLApplicationLogic(app)
    color_logic.SetMRMLScene(scene)
    app.SetColorLogic(color_logic)
    modules = _Modules()
    for name, cls in (("volumes", slicer.vtkSlicerVolumesLogic),
                      ("segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("subjecthierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
                      ("tables", slicer.vtkSlicerTablesLogic),
                      ("plots", slicer.vtkSlicerPlotsLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        setattr(modules, name, _Module(logic))
    previous = {name: getattr(slicer, name, None) for name in ("mrmlScene", "app", "modules")}
    slicer.mrmlScene, slicer.app, slicer.modules = scene, app, modules
    yield scene
    scene.Clear(1)
    for name, value in previous.items():
        if value is None:
            delattr(slicer, name)
        else:
            setattr(slicer, name, value)


@pytest.fixture
def scene(slicer_scene):
    slicer_scene.Clear(0)
    yield slicer_scene
    slicer_scene.Clear(0)


def slicerio_data() -> Path:
    slicerio = pytest.importorskip("slicerio")
    folder = Path(slicerio.__file__).parent / "data"
    if not (folder / "CTChest4.nrrd").is_file():
        pytest.skip("the installed slicerio has no CTChest4 sample data")
    return folder


@pytest.fixture
def ct_chest(scene):
    """``(volume node, segmentation node)``: CTChest4 (128x128x34, 3.05 x 3.05 x 10 mm) and a segmentation
    with "right lung" and "left lung" painted on slices 10, 17 and 24 only (the user's few labels)."""
    import slicer

    folder = slicerio_data()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CTChest")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(folder / "CTChest4.nrrd"))
    assert storage.ReadData(volume)
    full = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CTChest full")
    seg_storage = slicer.vtkMRMLSegmentationStorageNode()
    seg_storage.SetFileName(str(folder / "Segmentation.seg.nrrd"))
    assert seg_storage.ReadData(full)
    labels = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Lung labels")
    labels.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    source = full.GetSegmentation()
    for name, colour in (("right lung", (0.8, 0.4, 0.3)), ("left lung", (0.3, 0.5, 0.9))):
        sid = source.GetSegmentIdBySegmentName(name)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(full, sid, volume)
        few = np.zeros_like(mask)
        few[[10, 17, 24]] = mask[[10, 17, 24]]
        new_id = labels.GetSegmentation().AddEmptySegment(name.replace(" ", "_"), name, colour)
        slicer.util.updateSegmentBinaryLabelmapFromArray(few, labels, new_id, volume)
    scene.RemoveNode(full)
    return volume, labels


def oblique_volume(scene, name: str = "oblique", shape=(9, 11, 13), dtype=np.int16):
    """A volume node with a real rotation, anisotropic spacing and an origin far from zero."""
    import slicer
    import vtk

    ax, ay, az = 0.3, -0.2, 0.5
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rotation = (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
                @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]))
    spacing = np.array([0.7, 0.9, 2.5])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation * spacing
    matrix[:3, 3] = (-120.3, 33.7, 410.1)
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1000, size=shape).astype(dtype)
    node = slicer.util.addVolumeFromArray(array, ijkToRAS=matrix, name=name)
    return node, matrix, array


def import_engine() -> None:
    """Import the engine (``mismatch.cli``, and with it everything a training imports); skip only where this
    Python has no torch (the Python 3.12 run of this suite, scripts/test.sh: slicer-core without torch). An
    engine that does not import where torch is installed fails the test: it is a broken engine, not a
    missing one."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed in this Python: the real engine cannot run here")
    import mismatch.cli  # noqa: F401


@pytest.fixture
def engine_available():
    import_engine()
    return True


from MisMatchSegmentationTesting import STANDIN_ENGINE as STANDIN  # noqa: E402  (shipped with the module)
from MisMatchSegmentationTesting import STANDIN_LAUNCHER  # noqa: E402,F401


def standin_command(mode: str, launcher: bool = False) -> list[str]:
    """Command prefix that runs the stand-in engine in ``mode`` (contract arguments follow); ``launcher``:
    behind the stand-in PythonSlicer launcher (a parent that forwards no signal)."""
    from MisMatchSegmentationTesting import standin_command as command

    return command(sys.executable, mode, launcher)


@pytest.fixture
def standin_log(tmp_path, monkeypatch):
    """Folder where the stand-in records its calls (``calls.jsonl``) and grandchild pid."""
    log = tmp_path / "standin-log"
    log.mkdir()
    monkeypatch.setenv("STANDIN_LOG", str(log))
    return log


# -- waiting for another process ----------------------------------------------------------------------------
#: how long a test waits for what takes a fraction of a second on an idle machine: generous, so that a busy
#: machine makes a test slower, never failed; a test that fails waits this long once
PATIENCE = 60.0


def wait_until(condition, timeout: float = PATIENCE, what="the condition", interval: float = 0.02) -> None:
    """Call ``condition()`` until it is true; an AssertionError naming ``what`` (a string, or a function that
    says what was seen) after ``timeout`` seconds. Tests wait for a state this way, never for a fixed time."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what() if callable(what) else what}: not reached in {timeout:.0f} s")
        time.sleep(interval)


def poll_until(source, predicate, timeout: float = PATIENCE) -> list[dict]:
    """The events of ``source.poll()`` (an ``EngineProcess`` or the logic) gathered until ``predicate(events)``."""
    events: list[dict] = []

    def reached() -> bool:
        events.extend(source.poll())
        return predicate(events)

    wait_until(reached, timeout, lambda: f"the events wanted (so far: {events[-5:]})")
    return events


def progressed(events: list[dict]) -> bool:
    """A ``poll_until`` predicate: a progress event has arrived."""
    return any(e.get("event") == "progress" for e in events)


os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
