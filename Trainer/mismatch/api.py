"""Files in, files out: what ``mismatch train``, ``mismatch segment`` and ``mismatch evaluate`` do, callable from
Python."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from .classes import choose_classes, class_values_lut, remap_labels
from .data import Normalisation, auto_window
from .device import resolve_device
from .errors import UserError
from .events import Reporter
from .inference import segment_volume
from .modelfile import PaintedSlices, image_fingerprint, load_model, read_optimizer_state, read_painted, save_model
from .pipeline import build_card, painted_slice_prior
from .prior import SlicePrior, intensity_range_notes
from .ranking import DEFAULT_RANKING, RANKINGS, rank_uncertain_slices
from .train import CHECKPOINT_SECONDS, StopRequest, TrainConfig


# -- the painted slices' prior ----------------------------------------------------------------------------

def painted_prior(card: dict, painted: np.ndarray, spacing_kji: Sequence[float],
                  explicit_slices: Sequence[int] | None = None, volume: np.ndarray | None = None
                  ) -> SlicePrior | None:
    """The prior of a painted label map (label values, ``[K, J, I]``) for the model of ``card``: its labelled
    slices (any painted voxel, or listed in ``explicit_slices``) along the model's slice axis, with the
    card's prior settings. ``None`` when no slice is labelled. A card without prior settings (``--preset
    paper``) keeps the painted slices as painted and leaves the others to the network. ``volume``: the
    normalised ``[C, K, J, I]`` image, whose edges the prior follows where the card's settings say so."""
    from .data import labelled_slices

    mapped = remap_labels(painted, card["classes"])
    labelled = labelled_slices(mapped, card["slice_axis"], explicit_slices)
    if len(labelled) == 0:
        return None
    return painted_slice_prior(mapped, labelled, card["slice_axis"], spacing_kji, len(card["classes"]) + 1,
                               card.get("prior"), volume)


def _check_channels(card: dict, image: np.ndarray) -> None:
    if image.shape[0] != card["architecture"]["in_channels"]:
        raise UserError(f"the model takes {card['architecture']['in_channels']} channel(s) "
                        f"({', '.join(c['name'] for c in card['channels'])}) but {image.shape[0]} image(s) "
                        "were given; pass one file per channel, in the same order as for training")


def _normalise_in_place(card: dict, image: np.ndarray, stats: list | None = None) -> np.ndarray:
    """``image [C, K, J, I]`` (float32) normalised as the card says, into itself: one channel's normalised
    copy at a time exists beside it, not a second volume. The same numbers as
    :meth:`~mismatch.data.Normalisation.apply` (which treats each channel on its own; ``stats`` as there)."""
    norm = Normalisation.from_dict(card["normalisation"])
    for c in range(image.shape[0]):
        image[c] = norm.apply(image[c:c + 1], stats)[0]
    return image


class _SpilledVolume:
    """An output volume ``[K, J, I]`` streamed batch by batch (slices along ``axis`` first, in order) into an
    anonymous temporary file beside its destination, and read back only when it is written out: it is not in
    memory during the inference. The file has no name on Linux and disappears when closed (or killed)."""

    def __init__(self, destination, shape: Sequence[int], axis: int, dtype=np.float32):
        folder = Path(destination).absolute().parent
        while not folder.exists() and folder.parent != folder:   # write_volume creates the rest later
            folder = folder.parent
        self.file = tempfile.TemporaryFile(prefix=".mismatch-stream-", dir=folder)
        self.axis, self.dtype, self.next = int(axis), np.dtype(dtype), 0
        self.shape = tuple(int(n) for n in shape)
        self.moved = (self.shape[self.axis],) + tuple(n for a, n in enumerate(self.shape) if a != self.axis)

    def __call__(self, start: int, block: np.ndarray) -> None:
        if start != self.next:
            raise RuntimeError(f"batch at slice {start} given after slices 0..{self.next - 1}")
        block = np.ascontiguousarray(block, dtype=self.dtype)
        self.file.write(memoryview(block).cast("B"))
        self.next += block.shape[0]

    def read(self) -> np.ndarray:
        """The whole volume ``[K, J, I]`` (a view of the array read back, the slice axis moved home)."""
        if self.next != self.moved[0]:
            raise RuntimeError(f"only {self.next} of {self.moved[0]} slices were streamed")
        self.file.flush()
        self.file.seek(0)
        data = np.fromfile(self.file, dtype=self.dtype, count=math.prod(self.moved))
        return np.moveaxis(data.reshape(self.moved), 0, self.axis)

    def close(self) -> None:
        self.file.close()


