"""The training loop shared by every method.

Read top to bottom: :class:`TrainConfig` (every setting in one place, and its presets), :class:`StopRequest`
(how training is asked to stop) and :func:`fit`: arrays in, networks out. ``fit`` builds a
:class:`TrainingRun` (network, method, optimiser, sampler), restores it from a checkpoint when resuming, and
steps it (:func:`_one_step`), keeping snapshots and writing checkpoints
(:class:`~mismatch.modelfile.TrainingCheckpoint`). Files in, model folder out: :func:`mismatch.api.train_files`.
"""

from __future__ import annotations

import math
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed
from .data import TwoStreamSampler, common_size
from .device import autocast, describe
from .errors import Cancelled, UserError, on_stop_signals
from .events import Reporter
from .methods import METHODS, Method, TrainingBatch, make_method
from .modelfile import TrainingCheckpoint, load_optimizer_moments, optimizer_to_tensors, state_to_cpu
from .models import ArchitectureConfig, SegmentationNetwork, count_parameters
from .prior import PriorSettings


@dataclass
class TrainConfig:
    """Every training setting. The defaults are the product's ``default`` preset (see :data:`PRESETS`):
    what a user gets from ``mismatch train`` and the Slicer panel."""

    method: str = "mismatch"
    steps: int = 180
    width: int = 16
    batch_size: int = 4              # labelled slices per step
    # unlabelled slices per step (0: as many as batch_size). Two beside the four labelled ones, not four: at the
    # paper's consistency weight the unlabelled half of the step changed no segmentation measurably in 180
    # steps, and with two the training takes 0.77 of the time (docs/benchmarks.md, "Fewer unlabelled patches")
    unlabelled_batch_size: int = 2
    patch_size: int = 128            # square random patches; 0 = whole slices
    # the first ``early_patch_fraction`` of the steps on smaller patches of ``early_patch_size`` (0: off; only
    # when smaller than ``patch_size``): the coarse shape is learnt as well from them at about half the cost a
    # step, the later steps see the full patch (docs/benchmarks.md, "Smaller patches first")
    early_patch_size: int = 96
    early_patch_fraction: float = 0.5
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: float = 0.05             # fraction of steps with a linear learning-rate warm-up, then cosine decay
    # weight averaging: the last ``average_span`` of the steps run at ``lr * lr_floor`` (the cosine reaches it there)
    # and the network kept is the mean of the weights after each of those steps, not the last weights. 0: off (the
    # cosine decays to 1 % of ``lr`` at the last step, whose weights are kept). Set for the two-decoder methods by
    # the default preset (PRESETS): the run-to-run spread on the brain tumour painted on 5 slices fell from 2.7 to
    # 1.4 points at the same mean IoU (docs/benchmarks.md, "Weights averaged over the last steps")
    average_span: float = 0.0
    lr_floor: float = 0.25
    alpha: float = 0.002             # consistency weight (paper: 0.0005 to 0.004, 0.002 best)
    alpha_rampup: float = 0.4        # fraction of steps over which alpha ramps up
    stop_gradient: str = "none"      # see mismatch.losses.consistency_loss
    snapshots: int = 1               # keep the last K snapshots and average them at inference (paper: 10)
    snapshot_span: float = 0.2       # ... spread over the last 20 % of training (paper: last 10 of 50 epochs)
    seed: int = 0
    axis: str = "k"
    hu_window: tuple[float, float] | str | None = None   # "auto": chosen from the image (mismatch.data.auto_window)
    foreground_fraction: float = 0.33
    amp: bool = True                 # mixed precision on CUDA
    checkpoint_every: int = 100
    pasb_side: str = "factorised"
    context: int = 0                 # neighbouring slices on each side given with each slice (2.5D input)
    method_options: dict = field(default_factory=dict)  # a method's own settings, e.g. {"ema_decay": 0.999}
    # what the painted slices imply, used when a volume is segmented with its painted labels
    # (mismatch.prior.PriorSettings as a dict); None: the network's prediction alone
    prior: dict | None = field(default_factory=lambda: PriorSettings().to_dict())
    preset: str = "default"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hu_window"] = self.hu_window if isinstance(self.hu_window, str) else \
            list(self.hu_window) if self.hu_window else None
        return d


#: the methods that train MisMatch's network or one of the paper's two-decoder ablations
TWO_DECODER_METHODS = ("mismatch", "mm-a", "mm-b", "mm-c")

