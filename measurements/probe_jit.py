"""Does TorchScript's inference path or torch.compile change MisMatch's time beside the U-Net's on a CPU?
(issue 14, a probe)

    python measurements/probe_jit.py [--size 512] [--width 16] [--threads 2] [--repeats 7] [--compile]
        [--out FILE.json]

Times, at batch 1 in channels-last (what ``mismatch segment`` runs on a CPU), the default-width U-Net and
MisMatch three ways: eager (what the engine runs), the traced network frozen (``torch.jit.freeze``), and
``torch.jit.optimize_for_inference`` (oneDNN layout and fusions), and with ``--compile`` ``torch.compile``
(inductor; needs a C++ compiler, and its compile time is reported apart); median ms of ``--repeats`` runs after two
warm-up runs, the ratios MisMatch / U-Net, and the largest difference of the outputs from eager. Prints one line
a network. Not a test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Trainer"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decoders import median_ms  # noqa: E402
from mismatch.allocator import tune_cpu_allocator  # noqa: E402
from mismatch.models import build_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--compile", action="store_true", help="also torch.compile (needs a C++ compiler)")
    ap.add_argument("--out", help="write the figures as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    x = torch.randn(1, 1, args.size, args.size).contiguous(memory_format=torch.channels_last)
    ways = ("eager", "frozen", "optimize_for_inference") + (("compile",) if args.compile else ())
    result: dict = {"machine": {"cpu": platform.machine(), "threads": args.threads, "torch": torch.__version__},
                    "size": args.size, "width": args.width, "ms": {}, "max_abs_difference": {}, "compile_seconds": {}}
    for name in ("unet", "mismatch"):
        net = build_model(name, width=args.width).eval().to(memory_format=torch.channels_last)
        with torch.no_grad():
            frozen = torch.jit.freeze(torch.jit.trace(net, x, strict=False).eval())
            optimized = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(net, x, strict=False).eval()))
            runs = dict(zip(ways, (net, frozen, optimized)))
            if args.compile:
                t0 = time.perf_counter()
                runs["compile"] = torch.compile(net)
                runs["compile"](x)
                result["compile_seconds"][name] = time.perf_counter() - t0
            result["ms"][name] = {way: median_ms(lambda f=f: f(x), args.repeats) for way, f in runs.items()}
            ref = net(x)
            result["max_abs_difference"][name] = {
                way: max(float((a - b).abs().max()) for a, b in zip(ref, f(x))) for way, f in runs.items()}
        print(name + ": " + ", ".join(f"{way} {ms:.1f} ms" for way, ms in result["ms"][name].items()), flush=True)
    result["ratio"] = {way: result["ms"]["mismatch"][way] / result["ms"]["unet"][way] for way in ways}
    print("ratio MisMatch / U-Net: " + ", ".join(f"{way} {r:.2f}" for way, r in result["ratio"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