# -- train -------------------------------------------------------------------------------------------------

def train_files(images: Sequence[str], labels_path: str, out_dir: str, config: TrainConfig, *,
                unlabelled: Sequence[Sequence[str]] = (), explicit_slices: Sequence[int] | None = None,
                empty_slices: Sequence[int] | None = None, classes_path: str | None = None,
                init_model: str | None = None, device: str = "auto",
                resume: bool = False, reporter: Reporter | None = None, stop: StopRequest | None = None,
                unlabelled_manifest: str | None = None, cache_volumes: int = 8,
                cache_bytes: int | None = None, checkpoint_seconds: float | None = CHECKPOINT_SECONDS) -> dict:
    """Train from files and write the model folder; returns the card (:func:`~mismatch.pipeline.build_card`).
    See ``mismatch train --help``.

    ``out_dir`` must be new, empty or a model folder: it is replaced as a whole, and only once the new
    model is complete (:func:`~mismatch.modelfile.save_model`); checkpoints go to ``out_dir/checkpoint``.

    ``unlabelled_manifest``: a CSV / JSON list of further unlabelled volumes, read lazily a slice at a time
    with at most ``cache_volumes`` volumes (and ``cache_bytes``) held (:mod:`mismatch.manifest`). Under
    torchrun (:mod:`mismatch.distributed`) only rank 0 writes the model folder.
    """
    from . import distributed
    from .data import axis_index, check_label_values, choose_axis, painted_slices, window_note
    from .device import describe
    from .io import check_outputs_not_inputs, check_writable, finish_interrupted_swap, read_image, read_labels
    from .modelfile import CHECKPOINT_DIR, _model_complete, check_checkpoint, check_model_destination
    from .train import build_method, fit

    reporter = reporter or Reporter(progress_bar=False)
    method = build_method(config)  # a wrong method or method option stops here, before anything is read
    ctx = distributed.current()
    dev = resolve_device(device)
    inputs = list(images) + [labels_path] + [p for case in unlabelled for p in case]
    inputs += [unlabelled_manifest] if unlabelled_manifest else []
    check_outputs_not_inputs([out_dir], inputs)
    out = Path(out_dir)

    def check_output() -> None:   # rank 0 writes the folder and checks it
        check_model_destination(out)                   # nothing but a model's files would be replaced
        check_writable(out, "--out", folder=True)      # before any work, not after training
        finish_interrupted_swap(out, _model_complete)  # a run killed while it replaced the model folder
        if resume:   # a missing, damaged or torn checkpoint is found before the inputs are read
            check_checkpoint(out / CHECKPOINT_DIR)

    if resume:   # every process gets rank 0's answer (resuming needs the checkpoint from rank 0 anyway)
        ctx.share_from_main(check_output)
    elif ctx.is_main:   # a failure here ends rank 0; torchrun then stops the others
        check_output()
    reporter.start("load", total=None)
    image, geometry = read_image(images)
    for path, channel in zip(images, image):
        low, high = float(channel.min()), float(channel.max())
        if low == high:   # e.g. a new empty volume chosen by mistake: minutes of training that learn nothing
            raise UserError(f"{path}: every voxel is {low:g}, so there is nothing to learn from; give the image "
                            "the structure was painted on")
    init_state, init_optimizer, init_card = None, None, None
    if init_model:
        init_card, nets = load_model(init_model)
        init_optimizer = read_optimizer_state(init_model)
        if nets[0].config.in_channels != image.shape[0]:
            raise UserError(f"--init {init_model}: the model takes {nets[0].config.in_channels} channel(s) "
                            f"but {image.shape[0]} image(s) were given")
        init_state = nets[-1].state_dict()
        config.width = nets[0].config.width
        config.context = nets[0].config.context   # the model reads its slices with the neighbours it learned on
        wanted = method.architecture
        if wanted != nets[0].config.name:
            raise UserError(f"--init {init_model}: the model is a {nets[0].config.name} network but --method "
                            f"{config.method} trains a {wanted}; use the model's method to continue from it")

    auto = config.hu_window == "auto"   # mismatch train's default: a CT in HU is clipped to CT_WINDOW
    if auto:   # ... and a model continued with --init goes on seeing its inputs as it was trained on them
        window = Normalisation.from_dict(init_card.get("normalisation") or {}).hu_window \
            if init_card is not None else auto_window(image)
        config = dataclasses.replace(config, hu_window=window)
    labels = read_labels(labels_path, geometry, log=reporter.log)
    config = dataclasses.replace(config, axis=choose_axis(labels, config.axis, reporter.log))
    extra = []
    for case in unlabelled:
        vol, _ = read_image(case)
        if vol.shape[0] != image.shape[0]:
            raise UserError(f"unlabelled case {', '.join(case)} has {vol.shape[0]} channel(s) but the labelled "
                            f"case has {image.shape[0]}; give the same channels, comma-separated")
        extra.append(vol)
    pool = None
    if unlabelled_manifest:
        from .manifest import ManifestPool

        pool = ManifestPool.open(unlabelled_manifest, channels=image.shape[0], axis=config.axis,
                                 hu_window=config.hu_window, cache_volumes=cache_volumes, cache_bytes=cache_bytes,
                                 warn=lambda message: reporter.log(message, level="warning"),
                                 check_not=[out_dir])

    classes = init_card["classes"] if init_card is not None and not classes_path else \
        choose_classes(labels, labels_path, classes_path)
    mapped = remap_labels(labels, classes)
    num_classes = len(classes) + 1
    check_label_values(mapped, num_classes)
    if init_card is not None and len(init_card["classes"]) != len(classes):
        raise UserError(f"--init {init_model}: the model has {len(init_card['classes'])} class(es), the labels "
                        f"{len(classes)}; fine-tune with the same segments")

    labelled = painted_slices(labels, config.axis, explicit_slices, labels_path, empty=empty_slices)
    n_slices = labels.shape[axis_index(config.axis)]
    if len(labelled) == n_slices and not extra and pool is None and method.uses_unlabelled:
        raise UserError(f"every slice of {labels_path} is labelled, so there is nothing for the semi-supervised "
                        "term; supervised training is what you want: --method unet (or add unlabelled volumes "
                        "with --unlabelled)")
    # segment of this same image keeps these slices and lets them guide the others without --labels
    painted = PaintedSlices.take(labels, image, config.axis, labelled) if ctx.is_main else None
    norm = Normalisation(hu_window=tuple(config.hu_window) if config.hu_window else None)
    volumes = [norm.apply(image)] + [norm.apply(v) for v in extra] + (pool.volumes if pool else [])
    del image

    n_total = sum(v.shape[1 + axis_index(config.axis)] for v in volumes)
    if auto and config.hu_window:   # said once every input has passed its checks
        reporter.log(window_note(config.hu_window, "as the --init model's inputs were") if init_model else
                     window_note(config.hu_window))
    reporter.log(f"{len(labelled)} labelled slice(s) along {config.axis}, {n_total - len(labelled)} "
                 f"unlabelled; training {config.method} on {describe(dev)}"
                 + (f" and {ctx.world_size - 1} more process(es) ({ctx.backend}), the batch split evenly"
                    if ctx.distributed else ""))
    ctx.check_batch(config.batch_size, "--batch-size")   # before anything is written
    if method.uses_unlabelled:
        ctx.check_batch(config.unlabelled_batch_size or config.batch_size, "--unlabelled-batch-size")
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    result = fit(volumes, mapped, labelled, num_classes, config, reporter=reporter, device=dev,
                 init_state=init_state, init_optimizer=init_optimizer, checkpoint_dir=out / CHECKPOINT_DIR,
                 resume=resume, stop=stop, checkpoint_seconds=checkpoint_seconds)
    card = build_card(result, config, classes=classes, normalisation=norm, channels=[Path(p).name for p in images],
                      labelled=labelled, device=dev, geometry=geometry,
                      training={"init_model": init_model, "images": [Path(p).name for p in images],
                                "labels": Path(labels_path).name,
                                "unlabelled_cases": len(extra) + (len(pool.volumes) if pool else 0),
                                "unlabelled_manifest": Path(unlabelled_manifest).name if unlabelled_manifest
                                else None})
    if pool is not None:
        reporter.log(f"unlabelled manifest: {pool.cache.describe()}")
    if ctx.is_main:
        # one unit: the folder (with its checkpoint) is replaced only by the complete new model
        save_model(out, result.snapshots, card, result.optimizer_state, painted)
    return card


