"""The training loop shared by every method.

Read top to bottom: :class:`TrainConfig` (every setting in one place), :func:`fit` (arrays in, networks
out: build, optimise, checkpoint, snapshot) and :func:`train_files` (files in, model folder out, with all
the input checks of the command line).
"""

from __future__ import annotations

import math
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import __version__, distributed
from .data import Normalisation, TwoStreamSampler, check_label_values, common_size, labelled_slices
from .device import autocast, describe, resolve_device
from .errors import Cancelled, UserError
from .events import Reporter
from .methods import METHODS, make_method
from .modelfile import (
    load_checkpoint,
    load_model,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
    save_model,
)
from .models import ArchitectureConfig, SegmentationNetwork, count_parameters
from .prior import PriorSettings

CHECKPOINT_DIR = "checkpoint"

# A palette for classes that come without a colour (Slicer's segment colours, roughly).
_PALETTE = [(0.5, 0.68, 0.5), (0.94, 0.84, 0.57), (0.69, 0.48, 0.39), (0.43, 0.72, 0.82),
            (0.86, 0.96, 0.49), (0.56, 0.31, 0.64), (0.98, 0.36, 0.36), (0.25, 0.6, 0.9)]


@dataclass
class TrainConfig:
    """Every training setting. The defaults are the product's ``default`` preset (see :data:`PRESETS`):
    what a user gets from ``mismatch train`` and the Slicer panel."""

    method: str = "mismatch"
    steps: int = 200
    width: int = 16
    batch_size: int = 4              # labelled slices per step
    unlabelled_batch_size: int = 0   # unlabelled slices per step (0: same as batch_size)
    patch_size: int = 128            # square random patches; 0 = whole slices
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: float = 0.05             # fraction of steps with a linear learning-rate warm-up, then cosine decay
    alpha: float = 0.002             # consistency weight (paper: 0.0005 to 0.004, 0.002 best)
    alpha_rampup: float = 0.4        # fraction of steps over which alpha ramps up
    stop_gradient: str = "none"      # see mismatch.losses.consistency_loss
    snapshots: int = 1               # keep the last K snapshots and average them at inference (paper: 10)
    snapshot_span: float = 0.2       # ... spread over the last 20 % of training (paper: last 10 of 50 epochs)
    seed: int = 0
    axis: str = "k"
    hu_window: tuple[float, float] | None = None
    foreground_fraction: float = 0.33
    amp: bool = True                 # mixed precision on CUDA
    checkpoint_every: int = 100
    pasb_side: str = "factorised"
    method_options: dict = field(default_factory=dict)  # a method's own settings, e.g. {"ema_decay": 0.999}
    # what the painted slices imply, used when a volume is segmented with its painted labels
    # (mismatch.prior.PriorSettings as a dict); None: the network's prediction alone
    prior: dict | None = field(default_factory=lambda: PriorSettings().to_dict())
    preset: str = "default"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hu_window"] = list(self.hu_window) if self.hu_window else None
        return d


#: Named starting points for :class:`TrainConfig`. ``default`` is the product's recipe, chosen by the
#: measurements in docs/benchmarks.md; ``paper`` is MisMatch as the paper describes it (width 24, 176-pixel
#: patches, Dice only, no use of the painted slices beyond training), which this project shipped first.
#: ``method_options`` apply to the named methods only.
PRESETS: dict[str, dict] = {
    "default": {"config": {}, "method_options": {m: {"cross_entropy": True}
                                                 for m in ("mismatch", "mm-a", "mm-b", "mm-c", "sup2")}},
    "paper": {"config": {"width": 24, "patch_size": 176, "lr": 1e-3, "steps": 300, "prior": None},
              "method_options": {}},
}


