"""The ``mismatch`` command: train, segment, evaluate, demo, benchmark, simulate.

Exit status: 0 done; 2 bad input (one line on stderr, nothing modified); 130 cancelled; 1 other failure.

This module imports nothing heavy at the top: :func:`main` chooses the CPU threads and the OpenMP wait
policy (:func:`configure_threads`) and installs its signal handlers before torch is imported, because
OpenMP reads its settings once, when torch loads it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from .contract import EXIT_CANCELLED, EXIT_FAILED, EXIT_USER_ERROR
from .errors import Cancelled, UserError, on_stop_signals


# -- CPU threads ----------------------------------------------------------------------------------------

def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a Linux cgroup quota (containers), or None."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]   # cgroup v2
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())        # cgroup v1
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def physical_cores(cpus: list[int] | None = None, sysfs: str = "/sys/devices/system/cpu") -> int:
    """Physical cores this process may run on: the distinct cores of the CPUs in its affinity mask (Linux
    sysfs topology; hyper-threads of one core count once), capped by a cgroup CPU quota; macOS
    ``hw.physicalcpu``; elsewhere the logical CPUs. ``cpus`` and ``sysfs`` are for tests."""
    if cpus is None:
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = []
    cores = len(cpus) or os.cpu_count() or 1
    if sys.platform.startswith("linux") and cpus:
        seen = set()
        for cpu in cpus:
            topology = Path(sysfs) / f"cpu{cpu}" / "topology"
            try:
                seen.add(((topology / "physical_package_id").read_text().strip(),
                          (topology / "core_id").read_text().strip()))
            except OSError:
                seen = set()
                break
        cores = len(seen) or cores
        limit = _cgroup_cpu_limit()
        if limit:
            cores = min(cores, max(1, int(limit)))
    elif sys.platform == "darwin":
        import subprocess

        try:
            cores = int(subprocess.run(["sysctl", "-n", "hw.physicalcpu"], capture_output=True, text=True,
                                       timeout=5).stdout.strip())
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    return max(1, cores)


def choose_threads(requested: int | None = None, environ=None) -> tuple[int, str]:
    """The CPU threads to use and why: ``--threads`` if given, else the user's own ``OMP_NUM_THREADS``,
    else the physical cores (:func:`physical_cores`; more threads than cores only wait for each other)."""
    environ = os.environ if environ is None else environ
    if requested:
        return int(requested), "--threads"
    try:
        own = int(environ.get("OMP_NUM_THREADS", "").split(",")[0])
        if own >= 1:
            return own, "OMP_NUM_THREADS"
    except ValueError:
        pass
    return physical_cores(), "physical cores"


def configure_threads(requested: int | None = None, environ=None) -> tuple[int, str]:
    """Choose the threads (:func:`choose_threads`) and, while torch is not yet imported, put them and a
    passive OpenMP wait policy in the environment, where OpenMP reads them when torch loads it.

    Passive waiting: an OpenMP thread that has finished its share sleeps instead of spinning for the
    others; on a busy CPU (another job, or 3D Slicer itself) spinning threads take the cores from the
    threads they wait for. ``OMP_WAIT_POLICY`` and ``KMP_BLOCKTIME`` (Intel and LLVM OpenMP: macOS,
    Windows) set by the user are kept, and so is ``OMP_NUM_THREADS`` unless ``--threads`` is given.
    Returns ``(threads, reason)``; :func:`apply_threads` sets them in torch.
    """
    environ = os.environ if environ is None else environ
    threads, reason = choose_threads(requested, environ)
    if "torch" not in sys.modules:
        if requested or "OMP_NUM_THREADS" not in environ:
            environ["OMP_NUM_THREADS"] = str(threads)
        environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        environ.setdefault("KMP_BLOCKTIME", "0")
    return threads, reason


def apply_threads(threads: int) -> int:
    """``torch.set_num_threads(threads)``; returns the number before (to restore it in-process)."""
    import torch

    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
    return before


def _early_value(argv: list[str], option: str) -> str | None:
    """The value of ``option`` in ``argv`` before argparse runs (None if absent)."""
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def _early_threads(argv: list[str]) -> int | None:
    try:
        value = int(_early_value(argv, "--threads") or 0)
    except ValueError:
        return None   # argparse reports it
    return value if value >= 1 else None


# -- signals --------------------------------------------------------------------------------------------

@contextmanager
def cancel_on_signals():
    """SIGINT, SIGTERM (and SIGBREAK on Windows) raise :class:`Cancelled` once, from the first moment of
    :func:`main` (importing torch takes seconds): the command ends with one line and exit 130 instead of a
    ``KeyboardInterrupt`` traceback or a silent death. Training installs its own handlers over these (it
    finishes the step and writes a checkpoint, :func:`mismatch.train.stop_on_signals`)."""
    raised = []

    def handler(signum, _frame):
        if raised:      # a second signal while the first unwinds: the first one's message stands
            return
        raised.append(signum)
        raise Cancelled(f"stopped by {signal.Signals(signum).name}")

    with on_stop_signals(handler):
        yield


# -- argument types -------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage is one ``--help`` away) and exit status 2."""

    def error(self, message):  # noqa: D102
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
    return value


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} must be " + ("0 or more" if minimum == 0 else f"at least {minimum}"))
    return value


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def _slices(text: str) -> list[int]:
    from .data import parse_slice_list

    try:
        return parse_slice_list(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _window(text: str) -> tuple[float, float] | str | None:
    """``LOW,HIGH`` in HU; ``auto`` (a CT in HU gets :data:`mismatch.data.CT_WINDOW`); ``none``."""
    word = text.strip().lower()
    if word == "auto":
        return "auto"
    if word == "none":
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give the window as LOW,HIGH in HU, e.g. --hu-window=-1000,400 "
                                         "(or auto, or none)") from None
    if not lo < hi:
        raise argparse.ArgumentTypeError(f"{text!r}: LOW must be below HIGH")
    return lo, hi


