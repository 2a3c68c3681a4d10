"""Reloading the module's library during development (the module's *Reload* button).

Slicer's reload re-executes the module file only; the file imports its classes and functions from this
package, so without reloading it too an edit in ``MisMatchSegmentationLib`` would not take effect (SlicerNNUnet
overrides ``onReload`` for the same reason). Submodules are reloaded in dependency order: each after the
modules it imports.
"""

from __future__ import annotations

import importlib
import sys
import types

PACKAGE = "MisMatchSegmentationLib"
# dependency order: a module comes after every library module it imports
SUBMODULES = ("engine", "jobfolder", "modelcard", "plots", "process", "state", "devices", "install", "logic", "reloading")
TESTING = ("MisMatchSegmentationTesting",)


def reload_library() -> list[types.ModuleType]:
    """Reload the package, its submodules (in dependency order) and the testing helpers; return them."""
    reloaded = [importlib.reload(importlib.import_module(PACKAGE))]
    for name in SUBMODULES:
        full = f"{PACKAGE}.{name}"
        module = sys.modules.get(full)
        reloaded.append(importlib.reload(module) if module is not None else importlib.import_module(full))
    for name in TESTING:
        module = sys.modules.get(name)
        if module is not None:
            reloaded.append(importlib.reload(module))
    return reloaded
