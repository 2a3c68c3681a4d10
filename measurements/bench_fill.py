"""``mismatch fill`` timed as a user runs it: the painted slices alone, on a whole CT.

    python measurements/bench_fill.py [--size 512] [--length 300] [--repeats 3] [--threads N] [--out FILE.json]

Writes the synthetic CT of ``measurements/bench_memory.py`` (``size x size x length`` int16 NRRD, a body with
two lungs and noise, the left lung painted on five slices) and runs ``mismatch fill CT --labels painted.nrrd
--out filled.nrrd`` in a child process ``--repeats`` times: the wall time (start-up included, what a user
waits for) and the engine's own figure (its ``end`` event's ``seconds``: reading, the prior's passes and
writing). Median and best round. Not a test: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import write_ct, write_labels  # noqa: E402
from bench_segment import _env, _run  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--length", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)

    env = _env(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-fill-") as tmp:
        work = Path(tmp)
        size = (args.size, args.size, args.length)
        write_ct(work / "ct.nrrd", size)
        write_labels(work / "painted.nrrd", size)
        walls, engine = [], []
        for _ in range(args.repeats):
            events = work / "events.jsonl"
            walls.append(_run([sys.executable, "-m", "mismatch", "fill", str(work / "ct.nrrd"), "--labels",
                               str(work / "painted.nrrd"), "--out", str(work / "filled.nrrd"),
                               "--events", str(events)], env))
            end = [json.loads(line) for line in events.read_text().splitlines()][-1]
            engine.append(float(end["seconds"]))
    result = {"size": list(size), "repeats": args.repeats, "wall_seconds": walls, "engine_seconds": engine,
              "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine(),
                          "threads": args.threads}}
    print(f"mismatch fill, {args.size} x {args.size} x {args.length} CT, 5 painted slices: "
          f"{statistics.median(walls):.1f} s wall (best {min(walls):.1f}), of which the engine's own work "
          f"{statistics.median(engine):.1f} s (best {min(engine):.1f}); {args.repeats} rounds")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
