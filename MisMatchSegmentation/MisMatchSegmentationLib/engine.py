"""The engine the module runs, and the contract the module shares with it.

The engine (``Trainer/mismatch``) ships inside the extension, in a ``MisMatchEngine`` folder next to the
module (see the module's CMakeLists.txt); in a source checkout it is ``Trainer/``. The module never imports
the engine (torch stays out of Slicer's GUI process) except one file, ``mismatch/contract.py``: plain
Python with the exit codes, slice lists, durations and model-card checks that both sides must agree on. It
is loaded here from the engine the module runs, so that the module and that engine read cards, slices and
exit codes with the same code.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

CONTRACT_MODULE = "MisMatchSegmentationLib._engine_contract"


def engine_source_dir() -> Path | None:
    """The folder that holds the ``mismatch`` package: packaged next to the module, or the source tree."""
    module_dir = Path(__file__).resolve().parent.parent  # MisMatchSegmentation/
    for candidate in (module_dir / "MisMatchEngine",  # installed extension (see the module's CMakeLists.txt)
                      module_dir.parent / "Trainer"):  # source checkout
        if (candidate / "mismatch" / "__init__.py").is_file():
            return candidate
    return None


def load_contract(engine_dir: Path | None = None) -> ModuleType:
    """``mismatch/contract.py`` of the engine in ``engine_dir`` (default: :func:`engine_source_dir`).

    Where that very file is already imported as ``mismatch.contract`` (the engine on ``sys.path``, as in the
    tests), that module is used, so that both names share one set of classes; else the file is loaded on its
    own, without importing the rest of the engine.
    """
    engine_dir = engine_dir or engine_source_dir()
    path = None if engine_dir is None else Path(engine_dir) / "mismatch" / "contract.py"
    if path is None or not path.is_file():
        raise ImportError("the MisMatch engine (MisMatchEngine/mismatch/contract.py next to the module) is missing: "
                          "reinstall the MisMatch extension")
    imported = sys.modules.get("mismatch.contract")
    if imported is not None and Path(getattr(imported, "__file__", "") or "").resolve() == path.resolve():
        return imported
    spec = importlib.util.spec_from_file_location(CONTRACT_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[CONTRACT_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(CONTRACT_MODULE, None)
        raise
    return module


#: The engine's ``mismatch.contract``.
contract = load_contract()
