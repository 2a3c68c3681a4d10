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
from .prior import PriorSettings, SlicePrior
from .train import remap_labels


def class_values_lut(classes: list[dict]) -> np.ndarray:
    """Class index (0..N) -> the label value written to the label map (0 stays background)."""
    values = [0] + [int(c["value"]) for c in classes]
    dtype = np.uint8 if max(values) < 256 else np.uint16 if max(values) < 65536 else np.int32
    return np.asarray(values, dtype=dtype)


def painted_prior(card: dict, painted: np.ndarray, spacing_kji: Sequence[float],
                  explicit_slices: Sequence[int] | None = None) -> SlicePrior | None:
    """The prior of a painted label map (label values, ``[K, J, I]``) for the model of ``card``: its labelled
    slices (any painted voxel, or listed in ``explicit_slices``) along the model's slice axis, with the
    card's prior settings. ``None`` when no slice is labelled. A card without prior settings (``--preset
    paper``) keeps the painted slices as painted and leaves the others to the network."""
    from .data import axis_index, labelled_slices

    mapped = remap_labels(painted, card["classes"])
    axis = card["slice_axis"]
    labelled = labelled_slices(mapped, axis, explicit_slices)
    if len(labelled) == 0:
        return None
    settings = card.get("prior")
    prior_settings = PriorSettings.from_dict(settings) if settings else PriorSettings(weight=0.0)
    return SlicePrior(mapped, labelled, axis_index(axis), spacing_kji, len(card["classes"]) + 1, prior_settings)


def segment_arrays(card: dict, networks, image: np.ndarray, *, truth: np.ndarray | None = None,
                   eval_slices: Sequence[int] | None = None, batch_size: int = 8, device="cpu",
                   reporter: Reporter | None = None, prior: SlicePrior | None = None) -> VolumeSegmentation:
    """Normalise ``image [C, K, J, I]`` as the card says and segment it; ``truth`` holds label values;
    ``prior``: see :func:`painted_prior`."""
    if image.shape[0] != card["architecture"]["in_channels"]:
        raise UserError(f"the model takes {card['architecture']['in_channels']} channel(s) "
                        f"({', '.join(c['name'] for c in card['channels'])}) but {image.shape[0]} image(s) "
                        "were given; pass one file per channel, in the same order as for training")
    volume = Normalisation.from_dict(card["normalisation"]).apply(image)
    mapped = remap_labels(truth, card["classes"]) if truth is not None else None
    return segment_volume(networks, volume, axis=card["slice_axis"], batch_size=batch_size, device=device,
                          truth=mapped, eval_slices=eval_slices, reporter=reporter, prior=prior)


def segment_files(images: Sequence[str], model_dir: str, out: str, *, confidence: str | None = None,
                  disagreement: str | None = None, report: str | None = None, truth: str | None = None,
                  eval_slices: Sequence[int] | None = None, batch_size: int = 8, device: str = "auto",
                  reporter: Reporter | None = None, labels: str | None = None,
                  explicit_slices: Sequence[int] | None = None) -> dict:
    """Segment IMAGE(s) with a model folder and write the outputs on the input grid.

    ``labels``: the painted label map of this volume (what the model was trained from): see
    :func:`painted_prior`."""
    from .io import (check_extension, check_outputs_not_inputs, check_writable, read_image, read_labels,
                     write_text_atomic, write_volume)

    reporter = reporter or Reporter(progress_bar=False)
    outputs = [p for p in (out, confidence, disagreement, report) if p]
    inputs = list(images) + ([truth] if truth else []) + ([labels] if labels else [])
    check_outputs_not_inputs(outputs, inputs + [str(Path(model_dir) / "model.json"),
                                                str(Path(model_dir) / "model.safetensors")])
    # every output can be written, before any work (not found out after the whole inference)
    for option, path in (("--out", out), ("--confidence", confidence), ("--disagreement", disagreement),
                         ("--report", report)):
        if path:
            check_writable(path, option)
            if option != "--report":
                check_extension(path)
    if eval_slices is not None and truth is None:
        raise UserError("--eval-slices needs --truth (the label map to evaluate against)")
    if explicit_slices and not labels:
        raise UserError("--labelled-slices / --empty-slices need --labels (the painted label map)")
    dev = resolve_device(device)
    card, networks = load_model(model_dir, device=dev)
    reporter.start("load", total=None)
    image, geometry = read_image(images)
    truth_arr = read_labels(truth, geometry) if truth else None
    prior = None
    if labels:
        prior = painted_prior(card, read_labels(labels, geometry), geometry.spacing[::-1], explicit_slices)
        if prior is None:
            raise UserError(f"--labels {labels}: no painted slice; paint the structure on a few slices, or "
                            "leave --labels out")
    seg = segment_arrays(card, networks, image, truth=truth_arr, eval_slices=eval_slices,
                         batch_size=batch_size, device=dev, reporter=reporter, prior=prior)
    lut = class_values_lut(card["classes"])
    write_volume(lut[seg.labels], geometry, out)
    if confidence:
        write_volume(seg.confidence, geometry, confidence)
    if disagreement:
        write_volume(seg.disagreement, geometry, disagreement)
    summary = {"seconds": round(seg.seconds, 2), "slices": len(seg.slice_scores)}
    if report:
        labelled = list(card.get("summary", {}).get("labelled_slices", []))
        labelled += [int(s) for s in prior.lab] if prior is not None else []
        two = len(card["architecture"].get("decoders", [])) >= 2
        doc = {
            "slice_axis": card["slice_axis"],
            "model": str(model_dir),
            "uncertain_slices": rank_uncertain_slices(seg.slice_scores, exclude=labelled, two_decoders=two),
            "evaluation": seg.evaluation,
        }
        write_text_atomic(report, json.dumps(doc, indent=1) + "\n")
    if seg.evaluation:
        summary["iou"] = seg.evaluation["mean"].get("iou")
    return summary


