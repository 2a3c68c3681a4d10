"""Load a script of ``measurements/`` as a module, for the tests of its options."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

MEASUREMENTS = Path(__file__).resolve().parents[2] / "measurements"


def load_script(name: str) -> ModuleType:
    """``measurements/<name>.py`` as a module (its ``main`` not run)."""
    spec = importlib.util.spec_from_file_location(f"measurement_{name}", MEASUREMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