def preset_config(preset: str = "default", method: str = "mismatch", **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a preset, with ``overrides`` (``None`` values are ignored) on top."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    options = dict(PRESETS[preset]["method_options"].get(method, {}))
    options.update(overrides.pop("method_options", None) or {})
    values = dict(PRESETS[preset]["config"])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(method=method, preset=preset, method_options=options, **values)


#: A round that continues from a trained model (``mismatch train --init``, the panel's retrain after
#: corrections): a quarter of the steps, half the peak learning rate after a short warm-up, and the
#: consistency term at full weight from the first step (the decoders are trained already; ramping alpha up
#: again would only weaken it). Fractions of the run's own steps and learning rate (the preset's, or the ones
#: given). Measured against training from scratch by ``mismatch simulate --scratch`` (docs/loop.md).
WARM_START: dict[str, float] = {"steps_fraction": 0.25, "lr_fraction": 0.5, "warmup": 0.1, "alpha_rampup": 0.0}


def warm_start_config(config: TrainConfig, settings: dict | None = None) -> TrainConfig:
    """``config`` as a warm-start round (:data:`WARM_START`, or ``settings`` on top of it): fewer steps, a lower
    learning rate, a short warm-up, no alpha ramp-up. A new object; ``config`` is left as it is."""
    from dataclasses import replace

    w = {**WARM_START, **(settings or {})}
    return replace(config, steps=max(1, math.ceil(w["steps_fraction"] * config.steps)),
                   lr=float(w["lr_fraction"] * config.lr), warmup=float(w["warmup"]),
                   alpha_rampup=float(w["alpha_rampup"]))


def default_classes(values: Sequence[int]) -> list[dict]:
    return [{"value": int(v), "name": f"class_{int(v)}", "color": list(_PALETTE[i % len(_PALETTE)])}
            for i, v in enumerate(values)]


def remap_labels(labels: np.ndarray, classes: list[dict]) -> np.ndarray:
    """Label values -> class indices 1..N in the order of ``classes`` (0 stays background).

    A value that is not a listed class is a :class:`UserError`.
    """
    present = np.unique(labels)
    known = {int(c["value"]) for c in classes}
    unknown = [int(v) for v in present if v != 0 and int(v) not in known]
    if unknown:
        raise UserError(f"label value(s) {unknown} are not among the {len(classes)} class(es) "
                        f"{sorted(known)}; add them to the classes file or remove them from the label map")
    lut = np.zeros(int(max(present.max(), max(known))) + 1, dtype=np.uint8 if len(classes) < 255 else np.int32)
    for i, c in enumerate(classes, start=1):
        lut[int(c["value"])] = i
    return lut[labels]


class StopRequest(dict):
    """Why training should stop, if it should (``self["stop"]``): set by a signal (:func:`stop_on_signals`) or,
    with ``path``, by a file appearing there (``mismatch train --stop-file``: how a parent that cannot signal
    the engine, such as Slicer behind its PythonSlicer launcher, asks it to stop). Checked once a step."""

    def __init__(self, path: str | os.PathLike | None = None):
        super().__init__()
        self.path = Path(path) if path else None

    def get(self, key, default=None):
        if key == "stop" and self.path is not None and not super().get("stop") and self.path.exists():
            self["stop"] = f"the stop file {self.path}"
        return super().get(key, default)


@contextmanager
def stop_on_signals(flag: dict):
    """SIGINT / SIGTERM (and SIGBREAK on Windows, what a console Ctrl+Break or a parent's
    ``CTRL_BREAK_EVENT`` sends) set ``flag["stop"]``; the loop finishes its step, checkpoints and stops."""
    def handler(signum, _frame):
        flag["stop"] = signal.Signals(signum).name

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM) + ((signal.SIGBREAK,) if hasattr(signal, "SIGBREAK") else ()):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def learning_rate(step: int, config: TrainConfig) -> float:
    warm = max(1, int(config.warmup * config.steps))
    if step < warm:
        return config.lr * (step + 1) / warm
    t = (step - warm) / max(1, config.steps - warm)
    return config.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def snapshot_steps(config: TrainConfig) -> list[int]:
    """The (1-based) steps after which a snapshot is kept: the last step and K-1 before it, evenly over the
    last ``snapshot_span`` of training."""
    k = max(1, config.snapshots)
    if k == 1:
        return [config.steps]
    interval = max(1, int(config.snapshot_span * config.steps / k))
    return sorted({max(1, config.steps - i * interval) for i in range(k)})