def _method_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: give KEY=VALUE, e.g. ema_decay=0.999")
    value = value.strip()
    for convert in (int, float):
        try:
            return key.strip(), convert(value)
        except ValueError:
            pass
    lowered = value.lower()
    return key.strip(), {"true": True, "false": False}.get(lowered, value)


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="CPU threads (default: $OMP_NUM_THREADS if set, else the physical cores); OpenMP threads "
                        "wait passively unless $OMP_WAIT_POLICY says otherwise")


def _common_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--events", metavar="FILE|-", help="write JSON-lines progress events to FILE, or - for stdout")
    _threads_option(p)


def _preset_default(name: str) -> str:
    """An option's default as each training preset sets it, e.g. ``default 16; --preset paper: 24``: the
    values come from :class:`mismatch.train.TrainConfig` (the ``default`` preset) and
    :data:`mismatch.train.PRESETS`, so that the help always says what a run does."""
    from .train import PRESETS, TrainConfig

    base = getattr(TrainConfig(), name)
    default = PRESETS["default"]["config"].get(name, base)
    others = [f"--preset {preset}: {values['config'][name]:g}" if isinstance(values["config"][name], float)
              else f"--preset {preset}: {values['config'][name]}"
              for preset, values in PRESETS.items()
              if preset != "default" and values["config"].get(name, base) != default]
    return "; ".join([f"default {default:g}" if isinstance(default, float) else f"default {default}"] + others)