# -- segment and evaluate ----------------------------------------------------------------------------------

def segment_files(images: Sequence[str], model_dir: str, out: str, *, confidence: str | None = None,
                  disagreement: str | None = None, report: str | None = None, truth: str | None = None,
                  eval_slices: Sequence[int] | None = None, batch_size: int = 8, device: str = "auto",
                  reporter: Reporter | None = None, labels: str | None = None,
                  explicit_slices: Sequence[int] | None = None, empty_slices: Sequence[int] | None = None,
                  ranking: str = DEFAULT_RANKING, stored_labels: bool = True) -> dict:
    """Segment IMAGE(s) with a model folder and write the outputs on the input grid.

    ``ranking``: how the report orders the slices worth labelling next
    (:data:`~mismatch.ranking.RANKINGS`).

    ``labels``: the painted label map of this volume (what the model was trained from): see
    :func:`painted_prior`. Without it, and with ``stored_labels``, the painted slices the model folder keeps
    (:func:`~mismatch.modelfile.read_painted`) do the same when the image is the one they were painted on
    (same grid, same voxels on those slices); on any other image the network segments alone.

    Memory: the image is normalised into itself; during the inference only it and the label map are
    volumes in memory: the confidence and the disagreement, when asked for, are streamed to temporary files
    beside their destinations and read back one at a time to be written; the image is freed before the
    painted slices' connectivity pass."""
    from .data import axis_index, with_empty_slices
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
    if (explicit_slices or empty_slices) and not labels:
        raise UserError("--labelled-slices / --empty-slices need --labels (the painted label map)")
    if ranking not in RANKINGS:
        raise UserError(f"--ranking {ranking}: choose one of {', '.join(RANKINGS)}")
    dev = resolve_device(device)
    card, networks = load_model(model_dir, device=dev)
    reporter.start("load", total=None)
    image, geometry = read_image(images)
    truth_arr = read_labels(truth, geometry, log=reporter.log) if truth else None
    painted_map = read_labels(labels, geometry, log=reporter.log) if labels else None
    _check_channels(card, image)
    if painted_map is not None:
        explicit_slices = with_empty_slices(painted_map, card["slice_axis"], explicit_slices, empty_slices, labels)
    if painted_map is None and stored_labels:
        painted_map, explicit_slices = _stored_painted(model_dir, card, image, geometry, reporter)
    stats: list = []
    volume = [_normalise_in_place(card, image, stats)]   # handed over: freed before the connectivity pass
    del image
    prior, notes = None, []
    if painted_map is not None:
        prior = painted_prior(card, painted_map, geometry.spacing[::-1], explicit_slices, volume=volume[0])
        if prior is None:
            raise UserError(f"--labels {labels}: no painted slice; paint the structure on a few slices, or "
                            "leave --labels out")
        notes = intensity_range_notes(prior, card["classes"], *stats[0])
        for note in notes:
            reporter.log(note)
    del painted_map
    painted = [int(s) for s in prior.lab] if prior is not None else []
    mapped = remap_labels(truth_arr, card["classes"]) if truth_arr is not None else None
    del truth_arr
    streamed = {}
    try:
        for name, path in (("confidence", confidence), ("disagreement", disagreement)):
            if path:
                streamed[name] = _SpilledVolume(path, geometry.shape, axis_index(card["slice_axis"]))
        seg = segment_volume(networks, volume, axis=card["slice_axis"], batch_size=batch_size, device=dev,
                             truth=mapped, eval_slices=eval_slices, reporter=reporter, prior=prior,
                             outputs=("labels",), stream=streamed, scores=bool(report))
        del mapped, prior
        lut = class_values_lut(card["classes"])
        write_volume(lut[seg.labels], geometry, out, segments=card["classes"])
        seg.labels = None
        for name, path in (("confidence", confidence), ("disagreement", disagreement)):
            if path:
                array = streamed[name].read()
                if name == "confidence":
                    seg.unsure_where_removed(array)
                write_volume(array, geometry, path)
                del array
                streamed.pop(name).close()
    finally:
        for spilled in streamed.values():
            spilled.close()
    summary = {"seconds": round(seg.seconds, 2), "slices": geometry.shape[axis_index(card["slice_axis"])]}
    if notes:   # the painted slices' intensity ranges that decide (intensity_range_notes), for the panel
        summary["notes"] = notes
    if report:
        labelled = list(card.get("summary", {}).get("labelled_slices", [])) + painted
        two = len(card["architecture"].get("decoders", [])) >= 2
        doc = {
            "slice_axis": card["slice_axis"],
            "model": str(model_dir),
            "ranking": ranking,
            "uncertain_slices": rank_uncertain_slices(seg.slice_scores, exclude=labelled, two_decoders=two,
                                                      ranking=ranking),
            "evaluation": seg.evaluation,
        }
        if seg.extended_ends:   # the network alone saw the painted structure go on past the painted range
            doc["structure_goes_on"] = {("below" if side < 0 else "above"): int(end)
                                        for side, end in sorted(seg.extended_ends.items())}
        write_text_atomic(report, json.dumps(doc, indent=1) + "\n")
    if seg.evaluation:
        summary["iou"] = seg.evaluation["mean"].get("iou")
    return summary