def evaluate_files(prediction: str, truth: str, *, confidence: str | None = None,
                   slices: Sequence[int] | None = None, axis: str = "k", n_bins: int = 15,
                   diagram: str | None = None) -> dict:
    """Overlap (and calibration, with a confidence volume) of a label map against a truth.

    The prediction and the truth must be integer label maps on one grid, the confidence a volume of
    probabilities on that grid: anything else is a :class:`UserError` (an intensity image given by mistake
    would score an IoU of 0 or a meaningless calibration)."""
    from .io import atomic_output, read_label_volume, read_volume
    from .metrics import evaluate_confidence, evaluate_arrays
    from .data import axis_index

    if diagram and not confidence:
        raise UserError("--diagram needs --confidence (the confidence volume from 'mismatch segment')")
    pred, g_pred = read_label_volume(prediction)
    true, g_true = read_label_volume(truth)
    if not g_pred.same_grid(g_true):
        raise UserError(f"{prediction} ({g_pred.describe()}) and {truth} ({g_true.describe()}) are not on the "
                        "same grid; resample one onto the other first")
    ax = axis_index(axis)
    if confidence:
        conf, g_conf = read_volume(confidence)
        if not g_conf.same_grid(g_pred):
            raise UserError(f"{confidence} is not on the prediction's grid ({g_pred.describe()})")
        check_confidence(conf, confidence)
        result = evaluate_confidence(pred, true, conf.astype(np.float32, copy=False), slices=slices, axis=ax,
                                     n_bins=n_bins)
    else:
        result = evaluate_arrays(pred, true, slices=slices, axis=ax, n_bins=n_bins)
    if diagram:
        from .plots import reliability_diagram

        cal = result["calibration"]
        with atomic_output(diagram) as tmp:
            reliability_diagram({"all voxels": cal["all"], "foreground band": cal["band"]}, tmp,
                                title=f"{Path(prediction).name} vs {Path(truth).name}")
        result["diagram"] = str(diagram)
    return result


def check_confidence(conf: np.ndarray, path) -> None:
    """:class:`UserError` unless ``conf`` holds probabilities: finite values in 0..1 (what ``mismatch segment
    --confidence`` writes), not, say, the CT itself."""
    finite = np.isfinite(conf)
    if not finite.all():
        raise UserError(f"{path}: {int(conf.size - np.count_nonzero(finite))} voxel(s) of the confidence volume "
                        "are NaN or infinite; give the confidence volume that 'mismatch segment --confidence' "
                        "wrote")
    lo, hi = (float(conf.min()), float(conf.max())) if conf.size else (0.0, 0.0)
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise UserError(f"{path}: the confidence volume holds values from {lo:g} to {hi:g}, not probabilities "
                        "(0 to 1); is it an image? give the confidence volume that 'mismatch segment "
                        "--confidence' wrote")