def _state_to_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@dataclass
class FitResult:
    snapshots: list[dict[str, torch.Tensor]]
    architecture: ArchitectureConfig
    history: list[dict] = field(default_factory=list)
    steps_done: int = 0
    seconds: float = 0.0
    batch_size: int = 0
    parameters: int = 0

    def networks(self) -> list[SegmentationNetwork]:
        """One network in eval mode per kept snapshot (what :func:`~mismatch.inference.segment_volume`
        averages)."""
        nets = []
        for state in self.snapshots:
            net = SegmentationNetwork(self.architecture)
            net.load_state_dict(state)
            nets.append(net.eval())
        return nets


def build_method(config: TrainConfig):
    """The training method of ``config``, with its options; an option the method does not have is a
    :class:`UserError` (not silently ignored)."""
    if config.method not in METHODS:
        raise UserError(f"unknown method {config.method!r}; choose one of {', '.join(sorted(METHODS))}")
    method = make_method(config.method, alpha=config.alpha, alpha_rampup=config.alpha_rampup,
                         stop_gradient=config.stop_gradient, **config.method_options)
    unknown = sorted(set(config.method_options) - set(method.options))
    if unknown:
        raise UserError(f"--method-option {', '.join(unknown)}: not a setting of --method {config.method}; its "
                        f"settings are {', '.join(sorted(method.options)) or 'none'}")
    return method


#: A checkpoint is written at least this often (seconds of training), besides every ``checkpoint_every``
#: steps: a kill loses at most this much work. Writing one costs a fraction of a second for the default
#: network (docs/contract.md).
CHECKPOINT_SECONDS = 60.0