#: Named starting points for :class:`TrainConfig`. ``default`` is the product's recipe, chosen by the
#: measurements in docs/benchmarks.md; ``paper`` is MisMatch as the paper describes it (width 24, 176-pixel
#: patches, Dice only, no use of the painted slices beyond training), which this project shipped first.
#: ``method_options`` apply to the named methods only.
PRESETS: dict[str, dict] = {
    # two-decoder methods: Dice + cross-entropy, and the anatomy-preserving augmentation on the labelled
    # slices (rotation, scale, intensity; no flips): paired against no augmentation on six draws not in the
    # benchmark, it was ahead on all six (docs/benchmarks.md); and their weights averaged over the last 30 % of
    # the steps (``method_config``: settings of TrainConfig for the named methods only; the baselines keep the
    # recipe their recorded runs were made with)
    "default": {"config": {},
                "method_options": {**{m: {"cross_entropy": True, "augment": True}
                                      for m in TWO_DECODER_METHODS},
                                   "sup2": {"cross_entropy": True}},
                "method_config": {m: {"average_span": 0.3} for m in TWO_DECODER_METHODS}},
    # as many unlabelled patches a step as labelled ones, as this project first trained the paper's method
    "paper": {"config": {"width": 24, "patch_size": 176, "lr": 1e-3, "steps": 300, "prior": None,
                         "unlabelled_batch_size": 0, "early_patch_size": 0},
              "method_options": {}},
}


