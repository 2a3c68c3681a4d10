"""Training step time on an idle and on a loaded CPU, with the engine's thread settings before and after
issue 10 (a fair share of a busy CPU).

    python measurements/bench_threads.py [--steps 20] [--warmup 3] [--load N] [--timeout 900] [--out FILE.json]
                                       [--settings before after] [--conditions idle loaded]

``before``: what the engine did until issue 10 -- torch's own defaults (as many threads as torch picks,
OpenMP's default active waiting), the environment cleared of ``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY`` and
``KMP_BLOCKTIME``. ``after``: what ``mismatch`` does now -- :func:`mismatch.cli.configure_threads` before
torch is imported (the physical cores, passive waiting) and :func:`mismatch.cli.apply_threads`.
``spin-N``: as ``after``, with ``GOMP_SPINCOUNT=N`` (GNU OpenMP, which Linux builds of torch use: a thread
that has finished its share spins about N iterations, roughly N / 100000 ms, before it sleeps; it overrides
the passive policy's 0 and the default 300000). ``loaded``: ``--load`` other processes (default: one per
physical core) spin in a pure-Python loop for the whole run, the way another CPU job (or 3D Slicer itself)
competes for the cores; ``idle``: nothing else started (close other programs first).

Each (setting, condition) pair is a fresh process that trains MisMatch with the default preset (what a
user gets: width 16, 128-pixel patches, batch 4 + 4) on a synthetic 32 x 160 x 160 volume for
``--warmup`` + ``--steps`` steps and times the steps after the warm-up. A run that takes longer than
``--timeout`` seconds is stopped and reported as such. Prints a Markdown table (median and mean seconds
per step, threads, the wait policy) and the command line that produced it; not a test (timings depend on
the machine and on what else runs on it). ``--worker`` is the per-run entry point.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Trainer"))

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")


def synthetic(seed: int = 0):
    """bench_scaling's synthetic volume, its first channel only (the same image: the second channel is
    drawn after it)."""
    from bench_scaling import synthetic as two_channels   # this folder is on sys.path when run as a script

    volumes, labels, labelled = two_channels(seed)
    return volumes[:1], labels, labelled


def worker(args) -> None:
    """One run in a fresh process: thread settings, then torch, then ``warmup + steps`` timed steps."""
    threads_wanted = None
    if args.setting == "after" or args.setting.startswith("spin-"):
        from mismatch.cli import configure_threads

        threads_wanted, _ = configure_threads()          # before torch is imported, as `mismatch` does
        if args.setting.startswith("spin-"):
            os.environ["GOMP_SPINCOUNT"] = args.setting.split("-", 1)[1]
    import torch

    if threads_wanted is not None:
        from mismatch.cli import apply_threads

        apply_threads(threads_wanted)
    from mismatch.allocator import tune_cpu_allocator
    from mismatch.events import Reporter
    from mismatch.train import fit, preset_config

    tune_cpu_allocator()
    times: list[float] = []

    class Clock(Reporter):
        def progress(self, phase, step, total, **kw):
            times.append(time.perf_counter())

    volumes, labels, labelled = synthetic()
    config = preset_config("default", "mismatch", steps=args.warmup + args.steps, checkpoint_every=0,
                           width=args.width, patch_size=args.patch_size)
    start = time.perf_counter()
    fit(volumes, labels, labelled, 2, config, reporter=Clock(progress_bar=False), device=torch.device("cpu"),
        checkpoint_seconds=None)
    per_step = [b - a for a, b in zip([start] + times[:-1], times)][args.warmup:]
    Path(args.worker).write_text(json.dumps({
        "setting": args.setting, "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(OpenMP default)")
        + (f", GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}" if "GOMP_SPINCOUNT" in os.environ else ""),
        "steps": len(per_step), "median_s": statistics.median(per_step), "mean_s": statistics.fmean(per_step),
        "total_s": sum(per_step)}))


def setting_name(text: str) -> str:
    """``before``, ``after`` or ``spin-N`` (N a whole number of spins)."""
    if text in ("before", "after") or (text.startswith("spin-") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: use before, after or spin-N (e.g. spin-10000)")


def start_load(n: int) -> list[subprocess.Popen]:
    """``n`` processes that keep one core each busy (pure Python, no OpenMP of their own)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
            for _ in range(n)]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def run_one(args, setting: str, condition: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env["PYTHONPATH"] = str(ROOT / "Trainer")
    load = start_load(args.load) if condition == "loaded" else []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, __file__, "--worker", str(out), "--setting", setting, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--width", str(args.width), "--patch-size", str(args.patch_size)]
            t0 = time.monotonic()
            try:
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                return {"setting": setting, "condition": condition, "timed_out": True,
                        "wall_s": round(time.monotonic() - t0, 1)}
            if done.returncode != 0:
                sys.exit(f"{setting} / {condition} failed:\n{done.stderr[-4000:]}")
            result = json.loads(out.read_text())
    finally:
        stop_load(load)
    result.update(condition=condition, load_processes=len(load), wall_s=round(time.monotonic() - t0, 1))
    return result


def table(results: list[dict]) -> str:
    lines = ["| setting | machine | threads | OpenMP wait policy | s / step (median) | s / step (mean) | "
             f"{results[0].get('steps', '')} steps, s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        machine = "idle" if r["condition"] == "idle" else f"loaded ({r['load_processes']} busy processes)"
        if r.get("timed_out"):
            lines.append(f"| {r['setting']} | {machine} | | | stopped after {r['wall_s']} s | | |")
            continue
        lines.append(f"| {r['setting']} | {machine} | {r['threads']} | {r['omp_wait_policy']} | "
                     f"{r['median_s']:.3f} | {r['mean_s']:.3f} | {r['total_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    from mismatch.cli import physical_cores

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per run (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--patch-size", type=int, default=128)
    p.add_argument("--load", type=int, default=physical_cores(),
                   help=f"busy processes on the loaded machine (default: the physical cores, {physical_cores()})")
    p.add_argument("--settings", nargs="+", default=["before", "after"], type=setting_name,
                   help="before, after, spin-N (default: before after)")
    p.add_argument("--conditions", nargs="+", default=["idle", "loaded"], choices=["idle", "loaded"])
    p.add_argument("--timeout", type=float, default=900, help="seconds before a run is stopped (default 900)")
    p.add_argument("--out", help="also write the results as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--setting", default="after", type=setting_name, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    results = [run_one(args, setting, condition) for condition in args.conditions for setting in args.settings]
    command = " ".join(["python", "measurements/bench_threads.py", *sys.argv[1:]])
    header = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
              f"{physical_cores()} physical cores; torch {torch.__version__}; Python {platform.python_version()}")
    print(f"{header}\n\n{table(results)}\n\ncommand: {command}")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": header, "command": command, "results": results}, indent=1)
                                  + "\n")


if __name__ == "__main__":
    main()