def _stored_painted(model_dir, card: dict, image: np.ndarray, geometry, reporter: Reporter):
    """``(painted label map, its labelled slices)`` from the painted slices the model folder keeps, when
    ``image`` (as read) is the image they were painted on; ``(None, None)`` otherwise."""
    from .data import axis_index
    from .io import Geometry

    stored = read_painted(model_dir)
    grid = card.get("geometry")
    if stored is None or not grid or stored.axis != card["slice_axis"] or not len(stored.slices):
        return None, None
    plane = tuple(n for a, n in enumerate(geometry.shape) if a != axis_index(stored.axis))
    if not Geometry.from_dict(grid).same_grid(geometry) or stored.labels.shape[1:] != plane or \
            int(stored.slices.min()) < 0 or int(stored.slices.max()) >= geometry.shape[axis_index(stored.axis)]:
        return None, None   # another volume: the network alone, as for any image the model was not trained on
    if image_fingerprint(image, stored.axis, stored.slices) != stored.image_sha256:
        reporter.log("the image is on the grid of the one the model was trained from, but not the same on its "
                     "painted slices: segmented by the network alone; give --labels (the painted label map of "
                     "this image) for the painted slices to guide it", level="warning")
        return None, None
    shown = ", ".join(str(int(s)) for s in stored.slices)
    reporter.log(f"the {len(stored.slices)} painted slice(s) the model was trained from ({shown}, kept in the model "
                 "folder) stay as painted and guide the others, as with --labels (--no-labels: the network alone)")
    return stored.label_map(geometry.shape), [int(s) for s in stored.slices]