def _add_fill(sub) -> None:
    f = sub.add_parser("fill", help="fill the unpainted slices from the painted ones, in seconds, no network",
                       description="What the painted slices say on their own, before any training: every unpainted "
                                   "slice labelled from the painted shapes around it, grown along the image's "
                                   "edges and checked against the painted intensities (the prior 'segment "
                                   "--labels' combines with the network), the painted slices as painted. Seconds "
                                   "on a CPU; 'mismatch train' then 'segment' do better on tumours and thin "
                                   "structures (docs/benchmarks.md, \"Before any training\").")
    f.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s): one per channel (the first one's "
                                                              "edges and intensities are followed)")
    f.add_argument("--labels", required=True, metavar="LABELS",
                   help="the painted label map (0 = background / unpainted; a .seg.nrrd saved by Slicer is fine)")
    f.add_argument("--out", required=True, metavar="LABELMAP",
                   help="label map to write (input grid; *.seg.nrrd: a Slicer segmentation with named segments)")
    f.add_argument("--labelled-slices", type=_slices, metavar="LIST",
                   help="slices that count as painted even if all background, e.g. 3,7,10-12")
    f.add_argument("--empty-slices", type=_slices, metavar="LIST",
                   help="slices you checked and found without the structure")
    f.add_argument("--axis", choices=["auto", "k", "j", "i"], default="auto",
                   help="slice axis (default auto: the axis the labels were painted along)")
    f.add_argument("--hu-window", type=_window, default="auto", metavar="LOW,HIGH|auto|none",
                   help="as for train (default auto: a CT in Hounsfield units is clipped to -1000,400)")
    f.add_argument("--classes", metavar="CLASSES.json", help="class values, names and colours")
    f.add_argument("--report", metavar="JSON", help="write the slices worth painting next (the widest unpainted "
                                                    "stretch of the filled structure first, as segment's gap)")
    f.add_argument("--events", metavar="FILE|-", help="write JSON-lines progress events to FILE, or - for stdout")
    _threads_option(f)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; for ``command`` ``fill`` only that subcommand, without importing torch (the fill needs
    none, and importing it is about two seconds of a fill's wait)."""
    parser = _Parser(
        prog="mismatch",
        description="MisMatch semi-supervised segmentation from a few labelled slices (Xu et al., MIDL 2022).")
    parser.add_argument("--version", action="version", version=f"mismatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if command == "fill":
        _add_fill(sub)
        return parser
    from .inference import CPU_BATCH_PIXELS
    from .ranking import DEFAULT_RANKING, RANKINGS
    from .train import CHECKPOINT_SECONDS, PRESETS, TrainConfig

    d = TrainConfig()

    t = sub.add_parser("train", help="train a model from a volume and a few labelled slices",
                       description="Train on the labelled slices of LABELS (Dice) and on every other slice "
                                   "(consistency between the two decoders). Several IMAGEs are the channels "
                                   "of one case.")
    t.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s): .nrrd .nii .nii.gz .mha ...")
    t.add_argument("--labels", required=True, help="label map on the image's grid: 0 = background or unlabelled")
    t.add_argument("--out", required=True, metavar="MODEL_DIR", help="folder to write the model to")
    t.add_argument("--method", default=d.method, help="mismatch (default), unet (supervised U-Net), sup2, "
                                                      "mm-a, mm-b, mm-c; baselines mt, fixmatch, cct, mta, "
                                                      "morph (docs/methods.md)")
    t.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="default: the product's recipe (Dice + cross-entropy, width 16, 128-pixel patches, and the "
                        "painted slices guide segmentation); paper: MisMatch as the paper describes it (width 24, "
                        "176-pixel patches, Dice only). Options below override the preset")
    t.add_argument("--steps", type=_positive_int, help=f"optimiser steps ({_preset_default('steps')})")
    t.add_argument("--width", type=_positive_int,
                   help=f"channels of the first encoder block ({_preset_default('width')})")
    t.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help=f"labelled slices per step ({_preset_default('batch_size')}); under torchrun the global "
                        "batch, split evenly over the processes (a multiple of their number)")
    t.add_argument("--unlabelled-batch-size", type=_non_negative_int,
                   help=f"unlabelled slices per step, 0: as many as --batch-size "
                        f"({_preset_default('unlabelled_batch_size')}); under torchrun global too")
    t.add_argument("--patch-size", type=int,
                   help=f"square random patches of this side; 0 = whole slices; a slice side shorter than the "
                        f"patch is taken whole ({_preset_default('patch_size')})")
    t.add_argument("--early-patch-size", type=_non_negative_int, metavar="SIDE",
                   help="train the first half of the steps on smaller patches of this side, at about half the "
                        "cost a step; 0 = the full patch from the first step "
                        f"({_preset_default('early_patch_size')})")
    t.add_argument("--lr", type=_positive_float, help=f"AdamW learning rate ({_preset_default('lr')})")
    t.add_argument("--context", type=_non_negative_int, metavar="N",
                   help="give the network each slice with N neighbouring slices on either side as extra channels "
                        f"(2.5D input; 0 = the slice alone) ({_preset_default('context')})")
    t.add_argument("--alpha", type=_non_negative_float, default=d.alpha, help="consistency weight (default 0.002)")
    t.add_argument("--alpha-rampup", type=_fraction, default=d.alpha_rampup,
                   help="fraction of training over which alpha ramps up (0 = constant)")
    t.add_argument("--stop-gradient", choices=["none", "one-sided"], default=d.stop_gradient,
                   help="consistency gradient: to both decoders (none, default) or only the positive one")
    t.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE", type=_method_option,
                   help="a setting of the chosen method, e.g. ema_decay=0.999 (mt), threshold=0.9 (fixmatch), "
                        "consistency_weight=0.3 (mt, cct); repeat for several; see docs/methods.md")
    t.add_argument("--pasb-side", choices=["factorised", "paper"], default=d.pasb_side,
                   help="PASB side branch: factorised (default; the first atrous conv as 1x1 then atrous 3x3) "
                        "or paper (full-rank atrous convs, slower on a CPU)")
    t.add_argument("--snapshots", type=_positive_int, default=d.snapshots,
                   help="keep the last K snapshots and average their predictions at inference (paper: 10; needs "
                        "--average-span 0)")
    t.add_argument("--average-span", type=_fraction, metavar="FRACTION",
                   help="the last fraction of the steps, run at a constant quarter of the peak learning rate, whose "
                        "weights are averaged into the network saved (default 0.3 for mismatch and mm-a/b/c, 0 "
                        "for the other methods and --preset paper; 0: off, the last weights are saved)")
    t.add_argument("--labelled-slices", type=_slices, metavar="LIST",
                   help="slices that count as labelled even if all background, e.g. 3,7,10-12")
    t.add_argument("--empty-slices", type=_slices, metavar="LIST",
                   help="slices you checked and found without the structure (labelled as all background), "
                        "e.g. 0-4,40: they teach the model where the structure is not")
    t.add_argument("--axis", choices=["auto", "k", "j", "i"], default="auto",
                   help="slice axis of the image grid: k (the file's slice direction), j or i; auto (default): the "
                        "axis the labels were painted along (k unless they lie on separate slices along j or i)")
    t.add_argument("--hu-window", type=_window, default="auto", metavar="LOW,HIGH|auto|none",
                   help="clip the image to this window before the per-volume z-score; auto (default): a CT in "
                        "Hounsfield units (darkest voxel at -500 or below) is clipped to -1000,400, any other "
                        "image is not, and with --init the model's own window is kept; none: never clip. A window "
                        "that starts below zero needs the = form: --hu-window=-1000,400")
    t.add_argument("--unlabelled", nargs="+", default=[], metavar="EXTRA",
                   help="extra unlabelled cases; a case with several channels is a comma-separated list")
    t.add_argument("--unlabelled-manifest", metavar="FILE",
                   help="CSV (a 'path' column, or one path per line; more channel columns 'path...') or JSON "
                        "(a list of paths, or of lists of channel paths) of unlabelled volumes, read lazily a "
                        "slice at a time: pools too large for memory")
    t.add_argument("--cache-volumes", type=_positive_int, default=8, metavar="N",
                   help="manifest volumes held in memory at once (default 8)")
    t.add_argument("--cache-mb", type=_positive_int, default=2048, metavar="MB",
                   help="memory for cached manifest slices and volumes (default 2048)")
    t.add_argument("--checkpoint-every", type=_positive_int, default=d.checkpoint_every, metavar="STEPS",
                   help=f"write a resumable checkpoint every STEPS steps (default {d.checkpoint_every})")
    t.add_argument("--stop-file", metavar="PATH",
                   help="stop as on SIGTERM when this file appears (finish the step, write a checkpoint, exit 130; "
                        "--resume continues): for a parent process that cannot signal the engine")
    t.add_argument("--checkpoint-seconds", type=_non_negative_float, default=CHECKPOINT_SECONDS, metavar="SECONDS",
                   help=f"... and after SECONDS of training since the last one (default {CHECKPOINT_SECONDS:g}; "
                        "0 = by steps only)")
    t.add_argument("--classes", metavar="CLASSES.json", help="class values, names and colours")
    t.add_argument("--init", metavar="MODEL_DIR", help="start from this model (fine-tune after corrections); a "
                   "warm-start round unless --no-warm-start")
    t.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=True,
                   help="with --init: train a fifth of the steps at half the learning rate, short warm-up, no "
                        "alpha ramp-up, continuing the model's optimiser state (mismatch.train.WARM_START; "
                        "fractions of the preset's or the given --steps and --lr); --no-warm-start: the full "
                        "schedule (default: on)")
    t.add_argument("--seed", type=int, default=d.seed,
                   help=f"random seed of the weights, patches and augmentation ({_preset_default('seed')})")
    t.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    _common_device(t)

    s = sub.add_parser("segment", help="segment a whole volume with a trained model",
                       description="Segment every slice of IMAGE with a trained model and write the label map on "
                                   "the image's grid; optionally the confidence, the decoders' disagreement and "
                                   "a report that ranks the slices most worth checking. With --labels (the "
                                   "painted label map the model was trained from) the painted slices are kept "
                                   "as painted and guide the others.")
    s.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image file(s) (.nrrd .nii .nii.gz .mha ...): one per channel, in the order the model "
                        "was trained with")
    s.add_argument("--model", required=True, metavar="MODEL_DIR",
                   help="the model folder that 'mismatch train --out' wrote (model.json and model.safetensors)")
    s.add_argument("--out", required=True, metavar="LABELMAP", help="label map to write (input grid)")
    s.add_argument("--confidence", metavar="FILE", help="write the probability of the predicted class")
    s.add_argument("--disagreement", metavar="FILE", help="write the disagreement between the two decoders")
    s.add_argument("--report", metavar="JSON", help="write per-slice uncertainty ranking (and evaluation)")
    s.add_argument("--labels", metavar="LABELS",
                   help="the painted label map this model was trained from (same volume): the painted slices are "
                        "kept as painted, and the model's prediction on the other slices is combined with what "
                        "the painted slices imply (where the structure can be). Without it, the painted slices the "
                        "model folder keeps from its training do the same when IMAGE is the image they were "
                        "painted on")
    s.add_argument("--no-labels", action="store_true",
                   help="segment with the network alone: neither --labels nor the painted slices kept in the "
                        "model folder")
    s.add_argument("--labelled-slices", type=_slices, metavar="LIST",
                   help="with --labels: slices that count as labelled even if all background")
    s.add_argument("--empty-slices", type=_slices, metavar="LIST",
                   help="with --labels: slices checked and found without the structure")
    s.add_argument("--ranking", choices=RANKINGS, default=DEFAULT_RANKING,
                   help="how --report orders the slices worth labelling next: gap (default: the slice of the "
                        "predicted structure farthest from any labelled slice), the decoders' disagreement, the "
                        "confidence missing (expected-error), either of these weighted by the distance to the "
                        "nearest labelled slice (-distance); docs/loop.md")
    s.add_argument("--truth", metavar="LABELS", help="evaluate against this label map (for --report)")
    s.add_argument("--eval-slices", type=_slices, metavar="LIST", help="slices to evaluate (default: all)")
    s.add_argument("--batch-size", type=_positive_int, default=8,
                   help=f"slices per batch (default 8; on the CPU at most {CPU_BATCH_PIXELS:,} pixels a batch "
                        f"({CPU_BATCH_PIXELS // (256 * 256)} slices of 256 x 256), the fastest there and a bound "
                        "on the memory)")
    _common_device(s)

    _add_fill(sub)

    e = sub.add_parser("evaluate", help="overlap and calibration of a segmentation against a truth",
                       description="Foreground IoU and Dice of a label map against a reference on the same grid, "
                                   "and with --confidence the calibration (ECE, MCE; all voxels and the "
                                   "foreground band) and a reliability diagram. Prints JSON.")
    e.add_argument("--prediction", required=True, metavar="LABELMAP",
                   help="the label map to evaluate (e.g. what 'mismatch segment --out' wrote): integers, "
                        "0 = background")
    e.add_argument("--truth", required=True, metavar="LABELMAP",
                   help="the reference label map on the prediction's grid, with the same label values")
    e.add_argument("--confidence", metavar="FILE", help="confidence volume from 'mismatch segment'")
    e.add_argument("--slices", type=_slices, metavar="LIST", help="evaluate only these slices")
    e.add_argument("--axis", choices=["k", "j", "i"], default="k",
                   help="slice axis of the grid (k: the file's slice direction, j, i): --slices count along "
                        "it, and the calibration's foreground band is dilated within its slices (default k)")
    e.add_argument("--bins", type=_positive_int, default=15, help="calibration bins (default 15)")
    e.add_argument("--diagram", metavar="PNG", help="write the reliability diagram")
    e.add_argument("--out", metavar="JSON", help="also write the JSON here")
    _threads_option(e)

    m = sub.add_parser("demo", help="the real-data demo: chest CT lungs from 3 labelled slices",
                       description="Train MisMatch and a supervised U-Net on 3 labelled slices of a real chest CT "
                                   "(CTChest4, shipped with slicerio), segment the whole volume with both and "
                                   "report IoU, Dice and calibration on the slices neither saw.")
    m.add_argument("--out", default="demo-output", metavar="DIR",
                   help="folder for the demo's outputs (default demo-output)")
    m.add_argument("--steps", type=_positive_int, default=None,
                   help=f"training steps per model (default {d.steps}, the default preset's)")
    m.add_argument("--width", type=_positive_int, default=None,
                   help=f"channels of the first encoder block (default {d.width}, the default preset's)")
    m.add_argument("--seed", type=int, default=0, help="random seed of the training (default 0)")
    m.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps "
                                                    "(default auto)")
    _threads_option(m)

    b = sub.add_parser(
        "benchmark", help="the paper's comparisons (Table 1, ECE, Fig. 4/5, alpha sweep, ablation) on real data",
        description="Train every selected method with the same budget on the same labelled slices of each data "
                    "set, for each labelled-slice count and seed, evaluate on disjoint test slices, and write "
                    "results.md, the figures and runs.json (every run's settings and metrics) into --out. "
                    "Finished runs in --out/runs.json are kept: running again resumes.")
    b.add_argument("--out", default="benchmark-output", metavar="DIR",
                   help="folder for results.md, the figures and runs.json (default benchmark-output)")
    b.add_argument("--datasets", nargs="+", metavar="NAME",
                   help="ctchest-lungs, ctchest-lungs-lr, ctchest-spine, ctchest-ribs, ctchest-lungs-spine-ribs, "
                        "ctchest-tissue, mni152-gm, mni152-wm, mni152-tissue, mni152-csf, pyradiomics-brain1, "
                        "pyradiomics-breast1, synthetic-vessels, synthetic-vessels-lung, synthetic-lesion-lung, "
                        "synthetic-lesion-lung-fine (default: ctchest-lungs)")
    _files_option(b)
    b.add_argument("--labelled", nargs="+", type=_positive_int, metavar="N",
                   help="labelled-slice counts (default 3 5 10; --quick: 3)")
    b.add_argument("--seeds", type=_positive_int, help="runs per labelled-slice count (default 3)")
    b.add_argument("--placement", choices=["random", "even"],
                   help="where the labelled slices go: 'random' (default) draws other slices for each seed; "
                        "'even' spaces them evenly over the structure's extent, as the README advises users, the "
                        "same slices for every seed (the seed then varies the training alone)")
    b.add_argument("--methods", nargs="+", metavar="NAME", help="methods to compare (default: all)")
    b.add_argument("--alpha-sweep", nargs="*", type=_non_negative_float, metavar="ALPHA",
                   help="MisMatch consistency weights to sweep (default 0 0.0005 0.001 0.002 0.004; the flag with no value: no sweep)")
    _budget_arguments(b, "every learned method", quick=True)
    b.add_argument("--n-test", type=_positive_int, help="test slices per draw (default: every unlabelled "
                   "slice)")
    b.add_argument("--data-dir", help="folder with data that is not installed as a package (see docs)")
    b.add_argument("--devices", default="auto",
                   help="comma-separated devices, one run at a time on each (e.g. cuda:0,cuda:1; 'all' = every "
                        "GPU; default: every GPU when there are several, else the best device)")
    b.add_argument("--quick", action="store_true", help="minutes on a 2-core CPU: width 8, 60 steps, 1 data set")
    b.add_argument("--report-only", action="store_true", help="rebuild results.md and the figures from runs.json")
    _threads_option(b)
    _simulate_parser(sub)
    return parser


