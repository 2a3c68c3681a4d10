"""Checking a model folder (docs/contract.md, "Model folder") before it is used, imported or shared.

Only the card and the weights file are read (JSON and a checksum); the weights themselves are loaded by the
engine in its own process.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

FORMAT = "mismatch-model"
SUPPORTED_FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "architecture", "classes", "channels", "weights")


class ModelCardError(ValueError):
    """The folder is not a usable MisMatch model; the message says why and what to do."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_card(folder: str | Path, check_weights: bool = True) -> dict:
    """The model card of ``folder`` (or of the folder holding a given ``model.json``), validated."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    card_path = folder / "model.json"
    if not card_path.is_file():
        raise ModelCardError(f"{folder} has no model.json: choose the folder of a model saved by MisMatch")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelCardError(f"{card_path} is not readable JSON ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise ModelCardError(f"{card_path} is not a MisMatch model card (format is not {FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in card]
    if missing:
        raise ModelCardError(f"{card_path} lacks {', '.join(missing)}: the model is incomplete; save it again")
    try:
        version = int(card["format_version"])
    except (TypeError, ValueError):
        raise ModelCardError(f"{card_path}: format_version {card['format_version']!r} is not a number") from None
    if version > SUPPORTED_FORMAT_VERSION:
        raise ModelCardError(f"{card_path}: model format {version} is newer than this extension understands "
                             f"({SUPPORTED_FORMAT_VERSION}); update the MisMatch extension")
    classes = card["classes"]
    if not isinstance(classes, list) or not classes or not all(
            isinstance(c, dict) and isinstance(c.get("value"), int) and c["value"] > 0 for c in classes):
        raise ModelCardError(f"{card_path}: 'classes' must list the classes with positive integer values")
    weights = card["weights"]
    if not isinstance(weights, dict) or not weights.get("file"):
        raise ModelCardError(f"{card_path}: 'weights' does not name the weights file")
    weights_path = folder / weights["file"]
    if Path(weights["file"]).name != weights["file"]:
        raise ModelCardError(f"{card_path}: the weights file must sit in the model folder")
    if not weights_path.is_file():
        raise ModelCardError(f"{weights_path} is missing: copy the whole model folder")
    if check_weights and weights.get("sha256") and _sha256(weights_path) != weights["sha256"]:
        raise ModelCardError(f"{weights_path} does not match the checksum in model.json: the file is damaged "
                             "or was changed; copy the model again")
    return card


def channel_count(card: dict) -> int:
    return int(card.get("architecture", {}).get("in_channels") or len(card.get("channels") or [1]))


def describe(card: dict) -> str:
    """One line for the status: method, classes, training summary."""
    arch = card.get("architecture", {})
    names = ", ".join(str(c.get("name", c.get("value"))) for c in card.get("classes", []))
    steps = card.get("summary", {}).get("steps")
    text = f"{arch.get('name', '?')} model (width {arch.get('width', '?')}) for {names}"
    return text + (f", trained {steps} steps" if steps else "")


def copy_model(source: str | Path, destination: str | Path) -> Path:
    """Copy a validated model (card and weights only, not the resumable checkpoint) to ``destination``."""
    source, destination = Path(source), Path(destination)
    card = read_card(source)
    if destination.exists() and any(destination.iterdir()):
        if not (destination / "model.json").is_file():
            raise ModelCardError(f"{destination} is not empty and holds no model: choose an empty folder")
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("model.json", card["weights"]["file"]):
        shutil.copy2(source / name, destination / name)
    return destination
