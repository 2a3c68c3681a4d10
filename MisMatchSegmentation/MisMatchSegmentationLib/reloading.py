"""Reloading the module's library during development (the module's *Reload* button).

Slicer's reload re-executes the module file only; the file imports its classes and functions from this
package, so without reloading it too an edit in ``MisMatchSegmentationLib`` would not take effect (SlicerNNUnet
overrides ``onReload`` for the same reason). Submodules are reloaded in dependency order: each after the
modules it imports. Only modules already loaded are reloaded: in Slicer the module file has loaded all of them,
and ``widget`` (the Qt panel) cannot be imported outside the application.
"""

from __future__ import annotations

import importlib
import sys
import types

PACKAGE = "MisMatchSegmentationLib"
# dependency order: a module comes after every library module it imports
SUBMODULES = ("engine", "jobfolder", "modelcard", "plots", "process", "state", "devices", "install", "logic", "reloading",
              "widget")
TESTING = ("MisMatchSegmentationTesting",)


def reload_library() -> list[types.ModuleType]:
    """Reload the package, its loaded submodules (in dependency order) and the testing helpers; return them."""
    reloaded = [importlib.reload(importlib.import_module(PACKAGE))]
    for name in SUBMODULES:
        module = sys.modules.get(f"{PACKAGE}.{name}")
        if module is not None:
            reloaded.append(importlib.reload(module))
    for name in TESTING:
        module = sys.modules.get(name)
        if module is not None:
            reloaded.append(importlib.reload(module))
    return reloaded
