"""Packaging: what the CMake files list is what a packaged extension contains.

The file lists are read from disk at test time, so a Python file added to the module or to the engine later
fails this test until it is listed in ``MisMatchSegmentation/CMakeLists.txt``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import ENGINE_DIR, MODULE_DIR, ROOT

MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"


def cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", text, re.S)
    assert match, f"{variable} is not set"
    return [line.strip() for line in match.group(1).split() if line.strip() and not line.startswith("#")]


def expand(items: list[str]) -> set[str]:
    return {i.replace("${MODULE_NAME}", "MisMatchSegmentation") for i in items}


def on_disk(folder: Path, pattern: str, skip=("Testing",)) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob(pattern)
            if "__pycache__" not in p.parts and not (set(p.relative_to(folder).parts) & set(skip))}


def test_every_module_script_and_resource_is_listed():
    text = MODULE_CMAKE.read_text()
    scripts = expand(cmake_list(text, "MODULE_PYTHON_SCRIPTS"))
    resources = expand(cmake_list(text, "MODULE_PYTHON_RESOURCES"))
    assert scripts == on_disk(MODULE_DIR, "*.py")
    wanted = {p for p in on_disk(MODULE_DIR / "Resources", "*") if (MODULE_DIR / "Resources" / p).is_file()}
    assert resources == {f"Resources/{p}" for p in wanted}
    for path in scripts | resources:
        assert (MODULE_DIR / path).is_file(), path


def test_every_engine_file_is_packaged_with_the_module():
    text = MODULE_CMAKE.read_text()
    listed = set(cmake_list(text, "ENGINE_PYTHON_SCRIPTS"))
    present = {f"mismatch/{p}" for p in on_disk(ENGINE_DIR / "mismatch", "*.py")}
    assert listed == present, (f"not listed: {sorted(present - listed)}; listed but missing: {sorted(listed - present)}")
    other = {p for p in on_disk(ENGINE_DIR / "mismatch", "*") if not p.endswith((".py", ".pyc"))
             and (ENGINE_DIR / "mismatch" / p).is_file()}
    assert not other, f"engine data files need a RESOURCES entry in the module CMakeLists.txt: {sorted(other)}"
    assert "SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR}/../Trainer" in text
    assert "/MisMatchEngine" in text  # the folder process.engine_source_dir() looks for


def test_module_cmake_uses_the_scripted_module_macros():
    text = MODULE_CMAKE.read_text()
    assert re.search(r"slicerMacroBuildScriptedModule\(.*WITH_GENERIC_TESTS.*?\)", text, re.S)
    assert re.search(r"if\(BUILD_TESTING\)\s+(#.*\n\s*)*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}.py\)", text)


def test_extension_cmake_has_the_metadata_and_builds_the_module():
    text = (ROOT / "CMakeLists.txt").read_text()
    values = dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', text))
    homepage = "https://github.com/mismatch-slicer/SlicerMisMatch"
    assert values["EXTENSION_HOMEPAGE"] == homepage
    assert values["EXTENSION_CATEGORY"] == "Segmentation"
    assert values["EXTENSION_CONTRIBUTORS"] == "MisMatch for 3D Slicer developers"
    assert values["EXTENSION_DEPENDS"] == "PyTorch"
    assert len(values["EXTENSION_DESCRIPTION"]) > 80
    raw = "https://raw.githubusercontent.com/mismatch-slicer/SlicerMisMatch/main/"
    icon = values["EXTENSION_ICONURL"]
    assert icon.startswith(raw) and (ROOT / icon[len(raw):]).is_file()
    for url in values["EXTENSION_SCREENSHOTURLS"].split():
        assert url.startswith(raw + "Resources/Screenshots/")
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                 "add_subdirectory(MisMatchSegmentation)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                 "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text


def test_extension_icon_is_a_128_pixel_png():
    from PIL import Image

    for path in (ROOT / "Resources" / "MisMatch.png", MODULE_DIR / "Resources" / "Icons" / "MisMatchSegmentation.png"):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (128, 128)


def test_extensions_index_entry():
    entry = json.loads((ROOT / "MisMatchSegmentation.json").read_text())
    assert entry["$schema"].endswith("slicer-extension-catalog-item-schema-v1.0.0.json#")
    assert entry["scmurl"] == "https://github.com/mismatch-slicer/SlicerMisMatch"
    assert entry["category"] == "Segmentation" and entry["build_dependencies"] == ["PyTorch"]
    assert entry["scmrevision"] and entry["build_subdirectory"] == "."


def test_requirements_never_touch_slicers_own_packages():
    from MisMatchSegmentationLib import install

    lines = install.read_requirements(MODULE_DIR / "Resources" / "requirements.txt")
    names = {install.requirement_name(line) for line in lines}
    assert names and not names & install.PROTECTED


def test_every_package_the_engine_imports_is_installed_on_first_use():
    """A module-level import of a third-party package in a packaged engine file (benchmark/ is for the command
    line) must be Slicer's own, torch (the PyTorch extension), or in Resources/requirements.txt: otherwise the
    engine's child process fails at import inside Slicer."""
    import ast
    import sys

    from MisMatchSegmentationLib import install

    provided = install.PROTECTED | {install.requirement_name(r) for r in install.read_requirements()}
    engine = ENGINE_DIR / "mismatch"
    needed: dict[str, set[str]] = {}
    for path in engine.rglob("*.py"):
        if "benchmark" in path.relative_to(engine).parts:
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "mismatch":
                    needed.setdefault(top.lower(), set()).add(path.relative_to(engine).as_posix())
    assert "scipy" in needed and "torch" in needed  # the scan sees the engine's imports
    missing = {name: sorted(files) for name, files in needed.items() if name not in provided}
    assert not missing, f"add these to MisMatchSegmentation/Resources/requirements.txt: {missing}"
