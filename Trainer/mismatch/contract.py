"""What the engine and the Slicer module must agree on (docs/contract.md), in one place for both.

The engine imports this file as ``mismatch.contract``; the module loads the same file from the engine
packaged next to it (``MisMatchSegmentationLib/engine.py``), in Slicer's GUI process. So it is plain
Python: the standard library only (no torch, no numpy) and no imports from the rest of the engine.

- the exit status of a ``mismatch`` command
- slice lists as people write them (``3, 7, 10-12``)
- durations as the progress shows them (``1:02:05``)
- the model card (``model.json``) and its weights' checksum

A check that fails raises the caller's own error class (``error=``), with one line that says what is wrong
and what to do: the engine raises its ``UserError`` (exit 2), the module its ``JobError`` or
``ModelCardError`` (a message in the panel).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

# -- exit status ------------------------------------------------------------------------------------------
EXIT_OK = 0
EXIT_FAILED = 1          # an engine bug or a system failure: a traceback on stderr
EXIT_USER_ERROR = 2      # bad input: one line on stderr, nothing modified
EXIT_CANCELLED = 130     # stopped on request (SIGINT / SIGTERM / the stop file) after a checkpoint


class ContractError(ValueError):
    """The default error of the checks here: bad input the user can fix."""


# -- slice lists ------------------------------------------------------------------------------------------
def parse_slices(text: str | None, what: str = "slice list", error: type[Exception] = ContractError) -> list[int]:
    """``"3, 7; 10-12,7"`` -> ``[3, 7, 10, 11, 12]``: 0-based slice numbers and inclusive ranges separated by
    commas (or semicolons), sorted and without repeats; an empty text gives ``[]``. ``what`` names the list
    at the start of the error message."""
    out: set[int] = set()
    for part in (text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise error(f"{what}: {part!r} is not a slice number or range; use numbers and ranges like "
                        "3,7,10-12 (0-based)")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if hi < lo:
            raise error(f"{what}: range {part!r} runs backwards; write it as {hi}-{lo}")
        out.update(range(lo, hi + 1))
    return sorted(out)


def format_slices(slices) -> str:
    """``[3, 7, 10]`` -> ``"3,7,10"``, the form ``--labelled-slices`` and its siblings take."""
    return ",".join(str(int(s)) for s in slices)


# -- durations --------------------------------------------------------------------------------------------
def format_duration(seconds) -> str:
    """``3725`` -> ``"1:02:05"``, ``75`` -> ``"1:15"``; ``"?"`` for None, infinity or anything not a number."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


# -- the model folder -------------------------------------------------------------------------------------
CARD_NAME = "model.json"
WEIGHTS_NAME = "model.safetensors"
#: the optimiser's state beside the weights (a warm start continues it)
OPTIMIZER_NAME = "optimizer.safetensors"
#: the painted slices the model was trained from (segment of the same image keeps them)
PAINTED_NAME = "painted.safetensors"
MODEL_FORMAT = "mismatch-model"
#: the newest card this engine reads and writes. 2: the network may read each slice with its neighbours
#: (``architecture.context``, the 2.5D input); a card is written as version 1 unless it uses that, so that
#: every other model stays readable by engines and extensions of version 1, and one that needs the newer
#: engine says so there instead of failing to match its weights
MODEL_FORMAT_VERSION = 2
REQUIRED_CARD_KEYS = ("format", "format_version", "architecture", "classes", "channels", "normalisation",
                      "slice_axis", "weights")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_card(card_path, update: str, error: type[Exception] = ContractError) -> dict:
    """Read ``model.json`` at ``card_path`` and check it (:func:`check_card`)."""
    try:
        card = json.loads(Path(card_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise error(f"{card_path}: the model card is not valid JSON ({exc}); the model folder is damaged: "
                    "copy the model folder again") from None
    return check_card(card, card_path, update, error)


def check_card(card, where, update: str, error: type[Exception] = ContractError) -> dict:
    """``card`` if it is a model card this version reads, else ``error`` with what is wrong (``where``
    names the card in the message). ``update`` is the advice for a card of a newer format, e.g. "update
    the MisMatch extension". Checked: the format and its version (a whole number, not newer than
    :data:`MODEL_FORMAT_VERSION`), the required keys, the classes (positive whole-number label values),
    the channels (a list) and the weights file (a plain file name in the model folder). What the network
    must look like is for the engine to check."""
    if not isinstance(card, dict) or card.get("format") != MODEL_FORMAT:
        raise error(f"{where}: not a MisMatch model card (format is not {MODEL_FORMAT!r})")
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise error(f"{where}: the model card lacks {', '.join(missing)}; the model folder is damaged or "
                    "incomplete: save or copy the model again")
    version = card["format_version"]
    try:
        if isinstance(version, bool) or int(version) != float(version):
            raise ValueError
        version = int(version)
    except (TypeError, ValueError, OverflowError):
        raise error(f"{where}: format_version {card['format_version']!r} is not a whole number; the model card "
                    "is damaged or was edited: copy the model folder again") from None
    if version > MODEL_FORMAT_VERSION:
        raise error(f"{where}: model format version {version} is newer than this version reads "
                    f"({MODEL_FORMAT_VERSION}); {update}")
    classes = card["classes"]
    if not isinstance(classes, list) or not classes or not all(
            isinstance(c, dict) and isinstance(c.get("value"), int) and not isinstance(c["value"], bool)
            and c["value"] > 0 for c in classes):
        raise error(f"{where}: 'classes' must list the classes with positive integer values, e.g. "
                    '[{"value": 1, "name": "liver"}]; the model card is damaged or was edited')
    if not isinstance(card["channels"], list):
        raise error(f"{where}: 'channels' must list the input channels; the model card is damaged or was edited")
    weights = card["weights"]
    if not isinstance(weights, dict) or not isinstance(weights.get("file"), str) or not weights["file"]:
        raise error(f"{where}: 'weights' does not name the weights file; the model card is damaged")
    if Path(weights["file"]).name != weights["file"] or weights["file"] in (".", ".."):
        raise error(f"{where}: the weights file {weights['file']!r} must sit in the model folder")
    return card


def check_weights(folder, card: dict, error: type[Exception] = ContractError, checksum: bool = True) -> Path:
    """The weights file of a checked ``card`` in ``folder``, after checking that it is there and (unless not
    ``checksum``) that it matches the card's sha256."""
    path = Path(folder) / card["weights"]["file"]
    if not path.is_file():
        raise error(f"{path}: the weights file is missing; copy the whole model folder")
    if checksum and sha256_file(path) != card["weights"].get("sha256"):
        raise error(f"{path}: the weights do not match the checksum in {CARD_NAME} (damaged or replaced file); "
                    "copy the model folder again")
    return path