def evaluate_files(prediction: str, truth: str, *, confidence: str | None = None,
                   slices: Sequence[int] | None = None, axis: str = "k", n_bins: int = 15,
                   diagram: str | None = None) -> dict:
    """Overlap (and calibration, with a confidence volume) of a label map against a truth.

    The prediction and the truth must be integer label maps on one grid, the confidence a volume of
    probabilities on that grid: anything else is a :class:`UserError` (an intensity image given by mistake
    would score an IoU of 0 or a meaningless calibration)."""
    from .io import atomic_output, place_on_grid, read_label_volume, read_volume
    from .metrics import evaluate_confidence, evaluate_arrays
    from .data import axis_index

    if diagram and not confidence:
        raise UserError("--diagram needs --confidence (the confidence volume from 'mismatch segment')")
    pred, g_pred = read_label_volume(prediction)
    true, g_true = read_label_volume(truth)
    if not g_pred.same_grid(g_true):   # a truth cropped to its segments (a .seg.nrrd) is placed as it lies
        true = place_on_grid(true, g_true, g_pred, truth, "the prediction")
    ax = axis_index(axis)
    if confidence:
        conf, g_conf = read_volume(confidence)
        if not g_conf.same_grid(g_pred):
            raise UserError(f"{confidence} is not on the prediction's grid ({g_pred.describe()})")
        check_confidence(conf, confidence)
        result = evaluate_confidence(pred, true, conf.astype(np.float32, copy=False), slices=slices, axis=ax,
                                     n_bins=n_bins)
    else:
        result = evaluate_arrays(pred, true, slices=slices, axis=ax)
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
