"""The classes of a label map: their values, names and colours (what a model card keeps), and the mapping
between label values and the class indices the networks use. Imports nothing heavy (no torch)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import label_values
from .errors import UserError

# A palette for classes that come without a colour (Slicer's segment colours, roughly).
_PALETTE = [(0.5, 0.68, 0.5), (0.94, 0.84, 0.57), (0.69, 0.48, 0.39), (0.43, 0.72, 0.82),
            (0.86, 0.96, 0.49), (0.56, 0.31, 0.64), (0.98, 0.36, 0.36), (0.25, 0.6, 0.9)]


def default_classes(values: Sequence[int]) -> list[dict]:
    """Classes for label values that come without names or colours: ``class_<value>``, palette colours."""
    return [{"value": int(v), "name": f"class_{int(v)}", "color": list(_PALETTE[i % len(_PALETTE)])}
            for i, v in enumerate(values)]


def remap_labels(labels: np.ndarray, classes: list[dict]) -> np.ndarray:
    """Label values -> class indices 1..N in the order of ``classes`` (0 stays background).

    A value that is not a listed class is a :class:`UserError`.
    """
    present = label_values(labels)
    known = {int(c["value"]) for c in classes}
    unknown = [int(v) for v in present if v != 0 and int(v) not in known]
    if unknown:
        raise UserError(f"label value(s) {unknown} are not among the {len(classes)} class(es) "
                        f"{sorted(known)}; add them to the classes file or remove them from the label map")
    lut = np.zeros(int(max(present.max(), max(known))) + 1, dtype=np.uint8 if len(classes) < 255 else np.int32)
    for i, c in enumerate(classes, start=1):
        lut[int(c["value"])] = i
    return lut[labels]


def class_values_lut(classes: list[dict]) -> np.ndarray:
    """Class index (0..N) -> the label value written to the label map (0 stays background)."""
    values = [0] + [int(c["value"]) for c in classes]
    dtype = np.uint8 if max(values) < 256 else np.uint16 if max(values) < 65536 else np.int32
    return np.asarray(values, dtype=dtype)


def load_classes_file(path: str | os.PathLike) -> list[dict]:
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: classes file not found") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a valid JSON classes file ({exc})") from None
    if not isinstance(data, list) or not data or not all(isinstance(c, dict) and "value" in c for c in data):
        raise UserError(f"{path}: expected a JSON list like "
                        '[{"value": 1, "name": "liver", "color": [0.8, 0.3, 0.2]}]')
    values = [int(c["value"]) for c in data]
    if len(set(values)) != len(values) or min(values) < 1:
        raise UserError(f"{path}: class values must be distinct integers >= 1 (0 is background)")
    out = default_classes(values)
    for c, given in zip(out, data):
        c["name"] = str(given.get("name", c["name"]))
        if "color" in given:
            c["color"] = [float(x) for x in given["color"]][:3]
    return out


def choose_classes(labels: np.ndarray, labels_path, classes_path=None) -> list[dict]:
    """The classes of a painted label map: the ``--classes`` file's, else one per non-zero label value, named
    and coloured as a Slicer ``.seg.nrrd``'s header names its segments (:func:`~mismatch.io.segment_names`),
    else ``class_<value>``. An all-zero label map is a :class:`UserError`."""
    from .io import segment_names

    if classes_path:
        return load_classes_file(classes_path)
    classes = default_classes([int(v) for v in label_values(labels) if v != 0])
    named = segment_names(labels_path)
    for c in classes:
        c.update(named.get(c["value"], {}))
    if not classes:
        raise UserError(f"{labels_path}: the label map is empty (all zero); paint the structure on a few "
                        "slices first, or list all-background labelled slices with --labelled-slices")
    return classes