def _files_option(p) -> None:
    p.add_argument("--files", nargs=2, action="append", metavar=("IMAGE", "LABELS"),
                   help="a volume of your own with its structure labelled on every slice (a label map on the "
                        "image's grid), as data set file-<image name>; repeat for more (with --datasets: beside "
                        "those)")
    p.add_argument("--axis", choices=["k", "j", "i"],
                   help="the slice axis of the --files volumes, along which slices are labelled and tested: k (the "
                        "default: the file's slice direction), j or i (e.g. a structure that lies on few k-slices); "
                        "the named data sets keep their own")


def _with_files(args) -> tuple[list[str] | None, dict[str, dict]]:
    """``--datasets`` with the ``--files`` data sets added, and their options."""
    from .benchmark.datasets import files_datasets

    if args.axis and not args.files:
        raise UserError("--axis is the slice axis of the --files volumes; the named data sets keep their own. "
                        "Give --files IMAGE LABELS, or leave --axis out")
    files = files_datasets(args.files or [], axis=args.axis or "k")
    if not files:
        return args.datasets, {}
    return (args.datasets or []) + list(files), files


def _simulate_parser(sub) -> None:
    """``mismatch simulate``: the annotate-and-retrain loop played by a simulated user (docs/loop.md)."""
    from .benchmark.loop import BASE_POLICIES, POLICIES, START_PLACEMENTS

    v = sub.add_parser(
        "simulate", help="the annotate-and-retrain loop with a simulated user, per slice-picking policy",
        description="On volumes with full labels: start from K0 labelled slices, then in each round add the true "
                    "labels of one slice chosen by a policy, retrain from the last model (warm start), segment "
                    "with the painted slices and record IoU, ECE and seconds on every slice not labelled. Writes "
                    "loop.json (every round; running again resumes), results.md and the figures into --out.")
    v.add_argument("--out", default="simulate-output", metavar="DIR",
                   help="folder for results.md, the figures and loop.json (default simulate-output)")
    v.add_argument("--datasets", nargs="+", metavar="NAME",
                   help="the benchmark's data sets (mismatch benchmark --help; default: ctchest-lungs)")
    _files_option(v)
    v.add_argument("--methods", nargs="+", metavar="NAME", help="methods (default: mismatch unet-strong)")
    v.add_argument("--start", nargs="+", type=_positive_int, metavar="K0",
                   help="labelled slices of the first round (default 1 3)")
    v.add_argument("--start-placement", choices=START_PLACEMENTS,
                   help="the first round's slices for every policy but even: draw (at random over the structure, "
                        "as the benchmark draws them; the default) or even (evenly spaced, as the README advises)")
    v.add_argument("--max-labelled", type=_positive_int, metavar="N",
                   help="labelled slices of the last round (default 10)")
    v.add_argument("--seeds", type=_positive_int, help="draws of the first slices and training seeds (default 5)")
    v.add_argument("--policies", nargs="+", metavar="NAME", choices=POLICIES,
                   help=f"how the next slice is picked: {', '.join(POLICIES)} (default: {' '.join(BASE_POLICIES)})")
    _budget_arguments(v, "the first training of a trajectory")
    v.add_argument("--warm-steps-fraction", type=_positive_float, metavar="F",
                   help="steps of a later round as a fraction of the first's (default: mismatch.train.WARM_START)")
    v.add_argument("--warm-lr-fraction", type=_positive_float, metavar="F",
                   help="learning rate of a later round as a fraction of the first's (default: WARM_START)")
    v.add_argument("--scratch", action="store_true",
                   help="also train from scratch on the slices of every later round, to compare with the warm start")
    v.add_argument("--no-reference", action="store_true",
                   help="leave out the reference (unet-strong trained on every slice)")
    v.add_argument("--data-dir", help="folder with data that is not installed as a package (see docs)")
    v.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    v.add_argument("--report-only", action="store_true", help="rebuild results.md and the figures from loop.json")
    _threads_option(v)


