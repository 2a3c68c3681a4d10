"""Warm-start rounds with and without the first training's optimiser state, paired.

    python measurements/ablate_warm.py --datasets pyradiomics-brain1 mni152-gm --seeds 0 1 2 \
        --out docs/benchmark/warm-start-optimizer.json [--rounds warm_adam_0.2 scratch]

For each data set and seed: 3 labelled slices drawn as ``mismatch simulate`` draws them, a first training at
the product's default, then the slice of the structure's extent farthest from any labelled one added (the
simulation's ``largest-gap``), and the round on the 4 slices trained several ways from the same first model or
from nothing: the warm start with fresh optimiser state (the default before this measurement), the same
continuing the first training's optimiser state (Adam's step count and moments), that with a fifth of the
steps instead of a quarter (the default), that without the round's own weight averaging (``average_span`` 0 in
the round; ``warm_adam_0.2_last``), that at the first training's peak learning rate (``warm_adam_0.2_lr1``) or
at its floor, a quarter of the peak, flat, with no warm-up and the last half averaged (``warm_adam_0.2_floor``:
the first training's flat averaged tail continued with the new slice), and from scratch, with the round's seed
and with another (``scratch_b``: how far two trainings from scratch differ; ``--rounds`` picks some, and with no
warm round among them the first training is skipped). Each is segmented as the product does (network plus the
painted slices' prior) and scored by IoU on the slices labelled in neither round; the first model's IoU on the
same slices is given too. Seconds are of training and segmenting together, in one process.

Not a test: one job at a time on an otherwise idle machine; say what else was running.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Trainer"))

from mismatch.benchmark.datasets import draw_split, extent, load_dataset  # noqa: E402
from mismatch.benchmark.classical import labelled_slices_only  # noqa: E402
from mismatch.benchmark.loop import AXIS_NAMES, LoopConfig, largest_gap_slice  # noqa: E402
from mismatch.benchmark.runner import case_classes  # noqa: E402
from mismatch.data import Normalisation  # noqa: E402
from mismatch.pipeline import train_and_segment  # noqa: E402

#: the rounds compared: name, warm-start settings on top of WARM_START (None: from scratch), optimiser state
ROUNDS = (("warm", {"steps_fraction": 0.25}, False), ("warm_adam", {"steps_fraction": 0.25}, True),
          ("warm_adam_0.2", {"steps_fraction": 0.2}, True),
          ("warm_adam_0.2_last", {"steps_fraction": 0.2, "average_span": 0.0}, True),
          ("warm_adam_0.2_lr1", {"steps_fraction": 0.2, "lr_fraction": 1.0}, True),
          ("warm_adam_0.2_floor", {"steps_fraction": 0.2, "lr_fraction": 0.25, "lr_floor": 1.0, "warmup": 0.0,
                                  "average_span": 0.5}, True),
          ("scratch", None, False), ("scratch_b", None, False))
#: the training seed of each round (of data set draw ``seed``): ``seed * 1000 + 1``, and ``+ 2`` for ``scratch_b``,
#: training from scratch with another seed, to see how far two trainings from scratch differ
SEED_OFFSET = {"scratch_b": 2}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["pyradiomics-brain1", "mni152-gm"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", required=True, help="JSON file for the rows (written after each seed)")
    ap.add_argument("--rounds", nargs="+", choices=[name for name, _, _ in ROUNDS],
                    default=[name for name, _, _ in ROUNDS], help="the rounds to train (default: all)")
    args = ap.parse_args()
    rounds = [r for r in ROUNDS if r[0] in args.rounds]
    rows = []
    for dataset in args.datasets:
        case = load_dataset(dataset)[0]
        norm = Normalisation(hu_window=case.window)
        volume = norm.apply(case.image)
        axis, n = AXIS_NAMES[case.axis], case.label.shape[case.axis]
        for seed in args.seeds:
            labelled = sorted(draw_split(case.label, case.axis, 3, seed)[0].tolist())
            added = largest_gap_slice(extent(case.label, case.axis).tolist(), labelled)
            test = [s for s in range(n) if s not in labelled + [added]]

            def run(slices, config, **kw):
                t0 = time.monotonic()
                result = train_and_segment(volume, labelled_slices_only(case.label, slices, case.axis),
                                           np.asarray(slices), case_classes(case), config, normalisation=norm,
                                           spacing_kji=case.spacing, geometry=case.geometry, truth=case.label,
                                           eval_slices=test, outputs=(), **kw)
                return result, result.segmentation.evaluation["mean"]["iou"], time.monotonic() - t0

            row = {"dataset": dataset, "seed": seed, "labelled": labelled, "added": added}
            if any(warm is not None for _, warm, _ in rounds):   # the first round: only a warm round needs it
                first_config = LoopConfig(datasets=[dataset]).train_config("mismatch", seed=seed, axis=axis,
                                                                           checkpoint_every=10 ** 9)
                first, row["first"], row["t_first"] = run(labelled, first_config)
            for name, warm, carry in rounds:
                round_seed = seed * 1000 + SEED_OFFSET.get(name, 1)
                if warm is None:
                    config, kw = LoopConfig(datasets=[dataset]).train_config(
                        "mismatch", seed=round_seed, axis=axis, checkpoint_every=10 ** 9), {}
                else:
                    config = LoopConfig(datasets=[dataset], warm=warm).warm_config(
                        "mismatch", seed=round_seed, axis=axis, checkpoint_every=10 ** 9)
                    kw = {"init_state": first.fitted.snapshots[-1],
                          "init_optimizer": first.fitted.optimizer_state if carry else None}
                _, row[name], row["t_" + name] = run(sorted(labelled + [added]), config, **kw)
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    names = [name for name in ["first"] + [name for name, _, _ in rounds] if all(name in r for r in rows)]
    print("mean IoU %: " + ", ".join(f"{k} {100 * np.mean([r[k] for r in rows]):.1f}" for k in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
