"""``mismatch segment`` timed end to end, as users run it, beside the network alone (issue 14).

    python measurements/bench_segment.py [--lengths 4 28] [--size 512] [--full 300] [--width 16]
                                         [--methods mismatch unet] [--repeats 3] [--train-steps 30]
                                         [--threads N] [--device cpu|cuda] [--dir DIR] [--out FILE.json]

Writes synthetic CTs of ``size x size x L`` voxels for each length ``L`` (int16 NRRD, a body with two
lungs and noise, the volume ``measurements/bench_memory.py`` writes) with the left lung painted on five
slices, trains one model per method on the longest of them with ``mismatch train`` (``--train-steps``
steps at the default preset and ``--width``: a real model, so that the label map, the connectivity pass
and the files written are those of a real run; its accuracy is not the point), then runs, in a child
process each time, as a user does:

* ``bare``: ``mismatch segment CT --model M --out seg.nrrd --no-labels --device cpu`` (or ``--device cuda``):
  the label map of the network alone (without ``--no-labels`` the model folder's painted slices, those of the
  long volume it was trained on, would apply to that volume only, and the difference of the two lengths
  would count the painted slices' passes as slices)
* ``panel``: the same with ``--labels painted.nrrd --confidence --disagreement --report``, what the Slicer
  panel asks for.

Per slice = the difference of the wall times of the two lengths divided by the difference of the lengths
(the start-up, reading the model and the files, cancels out); start-up = the shorter run less its slices.
Each figure is the median over ``--repeats`` rounds (and the best round beside it: on a shared virtual
machine the host's load comes and goes), the runs of a round interleaved (so that a change of machine load
affects all of them alike). Beside it, the network alone (``bench_speed.time_inference``) at
batch 1 and at the batch the command uses. ``--full K`` also segments one ``size x size x K`` volume with
every output of the panel (MisMatch only), the whole-CT figure of the issue's target.

Not a test: the figures depend on the machine and on what else runs on it. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Trainer"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import write_ct, write_labels  # noqa: E402

MODES = ("bare", "panel")


def _env(threads: int | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "Trainer") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"bench_segment: {' '.join(cmd[2:4])} failed with exit status {done.returncode}")
    return seconds


def segment_command(work: Path, length: int, model: Path, mode: str, device: str = "cpu") -> list[str]:
    out = work / f"out-{model.name}-{length}"
    cmd = [sys.executable, "-m", "mismatch", "segment", str(work / f"ct{length}.nrrd"), "--model", str(model),
           "--out", str(out / "seg.nrrd"), "--device", device]
    if mode == "panel":
        cmd += ["--labels", str(work / f"painted{length}.nrrd"), "--confidence", str(out / "confidence.nrrd"),
                "--disagreement", str(out / "disagreement.nrrd"), "--report", str(out / "report.json")]
    else:   # the network alone (see "bare" above: the model's painted slices fit the long volume only)
        cmd += ["--no-labels"]
    return cmd


def network_only(methods, size: int, width: int, batch: int, repeats: int, device: str = "cpu") -> dict:
    """The networks alone, as the command runs them: float32 on the CPU, float16 autocast on CUDA."""
    import torch

    from bench_speed import time_inference
    from mismatch.allocator import tune_cpu_allocator

    dev = torch.device(device)
    if dev.type == "cpu":
        tune_cpu_allocator()
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    result = {}
    for b in sorted({1, batch}):
        times = time_inference(methods, size, width, dev, dtype, repeats, batch=b)
        result[b] = {m: round(times[m][0], 1) for m in methods}
    return result


def command_batch(size: int, device: str = "cpu") -> int:
    """The batch ``mismatch segment`` runs (its default --batch-size, 8, capped on the CPU as the engine caps it)."""
    from mismatch.inference import CPU_BATCH_PIXELS, batch_slices

    return batch_slices(8, size * size, CPU_BATCH_PIXELS if device == "cpu" else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs=2, default=[4, 28], metavar=("SHORT", "LONG"),
                   help="the two volume lengths whose difference gives the time per slice (default 4 28)")
    p.add_argument("--size", type=int, default=512, help="slice size in pixels (default 512)")
    p.add_argument("--full", type=int, default=0, metavar="K",
                   help="also segment one size x size x K volume with every panel output (MisMatch)")
    p.add_argument("--width", type=int, default=16, help="network width (default 16, the default preset's)")
    p.add_argument("--methods", nargs="+", default=["mismatch", "unet"])
    p.add_argument("--repeats", type=int, default=3, help="rounds of runs (default 3); the median is kept")
    p.add_argument("--train-steps", type=int, default=30, help="training steps of each model (default 30)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the children (default: unset)")
    p.add_argument("--device", default="cpu", help="--device of every command and of the network-only timing "
                                                    "(default cpu; cuda on a machine with an NVIDIA GPU)")
    p.add_argument("--dir", default=None, help="folder for the files (default: a temporary folder, removed)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="also write the figures as JSON")
    args = p.parse_args(argv)
    short, long_ = sorted(args.lengths)
    if short == long_:
        p.error("--lengths needs two different lengths")
    env = _env(args.threads)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-segment-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        lengths = [short, long_] + ([args.full] if args.full else [])
        for k in lengths:
            if not (work / f"ct{k}.nrrd").exists():
                write_ct(work / f"ct{k}.nrrd", (args.size, args.size, k))
                write_labels(work / f"painted{k}.nrrd", (args.size, args.size, k))
        models = {}
        for method in args.methods:
            models[method] = work / f"model-{method}"
            if not (models[method] / "model.json").exists():
                _run([sys.executable, "-m", "mismatch", "train", str(work / f"ct{long_}.nrrd"),
                      "--labels", str(work / f"painted{long_}.nrrd"), "--out", str(models[method]),
                      "--method", method, "--width", str(args.width), "--steps", str(args.train_steps),
                      "--device", args.device], env)
        walls = {(m, mode, k): [] for m in args.methods for mode in MODES for k in (short, long_)}
        for _ in range(args.repeats):
            for key in walls:
                method, mode, k = key
                walls[key].append(_run(segment_command(work, k, models[method], mode, args.device), env))
        rows = []
        for method in args.methods:
            for mode in MODES:
                per = [(b - a) / (long_ - short) for a, b in zip(walls[(method, mode, short)],
                                                                  walls[(method, mode, long_)])]
                ms = statistics.median(per) * 1000
                best = min(per) * 1000
                startup = statistics.median(walls[(method, mode, short)]) - short * ms / 1000
                rows.append({"method": method, "mode": mode, "ms_per_slice": round(ms, 1),
                             "best_ms_per_slice": round(best, 1),
                             "startup_s": round(startup, 2),
                             "walls_s": {str(k): [round(w, 2) for w in walls[(method, mode, k)]]
                                         for k in (short, long_)}})
        batch = command_batch(args.size, args.device)
        net = network_only(args.methods, args.size, args.width, batch, max(3, 2 * args.repeats + 1), args.device)
        full = None
        if args.full:
            method = "mismatch" if "mismatch" in models else args.methods[0]
            seconds = _run(segment_command(work, args.full, models[method], "panel", args.device), env)
            full = {"method": method, "slices": args.full, "seconds": round(seconds, 1)}
        import torch

        result = {
            "size": args.size, "lengths": [short, long_], "width": args.width, "repeats": args.repeats,
            "device": args.device, "command_batch": batch, "rows": rows, "network_only_ms": {str(b): v for b, v in net.items()},
            "full": full,
            "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} logical CPUs, "
                       f"Python {platform.python_version()}, torch {torch.__version__}"
                       + (f", {torch.cuda.get_device_name(0)}" if args.device.startswith("cuda") else ""),
            "command": "python measurements/bench_segment.py " + " ".join(
                shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        }
        print(f"# mismatch segment end to end: {args.size} x {args.size} slices, width {args.width}, "
              f"lengths {short} and {long_}, median of {args.repeats}; {result['machine']}")
        batches = " / ".join(f"batch {b}" for b in sorted(net))
        print("\n| network | outputs | end to end, ms / slice (median / best round) | start-up, s | network alone, "
              f"ms / slice ({batches}) |\n|---|---|---|---|---|")
        for r in rows:
            alone = " / ".join(f"{net[b][r['method']]:.1f}" for b in sorted(net))
            outputs = "label map" if r["mode"] == "bare" else "panel (--labels, confidence, disagreement, report)"
            print(f"| {r['method']} | {outputs} | {r['ms_per_slice']:.1f} / {r['best_ms_per_slice']:.1f} | "
                  f"{r['startup_s']:.2f} | {alone} |")
        if "mismatch" in args.methods and "unet" in args.methods:
            for mode in MODES:
                a = next(r for r in rows if r["method"] == "mismatch" and r["mode"] == mode)
                b = next(r for r in rows if r["method"] == "unet" and r["mode"] == mode)
                result[f"ratio_{mode}"] = round(a["ms_per_slice"] / b["ms_per_slice"], 2)
                print(f"\nMisMatch / U-Net end to end ({mode}): {result[f'ratio_{mode}']:.2f}")
        if full:
            print(f"\n{args.size} x {args.size} x {args.full} with every panel output ({full['method']}): "
                  f"{full['seconds']:.1f} s wall")
        print(f"\ncommand: {result['command']}")
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        return 0
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