def _budget_arguments(p: argparse.ArgumentParser, trained: str, quick: bool = False) -> None:
    """The flags of a training budget (:class:`~mismatch.benchmark.runner.Budget`) for ``benchmark`` and
    ``simulate``: a preset and overrides of it (``trained`` says what trains at it; ``quick``: the command has
    ``--quick``, whose values the help gives)."""
    from .benchmark.runner import QUICK_BUDGET
    from .train import PRESETS

    def default(name: str) -> str:
        return "(default: the preset's" + (f"; --quick: {QUICK_BUDGET[name]:g})" if quick and name in QUICK_BUDGET
                                           else ")")

    p.add_argument("--preset", choices=sorted(PRESETS), help=f"the training budget and recipe of {trained} "
                   "(default: default, what a user gets; paper: the paper's recipe); the options below override it")
    p.add_argument("--steps", type=_positive_int, help=f"training steps {default('steps')}")
    p.add_argument("--width", type=_positive_int, help=f"channels of the first block {default('width')}")
    p.add_argument("--batch-size", type=_positive_int, help=f"labelled slices per step {default('batch_size')}")
    p.add_argument("--patch-size", type=int, help=f"square training patches, 0 = whole slices {default('patch_size')}")
    p.add_argument("--lr", type=_positive_float, help=f"learning rate {default('lr')}")
    p.add_argument("--context", type=_non_negative_int, metavar="N",
                   help=f"neighbouring slices on each side given with each slice (2.5D input) {default('context')}")