def preset_config(preset: str = "default", method: str = "mismatch", **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a preset, with ``overrides`` (``None`` values are ignored) on top."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    options = dict(PRESETS[preset]["method_options"].get(method, {}))
    options.update(overrides.pop("method_options", None) or {})
    values = dict(PRESETS[preset]["config"])
    values.update(PRESETS[preset].get("method_config", {}).get(method, {}))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(method=method, preset=preset, method_options=options, **values)


#: A round that continues from a trained model (``mismatch train --init``, the panel's retrain after
#: corrections): a fifth of the steps, half the peak learning rate after a short warm-up, and the
#: consistency term at full weight from the first step (the decoders are trained already; ramping alpha up
#: again would only weaken it), continuing the model's optimiser state where it was saved with it
#: (``optimizer.safetensors``). Fractions of the run's own steps and learning rate (the preset's, or the ones
#: given). Measured against training from scratch by ``mismatch simulate --scratch`` and
#: ``measurements/ablate_warm.py`` (docs/loop.md).
WARM_START: dict[str, float] = {"steps_fraction": 0.2, "lr_fraction": 0.5, "warmup": 0.1, "alpha_rampup": 0.0,
                                "early_patch_fraction": 0.0}


def warm_start_config(config: TrainConfig, settings: dict | None = None) -> TrainConfig:
    """``config`` as a warm-start round (:data:`WARM_START`, or ``settings`` on top of it): fewer steps, a lower
    learning rate, a short warm-up, no alpha ramp-up. A new object; ``config`` is left as it is."""
    from dataclasses import replace

    w = {**WARM_START, **(settings or {})}
    return replace(config, steps=max(1, math.ceil(w["steps_fraction"] * config.steps)),
                   lr=float(w["lr_fraction"] * config.lr), warmup=float(w["warmup"]),
                   alpha_rampup=float(w["alpha_rampup"]),
                   early_patch_fraction=float(w["early_patch_fraction"]),
                   average_span=float(w.get("average_span", config.average_span)),
                   lr_floor=float(w.get("lr_floor", config.lr_floor)))


class StopRequest:
    """Why training should stop, if it should: :attr:`reason` (None: go on). Asked for by a signal
    (:func:`stop_on_signals`), by another process (:meth:`mismatch.distributed.Context.agree_stop`) or, with
    ``path``, by a file appearing there (``mismatch train --stop-file``: how a parent that cannot signal the
    engine, such as Slicer behind its PythonSlicer launcher, asks it to stop). The loop checks it once a step."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else None
        self._reason: str | None = None

    @property
    def reason(self) -> str | None:
        if self._reason is None and self.path is not None and self.path.exists():
            self._reason = f"the stop file {self.path}"
        return self._reason

    def request(self, reason: str) -> None:
        """Ask the loop to stop, for ``reason`` (said in the final event)."""
        self._reason = reason

    def __bool__(self) -> bool:
        return self.reason is not None


@contextmanager
def stop_on_signals(stop: StopRequest):
    """SIGINT / SIGTERM (and SIGBREAK on Windows, what a console Ctrl+Break or a parent's
    ``CTRL_BREAK_EVENT`` sends) request ``stop``; the loop finishes its step, checkpoints and stops."""
    def handler(signum, _frame):
        stop.request(signal.Signals(signum).name)

    with on_stop_signals(handler):
        yield stop


def learning_rate(step: int, config: TrainConfig) -> float:
    """The learning rate of (0-based) ``step``: a linear warm-up over ``warmup`` of the steps, then a cosine
    decay to 1 % of ``lr`` at the last step, or, with weight averaging (``average_span``), to ``lr * lr_floor``
    where the averaged steps begin, and constant from there."""
    warm = max(1, int(config.warmup * config.steps))
    if step < warm:
        return config.lr * (step + 1) / warm
    floor, end = (config.lr_floor, average_from(config) - 1) if config.average_span > 0 else (0.01, config.steps)
    t = (step - warm) / max(1, end - warm)
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def check_averaging(config: TrainConfig) -> None:
    """A :class:`UserError` for weight-averaging settings that cannot be run."""
    if not 0 <= config.average_span < 1:
        raise UserError(f"--average-span {config.average_span:g}: give the fraction of the steps whose weights are "
                        "averaged, from 0 (off) to below 1, e.g. 0.3")
    if not 0 < config.lr_floor <= 1:
        raise UserError(f"lr_floor {config.lr_floor:g}: give the averaged steps' learning rate as a fraction of the "
                        "peak, above 0 and at most 1")
    if config.average_span > 0 and config.snapshots > 1:
        raise UserError(f"--snapshots {config.snapshots} keeps {config.snapshots} networks and averages their "
                        "predictions, but this recipe averages the weights of its last steps into one network "
                        f"(--average-span {config.average_span:g}); add --average-span 0 to keep snapshots")


def average_from(config: TrainConfig) -> int:
    """The first (1-based) step whose weights enter the average (``average_span``; at least the last step)."""
    return config.steps - max(1, int(round(config.average_span * config.steps))) + 1


def patch_size_at(step: int, config: TrainConfig) -> int | None:
    """The training patch side at (0-based) ``step``: ``early_patch_size`` for the first
    ``early_patch_fraction`` of the steps when it is smaller than ``patch_size``, then ``patch_size``; None
    for whole slices."""
    full = config.patch_size or None
    early = config.early_patch_size
    if full and early and early < full and step < int(config.early_patch_fraction * config.steps):
        return early
    return full


def snapshot_steps(config: TrainConfig) -> list[int]:
    """The (1-based) steps after which a snapshot is kept: the last step and K-1 before it, evenly over the
    last ``snapshot_span`` of training."""
    k = max(1, config.snapshots)
    if k == 1:
        return [config.steps]
    interval = max(1, int(config.snapshot_span * config.steps / k))
    return sorted({max(1, config.steps - i * interval) for i in range(k)})


@dataclass
class FitResult:
    snapshots: list[dict[str, torch.Tensor]]
    architecture: ArchitectureConfig
    history: list[dict] = field(default_factory=list)
    steps_done: int = 0
    seconds: float = 0.0
    batch_size: int = 0
    parameters: int = 0
    #: the optimiser's state at the end (its moments, as :func:`~mismatch.modelfile.optimizer_to_tensors`
    #: names them), for a warm start from this run (``fit(init_optimizer=...)``)
    optimizer_state: dict[str, torch.Tensor] = field(default_factory=dict)

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


@dataclass
class TrainingRun:
    """What a training run changes step by step, and what its checkpoint holds
    (:class:`~mismatch.modelfile.TrainingCheckpoint`)."""

    net: SegmentationNetwork          # the bare network
    model: torch.nn.Module            # what is trained: the network, or its DDP wrapper on several processes
    method: Method
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: TwoStreamSampler
    batch_l: int                      # labelled slices per step (global)
    batch_u: int                      # unlabelled slices per step (global)
    step: int = 0                     # steps done
    history: list[dict] = field(default_factory=list)
    snapshots: list[dict[str, torch.Tensor]] = field(default_factory=list)
    average: dict[str, torch.Tensor] | None = None   # the mean of the weights after the averaged steps so far
    averaged: int = 0                                 # how many steps' weights it holds

    def accumulate_average(self) -> None:
        """Add the network's weights after this step to :attr:`average` (a running mean, on the network's device)."""
        self.averaged += 1
        state = self.net.state_dict()
        if self.average is None:
            self.average = {k: v.detach().clone() for k, v in state.items()}
            return
        for k, v in state.items():
            if v.is_floating_point():
                self.average[k].add_(v.detach() - self.average[k], alpha=1.0 / self.averaged)
            else:
                self.average[k].copy_(v)


def fit(volumes: list[np.ndarray], labels: np.ndarray, labelled: np.ndarray, num_classes: int,
        config: TrainConfig, *, reporter: Reporter | None = None, device: torch.device | None = None,
        init_state: dict[str, torch.Tensor] | None = None,
        init_optimizer: dict[str, torch.Tensor] | None = None, checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False, stop: StopRequest | None = None,
        checkpoint_seconds: float | None = CHECKPOINT_SECONDS) -> FitResult:
    """Train a network on normalised volumes.

    ``volumes``: float32 ``[C, K, J, I]`` each, volume 0 the labelled case; ``labels``: class indices
    ``[K, J, I]`` of volume 0 (0 = background); ``labelled``: its labelled slice indices along
    ``config.axis``. Returns the kept snapshots' weights (CPU). With ``checkpoint_dir``, the full training
    state is written there every ``checkpoint_every`` steps, after every ``checkpoint_seconds`` of training
    (None or 0: by steps only), and when ``stop`` is requested (then :class:`Cancelled` is raised);
    ``resume`` continues from it (:class:`~mismatch.modelfile.TrainingCheckpoint`).
    """
    reporter = reporter or Reporter(progress_bar=False)
    device = device or torch.device("cpu")
    stop = stop if stop is not None else StopRequest()
    check_averaging(config)
    ctx = distributed.current()   # one process unless started by torchrun (see mismatch.distributed)
    run, arch = _new_run(volumes, labels, labelled, num_classes, config, device, init_state, ctx)
    if init_optimizer and not resume and not load_optimizer_moments(run.optimizer, init_optimizer):
        reporter.log("the initial model's optimiser state does not fit this network: the optimiser starts afresh",
                     level="warning")
    checkpoint = TrainingCheckpoint(checkpoint_dir) if checkpoint_dir else None
    if resume:
        if checkpoint is None:
            raise UserError("--resume needs the output folder of the interrupted run")
        checkpoint.restore(run, config.to_dict(), ctx.share_from_main(checkpoint.load))
        reporter.log(f"resuming at step {run.step} of {config.steps}")
    ctx.check_batch(run.batch_l, "--batch-size")
    if run.method.uses_unlabelled:
        ctx.check_batch(run.batch_u, "--unlabelled-batch-size")

    def save_checkpoint() -> None:   # rank 0 writes it
        if checkpoint is not None and ctx.is_main:
            checkpoint.save(run, config.to_dict())

    run.model = ctx.wrap(run.net)
    ctx.seed_augmentation(config.seed, run.step)
    reporter.start("train", total=config.steps, device=describe(device), method=config.method,
                   parameters=count_parameters(run.model), labelled_slices=[int(i) for i in labelled],
                   unlabelled_slices=run.sampler.num_unlabelled)
    first_step, log_every = run.step, max(1, config.steps // 100)
    average_at = average_from(config) if config.average_span > 0 else None
    # with averaging the network kept is the average: no snapshot of a single step's weights is taken
    keep_at = set(snapshot_steps(config)) if average_at is None else set()
    t0 = last_checkpoint = time.monotonic()
    run.model.train()
    while run.step < config.steps:
        if ctx.agree_stop(stop):   # every process stops at the same step
            save_checkpoint()
            ctx.barrier()
            raise Cancelled(f"stopped by {stop.reason} at step {run.step} of {config.steps}; "
                            "run again with --resume to continue")
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(run.step, config)
        try:
            loss, terms = _one_step(run, config, device, ctx.batch_sum)
        except torch.OutOfMemoryError:
            _halve_batches(run, ctx, device, reporter)   # or a UserError when they cannot be halved
            continue
        loss, terms = ctx.mean_losses(loss, terms)
        if not math.isfinite(loss):
            raise RuntimeError(f"the loss became {loss} at step {run.step + 1}; try a lower --lr")
        run.method.after_step(run.net, run.step)
        run.step += 1
        run.history.append({"step": run.step, "loss": loss, **terms, "lr": run.optimizer.param_groups[0]["lr"]})
        if run.step in keep_at:
            run.snapshots.append(state_to_cpu(run.net))
        if average_at is not None and run.step >= average_at:
            run.accumulate_average()
        if run.step % log_every == 0 or run.step == config.steps:
            reporter.progress("train", run.step, config.steps, loss=loss, terms=terms, first_step=first_step)
        if checkpoint is not None and run.step < config.steps:
            due = bool(config.checkpoint_every) and run.step % config.checkpoint_every == 0
            due = due or bool(checkpoint_seconds) and time.monotonic() - last_checkpoint >= checkpoint_seconds
            if due:
                save_checkpoint()
                last_checkpoint = time.monotonic()
    if run.averaged:   # the averaged weights are the network kept (average_span; one snapshot)
        run.snapshots = [state_to_cpu(run.average)]
    if not run.snapshots:
        run.snapshots.append(state_to_cpu(run.net))
    return FitResult(snapshots=run.snapshots[-max(1, config.snapshots):], architecture=arch, history=run.history,
                     steps_done=run.step, seconds=time.monotonic() - t0, batch_size=run.batch_l,
                     parameters=count_parameters(run.model),
                     optimizer_state={k: v.detach().to("cpu", copy=True)
                                      for k, v in optimizer_to_tensors(run.optimizer)[0].items()})


def _new_run(volumes, labels, labelled, num_classes: int, config: TrainConfig, device: torch.device,
             init_state: dict[str, torch.Tensor] | None, ctx: distributed.Context
             ) -> tuple[TrainingRun, ArchitectureConfig]:
    """A run at step 0: the network (seeded by ``config.seed``, or ``init_state``), the method, the optimiser
    and the sampler (this process's shard of it)."""
    method = build_method(config)
    arch = ArchitectureConfig(name=method.architecture, in_channels=volumes[0].shape[0],
                              num_classes=num_classes, width=config.width, pasb_side=config.pasb_side,
                              context=config.context)
    torch.manual_seed(config.seed)
    net = SegmentationNetwork(arch)
    if init_state is not None:
        net.load_state_dict(init_state)
    net.to(device)
    if device.type == "cpu":
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
    sampler = TwoStreamSampler(volumes, labels, labelled, axis=config.axis,
                               patch_size=config.patch_size or None, seed=config.seed,
                               foreground_fraction=config.foreground_fraction, shard=ctx.shard,
                               context=config.context)
    if method.uses_unlabelled and sampler.num_unlabelled == 0:
        sampler.unlabelled_batch(1)  # raises the UserError that says every slice is labelled
    run = TrainingRun(net=net, model=net, method=method, optimizer=optimizer, scaler=scaler, sampler=sampler,
                      batch_l=config.batch_size, batch_u=config.unlabelled_batch_size or config.batch_size)
    return run, arch


def _halve_batches(run: TrainingRun, ctx: distributed.Context, device: torch.device, reporter: Reporter) -> None:
    """After running out of GPU memory in a step: the same step again with half the batches (the engine's one
    out-of-memory policy), or a :class:`UserError` with advice when that cannot help or the processes could
    not agree on it."""
    if ctx.distributed:   # the processes cannot agree on halving mid-step: stop with advice
        raise UserError(f"the GPU ran out of memory on {describe(device)}; use a smaller --batch-size "
                        "(it is split over the processes), --patch-size or --width") from None
    run.optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if run.batch_l == 1 and run.batch_u == 1:
        raise UserError(f"the GPU ran out of memory even with one slice per batch on {describe(device)}; "
                        "use a smaller --patch-size or --width, or --device cpu") from None
    run.batch_l, run.batch_u = max(1, run.batch_l // 2), max(1, run.batch_u // 2)
    reporter.log(f"GPU out of memory: retrying with batch sizes {run.batch_l} labelled + {run.batch_u} "
                 "unlabelled", level="warning")


def _one_step(run: TrainingRun, config: TrainConfig, device: torch.device, batch_sum=None) -> tuple[float, dict]:
    """One optimiser step on the next batch; the loss and its terms on this process. ``batch_sum``: the sum
    over processes for the losses' batch sums (:attr:`mismatch.distributed.Context.batch_sum`)."""
    run.sampler.patch = patch_size_at(run.step, config)
    xl, yl = run.sampler.labelled_batch(run.batch_l)
    xu = run.sampler.unlabelled_batch(run.batch_u) if run.method.uses_unlabelled else None
    xl, yl, xu = common_size(xl, yl, xu)   # whole slices of volumes of different sizes
    fmt = torch.channels_last if device.type == "cpu" else torch.contiguous_format

    def to(x):
        return torch.from_numpy(x).to(device).contiguous(memory_format=fmt)

    batch = TrainingBatch(labelled_x=to(xl), labelled_y=torch.from_numpy(yl).to(device),
                          unlabelled_x=None if xu is None else to(xu), step=run.step, total_steps=config.steps,
                          batch_sum=batch_sum)
    run.optimizer.zero_grad(set_to_none=True)
    with autocast(device, config.amp):
        loss, terms = run.method.loss(run.model, batch)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return float(loss.detach()), terms
