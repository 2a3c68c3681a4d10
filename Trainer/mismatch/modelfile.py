"""Model folders: weights in safetensors and a JSON card; resumable checkpoints. No pickle is ever loaded.

A model folder holds ``model.json`` (the card, see ``docs/contract.md``) and ``model.safetensors``. The
safetensors file holds one set of weights per kept snapshot, keys prefixed ``snapshot<n>.``; the card
records the file's sha256, checked before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import UserError
from .models import ArchitectureConfig, SegmentationNetwork

CARD_NAME = "model.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "mismatch-model"
FORMAT_VERSION = 1
REQUIRED_CARD_KEYS = ("format", "format_version", "architecture", "classes", "channels", "normalisation",
                      "slice_axis", "weights")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def save_model(model_dir: str | os.PathLike, snapshots: list[dict[str, torch.Tensor]], card: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` (every snapshot) and ``model.json``; returns the folder.

    ``card`` must hold at least ``architecture`` (an :class:`ArchitectureConfig` dict), ``classes``,
    ``channels``, ``normalisation`` and ``slice_axis``; format, versions and the weights entry are added.
    """
    if not snapshots:
        raise ValueError("no weights to save")
    folder = Path(model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"snapshot{i}.{k}": v for i, sd in enumerate(snapshots) for k, v in sd.items()}
    weights = folder / WEIGHTS_NAME
    _save_tensors(tensors, weights, metadata={"format": FORMAT})
    card = dict(card)
    card.update({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "engine_version": __version__,
        "weights": {"file": WEIGHTS_NAME, "sha256": sha256_file(weights), "snapshots": len(snapshots)},
    })
    _atomic_write_text(folder / CARD_NAME, json.dumps(card, indent=2, sort_keys=False) + "\n")
    return folder


def read_card(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``model.json``; a :class:`UserError` says what is wrong with it."""
    folder = Path(model_dir)
    card_path = folder / CARD_NAME
    if folder.is_file() and folder.name == CARD_NAME:
        folder, card_path = folder.parent, folder
    if not card_path.is_file():
        raise UserError(f"{folder}: not a MisMatch model folder (no {CARD_NAME}); "
                        "give the folder that 'mismatch train --out' wrote")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{card_path}: the model card is not valid JSON ({exc}); the model folder is damaged") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise UserError(f"{card_path}: not a MisMatch model card (format is not {FORMAT!r})")
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise UserError(f"{card_path}: the model card lacks {', '.join(missing)}; the model folder is damaged")
    if int(card["format_version"]) > FORMAT_VERSION:
        raise UserError(f"{card_path}: model format version {card['format_version']} is newer than this engine "
                        f"reads ({FORMAT_VERSION}); update the MisMatch engine (installed: {__version__})")
    try:
        ArchitectureConfig.from_dict(card["architecture"]).decoders  # noqa: B018 - validates the name
    except (KeyError, TypeError):
        raise UserError(f"{card_path}: unknown architecture {card['architecture']!r}") from None
    return card


def load_model(model_dir: str | os.PathLike, device: torch.device | str = "cpu"
               ) -> tuple[dict[str, Any], list[SegmentationNetwork]]:
    """Validate the card and the weights' checksum, rebuild one network per snapshot (eval mode)."""
    folder = Path(model_dir)
    if folder.is_file():
        folder = folder.parent
    card = read_card(folder)
    weights = folder / card["weights"].get("file", WEIGHTS_NAME)
    if not weights.is_file():
        raise UserError(f"{weights}: the weights file is missing; copy the whole model folder")
    digest = sha256_file(weights)
    if digest != card["weights"].get("sha256"):
        raise UserError(f"{weights}: the weights do not match the card's checksum (corrupted or replaced file); "
                        "copy the model folder again")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise UserError(f"{weights}: cannot read the weights ({exc})") from None
    config = ArchitectureConfig.from_dict(card["architecture"])
    networks = []
    for i in range(int(card["weights"].get("snapshots", 1))):
        prefix = f"snapshot{i}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        net = SegmentationNetwork(config)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise UserError(f"{weights}: the weights do not fit the architecture in the card "
                            f"({str(exc).splitlines()[0]})") from None
        networks.append(net.to(device).eval())
    return card, networks


# -- resumable checkpoints -------------------------------------------------------------------------------

def save_checkpoint(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write ``state.safetensors`` and ``state.json`` (JSON for everything that is not a tensor)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save_tensors(tensors, folder / "state.safetensors")
    _atomic_write_text(folder / "state.json", json.dumps(state) + "\n")


def load_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    folder = Path(folder)
    if not (folder / "state.json").is_file() or not (folder / "state.safetensors").is_file():
        raise UserError(f"{folder}: no checkpoint to resume from; run without --resume to start training")
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    return load_file(str(folder / "state.safetensors")), state


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser's state dict into tensors (for safetensors) and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           rest: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, values in rest.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})