def _budget_values(args) -> dict:
    """The budget flags' values by :class:`~mismatch.benchmark.runner.Budget` field (None where not given: the
    preset's)."""
    from dataclasses import fields

    from .benchmark.runner import Budget

    return {f.name: getattr(args, f.name) for f in fields(Budget)}


def _reporter(args, quiet: bool = False):
    """The command's reporter; kept on ``args`` so that :func:`main` can write the final event."""
    from .events import Reporter

    args.reporter = Reporter(events=getattr(args, "events", None), quiet=quiet)
    return args.reporter


def cmd_train(args) -> int:
    from .distributed import init_from_env

    ctx = init_from_env(args.device)   # several processes only under torchrun (WORLD_SIZE > 1)
    if not ctx.is_main:   # rank 0 alone writes events and progress; one error line per machine
        args.events = None
        args.silent = ctx.local_rank != 0
    try:
        return _train(args, ctx)
    finally:
        ctx.close()


def _train(args, ctx) -> int:
    from .api import train_files
    from .data import check_patch_size
    from .train import StopRequest, preset_config, stop_on_signals

    config = preset_config(
        args.preset, args.method, steps=args.steps, width=args.width, batch_size=args.batch_size,
        unlabelled_batch_size=args.unlabelled_batch_size, patch_size=args.patch_size,
        early_patch_size=args.early_patch_size, lr=args.lr, context=args.context, alpha=args.alpha,
        alpha_rampup=args.alpha_rampup, stop_gradient=args.stop_gradient,
        pasb_side=args.pasb_side, method_options=dict(args.method_option),
        snapshots=args.snapshots, average_span=args.average_span, seed=args.seed, axis=args.axis,
        hu_window=args.hu_window, amp=not args.no_amp,
        checkpoint_every=args.checkpoint_every)
    check_patch_size(config.patch_size)
    check_patch_size(config.early_patch_size, "--early-patch-size", zero="the full patch from the first step")
    if args.init and args.warm_start:
        from .train import warm_start_config

        config = warm_start_config(config)
    check_training_memory(config, len(args.images), str(ctx.device) if ctx.distributed else args.device)
    unlabelled = [case.split(",") for case in args.unlabelled]
    reporter = _reporter(args, quiet=not ctx.is_main)
    with stop_on_signals(StopRequest(args.stop_file)) as stop:
        card = train_files(args.images, args.labels, args.out, config, unlabelled=unlabelled,
                           explicit_slices=args.labelled_slices,
                           empty_slices=args.empty_slices,
                           classes_path=args.classes,
                           init_model=args.init, device=str(ctx.device) if ctx.distributed else args.device,
                           resume=args.resume, reporter=reporter, stop=stop,
                           unlabelled_manifest=args.unlabelled_manifest, cache_volumes=args.cache_volumes,
                           cache_bytes=args.cache_mb * 2**20, checkpoint_seconds=args.checkpoint_seconds)
    losses = card["summary"]["final_losses"]
    reporter.end("completed", f"model written to {args.out}", final_losses=losses)
    if args.events != "-" and ctx.is_main:
        print(f"model written to {args.out} (final loss {losses.get('loss', float('nan')):.4f})")
    return 0


