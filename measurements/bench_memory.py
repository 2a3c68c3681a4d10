"""Peak memory (RSS) of ``mismatch segment`` on a synthetic volume of a given size (issue 10, item 7).

    python measurements/bench_memory.py [--size I J K] [--outputs all|labels] [--labels] [--width 16]
                                      [--batch-size 8] [--threads N] [--dir DIR] [--keep] [--json FILE]

Writes into a temporary folder (``--dir``: where; it needs about 16 bytes a voxel of free disk with every
output) a synthetic CT of ``I x J x K`` voxels (int16 NRRD, written a slice at a time, so this process never
holds the volume), a model folder with random weights (MisMatch, ``--width``; the same network and card a
trained model has, so the memory is that of a real run), with ``--labels`` a painted label map (a disc on
five slices; ``segment --labels`` then uses the painted slices' prior and keeps the parts connected to them,
what the Slicer panel does), and then runs

    python -m mismatch segment IMAGE --model MODEL --out seg.nrrd [--confidence conf.nrrd
        --disagreement dis.nrrd --report report.json] [--labels labels.nrrd] --device cpu

in a child process. The child's peak resident set size comes from ``resource.getrusage(RUSAGE_CHILDREN)``
(this process starts no other child), so it counts everything ``mismatch segment`` holds: Python, torch,
the volumes, SimpleITK's copies when the files are written. Prints the figure, the volume size and the
exact command; ``--json`` also writes them to a file. ``--outputs labels`` asks for the label map only
(no ``--confidence``, ``--disagreement``, ``--report``).

Not a test: the figure is a fixed part (Python, torch, the network's feature maps for one batch of slices)
plus a part that grows with the volume (at the peak about 12.5 bytes a voxel with ``--labels``, less
without; see docs/benchmarks.md), and depends a little on the platform (glibc, the torch build).
Unix only (the ``resource`` module).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Trainer"))

SPACING = (0.7, 0.7, 1.5)   # mm, I J K
PAINTED = (0.2, 0.35, 0.5, 0.65, 0.8)   # painted slices, as fractions of K


def _nrrd_header(size, type_name: str) -> bytes:
    i, j, k = size
    sx, sy, sz = SPACING
    return ("NRRD0004\n"
            f"type: {type_name}\ndimension: 3\nspace: left-posterior-superior\nsizes: {i} {j} {k}\n"
            f"space directions: ({sx},0,0) (0,{sy},0) (0,0,{sz})\nkinds: domain domain domain\n"
            "endian: little\nencoding: raw\nspace origin: (-180,-180,-400)\n\n").encode("ascii")


def _disc(j: int, i: int, cy: float, cx: float, r: float):
    import numpy as np

    yy, xx = np.ogrid[:j, :i]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2


def write_ct(path: Path, size, seed: int = 0) -> None:
    """A CT-like int16 volume: air around a body (soft tissue) holding two dark lungs, with noise."""
    import numpy as np

    i, j, k = size
    rng = np.random.default_rng(seed)
    body = _disc(j, i, j / 2, i / 2, 0.45 * min(i, j))
    lungs = _disc(j, i, j / 2, 0.32 * i, 0.15 * min(i, j)) | _disc(j, i, j / 2, 0.68 * i, 0.15 * min(i, j))
    base = np.where(body, 40, -1000).astype(np.int16)
    base[lungs] = -850
    with open(path, "wb") as f:
        f.write(_nrrd_header(size, "short"))
        for _ in range(k):
            noise = rng.normal(0, 30, (j, i)).astype(np.int16)
            f.write((base + noise).astype("<i2").tobytes())


def write_labels(path: Path, size) -> None:
    """The left lung painted on the :data:`PAINTED` slices; every other slice 0."""
    import numpy as np

    i, j, k = size
    lung = _disc(j, i, j / 2, 0.32 * i, 0.15 * min(i, j)).astype(np.uint8)
    painted = {min(k - 1, int(round(f * (k - 1)))) for f in PAINTED}
    empty = np.zeros((j, i), np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(_nrrd_header(size, "uchar"))
        for s in range(k):
            f.write(lung.tobytes() if s in painted else empty)


def write_model(folder: Path, width: int, seed: int = 0) -> None:
    """A MisMatch model folder with random weights and the card ``mismatch train`` writes."""
    import torch

    from mismatch.modelfile import save_model
    from mismatch.models import build_model
    from mismatch.prior import PriorSettings

    torch.manual_seed(seed)
    net = build_model("mismatch", in_channels=1, num_classes=2, width=width)
    save_model(folder, [net.state_dict()], {
        "architecture": net.config.to_dict(),
        "classes": [{"value": 1, "name": "lung", "color": [0.8, 0.4, 0.3]}],
        "channels": [{"name": "ct.nrrd"}],
        "normalisation": {"method": "zscore", "hu_window": None},
        "slice_axis": "k",
        "prior": PriorSettings().to_dict(),
        "summary": {"labelled_slices": []},
    })


def peak_rss_bytes_of_children() -> int:
    """Peak RSS of the waited-for children (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", nargs=3, type=int, default=[512, 512, 600], metavar=("I", "J", "K"),
                   help="volume size in voxels, I J K (default 512 512 600)")
    p.add_argument("--outputs", choices=["all", "labels"], default="all",
                   help="all: --out, --confidence, --disagreement and --report (default); labels: --out only")
    p.add_argument("--labels", action="store_true", help="segment with a painted label map (--labels)")
    p.add_argument("--width", type=int, default=16, help="network width (default 16, the default preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="segment --batch-size (default: the command's)")
    p.add_argument("--threads", type=int, default=None, help="segment --threads (default: the command's)")
    p.add_argument("--dir", default=None, help="folder for the files (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the files")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    args = p.parse_args(argv)

    size = tuple(args.size)
    work = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=args.dir))
    try:
        image, labels, model = work / "ct.nrrd", work / "labels.nrrd", work / "model"
        write_ct(image, size)
        write_model(model, args.width)
        cmd = [sys.executable, "-m", "mismatch", "segment", str(image), "--model", str(model),
               "--out", str(work / "seg.nrrd"), "--device", "cpu"]
        if args.outputs == "all":
            cmd += ["--confidence", str(work / "conf.nrrd"), "--disagreement", str(work / "dis.nrrd"),
                    "--report", str(work / "report.json")]
        if args.labels:
            write_labels(labels, size)
            cmd += ["--labels", str(labels)]
        if args.batch_size:
            cmd += ["--batch-size", str(args.batch_size)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT / "Trainer") + os.pathsep + env.get("PYTHONPATH", "")
        t0 = time.monotonic()
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seconds = time.monotonic() - t0
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            print(f"bench_memory: mismatch segment failed with exit status {done.returncode}", file=sys.stderr)
            return 1
        peak = peak_rss_bytes_of_children()
        voxels = size[0] * size[1] * size[2]
        result = {
            "size": list(size), "voxels": voxels, "outputs": args.outputs, "labels": args.labels,
            "width": args.width, "peak_rss_bytes": peak, "peak_rss_gb": round(peak / 1e9, 3),
            "peak_rss_gib": round(peak / 2**30, 3), "bytes_per_voxel": round(peak / voxels, 2),
            "seconds": round(seconds, 1), "machine": f"{platform.machine()} {platform.system()}, "
            f"{os.cpu_count()} logical CPUs, Python {platform.python_version()}",
            "command": " ".join(["python"] + [shlex.quote(c) for c in cmd[1:]]).replace(str(work), "$WORK"),
            "benchmark_command": "python measurements/bench_memory.py " + " ".join(
                shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        }
        print(f"peak RSS of mismatch segment: {peak / 1e9:.3f} GB ({peak / 2**30:.3f} GiB, "
              f"{peak / voxels:.1f} bytes a voxel) for {size[0]} x {size[1]} x {size[2]} voxels, "
              f"outputs: {args.outputs}{', with --labels' if args.labels else ''}; {seconds:.1f} s")
        print(f"command: {result['command']}")
        print(f"benchmark: {result['benchmark_command']}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        return 0
    finally:
        if args.keep:
            print(f"files kept in {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
