"""Where MisMatch's inference time goes beside the U-Net's: each part of the two networks, and what a 3 x 3
convolution costs by its number of output channels.

    python measurements/bench_decoders.py [--size 512] [--width 16] [--threads 2] [--out FILE.json]

Times, at batch 1 in channels-last (what ``mismatch segment`` runs on a CPU), the encoder and every decoder of
the default-width U-Net and MisMatch (forward hooks, median of the timed runs after warm-up), the whole
networks and their ratio, and 3 x 3 convolutions from the finest decoder stage's merged input (2 x width
channels) to 8, 16, 24, 32 and 48 output channels. Prints a Markdown table. Not a test: the figures depend on
the machine; docs/benchmarks.md names the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Trainer"))

from mismatch.allocator import tune_cpu_allocator  # noqa: E402
from mismatch.models import build_model  # noqa: E402


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def parts_ms(net: torch.nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms of the encoder and of each decoder over ``repeats`` forward passes (forward hooks)."""
    samples: dict[str, list[float]] = {}
    started: dict[str, float] = {}
    parts = {"encoder": net.encoder, **{f"decoder {i} ({d.kind})": d for i, d in enumerate(net.decoders)}}

    def start(name):
        return lambda module, inputs: started.__setitem__(name, time.perf_counter())

    def stop(name):
        return lambda module, inputs, output: samples.setdefault(name, []).append(
            (time.perf_counter() - started[name]) * 1000)

    hooks = []
    for name, module in parts.items():
        hooks.append(module.register_forward_pre_hook(start(name)))
        hooks.append(module.register_forward_hook(stop(name)))
    try:
        for _ in range(2):
            net(x)
        samples.clear()
        for _ in range(repeats):
            net(x)
    finally:
        for h in hooks:
            h.remove()
    return {name: statistics.median(v) for name, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512, help="slice size in pixels (square)")
    ap.add_argument("--width", type=int, default=16, help="the networks' width (the default preset's: 16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--out", help="also write the figures as JSON")
    args = ap.parse_args(argv)

    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(1, 1, args.size, args.size).contiguous(memory_format=cl)
    nets = {name: build_model(name, width=args.width).eval().to(memory_format=cl) for name in ("unet", "mismatch")}
    result: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                                "torch": torch.__version__},
                    "size": args.size, "width": args.width, "networks": {}, "conv3x3": {}}
    with torch.inference_mode():
        for name, net in nets.items():
            whole = median_ms(lambda net=net: net(x), args.repeats)
            result["networks"][name] = {"whole": whole, **parts_ms(net, x, args.repeats)}
        c_in = 2 * args.width
        merged = torch.randn(1, c_in, args.size, args.size).contiguous(memory_format=cl)
        for c_out in (8, 16, 24, 32, 48):
            w = torch.randn(c_out, c_in, 3, 3).contiguous(memory_format=cl)
            b = torch.randn(c_out)
            result["conv3x3"][c_out] = median_ms(lambda w=w, b=b: F.conv2d(merged, w, b, padding=1), args.repeats)

    print(f"{args.size} x {args.size}, width {args.width}, batch 1, channels-last, {args.threads} threads, "
          f"torch {torch.__version__}\n")
    print("| network | part | ms / slice |\n|---|---|---:|")
    for name, parts in result["networks"].items():
        for part, ms in parts.items():
            print(f"| {name} | {part} | {ms:.1f} |")
    ratio = result["networks"]["mismatch"]["whole"] / result["networks"]["unet"]["whole"]
    result["ratio"] = ratio
    print(f"\nratio MisMatch / U-Net (whole networks): {ratio:.2f}\n")
    print(f"| 3 x 3 convolution, {c_in} channels in, out | ms |\n|---:|---:|")
    for c_out, ms in result["conv3x3"].items():
        print(f"| {c_out} | {ms:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