def check_training_memory(config, in_channels: int, device: str) -> None:
    """:class:`UserError` before any work when the network's weights, gradients, AdamW state and kept
    snapshots alone exceed the memory available on the device (e.g. ``--width 100000``): counted on
    torch's ``meta`` device, nothing allocated. Activations come on top; running out of memory for them
    is reported by :func:`main` with the settings to lower."""
    import torch

    from .device import available_memory, resolve_device
    from .methods import METHODS, make_method
    from .models import ArchitectureConfig, SegmentationNetwork

    if config.method not in METHODS:
        return   # reported by train_files
    arch = ArchitectureConfig(name=make_method(config.method).architecture, in_channels=in_channels,
                              num_classes=2, width=config.width, pasb_side=config.pasb_side,
                              context=config.context)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in SegmentationNetwork(arch).parameters())
    need = parameters * 4 * (4 + max(1, config.snapshots))
    dev = resolve_device(device)
    available = available_memory(dev)
    if available is not None and need > available:
        raise UserError(f"--width {config.width}: the network has {parameters:,} parameters, and training it needs "
                        f"{need / 2**30:,.1f} GiB for its weights, gradients and optimiser state alone, but "
                        f"{available / 2**30:,.1f} GiB are available on {dev}; use a smaller --width "
                        f"(default {type(config)().width})")


def _memory_advice(args) -> str:
    """The settings that set the memory a command needs, with their values."""
    names = {"train": ("width", "batch_size", "patch_size"), "segment": ("batch_size",),
             "demo": ("width",), "benchmark": ("width", "batch_size", "patch_size")}.get(args.command, ())
    shown = [f"--{n.replace('_', '-')}" + (f" (now {getattr(args, n)})" if getattr(args, n, None) is not None
                                            else "") for n in names]
    if not shown:
        return "free memory, or use a smaller input"
    return "use a smaller " + (", ".join(shown[:-1]) + " or " + shown[-1] if len(shown) > 1 else shown[0])


def cmd_segment(args) -> int:
    from .api import segment_files

    if args.no_labels and args.labels:
        raise UserError("--no-labels and --labels: give one (--labels: the painted slices guide the segmentation; "
                        "--no-labels: the network alone)")
    reporter = _reporter(args)
    summary = segment_files(args.images, args.model, args.out, confidence=args.confidence,
                            disagreement=args.disagreement, report=args.report, truth=args.truth,
                            eval_slices=args.eval_slices, batch_size=args.batch_size, device=args.device,
                            reporter=reporter, labels=args.labels,
                            explicit_slices=args.labelled_slices,
                            empty_slices=args.empty_slices,
                            ranking=args.ranking, stored_labels=not args.no_labels)
    reporter.end("completed", f"segmentation written to {args.out}", **summary)
    if args.events != "-":
        print(f"segmentation written to {args.out} ({summary['seconds']:.1f} s)")
    return 0


def cmd_fill(args) -> int:
    from .fill import fill_files

    reporter = _reporter(args)
    summary = fill_files(args.images, args.labels, args.out, axis=args.axis, hu_window=args.hu_window,
                         explicit_slices=args.labelled_slices,
                         empty_slices=args.empty_slices,
                         classes_path=args.classes, report=args.report, reporter=reporter)
    reporter.end("completed", f"filled label map written to {args.out}", **summary)
    if args.events != "-":
        print(f"filled label map written to {args.out} ({summary['seconds']:.1f} s)")
    return 0


def cmd_evaluate(args) -> int:
    from .api import evaluate_files

    from .io import check_outputs_not_inputs, check_writable, write_text_atomic

    outputs = {"--out": args.out, "--diagram": args.diagram}
    check_outputs_not_inputs(outputs.values(), [args.prediction, args.truth, args.confidence])
    for option, path in outputs.items():
        if path:
            check_writable(path, option)
    result = evaluate_files(args.prediction, args.truth, confidence=args.confidence, slices=args.slices,
                            axis=args.axis, n_bins=args.bins, diagram=args.diagram)
    text = json.dumps(result, indent=2)
    if args.out:
        write_text_atomic(args.out, text + "\n")
    print(text)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    from .io import check_writable

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out}: exists and is not a folder; give a folder for the demo's outputs")
    check_writable(Path(args.out) / "results.json", "--out", shown=args.out)   # the demo writes into the folder
    run_demo(out_dir=args.out, steps=args.steps, width=args.width, seed=args.seed, device=args.device)
    return 0


