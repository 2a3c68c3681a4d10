"""Dependencies, installed on first use (never at import or start-up).

- torch through the PyTorch extension's ``PyTorchUtils`` logic, which picks the build that fits the GPU
  driver, after asking the user;
- the engine's other requirements (``Resources/requirements.txt``) through ``slicer.packaging.pip_ensure``
  (Slicer 5.12+) or ``slicer.util.pip_install``. Slicer's own numpy and SimpleITK are never replaced: they
  are not in the requirements file, and a requirement on them would be dropped here.

Every function takes what it needs from Slicer as arguments with defaults, so the decisions are testable
without the application.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
PROTECTED = {"numpy", "simpleitk", "vtk", "torch"}  # Slicer's own, or installed by the PyTorch extension
TORCH_REQUIREMENT = ">=2.1"


class InstallDeclined(RuntimeError):
    """The user said no (or the install failed); the message says what cannot work and how to fix it."""


def read_requirements(path: Path = REQUIREMENTS) -> list[str]:
    """Requirement lines, without comments and without packages that Slicer provides itself."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and requirement_name(line) not in PROTECTED:
            out.append(line)
    return out


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def missing(requirements: list[str], version_of=importlib.metadata.version) -> list[str]:
    """The requirements whose package is not installed at all (version pins are pip's business)."""
    out = []
    for req in requirements:
        try:
            version_of(requirement_name(req))
        except importlib.metadata.PackageNotFoundError:
            out.append(req)
    return out


def torch_installed(version_of=importlib.metadata.version) -> bool:
    try:
        version_of("torch")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def ensure_torch(pytorch_utils=None, ask: bool = True) -> None:
    """Install torch with the PyTorch extension if it is missing (it asks the user first, unless ``ask`` is
    False: the unattended self-test on the Slicer factory)."""
    if torch_installed():
        return
    if pytorch_utils is None:
        try:
            import PyTorchUtils  # the PyTorch extension, a dependency of this one
        except ImportError:
            raise InstallDeclined("MisMatch needs PyTorch: install the 'PyTorch' extension from the Extension "
                                  "Manager, restart Slicer and try again") from None
        pytorch_utils = PyTorchUtils.PyTorchUtilsLogic()
    torch = pytorch_utils.installTorch(askConfirmation=ask, torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        raise InstallDeclined("PyTorch was not installed, so MisMatch cannot train or segment; press Train "
                              "again to install it, or use the PyTorch Utils module")


def ensure_requirements(path: Path = REQUIREMENTS, slicer_module=None, confirm=None) -> list[str]:
    """Install the engine's missing requirements; returns what was installed."""
    requirements = read_requirements(path)
    todo = missing(requirements)
    if not todo:
        return []
    if slicer_module is None:
        import slicer as slicer_module
    packaging = getattr(slicer_module, "packaging", None)
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        if hasattr(packaging, "load_requirements"):  # Slicer's own parser, then the same filter
            wanted = [r for r in packaging.load_requirements(str(path)) if requirement_name(str(r)) not in PROTECTED]
        else:
            wanted = todo
        packaging.pip_ensure(wanted, requester="MisMatch")  # asks the user, then installs what is missing
        return todo
    confirm = confirm or slicer_module.util.confirmOkCancelDisplay
    if not confirm("MisMatch needs these Python packages, which will be installed now:\n\n" + "\n".join(todo)):
        raise InstallDeclined("MisMatch cannot run without " + ", ".join(todo) + "; press Train again to install")
    for req in todo:
        slicer_module.util.pip_install(req)
    return todo


def ensure_dependencies(pytorch_utils=None, slicer_module=None, ask: bool = True) -> None:
    """Everything the engine's child process imports: torch first, then the rest."""
    ensure_torch(pytorch_utils, ask=ask)
    ensure_requirements(slicer_module=slicer_module)
