"""What the module's own tests need, inside Slicer (``MisMatchSegmentationTest``) and outside (Testing/slicer):
a stand-in engine that speaks the engine's contract in milliseconds with plain Python (numpy, SimpleITK; never
torch), and a stand-in for Slicer's ``PythonSlicer`` launcher (a parent process that forwards no signal)."""

from pathlib import Path

HERE = Path(__file__).resolve().parent
STANDIN_ENGINE = HERE / "standin_engine.py"
STANDIN_LAUNCHER = HERE / "standin_launcher.py"


def standin_command(python: str, mode: str, launcher: bool = False) -> list:
    """Command prefix that runs the stand-in engine in ``mode`` with ``python`` (contract arguments follow);
    ``launcher``: behind the stand-in PythonSlicer launcher."""
    prefix = [python, "-u", str(STANDIN_LAUNCHER)] if launcher else [python]
    return prefix + ["-u", str(STANDIN_ENGINE), mode]
