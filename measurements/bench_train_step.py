"""One training step at the default recipe, with the instance normalisation's own channels-last backward
against torch's ``GroupNorm`` backward, the two timed in turn.

    python measurements/bench_train_step.py [--methods mismatch unet-strong] [--repeats 15] [--out FILE.json]

Builds each method as ``mismatch train`` does at its defaults (``TrainConfig()``: width, patch size, batch
sizes, the method's loss and augmentation), twice from the same seed: once as the engine builds it (its
``InstanceNorm`` modules take :class:`mismatch.models.blocks._ChannelsLastInstanceNorm`'s backward on a CPU in
channels-last) and once with every one of them replaced by a plain ``torch.nn.GroupNorm`` holding the same
parameters. Random patches stand in for a volume (the step's cost does not depend on the pixels). Steps of
the two run alternately (so that a change of machine load affects both alike) after 3 warm-up steps each;
prints the median seconds per step of each and their ratio. CPU only: on a GPU the engine runs torch's own
normalisation. Not a test: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Trainer"))


def _with_torch_norm(module):
    """``module`` with every ``InstanceNorm`` replaced by a ``torch.nn.GroupNorm`` of the same parameters."""
    import torch

    from mismatch.models.blocks import InstanceNorm

    for name, child in module.named_children():
        if isinstance(child, InstanceNorm):
            plain = torch.nn.GroupNorm(child.num_groups, child.num_channels, eps=child.eps)
            plain.load_state_dict(child.state_dict())
            setattr(module, name, plain)
        else:
            _with_torch_norm(child)
    return module


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["mismatch", "unet-strong"])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    from mismatch.cli import configure_threads

    configure_threads(None)
    import torch

    from mismatch.methods import TrainingBatch
    from mismatch.models import ArchitectureConfig, SegmentationNetwork
    from mismatch.train import TrainConfig, build_method

    cl = torch.channels_last
    results = {}
    for name in args.methods:
        config = TrainConfig(method=name)
        method = build_method(config)
        size, bl = config.patch_size, config.batch_size
        bu = config.unlabelled_batch_size or bl
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(bl, 1, size, size, generator=gen).contiguous(memory_format=cl)
        y = (torch.rand(bl, size, size, generator=gen) > 0.7).long()
        xu = torch.randn(bu, 1, size, size, generator=gen).contiguous(memory_format=cl)
        runs = {}
        for variant in ("own backward", "torch's GroupNorm"):
            torch.manual_seed(config.seed)
            net = SegmentationNetwork(ArchitectureConfig(name=method.architecture, width=config.width))
            if variant != "own backward":
                net = _with_torch_norm(net)
            net = net.to(memory_format=cl)
            runs[variant] = (net, torch.optim.AdamW(net.parameters(), lr=config.lr), [])

        def step(variant, i):
            net, opt, _ = runs[variant]
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss, _ = method.loss(net, TrainingBatch(x, y, xu if method.uses_unlabelled else None,
                                                     i, config.steps))
            loss.backward()
            opt.step()
            return time.perf_counter() - t

        for i in range(3):
            for variant in runs:
                step(variant, i)
        for i in range(args.repeats):
            for variant in runs:
                runs[variant][2].append(step(variant, config.steps // 2 + i))
        med = {v: statistics.median(r[2]) for v, r in runs.items()}
        own, plain = med["own backward"], med["torch's GroupNorm"]
        unlabelled = bu if method.uses_unlabelled else 0
        results[name] = {"seconds_per_step": med, "ratio": own / plain, "width": config.width,
                         "patch_size": size, "batch": [bl, unlabelled]}
        batch = f"{bl} labelled" + (f" + {unlabelled} unlabelled" if unlabelled else "")
        print(f"{name}: {own:.3f} s a step with the own backward, {plain:.3f} s with torch's GroupNorm "
              f"(ratio {own / plain:.2f}; {batch} patches of {size} x {size}, width {config.width}, "
              f"median of {args.repeats})", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": " ".join(["python measurements/bench_train_step.py",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "machine": {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "python": platform.python_version()},
            "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
