"""Dependencies, installed on first use (never at import or start-up).

- torch through the PyTorch extension's ``PyTorchUtils`` logic, which picks the build that fits the GPU
  driver, after asking the user;
- the engine's other requirements (``Resources/requirements.txt``) through ``slicer.packaging.pip_ensure``
  (Slicer 5.12+) or ``slicer.util.pip_install``. Slicer's own numpy and SimpleITK are never replaced: they
  are not in the requirements file, and a requirement on them would be dropped here.

Every function takes what it needs from Slicer as arguments with defaults, so the decisions are testable
without the application. A failed install raises :class:`InstallFailed` (what failed, what to do, and the
details for the error dialog); ``progress`` callbacks and :func:`forward_log` let the panel show what is being
installed (the torch download is several GB) instead of a wait cursor.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import re
import traceback
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
PROTECTED = {"numpy", "simpleitk", "vtk", "torch"}  # Slicer's own, or installed by the PyTorch extension
TORCH_REQUIREMENT = ">=2.1"


class InstallDeclined(RuntimeError):
    """The user said no; the message says what cannot work and how to fix it."""


class InstallFailed(RuntimeError):
    """Installing a dependency failed. ``what``: the packages; ``advice``: what the user can do; ``details``:
    the error and its traceback (pip's own output is in the Python console)."""

    def __init__(self, what: str, error: BaseException, advice: str):
        self.what, self.advice = what, advice
        self.error = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        self.details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        super().__init__(f"Installing {what} failed ({self.error}). {advice}")


TORCH_ADVICE = ("Check the internet connection and that there are several GB of free disk space, then press Train "
                "again; or install PyTorch in the PyTorch Utils module. pip's output is in the Python console.")


def requirements_advice(todo: list[str]) -> str:
    commands = "; ".join(f"slicer.util.pip_install({r!r})" for r in todo)
    return ("Check the internet connection, then press Train again, or install them in the Python console: "
            f"{commands}. pip's output is in the Python console.")


@contextlib.contextmanager
def forward_log(callback, logger: logging.Logger | None = None):
    """While the block runs, every log record (e.g. pip's output, which Slicer writes to the log line by line)
    is also passed to ``callback(text)``: the panel shows it in its progress dialog and its log pane."""
    class Forward(logging.Handler):
        def emit(self, record):
            try:
                callback(record.getMessage())
            except Exception:  # a broken display must not break the install
                pass

    handler = Forward(level=logging.INFO)
    target = logger or logging.getLogger()
    level = target.level
    if target.getEffectiveLevel() > logging.INFO:  # pip's lines are logged at INFO
        target.setLevel(logging.INFO)
    target.addHandler(handler)
    try:
        yield handler
    finally:
        target.removeHandler(handler)
        target.setLevel(level)


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


def ensure_torch(pytorch_utils=None, ask: bool = True, progress=None) -> None:
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
    if progress is not None:
        progress("Installing PyTorch with the PyTorch extension: a download of up to several GB, which can take "
                 "many minutes. pip's output follows here and in the Python console.")
    try:
        torch = pytorch_utils.installTorch(askConfirmation=ask, torchVersionRequirement=TORCH_REQUIREMENT)
    except Exception as exc:
        raise InstallFailed("PyTorch", exc, TORCH_ADVICE) from exc
    if torch is None:
        raise InstallDeclined("PyTorch was not installed, so MisMatch cannot train or segment; press Train "
                              "again to install it, or use the PyTorch Utils module")


def ensure_requirements(path: Path = REQUIREMENTS, slicer_module=None, confirm=None, progress=None,
                        version_of=importlib.metadata.version) -> list[str]:
    """Install the engine's missing requirements; returns what was installed."""
    requirements = read_requirements(path)
    todo = missing(requirements, version_of)
    if not todo:
        return []
    if slicer_module is None:
        import slicer as slicer_module
    if progress is not None:
        progress("Installing " + ", ".join(todo) + ". pip's output follows here and in the Python console.")
    try:
        return _install_requirements(path, todo, slicer_module, confirm)
    except InstallDeclined:
        raise
    except Exception as exc:
        raise InstallFailed(", ".join(todo), exc, requirements_advice(todo)) from exc


def _install_requirements(path: Path, todo: list[str], slicer_module, confirm) -> list[str]:
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


def dependencies_missing(version_of=importlib.metadata.version, torch: bool = True) -> bool:
    """Whether :func:`ensure_dependencies` has anything to do (the panel shows no dialog otherwise); ``torch``
    False: for a job that runs without it (Fill)."""
    return (torch and not torch_installed(version_of)) or bool(missing(read_requirements(), version_of))


def ensure_dependencies(pytorch_utils=None, slicer_module=None, ask: bool = True, progress=None,
                        torch: bool = True) -> None:
    """Everything the engine's child process imports: torch first (unless ``torch`` is False: the engine's
    ``fill`` runs without it), then the rest. Raises :class:`InstallDeclined` (the user said no) or
    :class:`InstallFailed`."""
    if torch:
        ensure_torch(pytorch_utils, ask=ask, progress=progress)
    ensure_requirements(slicer_module=slicer_module, progress=progress)
