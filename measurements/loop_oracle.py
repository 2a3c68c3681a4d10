"""How good can the loop's next slice be? Every possible fourth slice tried, against evenly spaced slices (issue 12).

    python measurements/loop_oracle.py --dataset pyradiomics-brain1 [--seeds 0 1 2 3 4] [--start 3] [--stride 1]
                                       [--device cpu] [--out FILE.json]

Issue 12 asks the loop's suggestion to reach the IoU of evenly spaced slices with fewer labelled slices. This
script bounds what any suggestion can do in the loop's first round, as ``mismatch simulate --start-placement
even`` plays it: for each training seed it trains the first round on ``--start`` evenly spaced slices of the
structure (the README's advice), then, from that model and with the loop's warm-start settings and seeds,

* a warm round for **every** slice of the structure's extent not yet labelled (every ``--stride``-th one; the
  slices the engine's rankings suggest and the largest gap are always among them): the start plus that slice,
  scored on the whole volume the user ends with (``iou_volume``, the loop's figure). The best of them is the
  **oracle**: the fourth slice chosen with the true labels of the whole volume, which no ranking can beat
  (and, chosen as the best of many noisy rounds, an optimistic one);
* the ``even`` trajectory of the simulation: ``start + 1`` slices evenly placed anew, then ``start + 2`` from
  that model.

For every seed it records the IoU of every candidate and of the two even rounds, which slice each ranking
suggested and where it falls among the candidates. If the oracle stays below ``start + 2`` evenly spaced
slices, no way of choosing the next slice reaches that IoU with one slice fewer in that round. Resumes: a seed
already in ``--out`` is not run again. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Trainer"))


def run_seed(case, volume, config, seed: int, start: int, stride: int, device, log) -> dict:
    """One training seed: the first round, every candidate fourth slice, and the even trajectory."""
    from mismatch.benchmark.datasets import even_slices, extent
    from mismatch.benchmark.loop import largest_gap_slice, train_round
    from mismatch.benchmark.runner import AXIS_NAMES
    from mismatch.ranking import DEFAULT_RANKING

    axis = AXIS_NAMES[case.axis]
    n_slices = int(case.label.shape[case.axis])
    candidates = [int(s) for s in extent(case.label, case.axis)]
    first = even_slices(candidates, start, n_slices)
    t = time.monotonic()
    cfg = config.train_config("mismatch", seed=seed, axis=axis, checkpoint_every=10 ** 9)
    m0, state0 = train_round(case, volume, first, cfg, device, keep_scores=True)
    log(f"seed {seed}: first round {first}: IoU (volume) {m0['iou_volume']:.4f} ({time.monotonic() - t:.0f} s)")
    suggested = {k: v for k, v in (m0.get("suggestions") or {}).items() if v is not None}
    gap = largest_gap_slice(candidates, first)
    lo, hi = min(candidates), max(candidates)
    picks = {int(s) for s in suggested.values()} | ({gap} if gap is not None else set())
    pool = sorted(({s for s in range(lo, hi + 1) if (s - lo) % stride == 0} | picks) - set(first))
    n = start + 1
    warm = config.warm_config("mismatch", seed=seed * 1000 + n, axis=axis, checkpoint_every=10 ** 9)
    tried = {}
    for s in pool:
        t = time.monotonic()
        m, _ = train_round(case, volume, sorted(first + [s]), warm, device, init_state=state0)
        tried[str(s)] = {"iou_volume": m["iou_volume"], "iou": m["iou"], "train_seconds": m["train_seconds"]}
        log(f"seed {seed}: + slice {s}: IoU (volume) {m['iou_volume']:.4f} ({time.monotonic() - t:.0f} s)")
    even = {}
    state = state0
    for k in (n, n + 1):
        labelled = even_slices(candidates, k, n_slices)
        cfg_k = config.warm_config("mismatch", seed=seed * 1000 + k, axis=axis, checkpoint_every=10 ** 9)
        m, state = train_round(case, volume, labelled, cfg_k, device, init_state=state)
        even[str(k)] = {"slices": labelled, "iou_volume": m["iou_volume"], "iou": m["iou"]}
        log(f"seed {seed}: even {labelled}: IoU (volume) {m['iou_volume']:.4f}")
    order = sorted(tried, key=lambda s: -tried[s]["iou_volume"])   # best first (ties: the lower slice)
    best = order[0]
    return {"seed": seed, "first": first, "first_iou_volume": m0["iou_volume"], "candidates": tried,
            "first_slice_scores": m0["slice_scores"],
            "oracle": {"slice": int(best), "iou_volume": tried[best]["iou_volume"]},
            "suggested": {r: {"slice": int(s), "iou_volume": tried[str(s)]["iou_volume"],
                              "rank": order.index(str(s)) + 1} for r, s in suggested.items() if str(s) in tried},
            "default_ranking": DEFAULT_RANKING,
            "largest_gap": None if gap is None else {"slice": gap, "iou_volume": tried[str(gap)]["iou_volume"],
                                                     "rank": order.index(str(gap)) + 1},
            "even": even}


def summary(runs: list[dict], start: int) -> dict:
    """Means over the seeds, in IoU points (whole volume)."""
    def pts(values):
        values = [100 * v for v in values]
        return {"mean": round(statistics.mean(values), 2),
                "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0}

    n = start + 1
    out = {"seeds": len(runs), "first": pts([r["first_iou_volume"] for r in runs]),
           "oracle": pts([r["oracle"]["iou_volume"] for r in runs]),
           f"even_{n}": pts([r["even"][str(n)]["iou_volume"] for r in runs]),
           f"even_{n + 1}": pts([r["even"][str(n + 1)]["iou_volume"] for r in runs]),
           "oracle_at_least_even_next": sum(r["oracle"]["iou_volume"] >= r["even"][str(n + 1)]["iou_volume"]
                                            for r in runs),
           "oracle_at_least_even": sum(r["oracle"]["iou_volume"] >= r["even"][str(n)]["iou_volume"] for r in runs),
           "candidates": round(statistics.mean(len(r["candidates"]) for r in runs), 1)}
    default = runs[0]["default_ranking"]
    if all(default in r["suggested"] for r in runs):
        out["suggested"] = pts([r["suggested"][default]["iou_volume"] for r in runs])
        out["suggested_rank"] = [r["suggested"][default]["rank"] for r in runs]
    # every ranking of the engine (mismatch.ranking.RANKINGS): the fourth slice it would have picked
    out["rankings"] = {name: {**pts([r["suggested"][name]["iou_volume"] for r in runs]),
                              "rank": [r["suggested"][name]["rank"] for r in runs]}
                       for name in sorted(set().union(*(r["suggested"] for r in runs)))
                       if all(name in r["suggested"] for r in runs)}
    if all(r["largest_gap"] for r in runs):
        out["largest_gap"] = pts([r["largest_gap"]["iou_volume"] for r in runs])
        out["largest_gap_rank"] = [r["largest_gap"]["rank"] for r in runs]
    return out


def save(data: dict, start: int, out: Path | None) -> None:
    """The summary of the runs so far into ``data``, and ``data`` into ``out`` (replaced whole)."""
    data["summary"] = summary(data["runs"], start)
    if out:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="a data set of mismatch benchmark (e.g. pyradiomics-brain1)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--start", type=int, default=3, help="evenly spaced slices of the first round")
    p.add_argument("--stride", type=int, default=1, help="try every STRIDE-th slice of the extent")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="JSON file (resumed: seeds in it are not run again)")
    args = p.parse_args(argv)
    if args.stride < 1 or args.start < 1:
        p.error("--stride and --start must be at least 1")

    from mismatch.allocator import tune_cpu_allocator
    from mismatch.benchmark.datasets import load_dataset
    from mismatch.benchmark.loop import LoopConfig
    from mismatch.benchmark.runner import machine_description
    from mismatch.data import Normalisation
    from mismatch.device import resolve_device

    tune_cpu_allocator()
    config = LoopConfig(datasets=[args.dataset], methods=["mismatch"], start=[args.start],
                        start_placement="even", data_dir=args.data_dir, device=args.device)
    device = resolve_device(args.device)
    case = load_dataset(args.dataset, data_dir=args.data_dir)[0]
    volume = Normalisation(hu_window=case.window).apply(case.image)
    out = Path(args.out) if args.out else None
    data = json.loads(out.read_text()) if out and out.exists() else {"runs": []}
    done = {r["seed"] for r in data["runs"]}
    data.update({"dataset": args.dataset, "case": case.name, "start": args.start, "stride": args.stride,
                 "settings": config.settings(), "machine": machine_description(),
                 "command": "python measurements/loop_oracle.py " + " ".join(
                     shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))})
    for seed in args.seeds:
        if seed in done:
            continue
        data["runs"].append(run_seed(case, volume, config, seed, args.start, args.stride, device,
                                     lambda m: print(f"{args.dataset}: {m}", flush=True)))
        data["runs"].sort(key=lambda r: r["seed"])
        save(data, args.start, out)
    if data["runs"]:
        save(data, args.start, out)   # the summary of the file as this script makes it
        print(json.dumps({"dataset": args.dataset, **data["summary"]}, indent=1))
    print(f"# {platform.machine()} {platform.system()}, {os.cpu_count()} logical CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
