"""The ``mismatch`` command: train, segment, evaluate, demo.

Exit status: 0 done; 2 bad input (one line on stderr, nothing modified); 130 cancelled; 1 other failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from . import __version__
from .errors import Cancelled, UserError

EXIT_USER_ERROR = 2
EXIT_CANCELLED = 130


def _slices(text: str) -> list[int]:
    from .data import parse_slice_list

    try:
        return parse_slice_list(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _window(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give the window as LOW,HIGH in HU, e.g. -1000,400") from None
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
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return v


def _common_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--events", metavar="FILE|-", help="write JSON-lines progress events to FILE, or - for stdout")


def build_parser() -> argparse.ArgumentParser:
    from .train import PRESETS, TrainConfig

    d = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="mismatch",
        description="MisMatch semi-supervised segmentation from a few labelled slices (Xu et al., MIDL 2022).")
    parser.add_argument("--version", action="version", version=f"mismatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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
    t.add_argument("--steps", type=_positive_int, help=f"optimiser steps (default {d.steps})")
    t.add_argument("--width", type=_positive_int, help=f"channels of the first encoder block (default {d.width})")
    t.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help="labelled slices per step; under torchrun the global batch, split evenly over the "
                        "processes (a multiple of their number)")
    t.add_argument("--unlabelled-batch-size", type=int, default=0, help="unlabelled slices per step "
                                                                        "(default: --batch-size; global too)")
    t.add_argument("--patch-size", type=int, help=f"square patch side; 0 = whole slices (default {d.patch_size})")
    t.add_argument("--lr", type=float, help=f"AdamW learning rate (default {d.lr})")
    t.add_argument("--alpha", type=float, default=d.alpha, help="consistency weight (default 0.002)")
    t.add_argument("--alpha-rampup", type=float, default=d.alpha_rampup,
                   help="fraction of training over which alpha ramps up (0 = constant)")
    t.add_argument("--stop-gradient", choices=["none", "one-sided"], default=d.stop_gradient,
                   help="consistency gradient: to both decoders (none, default) or only the positive one")
    t.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE", type=_method_option,
                   help="a setting of the chosen method, e.g. ema_decay=0.999 (mt), threshold=0.9 (fixmatch), "
                        "consistency_weight=0.3 (mt, cct); repeat for several; see docs/methods.md")
    t.add_argument("--pasb-side", choices=["factorised", "paper", "compact"], default=d.pasb_side,
                   help="PASB side branch: factorised (default; the first atrous conv as 1x1 then atrous 3x3), "
                        "paper (full-rank atrous convs) or compact (the authors' public code)")
    t.add_argument("--snapshots", type=_positive_int, default=d.snapshots,
                   help="keep the last K snapshots and average them at inference (paper: 10)")
    t.add_argument("--labelled-slices", type=_slices, metavar="LIST",
                   help="slices that count as labelled even if all background, e.g. 3,7,10-12")
    t.add_argument("--empty-slices", type=_slices, metavar="LIST",
                   help="slices you checked and found without the structure (labelled as all background), "
                        "e.g. 0-4,40: they teach the model where the structure is not")
    t.add_argument("--axis", choices=["k", "j", "i"], default="k", help="slice axis of the image grid (default k)")
    t.add_argument("--hu-window", type=_window, metavar="LOW,HIGH", help="CT: clip to this HU window first")
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
    t.add_argument("--classes", metavar="CLASSES.json", help="class values, names and colours")
    t.add_argument("--init", metavar="MODEL_DIR", help="start from this model (fine-tune after corrections)")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    _common_device(t)

    s = sub.add_parser("segment", help="segment a whole volume with a trained model")
    s.add_argument("images", nargs="+", metavar="IMAGE")
    s.add_argument("--model", required=True, metavar="MODEL_DIR")
    s.add_argument("--out", required=True, metavar="LABELMAP", help="label map to write (input grid)")
    s.add_argument("--confidence", metavar="FILE", help="write the probability of the predicted class")
    s.add_argument("--disagreement", metavar="FILE", help="write the disagreement between the two decoders")
    s.add_argument("--report", metavar="JSON", help="write per-slice uncertainty ranking (and evaluation)")
    s.add_argument("--labels", metavar="LABELS",
                   help="the painted label map this model was trained from (same volume): the painted slices are "
                        "kept as painted, and the model's prediction on the other slices is combined with what "
                        "the painted slices imply (where the structure can be)")
    s.add_argument("--labelled-slices", type=_slices, metavar="LIST",
                   help="with --labels: slices that count as labelled even if all background")
    s.add_argument("--empty-slices", type=_slices, metavar="LIST",
                   help="with --labels: slices checked and found without the structure")
    s.add_argument("--truth", metavar="LABELS", help="evaluate against this label map (for --report)")
    s.add_argument("--eval-slices", type=_slices, metavar="LIST", help="slices to evaluate (default: all)")
    s.add_argument("--batch-size", type=_positive_int, default=8, help="slices per batch")
    _common_device(s)

    e = sub.add_parser("evaluate", help="overlap and calibration of a segmentation against a truth")
    e.add_argument("--prediction", required=True, metavar="LABELMAP")
    e.add_argument("--truth", required=True, metavar="LABELMAP")
    e.add_argument("--confidence", metavar="FILE", help="confidence volume from 'mismatch segment'")
    e.add_argument("--slices", type=_slices, metavar="LIST", help="evaluate only these slices")
    e.add_argument("--axis", choices=["k", "j", "i"], default="k")
    e.add_argument("--bins", type=_positive_int, default=15, help="calibration bins (default 15)")
    e.add_argument("--diagram", metavar="PNG", help="write the reliability diagram")
    e.add_argument("--out", metavar="JSON", help="also write the JSON here")

    m = sub.add_parser("demo", help="the real-data demo: chest CT lungs from 3 labelled slices")
    m.add_argument("--out", default="demo-output", metavar="DIR")
    m.add_argument("--steps", type=_positive_int, default=None, help="training steps per model")
    m.add_argument("--width", type=_positive_int, default=None)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--device", default="auto")

    b = sub.add_parser(
        "benchmark", help="the paper's comparisons (Table 1, ECE, Fig. 4/5, alpha sweep, ablation) on real data",
        description="Train every selected method with the same budget on the same labelled slices of each data "
                    "set, for each labelled-slice count and seed, evaluate on disjoint test slices, and write "
                    "results.md, the figures and runs.json (every run's settings and metrics) into --out. "
                    "Finished runs in --out/runs.json are kept: running again resumes.")
    b.add_argument("--out", default="benchmark-output", metavar="DIR")
    b.add_argument("--datasets", nargs="+", metavar="NAME",
                   help="ctchest-lungs, ctchest-lungs-lr, mni152-gm, pyradiomics-brain1, pyradiomics-breast1, "
                        "synthetic-vessels, synthetic-vessels-lung (default: ctchest-lungs)")
    b.add_argument("--labelled", nargs="+", type=_positive_int, metavar="N",
                   help="labelled-slice counts (default 3 5 10; --quick: 3)")
    b.add_argument("--seeds", type=_positive_int, help="draws of the labelled slices per count (default 3)")
    b.add_argument("--methods", nargs="+", metavar="NAME", help="methods to compare (default: all)")
    b.add_argument("--alpha-sweep", nargs="*", type=float, metavar="ALPHA",
                   help="MisMatch consistency weights to sweep (default 0 0.0005 0.001 0.002 0.004; none: off)")
    b.add_argument("--preset", choices=sorted(PRESETS), help="the training budget and recipe of every learned "
                   "method (default: default, what a user gets; paper: the paper's recipe); the options below "
                   "override it")
    b.add_argument("--steps", type=_positive_int, help="training steps per run (default: the preset's; --quick: 60)")
    b.add_argument("--width", type=_positive_int, help="channels of the first block (default: the preset's; "
                   "--quick: 8)")
    b.add_argument("--batch-size", type=_positive_int)
    b.add_argument("--patch-size", type=int, help="square training patches, 0 = whole slices")
    b.add_argument("--lr", type=float)
    b.add_argument("--n-test", type=_positive_int, help="test slices per draw (default: every unlabelled "
                   "slice)")
    b.add_argument("--data-dir", help="folder with data that is not installed as a package (see docs)")
    b.add_argument("--devices", default="auto",
                   help="comma-separated devices, one run at a time on each (e.g. cuda:0,cuda:1; 'all' = every "
                        "GPU; default: every GPU when there are several, else the best device)")
    b.add_argument("--quick", action="store_true", help="minutes on a 2-core CPU: width 8, 60 steps, 1 data set")
    b.add_argument("--report-only", action="store_true", help="rebuild results.md and the figures from runs.json")
    return parser


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
    from .train import preset_config, stop_on_signals, train_files

    config = preset_config(
        args.preset, args.method, steps=args.steps, width=args.width, batch_size=args.batch_size,
        unlabelled_batch_size=args.unlabelled_batch_size, patch_size=args.patch_size, lr=args.lr,
        alpha=args.alpha, alpha_rampup=args.alpha_rampup, stop_gradient=args.stop_gradient,
        pasb_side=args.pasb_side, method_options=dict(args.method_option),
        snapshots=args.snapshots, seed=args.seed, axis=args.axis, hu_window=args.hu_window, amp=not args.no_amp,
        checkpoint_every=args.checkpoint_every)
    if config.patch_size < 0 or (0 < config.patch_size < 16):
        raise UserError(f"--patch-size {args.patch_size}: use 0 (whole slices) or at least 16")
    unlabelled = [case.split(",") for case in args.unlabelled]
    reporter = _reporter(args, quiet=not ctx.is_main)
    with stop_on_signals({}) as stop:
        card = train_files(args.images, args.labels, args.out, config, unlabelled=unlabelled,
                           explicit_slices=(args.labelled_slices or []) + (args.empty_slices or []),
                           classes_path=args.classes,
                           init_model=args.init, device=str(ctx.device) if ctx.distributed else args.device,
                           resume=args.resume, reporter=reporter, stop=stop,
                           unlabelled_manifest=args.unlabelled_manifest, cache_volumes=args.cache_volumes,
                           cache_bytes=args.cache_mb * 2**20)
    losses = card["summary"]["final_losses"]
    reporter.end("completed", f"model written to {args.out}", final_losses=losses)
    if args.events != "-" and ctx.is_main:
        print(f"model written to {args.out} (final loss {losses.get('loss', float('nan')):.4f})")
    return 0


def cmd_segment(args) -> int:
    from .api import segment_files

    reporter = _reporter(args)
    summary = segment_files(args.images, args.model, args.out, confidence=args.confidence,
                            disagreement=args.disagreement, report=args.report, truth=args.truth,
                            eval_slices=args.eval_slices, batch_size=args.batch_size, device=args.device,
                            reporter=reporter, labels=args.labels,
                            explicit_slices=(args.labelled_slices or []) + (args.empty_slices or []))
    reporter.end("completed", f"segmentation written to {args.out}", **summary)
    if args.events != "-":
        print(f"segmentation written to {args.out} ({summary['seconds']:.1f} s)")
    return 0


def cmd_evaluate(args) -> int:
    from .api import evaluate_files

    result = evaluate_files(args.prediction, args.truth, confidence=args.confidence, slices=args.slices,
                            axis=args.axis, n_bins=args.bins, diagram=args.diagram)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, steps=args.steps, width=args.width, seed=args.seed, device=args.device)
    return 0


def cmd_benchmark(args) -> int:
    from .benchmark.runner import BenchmarkConfig, load_runs, run_benchmark, write_report

    if args.report_only:
        data = load_runs(args.out)
        if not data["runs"]:
            raise UserError(f"{args.out} holds no runs.json with runs; run the benchmark first")
        print(f"wrote {write_report(data, args.out)}")
        return 0
    options = {"datasets": args.datasets, "labelled": args.labelled, "seeds": args.seeds, "methods": args.methods,
               "steps": args.steps, "width": args.width, "batch_size": args.batch_size,
               "patch_size": args.patch_size, "lr": args.lr, "n_test": args.n_test, "data_dir": args.data_dir,
               "alpha_sweep": args.alpha_sweep, "devices": args.devices.split(","), "preset": args.preset}
    if args.quick:
        config = BenchmarkConfig.quick(**options)
    else:
        config = BenchmarkConfig(**{k: v for k, v in options.items() if v is not None})
    if config.patch_size is not None and (config.patch_size < 0 or 0 < config.patch_size < 16):
        raise UserError(f"--patch-size {config.patch_size}: use 0 (whole slices) or at least 16")
    run_benchmark(config, args.out)
    return 0


COMMANDS = {"train": cmd_train, "segment": cmd_segment, "evaluate": cmd_evaluate, "demo": cmd_demo,
            "benchmark": cmd_benchmark}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USER_ERROR
    from .device import tune_cpu_allocator

    tune_cpu_allocator()  # faster CPU training and inference; the numbers computed are the same
    try:
        status = COMMANDS[args.command](args)
        if getattr(args, "reporter", None) is not None:
            args.reporter.close()
        return status
    except UserError as exc:
        _final(args, "failed", str(exc))
        if not getattr(args, "silent", False):
            print(f"mismatch {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Cancelled as exc:
        _final(args, "cancelled", str(exc))
        if not getattr(args, "silent", False):
            print(f"mismatch {args.command}: cancelled: {exc}", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        _final(args, "cancelled", "interrupted")
        print(f"mismatch {args.command}: interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as exc:  # an engine bug or a system failure: keep the traceback for the report
        message = f"{type(exc).__name__}: {exc}"
        if "out of memory" in str(exc).lower():
            message += " (out of memory: use a smaller --batch-size, --patch-size or --width)"
        _final(args, "failed", message)
        traceback.print_exc()
        print(f"mismatch {args.command}: failed: {message}", file=sys.stderr)
        return 1


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
