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


REPOSITORY = "https://github.com/mismatch-slicer/SlicerMisMatch"
RAW = "https://raw.githubusercontent.com/mismatch-slicer/SlicerMisMatch/main/"
CATALOG_SCHEMA = Path(__file__).with_name("catalog_entry_schema.json")
# Slicer's categories as the ExtensionsIndex's check_description_files.py accepts them (the ones an
# extension like this one could use; the full list is in that script)
ACCEPTED_CATEGORIES = {"Segmentation", "Active Learning", "Analysis", "Quantification", "Utilities"}


def extension_values() -> dict[str, str]:
    return dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', (ROOT / "CMakeLists.txt").read_text()))


def cmake_project() -> str:
    """The extension's name as the ExtensionsIndex reads it: the first ``project(...)`` of the top CMakeLists."""
    names = re.findall(r"project\s*\(\s*([^\s\)\n\r]+)", (ROOT / "CMakeLists.txt").read_text(), re.I)
    assert names, "no project() in CMakeLists.txt"
    return names[0].strip("\"'")


def test_extension_cmake_has_the_metadata_and_builds_the_module():
    text = (ROOT / "CMakeLists.txt").read_text()
    values = extension_values()
    assert values["EXTENSION_HOMEPAGE"].startswith(REPOSITORY)
    assert values["EXTENSION_CATEGORY"] == "Segmentation"
    contributors = values["EXTENSION_CONTRIBUTORS"]
    assert "developers" not in contributors.lower() and "SlicerMisMatch" in contributors
    assert values["EXTENSION_DEPENDS"] == "PyTorch"
    assert len(values["EXTENSION_DESCRIPTION"]) > 80
    icon = values["EXTENSION_ICONURL"]
    assert icon.startswith(RAW) and (ROOT / icon[len(RAW):]).is_file()
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                 "add_subdirectory(MisMatchSegmentation)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                 "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text


def test_screenshot_urls_point_to_pngs_in_the_repository():
    """check_description_files.py downloads every screenshot URL: each must be a file committed here."""
    from PIL import Image

    urls = extension_values()["EXTENSION_SCREENSHOTURLS"].split()
    assert len(urls) >= 3
    for url in urls:
        assert url.startswith(RAW + "Resources/Screenshots/") and url.endswith(".png"), url
        path = ROOT / url[len(RAW):]
        assert path.is_file(), f"{url} points to {path.relative_to(ROOT)}, which is not in the repository"
        assert path.stat().st_size < 300_000, f"{path.name} is larger than 300 KB"
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 300
        caption = (ROOT / "Resources" / "Screenshots" / "README.md").read_text()
        assert path.name in caption, f"{path.name} has no caption in Resources/Screenshots/README.md"


def test_extension_icon_is_a_128_pixel_png():
    from PIL import Image

    for path in (ROOT / "Resources" / "MisMatch.png", MODULE_DIR / "Resources" / "Icons" / "MisMatchSegmentation.png"):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (128, 128)


def validate(instance, schema: dict) -> list[str]:
    """Errors of ``instance`` against ``schema``: with ``jsonschema`` when it is installed, else with the
    subset of draft-07 that the catalog schema uses (type, required, additionalProperties, enum, items,
    minimum, maximum)."""
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        validator = jsonschema.Draft7Validator(schema)
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(instance)]
    types = {"object": dict, "string": str, "array": list, "boolean": bool, "integer": int}
    errors = []

    def check(value, rule, where):
        wanted = types.get(rule.get("type"))
        if wanted and (not isinstance(value, wanted) or (wanted is int and isinstance(value, bool))):
            errors.append(f"{where}: {value!r} is not of type {rule['type']!r}")
            return
        if "enum" in rule and value not in rule["enum"]:
            errors.append(f"{where}: {value!r} is not one of {rule['enum']}")
        if "minimum" in rule and value < rule["minimum"] or "maximum" in rule and value > rule["maximum"]:
            errors.append(f"{where}: {value!r} is out of range")
        if isinstance(value, list):
            for n, item in enumerate(value):
                check(item, rule.get("items", {}), f"{where}/{n}")
        if isinstance(value, dict):
            errors.extend(f"{where}: {k!r} is a required property" for k in rule.get("required", []) if k not in value)
            for key, item in value.items():
                if key in rule.get("properties", {}):
                    check(item, rule["properties"][key], f"{where}/{key}")
                elif rule.get("additionalProperties") is False:
                    errors.append(f"{where}: additional property {key!r} is not allowed")

    check(instance, schema, "")
    return errors


def test_catalog_schema_rejects_what_the_index_rejects():
    """The validator (jsonschema, or the fallback) on the schema: the old misspelt keys fail."""
    schema = json.loads(CATALOG_SCHEMA.read_text())
    good = {"$schema": "x", "category": "Segmentation", "scm_url": "https://github.com/a/SlicerB", "tier": 1}
    assert validate(good, schema) == []
    assert validate(dict(good, scmurl="u"), schema)                          # additionalProperties: false
    assert validate({k: v for k, v in good.items() if k != "scm_url"}, schema)  # required
    assert validate(dict(good, tier=7), schema) and validate(dict(good, scm_type="svn"), schema)


def test_extensions_index_entry_is_valid():
    """What Slicer's factory and the ExtensionsIndex checks read: the entry is named after the CMake project,
    valid against the catalog-entry schema (v1.0.1) it names, has what the factory's ``string(JSON ...)``
    needs, and points at this repository, which has a LICENSE."""
    name = cmake_project()
    assert name == "MisMatch" and not name.lower().startswith("slicer")
    entries = sorted(p.name for p in ROOT.glob("*.json"))
    assert entries == [f"{name}.json"], f"the index entry must be named {name}.json; found {entries}"
    raw = (ROOT / f"{name}.json").read_bytes()
    assert b"\r" not in raw, "the index wants LF line endings"
    entry = json.loads(raw)
    assert entry["$schema"] == ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                "slicer-extension-catalog-entry-schema-v1.0.1.json#")
    errors = validate(entry, json.loads(CATALOG_SCHEMA.read_text()))
    assert not errors, errors
    for key in ("scm_url", "scm_revision", "category"):  # the factory's configure step fails without them
        assert entry.get(key), key
    assert entry["scm_url"] == REPOSITORY and entry["scm_url"].rsplit("/", 1)[-1].startswith("Slicer")
    assert entry["category"] in ACCEPTED_CATEGORIES and entry["category"] == extension_values()["EXTENSION_CATEGORY"]
    assert entry["build_dependencies"] == extension_values()["EXTENSION_DEPENDS"].split()
    assert entry["tier"] == 1  # experimental: the index's maintainers assign higher tiers
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0" in licence


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
