"""The annotate loop with ``mismatch fill`` alone (no network): paint, fill, paint the slice the fill's report
suggests, fill again; beside the MisMatch loop that ``mismatch simulate`` recorded on the same draws.

    python measurements/loop_fill.py --loop docs/benchmark/loop-k3-gm-10 [--loop DIR ...] [--out FILE.json]

For each ``--loop`` folder (a ``mismatch simulate`` output: its data set, start count K0, seeds, policies and
rounds), the same trajectories are played with the fill in the network's place: round 0 the same K0 slices
(``draw_split`` with the seed, or evenly spaced for ``even``), then one slice a round by the same policy
(``suggested``: the first slice of the fill's own report, ``mismatch fill --report``, the gap ranking from the
filled structure; ``even``, ``random``, ``largest-gap`` as the simulator's), up to the folder's largest count.
Each round records the whole volume's IoU (the painted slices as painted, the others as filled: the
simulator's ``iou_volume``) and the seconds of the fill. Prints, per data set and policy, the IoU at each count
beside the recorded MisMatch round's, and the painted slices needed to reach 95 % of the folder's reference.
No training: seconds a round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Trainer"))

from mismatch.benchmark.classical import labelled_slices_only  # noqa: E402
from mismatch.benchmark.datasets import draw_split, even_slices, extent, load_dataset  # noqa: E402
from mismatch.benchmark.loop import next_labelled  # noqa: E402
from mismatch.benchmark.runner import AXIS_NAMES  # noqa: E402
from mismatch.data import Normalisation  # noqa: E402
from mismatch.fill import next_slices  # noqa: E402
from mismatch.metrics import evaluate_arrays  # noqa: E402
from mismatch.prior import PriorSettings, SlicePrior  # noqa: E402


def fill_round(case, volume, labelled) -> dict:
    lab = np.asarray(sorted(int(s) for s in labelled), dtype=np.int64)
    t0 = time.monotonic()
    sparse = labelled_slices_only(case.label, lab, case.axis)
    prior = SlicePrior(sparse, lab, case.axis, case.spacing, len(case.classes) + 1, PriorSettings(), image=volume[0])
    filled = prior.label_map(case.label.shape)
    seconds = time.monotonic() - t0
    whole = evaluate_arrays(filled, case.label, axis=case.axis, classes=list(case.classes))["iou"]
    ranked = next_slices(filled, AXIS_NAMES[case.axis], lab.tolist(), prior)["uncertain_slices"]
    return {"iou_volume": whole, "seconds": round(seconds, 3),
            "suggestions": {"gap": int(ranked[0]["slice"]) if ranked else None}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loop", action="append", required=True, help="a mismatch simulate output folder")
    p.add_argument("--data-dir", default=".data")
    p.add_argument("--out", help="write every round as JSON here")
    args = p.parse_args(argv)

    rows, lines = [], []
    for folder in args.loop:
        data = json.loads((Path(folder) / "loop.json").read_text())
        sim = data["config"]["simulation"]
        recorded = [r for r in data["rounds"] if r["method"] == "mismatch" and r["init"] != "scratch"]
        reference = {r["dataset"]: r["iou"] for r in data["references"]}
        for dataset in sorted({r["dataset"] for r in recorded}):
            case = load_dataset(dataset, data_dir=args.data_dir)[0]
            volume = Normalisation(hu_window=case.window).apply(case.image)
            n_slices = int(case.label.shape[case.axis])
            candidates = extent(case.label, case.axis)
            mine = [r for r in recorded if r["dataset"] == dataset]
            k0, top = min(r["n_labelled"] for r in mine), max(r["n_labelled"] for r in mine)
            policies = [q for q in sim["policies"] if any(r["policy"] == q for r in mine)]
            for policy in policies:
                for seed in range(int(sim["seeds"])):
                    labelled = even_slices(candidates, k0, n_slices) if policy == "even" else \
                        sorted(draw_split(case.label, case.axis, k0, seed)[0].tolist())
                    while labelled is not None and len(labelled) <= top:
                        got = fill_round(case, volume, labelled)
                        rows.append({"dataset": dataset, "policy": policy, "seed": seed, "n_labelled": len(labelled),
                                     "labelled_slices": list(labelled), **got})
                        print(f"{dataset} {policy} seed {seed} {labelled}: {100 * got['iou_volume']:.1f} % "
                              f"({got['seconds']:.1f} s)", file=sys.stderr, flush=True)
                        if len(labelled) == top:
                            break
                        labelled = next_labelled(policy, labelled, got, candidates, n_slices, seed)
            ref = reference.get(dataset)
            lines += [f"\n{dataset} (from {k0} slices; reference {100 * ref:.1f} %, 95 % of it "
                      f"{95 * ref:.1f} %)\n" if ref else f"\n{dataset}\n",
                      "| policy | " + " | ".join(f"{n} slices" for n in range(k0, top + 1))
                      + " | slices to 95 % of the reference, fill / MisMatch |",
                      "|---|" + "---:|" * (top - k0 + 2)]
            for policy in policies:
                cells = []
                need = {"fill": [], "mismatch": []}
                for n in range(k0, top + 1):
                    f = [r["iou_volume"] for r in rows if (r["dataset"], r["policy"], r["n_labelled"]) == (dataset, policy, n)]
                    m = [r["iou_volume"] for r in mine if (r["policy"], r["n_labelled"]) == (policy, n)
                         and r.get("iou_volume") is not None]
                    cells.append(f"{100 * statistics.mean(f):.1f} / {100 * statistics.mean(m):.1f}" if f and m else
                                 (f"{100 * statistics.mean(f):.1f} / –" if f else "–"))
                if ref:
                    for name, source in (("fill", rows), ("mismatch", mine)):
                        for seed in range(int(sim["seeds"])):
                            got = sorted((r["n_labelled"], r["iou_volume"]) for r in source
                                         if r["policy"] == policy and r["seed"] == seed and r.get("dataset", dataset) == dataset
                                         and r.get("iou_volume") is not None)
                            first = next((n for n, v in got if v >= 0.95 * ref), None)
                            need[name].append(first)

                def text(values):
                    reached = [v for v in values if v is not None]
                    never = len(values) - len(reached)
                    return (f"{statistics.mean(reached):.1f}" if reached else "–") + (f" ({never} never)" if never else "")

                lines.append(f"| {policy} | " + " | ".join(cells) + f" | {text(need['fill'])} / {text(need['mismatch'])} |")
    seconds = [r["seconds"] for r in rows]
    lines.append(f"\nfill: {statistics.mean(seconds):.1f} s a round on average (at most {max(seconds):.1f} s); "
                 "IoU of the whole volume (painted slices as painted), fill / MisMatch, mean over the draws")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"loops": args.loop, "rounds": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