def fit(volumes: list[np.ndarray], labels: np.ndarray, labelled: np.ndarray, num_classes: int,
        config: TrainConfig, *, reporter: Reporter | None = None, device: torch.device | None = None,
        init_state: dict[str, torch.Tensor] | None = None, checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False, stop: dict | None = None,
        checkpoint_seconds: float | None = CHECKPOINT_SECONDS) -> FitResult:
    """Train a network on normalised volumes.

    ``volumes``: float32 ``[C, K, J, I]`` each, volume 0 the labelled case; ``labels``: class indices
    ``[K, J, I]`` of volume 0 (0 = background); ``labelled``: its labelled slice indices along
    ``config.axis``. Returns the kept snapshots' weights (CPU). With ``checkpoint_dir``, the full training
    state is written there every ``checkpoint_every`` steps, after every ``checkpoint_seconds`` of training
    (None or 0: by steps only), and when ``stop["stop"]`` is set (then :class:`Cancelled` is raised);
    ``resume`` continues from it. A checkpoint is written as one unit (:func:`~mismatch.modelfile.save_checkpoint`).
    """
    reporter = reporter or Reporter(progress_bar=False)
    device = device or torch.device("cpu")
    stop = stop if stop is not None else {}
    method = build_method(config)
    arch = ArchitectureConfig(name=method.architecture, in_channels=volumes[0].shape[0],
                              num_classes=num_classes, width=config.width, pasb_side=config.pasb_side)
    ctx = distributed.current()   # one process unless started by torchrun (see mismatch.distributed)
    torch.manual_seed(config.seed)
    model = SegmentationNetwork(arch)
    if init_state is not None:
        model.load_state_dict(init_state)
    model.to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    net = model   # the bare network (model becomes its DDP wrapper on several processes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
    sampler = TwoStreamSampler(volumes, labels, labelled, axis=config.axis,
                               patch_size=config.patch_size or None, seed=config.seed,
                               foreground_fraction=config.foreground_fraction, shard=ctx.shard)
    batch_l = config.batch_size
    batch_u = config.unlabelled_batch_size or config.batch_size
    if method.uses_unlabelled and sampler.num_unlabelled == 0:
        sampler.unlabelled_batch(1)  # raises the UserError that says every slice is labelled

    start_step, history, snapshots = 0, [], []
    keep_at = set(snapshot_steps(config))
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if resume:
        if ckpt is None:
            raise UserError("--resume needs the output folder of the interrupted run")
        tensors, state = ctx.share_from_main(lambda: load_checkpoint(ckpt))
        for key in ("method", "width", "patch_size", "axis", "seed"):
            if state["config"].get(key) != config.to_dict().get(key):
                raise UserError(f"--resume: the checkpoint was made with {key}={state['config'].get(key)!r}, "
                                f"not {config.to_dict().get(key)!r}; use the same settings or start afresh")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        method.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("method.")}, model)
        optimizer_from_tensors(optimizer, tensors, state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(tensors["rng.torch"])
        start_step, history = state["step"], state["history"]
        batch_l, batch_u = state.get("batch_sizes", [batch_l, batch_u])
        for i in range(state["snapshots"]):
            prefix = f"snapshot{i}."
            snapshots.append({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        reporter.log(f"resuming at step {start_step} of {config.steps}")

    ctx.check_batch(batch_l, "--batch-size")
    if method.uses_unlabelled:
        ctx.check_batch(batch_u, "--unlabelled-batch-size")

    def write_checkpoint(step: int) -> None:
        if ckpt is None or not ctx.is_main:
            return
        tensors, opt_rest = optimizer_to_tensors(optimizer)
        tensors.update({f"model.{k}": v for k, v in _state_to_cpu(net).items()})
        tensors["rng.torch"] = torch.get_rng_state()
        tensors.update({f"method.{k}": v for k, v in method.state_dict().items()})
        for i, snap in enumerate(snapshots):
            tensors.update({f"snapshot{i}.{k}": v for k, v in snap.items()})
        save_checkpoint(ckpt, tensors, {
            "step": step, "config": config.to_dict(), "optimizer": opt_rest, "sampler": sampler.state_dict(),
            "history": history, "snapshots": len(snapshots), "batch_sizes": [batch_l, batch_u],
            "engine_version": __version__,
        })

    model = ctx.wrap(model)
    ctx.seed_augmentation(config.seed, start_step)
    reporter.start("train", total=config.steps, device=describe(device), method=config.method,
                   parameters=count_parameters(model), labelled_slices=[int(i) for i in labelled],
                   unlabelled_slices=sampler.num_unlabelled)
    t0 = time.monotonic()
    last_checkpoint = t0
    model.train()
    step = start_step
    log_every = max(1, config.steps // 100)
    while step < config.steps:
        if ctx.agree_stop(stop):   # every process stops at the same step
            write_checkpoint(step)
            ctx.barrier()
            raise Cancelled(f"stopped by {stop['stop']} at step {step} of {config.steps}; "
                            "run again with --resume to continue")
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        try:
            loss, terms = _one_step(model, method, sampler, optimizer, scaler, device, config, step,
                                    batch_l, batch_u)
        except torch.OutOfMemoryError:
            if ctx.distributed:   # the processes cannot agree on halving mid-step: stop with advice
                raise UserError(f"the GPU ran out of memory on {describe(device)}; use a smaller --batch-size "
                                "(it is split over the processes), --patch-size or --width") from None
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if batch_l == 1 and batch_u == 1:
                raise UserError(f"the GPU ran out of memory even with one slice per batch on {describe(device)}; "
                                "use a smaller --patch-size or --width, or --device cpu") from None
            batch_l, batch_u = max(1, batch_l // 2), max(1, batch_u // 2)
            reporter.log(f"GPU out of memory: retrying with batch sizes {batch_l} labelled + {batch_u} "
                         "unlabelled", level="warning")
            continue
        loss, terms = ctx.mean_losses(loss, terms)
        if not math.isfinite(loss):
            raise RuntimeError(f"the loss became {loss} at step {step + 1}; try a lower --lr")
        method.after_step(net, step)
        step += 1
        record = {"step": step, "loss": loss, **terms, "lr": optimizer.param_groups[0]["lr"]}
        history.append(record)
        if step in keep_at:
            snapshots.append(_state_to_cpu(net))
        if step % log_every == 0 or step == config.steps:
            reporter.progress("train", step, config.steps, loss=loss, terms=terms, first_step=start_step)
        if ckpt is not None and step < config.steps:
            now = time.monotonic()
            due = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
            due = due or bool(checkpoint_seconds) and now - last_checkpoint >= checkpoint_seconds
            if due:
                write_checkpoint(step)
                last_checkpoint = time.monotonic()
    if not snapshots:
        snapshots.append(_state_to_cpu(net))
    return FitResult(snapshots=snapshots[-max(1, config.snapshots):], architecture=arch, history=history,
                     steps_done=step, seconds=time.monotonic() - t0, batch_size=batch_l,
                     parameters=count_parameters(model))


def _one_step(model, method, sampler, optimizer, scaler, device, config, step, batch_l, batch_u):
    from .methods import TrainingBatch

    xl, yl = sampler.labelled_batch(batch_l)
    xu = sampler.unlabelled_batch(batch_u) if method.uses_unlabelled else None
    xl, yl, xu = common_size(xl, yl, xu)   # whole slices of volumes of different sizes
    fmt = torch.channels_last if device.type == "cpu" else torch.contiguous_format

    def to(x):
        return torch.from_numpy(x).to(device).contiguous(memory_format=fmt)

    batch = TrainingBatch(labelled_x=to(xl), labelled_y=torch.from_numpy(yl).to(device),
                          unlabelled_x=None if xu is None else to(xu), step=step, total_steps=config.steps)
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, config.amp):
        loss, terms = method.loss(model, batch)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach()), terms


# -- files in, model folder out -----------------------------------------------------------------------

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


def train_files(images: Sequence[str], labels_path: str, out_dir: str, config: TrainConfig, *,
                unlabelled: Sequence[Sequence[str]] = (), explicit_slices: Sequence[int] | None = None,
                classes_path: str | None = None, init_model: str | None = None, device: str = "auto",
                resume: bool = False, reporter: Reporter | None = None, stop: dict | None = None,
                unlabelled_manifest: str | None = None, cache_volumes: int = 8,
                cache_bytes: int | None = None, checkpoint_seconds: float | None = CHECKPOINT_SECONDS) -> dict:
    """Train from files and write the model folder; returns the card. See ``mismatch train --help``.

    ``out_dir`` must be new, empty or a model folder: it is replaced as a whole, and only once the new
    model is complete (:func:`~mismatch.modelfile.save_model`); checkpoints go to ``out_dir/checkpoint``.

    ``unlabelled_manifest``: a CSV / JSON list of further unlabelled volumes, read lazily a slice at a time
    with at most ``cache_volumes`` volumes (and ``cache_bytes``) held (:mod:`mismatch.manifest`). Under
    torchrun (:mod:`mismatch.distributed`) only rank 0 writes the model folder.
    """
    from .io import check_outputs_not_inputs, check_writable, finish_interrupted_swap, read_image, read_labels
    from .modelfile import _model_complete, check_checkpoint, check_model_destination

    reporter = reporter or Reporter(progress_bar=False)
    build_method(config)  # a wrong method option stops here, before anything is read
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
    labels = read_labels(labels_path, geometry)
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

    init_state, init_card = None, None
    if init_model:
        init_card, nets = load_model(init_model)
        if nets[0].config.in_channels != image.shape[0]:
            raise UserError(f"--init {init_model}: the model takes {nets[0].config.in_channels} channel(s) "
                            f"but {image.shape[0]} image(s) were given")
        init_state = nets[-1].state_dict()
        config.width = nets[0].config.width
        wanted = make_method(config.method).architecture if config.method in METHODS else None
        if wanted != nets[0].config.name:
            raise UserError(f"--init {init_model}: the model is a {nets[0].config.name} network but --method "
                            f"{config.method} trains a {wanted}; use the model's method to continue from it")

    if classes_path:
        classes = load_classes_file(classes_path)
    elif init_card is not None:
        classes = init_card["classes"]
    else:
        classes = default_classes([int(v) for v in np.unique(labels) if v != 0])
    if not classes:
        raise UserError(f"{labels_path}: the label map is empty (all zero); paint the structure on a few "
                        "slices first, or list all-background labelled slices with --labelled-slices")
    mapped = remap_labels(labels, classes)
    num_classes = len(classes) + 1
    check_label_values(mapped, num_classes)
    if init_card is not None and len(init_card["classes"]) != len(classes):
        raise UserError(f"--init {init_model}: the model has {len(init_card['classes'])} class(es), the labels "
                        f"{len(classes)}; fine-tune with the same segments")

    labelled = labelled_slices(labels, config.axis, explicit_slices)
    if len(labelled) == 0:
        raise UserError(f"{labels_path}: no labelled slice along axis {config.axis}; paint the structure on at "
                        "least one slice, or list labelled slices with --labelled-slices")
    n_slices = labels.shape[{"k": 0, "j": 1, "i": 2}[config.axis]]
    if len(labelled) == n_slices and not extra and pool is None and config.method in METHODS and \
            make_method(config.method).uses_unlabelled:
        raise UserError(f"every slice of {labels_path} is labelled, so there is nothing for the semi-supervised "
                        "term; supervised training is what you want: --method unet (or add unlabelled volumes "
                        "with --unlabelled)")
    norm = Normalisation(hu_window=tuple(config.hu_window) if config.hu_window else None)
    volumes = [norm.apply(image)] + [norm.apply(v) for v in extra] + (pool.volumes if pool else [])
    del image

    n_total = sum(v.shape[1 + {"k": 0, "j": 1, "i": 2}[config.axis]] for v in volumes)
    reporter.log(f"{len(labelled)} labelled slice(s) along {config.axis}, {n_total - len(labelled)} "
                 f"unlabelled; training {config.method} on {describe(dev)}"
                 + (f" and {ctx.world_size - 1} more process(es) ({ctx.backend}), the batch split evenly"
                    if ctx.distributed else ""))
    ctx.check_batch(config.batch_size, "--batch-size")   # before anything is written
    if config.method in METHODS and make_method(config.method).uses_unlabelled:
        ctx.check_batch(config.unlabelled_batch_size or config.batch_size, "--unlabelled-batch-size")
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    result = fit(volumes, mapped, labelled, num_classes, config, reporter=reporter, device=dev,
                 init_state=init_state, checkpoint_dir=out / CHECKPOINT_DIR, resume=resume, stop=stop,
                 checkpoint_seconds=checkpoint_seconds)
    last = result.history[-1] if result.history else {}
    card = {
        "architecture": result.architecture.to_dict(),
        "classes": classes,
        "channels": [{"name": Path(p).name} for p in images],
        "normalisation": norm.to_dict(),
        "slice_axis": config.axis,
        "training": {**config.to_dict(), "device": str(dev), "init_model": init_model,
                     "images": [Path(p).name for p in images], "labels": Path(labels_path).name,
                     "unlabelled_cases": len(extra) + (len(pool.volumes) if pool else 0),
                     "unlabelled_manifest": Path(unlabelled_manifest).name if unlabelled_manifest else None,
                     "processes": ctx.world_size},
        "summary": {"steps": result.steps_done, "seconds": round(result.seconds, 1),
                    "final_losses": {k: v for k, v in last.items() if k not in ("step", "lr")},
                    "labelled_slices": [int(i) for i in labelled], "parameters": result.parameters,
                    "loss_curve": [{"step": h["step"], "loss": round(h["loss"], 5)} for h in result.history]},
        "geometry": geometry.to_dict(),
        "prior": config.prior,
    }
    if pool is not None:
        reporter.log(f"unlabelled manifest: {pool.cache.describe()}")
    if ctx.is_main:
        # one unit: the folder (with its checkpoint) is replaced only by the complete new model
        save_model(out, result.snapshots, card)
    return card
