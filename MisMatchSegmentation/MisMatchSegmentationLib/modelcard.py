"""Checking a model folder (docs/contract.md, "Model folder") before it is used, imported or shared.

Only the card and the weights file are read (JSON and a checksum); the weights themselves are loaded by the
engine in its own process.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .engine import contract


class ModelCardError(ValueError):
    """The folder is not a usable MisMatch model; the message says why and what to do."""


def read_card(folder: str | Path, check_weights: bool = True) -> dict:
    """The model card of ``folder`` (or of the folder holding a given ``model.json``), validated as the engine
    validates it (``mismatch.contract``); the weights file must be there and, with ``check_weights``, match
    the card's checksum."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    card_path = folder / contract.CARD_NAME
    if not card_path.is_file():
        raise ModelCardError(f"{folder} has no model.json: choose the folder of a model saved by MisMatch")
    card = contract.load_card(card_path, "update the MisMatch extension", error=ModelCardError)
    contract.check_weights(folder, card, error=ModelCardError, checksum=check_weights)
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
    """Copy a validated model (card, weights, the optimiser's state a warm start continues from and the painted
    slices it was trained from, not the resumable checkpoint) to ``destination``."""
    source, destination = Path(source), Path(destination)
    card = read_card(source)
    if destination.exists() and any(destination.iterdir()):
        if not (destination / contract.CARD_NAME).is_file():
            raise ModelCardError(f"{destination} is not empty and holds no model: choose an empty folder")
    destination.mkdir(parents=True, exist_ok=True)
    optional = (contract.OPTIMIZER_NAME, contract.PAINTED_NAME)
    for name in (contract.CARD_NAME, card["weights"]["file"], *optional):
        if name not in optional or (source / name).is_file():   # earlier models lack them
            shutil.copy2(source / name, destination / name)
    return destination
