"""Files in, files out: what ``mismatch segment`` and ``mismatch evaluate`` do, callable from Python."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import Normalisation, parse_slice_list
from .device import resolve_device
from .errors import UserError
from .events import Reporter
from .inference import VolumeSegmentation, rank_uncertain_slices, segment_volume
from .modelfile import load_model
from .train import remap_labels


def class_values_lut(classes: list[dict]) -> np.ndarray:
    """Class index (0..N) -> the label value written to the label map (0 stays background)."""
    values = [0] + [int(c["value"]) for c in classes]
    dtype = np.uint8 if max(values) < 256 else np.uint16 if max(values) < 65536 else np.int32
    return np.asarray(values, dtype=dtype)


def segment_arrays(card: dict, networks, image: np.ndarray, *, truth: np.ndarray | None = None,
                   eval_slices: Sequence[int] | None = None, batch_size: int = 8, device="cpu",
                   reporter: Reporter | None = None) -> VolumeSegmentation:
    """Normalise ``image [C, K, J, I]`` as the card says and segment it; ``truth`` holds label values."""
    if image.shape[0] != card["architecture"]["in_channels"]:
        raise UserError(f"the model takes {card['architecture']['in_channels']} channel(s) "
                        f"({', '.join(c['name'] for c in card['channels'])}) but {image.shape[0]} image(s) "
                        "were given; pass one file per channel, in the same order as for training")
    volume = Normalisation.from_dict(card["normalisation"]).apply(image)
    mapped = remap_labels(truth, card["classes"]) if truth is not None else None
    return segment_volume(networks, volume, axis=card["slice_axis"], batch_size=batch_size, device=device,
                          truth=mapped, eval_slices=eval_slices, reporter=reporter)


def segment_files(images: Sequence[str], model_dir: str, out: str, *, confidence: str | None = None,
                  disagreement: str | None = None, report: str | None = None, truth: str | None = None,
                  eval_slices: Sequence[int] | None = None, batch_size: int = 8, device: str = "auto",
                  reporter: Reporter | None = None) -> dict:
    """Segment IMAGE(s) with a model folder and write the outputs on the input grid."""
    from .io import check_outputs_not_inputs, read_image, read_labels, write_volume

    reporter = reporter or Reporter(progress_bar=False)
    outputs = [p for p in (out, confidence, disagreement, report) if p]
    inputs = list(images) + ([truth] if truth else [])
    check_outputs_not_inputs(outputs, inputs + [str(Path(model_dir) / "model.json"),
                                                str(Path(model_dir) / "model.safetensors")])
    if eval_slices is not None and truth is None:
        raise UserError("--eval-slices needs --truth (the label map to evaluate against)")
    dev = resolve_device(device)
    card, networks = load_model(model_dir, device=dev)
    reporter.start("load", total=None)
    image, geometry = read_image(images)
    truth_arr = read_labels(truth, geometry) if truth else None
    seg = segment_arrays(card, networks, image, truth=truth_arr, eval_slices=eval_slices,
                         batch_size=batch_size, device=dev, reporter=reporter)
    lut = class_values_lut(card["classes"])
    write_volume(lut[seg.labels], geometry, out)
    if confidence:
        write_volume(seg.confidence, geometry, confidence)
    if disagreement:
        write_volume(seg.disagreement, geometry, disagreement)
    summary = {"seconds": round(seg.seconds, 2), "slices": len(seg.slice_scores)}
    if report:
        labelled = card.get("summary", {}).get("labelled_slices", [])
        two = len(card["architecture"].get("decoders", [])) >= 2
        doc = {
            "slice_axis": card["slice_axis"],
            "model": str(model_dir),
            "uncertain_slices": rank_uncertain_slices(seg.slice_scores, exclude=labelled, two_decoders=two),
            "evaluation": seg.evaluation,
        }
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    if seg.evaluation:
        summary["iou"] = seg.evaluation["mean"].get("iou")
    return summary


def evaluate_files(prediction: str, truth: str, *, confidence: str | None = None,
                   slices: Sequence[int] | None = None, axis: str = "k", n_bins: int = 15,
                   diagram: str | None = None) -> dict:
    """Overlap (and calibration, with a confidence volume) of a label map against a truth."""
    from .io import read_volume
    from .metrics import evaluate_confidence, evaluate_arrays
    from .data import axis_index

    pred, g_pred = read_volume(prediction)
    true, g_true = read_volume(truth)
    if not g_pred.same_grid(g_true):
        raise UserError(f"{prediction} ({g_pred.describe()}) and {truth} ({g_true.describe()}) are not on the "
                        "same grid; resample one onto the other first")
    ax = axis_index(axis)
    if confidence:
        conf, g_conf = read_volume(confidence)
        if not g_conf.same_grid(g_pred):
            raise UserError(f"{confidence} is not on the prediction's grid ({g_pred.describe()})")
        result = evaluate_confidence(pred, true, conf.astype(np.float32, copy=False), slices=slices, axis=ax,
                                     n_bins=n_bins)
    else:
        result = evaluate_arrays(pred, true, slices=slices, axis=ax, n_bins=n_bins)
    if diagram:
        if not confidence:
            raise UserError("--diagram needs --confidence (the confidence volume from 'mismatch segment')")
        from .plots import reliability_diagram

        cal = result["calibration"]
        reliability_diagram({"all voxels": cal["all"], "foreground band": cal["band"]}, diagram,
                            title=f"{Path(prediction).name} vs {Path(truth).name}")
        result["diagram"] = str(diagram)
    return result
