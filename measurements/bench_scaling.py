"""Training throughput on 1, 2, ... processes (torchrun + DistributedDataParallel): steps/s and samples/s.

    python measurements/bench_scaling.py [--device cpu|cuda] [--procs 1 2] [--steps 30] [--warmup 5]
                                       [--width 8] [--patch-size 64] [--batch-size 4] [--mode strong|weak]
                                       [--threads N ...] [--out FILE.json]

Each configuration is a fresh ``python -m torch.distributed.run --standalone --nproc_per_node W`` launch of
this script as the ranks (``--worker``), training MisMatch with :func:`mismatch.train.fit` on synthetic data
(one 32 x 160 x 160 volume with a disc on 4 labelled slices, and an unlabelled volume); one process is the
plain run (no process group). The first ``--warmup`` steps are not timed. ``--mode strong`` keeps the
global batch (``--batch-size`` labelled + as many unlabelled slices) and splits it over the processes;
``--mode weak`` gives every process ``--batch-size`` + ``--batch-size``. On the CPU every process gets
``--threads`` torch threads (default: the cores divided by the processes; one value per ``--procs`` entry
to pair them, e.g. ``--procs 1 1 2 --threads 2 1 1``). Prints a Markdown table; not a test (timings depend
on the machine and on what else runs on it). The environment is passed on to the processes: on a shared
CPU, ``OMP_WAIT_POLICY=PASSIVE`` keeps OpenMP threads from spinning while they wait for each other.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Trainer"))


def synthetic(seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    k, j, i = 32, 160, 160
    yy, xx = np.mgrid[:j, :i]
    disc = ((yy - 80) ** 2 + (xx - 70) ** 2) < 40 ** 2
    image = (np.where(disc, 1.0, -1.0)[None] + rng.normal(0, 0.5, (k, j, i))).astype(np.float32)[None]
    labels = np.zeros((k, j, i), np.uint8)
    labelled = [4, 12, 20, 28]
    labels[labelled] = disc
    extra = rng.normal(0, 1, (1, k, j, i)).astype(np.float32)
    return [image, extra], labels, np.asarray(labelled)


def worker(args) -> None:
    """One rank: train, time the steps after warm-up, rank 0 writes the result."""
    import torch

    from mismatch import distributed
    from mismatch.allocator import tune_cpu_allocator
    from mismatch.device import resolve_device
    from mismatch.events import Reporter
    from mismatch.train import TrainConfig, fit

    tune_cpu_allocator()
    ctx = distributed.init_from_env(args.device)
    device = ctx.device if ctx.distributed else resolve_device(args.device)
    times: list[float] = []

    class Clock(Reporter):
        def progress(self, phase, step, total, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter())

    volumes, labels, labelled = synthetic()
    w = ctx.world_size
    batch = args.batch_size * (w if args.mode == "weak" else 1)
    config = TrainConfig(steps=args.warmup + args.steps, width=args.width, batch_size=batch, unlabelled_batch_size=batch,
                         patch_size=args.patch_size, checkpoint_every=0, seed=0)
    try:
        fit(volumes, labels, labelled, 2, config, reporter=Clock(progress_bar=False), device=device)
    finally:
        ctx.close()
    if ctx.is_main:
        seconds = times[-1] - times[args.warmup - 1] if args.warmup else times[-1] - times[0]
        steps = args.steps if args.warmup else args.steps - 1
        Path(args.worker).write_text(json.dumps({
            "processes": w, "threads": torch.get_num_threads(), "device": str(device),
            "global_batch": 2 * batch, "steps": steps, "seconds": seconds,
            "steps_per_s": steps / seconds, "samples_per_s": steps * 2 * batch / seconds}))


def launch(args, procs: int, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               __file__, "--worker", str(out), "--device", args.device, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--width", str(args.width), "--patch-size", str(args.patch_size),
               "--batch-size", str(args.batch_size), "--mode", args.mode]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "Trainer"))
        if args.device == "cpu":
            env["OMP_NUM_THREADS"] = str(threads or max(1, (os.cpu_count() or 1) // procs))
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{procs} process(es) failed:\n{done.stderr[-4000:]}")
        return json.loads(out.read_text())


def table(rows: list[dict], args) -> str:
    ones = [r for r in rows if r["processes"] == 1]
    ref = max(ones, key=lambda r: r["samples_per_s"]) if ones else rows[0]   # the best single process
    lines = ["| device | processes | threads / process | global batch (labelled + unlabelled) | steps/s | "
             "samples/s | samples/s vs best 1 process |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['processes']} | {r['threads']} | {r['global_batch']} | "
                     f"{r['steps_per_s']:.2f} | {r['samples_per_s']:.1f} | "
                     f"{r['samples_per_s'] / ref['samples_per_s']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--procs", type=int, nargs="+", help="process counts (default: CPU 1 2; CUDA 1..GPUs)")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--patch-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4, help="labelled slices per step (global, or per process "
                                                             "with --mode weak); as many unlabelled")
    p.add_argument("--mode", choices=["strong", "weak"], default="strong")
    p.add_argument("--threads", type=int, nargs="+",
                   help="CPU: torch threads per process, one value or one per --procs entry (default: cores / "
                        "processes)")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    if args.procs is None:
        args.procs = [1, 2] if args.device == "cpu" else list(range(1, torch.cuda.device_count() + 1))
    threads = args.threads or [None]
    if len(threads) not in (1, len(args.procs)):
        p.error("give one --threads value, or one per --procs entry")
    threads = threads * len(args.procs) if len(threads) == 1 else threads
    rows = []
    for procs, n in zip(args.procs, threads):
        rows.append(launch(args, procs, n))
        print(f"{procs} process(es): {rows[-1]['steps_per_s']:.2f} steps/s", file=sys.stderr)
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    print(f"\nMisMatch width {args.width}, {args.patch_size} x {args.patch_size} patches, {args.mode} scaling, "
          f"{args.steps} timed steps after {args.warmup}; {os.cpu_count()} CPU cores ({cpu})"
          + (f", {gpu}" if gpu else "") + f"; torch {torch.__version__}"
          + (f"; OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}" if os.environ.get("OMP_WAIT_POLICY") else "")
          + "\n")
    print(table(rows, args))
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "worker"},
                                              "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