def _report_only(out: str, load, write, entries: str, file: str, command: str) -> int:
    """``--report-only``: rebuild the report in ``out`` from its results file (``file``, read by ``load``) alone;
    a :class:`UserError` when the file holds no ``entries`` yet."""
    data = load(out)
    if not data[entries]:
        raise UserError(f"{out} holds no {file} with {entries}; run the {command} first")
    print(f"wrote {write(data, out)}")
    return 0


def cmd_benchmark(args) -> int:
    from .benchmark.runner import RUNS_FILE, BenchmarkConfig, load_runs, run_benchmark, write_report
    from .data import check_patch_size

    if args.report_only:
        return _report_only(args.out, load_runs, write_report, "runs", RUNS_FILE, "benchmark")
    datasets, files = _with_files(args)
    options = {"datasets": datasets, "labelled": args.labelled, "seeds": args.seeds, "methods": args.methods,
               "placement": args.placement, "dataset_options": files or None,
               **_budget_values(args), "n_test": args.n_test, "data_dir": args.data_dir,
               "alpha_sweep": args.alpha_sweep, "devices": args.devices.split(",")}
    if args.quick:
        config = BenchmarkConfig.quick(**options)
    else:
        config = BenchmarkConfig(**{k: v for k, v in options.items() if v is not None})
    check_patch_size(config.patch_size)
    run_benchmark(config, args.out)
    return 0


def cmd_simulate(args) -> int:
    from .benchmark.loop import RESULTS_FILE, LoopConfig, load_results, run_simulation, write_report

    if args.report_only:
        return _report_only(args.out, load_results, write_report, "rounds", RESULTS_FILE, "simulation")
    warm = {k: v for k, v in (("steps_fraction", args.warm_steps_fraction), ("lr_fraction", args.warm_lr_fraction))
            if v is not None}
    datasets, files = _with_files(args)
    options = {"datasets": datasets, "dataset_options": files or None, "methods": args.methods, "start": args.start,
               "max_labelled": args.max_labelled, "seeds": args.seeds, "policies": args.policies,
               "start_placement": args.start_placement,
               **_budget_values(args), "data_dir": args.data_dir, "device": args.device}
    config = LoopConfig(**{k: v for k, v in options.items() if v is not None}, warm=warm, scratch=args.scratch,
                        reference=not args.no_reference)
    run_simulation(config, args.out)
    return 0


COMMANDS = {"train": cmd_train, "segment": cmd_segment, "fill": cmd_fill, "evaluate": cmd_evaluate, "demo": cmd_demo,
            "benchmark": cmd_benchmark, "simulate": cmd_simulate}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # before torch is imported (build_parser imports it): OpenMP reads its settings when torch loads it
    threads, _ = configure_threads(_early_threads(argv))
    command = next((a for a in argv if a in COMMANDS), None)
    args = argparse.Namespace(command=command, events=_early_value(argv, "--events"))
    threads_before = None
    with cancel_on_signals():
        try:
            parser = build_parser(command)
            args = parser.parse_args(argv)
            if not args.command:
                parser.print_help()
                return EXIT_USER_ERROR
            if args.command != "fill":   # the fill runs no torch (numpy and scipy): no torch threads to set
                threads_before = apply_threads(getattr(args, "threads", None) or threads)
            from .allocator import tune_cpu_allocator

            tune_cpu_allocator()  # faster work on large arrays; the numbers computed are the same
            status = COMMANDS[args.command](args)
            if getattr(args, "reporter", None) is not None:
                args.reporter.close()
            return status
        except UserError as exc:
            return _fail(args, EXIT_USER_ERROR, "failed", "error", str(exc))
        except Cancelled as exc:
            return _fail(args, EXIT_CANCELLED, "cancelled", "cancelled", str(exc))
        except KeyboardInterrupt:
            return _fail(args, EXIT_CANCELLED, "cancelled", "cancelled", "interrupted")
        except Exception as exc:  # an engine bug or a system failure: keep the traceback for the report
            from .device import is_out_of_memory

            first = (str(exc).strip().splitlines() or [""])[0]
            if is_out_of_memory(exc):   # a setting too large for this machine: what to lower, in one line
                reason = first.split("DefaultCPUAllocator: ")[-1][:200]
                return _fail(args, EXIT_USER_ERROR, "failed", "error",
                             f"out of memory ({reason}); {_memory_advice(args)}")
            message = f"{type(exc).__name__}: {exc}"
            _final(args, "failed", message)
            traceback.print_exc()
            print(f"mismatch {args.command}: failed: {message}", file=sys.stderr)
            return EXIT_FAILED
        finally:
            if threads_before is not None:   # in-process callers get their thread count back
                apply_threads(threads_before)


def _fail(args, code: int, status: str, word: str, message: str) -> int:
    """The final event and one line on stderr; returns the exit status."""
    _final(args, status, message)
    if not getattr(args, "silent", False):
        print(f"mismatch {args.command or ''}: {word}: {message}".replace("mismatch : ", "mismatch: "),
              file=sys.stderr)
    return code


def _final(args, status: str, message: str) -> None:
    """The last event line, for callers that read events, whatever happened."""
    from .events import Reporter

    reporter = getattr(args, "reporter", None)
    if reporter is None:
        if not getattr(args, "events", None):
            return
        reporter = Reporter(events=args.events, progress_bar=False, quiet=True)
    reporter.end(status, message)
    reporter.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
