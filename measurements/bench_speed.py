"""Inference time per slice and training speed of the U-Net and MisMatch networks, and the time the sampler
takes to draw one step's batches from a 512 x 512 x 600 volume.

    python measurements/bench_speed.py [--device cpu|cuda] [--sizes 256 512] [--width 24] [--out FILE.json]

Prints a Markdown table of measured figures (median of several timed runs after warm-up). Not a test:
timings depend on the machine; the figures recorded in docs/benchmarks.md name the machine they came from.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Trainer"))

from mismatch.data import TwoStreamSampler  # noqa: E402
from mismatch.allocator import tune_cpu_allocator  # noqa: E402
from mismatch.device import resolve_device  # noqa: E402
from mismatch.methods import TrainingBatch, make_method  # noqa: E402
from mismatch.models import build_model, count_parameters  # noqa: E402


def cpu_bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_inference(names, size, width, device, dtype, repeats, batch=1):
    """Median ms per slice of each network, the networks timed in turn within every repeat (so that a
    change of machine load during the run affects them alike), after 2 warm-up passes each."""
    fmt = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    nets = {n: build_model(n, width=width).eval().to(device).to(memory_format=fmt) for n in names}
    x = torch.randn(batch, 1, size, size, device=device).contiguous(memory_format=fmt)
    ctx = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(device.type, enabled=False))
    times = {n: [] for n in names}
    with torch.inference_mode(), ctx:
        for i in range(repeats + 2):
            for name, net in nets.items():
                _sync(device)
                t = time.perf_counter()
                [torch.sigmoid(o) for o in net(x)]
                _sync(device)
                if i >= 2:
                    times[name].append((time.perf_counter() - t) / batch)
    return {n: (statistics.median(times[n]) * 1000, count_parameters(nets[n])) for n in names}


def time_training(name, size, width, device, steps, batch):
    torch.manual_seed(0)
    method = make_method(name)
    net = build_model(method.architecture, width=width).to(device)
    fmt = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    net = net.to(memory_format=fmt)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, size, size, device=device).contiguous(memory_format=fmt)
    y = (torch.rand(batch, size, size, device=device) > 0.7).long()
    xu = torch.randn(batch, 1, size, size, device=device).contiguous(memory_format=fmt)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    times = []
    for i in range(steps + 2):
        _sync(device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            loss, _ = method.loss(net, TrainingBatch(x, y, xu if method.uses_unlabelled else None, i, steps))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return 1.0 / statistics.median(times)


def time_sampler(patch, batch, repeats=20):
    """Median ms to draw one step's batches (``batch`` labelled + ``batch`` unlabelled ``patch``-pixel patches)
    from a 512 x 512 x 600 volume labelled on every 50th slice (a read-only broadcast view: no memory used;
    Testing/engine/test_data.py checks that the sampler copies none of it)."""
    import numpy as np

    plane = np.random.default_rng(0).standard_normal((1, 1, 512, 512)).astype(np.float32)
    mask = np.zeros((1, 512, 512), np.uint8)
    mask[0, 200:230, 300:320] = 1
    sampler = TwoStreamSampler([np.broadcast_to(plane, (1, 600, 512, 512))], np.broadcast_to(mask, (600, 512, 512)),
                               list(range(0, 600, 50)), patch_size=patch, seed=0)
    times = []
    for i in range(repeats + 2):
        t = time.perf_counter()
        sampler.labelled_batch(batch)
        sampler.unlabelled_batch(batch)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--width", type=int, default=24)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--train-size", type=int, default=176)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument("--default-allocator", action="store_true",
                   help="leave glibc's allocator as it is (the mismatch command tunes it, see device.py)")
    args = p.parse_args(argv)
    tuned = False if args.default_allocator else tune_cpu_allocator()
    device = resolve_device(args.device)
    dtypes = [torch.float32]
    if device.type == "cuda":
        dtypes += [torch.float16, torch.bfloat16]
    elif cpu_bf16_supported():
        dtypes.append(torch.bfloat16)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"# speed: torch {torch.__version__}, device {device} ({machine}), width {args.width}, "
          f"allocator {'tuned' if tuned else 'default'}")
    if device.type == "cpu" and not cpu_bf16_supported():
        print("(bf16 not measured: this CPU has no native bf16 instructions)")
    rows = []
    print("\n| network | params | slice | dtype | ms / slice |\n|---|---|---|---|---|")
    for size in args.sizes:
        for dtype in dtypes:
            per = {}
            measured = time_inference(("unet", "mismatch"), size, args.width, device, dtype, args.repeats)
            for name in ("unet", "mismatch"):
                ms, params = measured[name]
                per[name] = ms
                rows.append({"kind": "inference", "network": name, "size": size, "dtype": str(dtype).split(".")[-1],
                             "ms_per_slice": round(ms, 2), "parameters": params})
                print(f"| {name} | {params / 1e6:.2f} M | {size}x{size} | {str(dtype).split('.')[-1]} | {ms:.1f} |")
            print(f"| ratio mismatch / unet | | {size}x{size} | {str(dtype).split('.')[-1]} | "
                  f"{per['mismatch'] / per['unet']:.2f} |")
    print(f"\n| method | training steps / s ({args.train_batch} labelled + {args.train_batch} unlabelled "
          f"{args.train_size}x{args.train_size} patches) |\n|---|---|")
    for name in ("unet", "mismatch"):
        sps = time_training(name, args.train_size, args.width, device, args.train_steps, args.train_batch)
        rows.append({"kind": "training", "method": name, "steps_per_second": round(sps, 3),
                     "patch": args.train_size, "batch": args.train_batch})
        print(f"| {name} | {sps:.2f} |")
    ms = time_sampler(args.train_size, args.train_batch)
    rows.append({"kind": "sampler", "ms_per_step": round(ms, 2), "patch": args.train_size, "batch": args.train_batch,
                 "volume": "512x512x600"})
    print(f"\n| sampler: one step's batches from a 512x512x600 volume | ms |\n|---|---|\n| "
          f"{args.train_batch} + {args.train_batch} patches of {args.train_size}x{args.train_size} | {ms:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": str(device), "machine": machine, "allocator_tuned": tuned,
                                              "torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
