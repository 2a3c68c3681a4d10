"""Self-training after the first training, paired against the product's default on the same networks.

    python measurements/probe_selftrain.py --datasets ctchest-lungs pyradiomics-brain1 pyradiomics-breast1 \
        mni152-gm synthetic-vessels-lung --placement random --labelled 3 --seeds 100 101 \
        --out docs/benchmark/selftrain-probe-random3.json

For each data set and seed: the labelled slices drawn as ``mismatch benchmark`` draws them
(:func:`mismatch.benchmark.datasets.draw_split`), MisMatch trained at the default preset and the volume
segmented as the product does (network plus the painted slices' prior): the reference. Then one more round
from that model, at the warm-start settings of ``mismatch train --init`` (:data:`mismatch.train.WARM_START`:
a fifth of the steps), four ways:

- ``warm``: the same painted slices (the control: is it the extra steps?);
- ``pseudo-all``: every slice not painted added as labelled, with the product's own labels of the first
  round as its pseudo-label (the volume given a second time as an unlabelled case, so that the consistency
  term keeps its slices);
- ``pseudo-confident``: only the slices where the first round was sure: at least ``--sure`` of the voxels
  that it marks as structure or is unsure about (confidence under 0.8) have a confidence of 0.8 or more, or no
  voxel of the slice is either (a confident empty slice: where the structure is not);
- ``pseudo-near``: the slices within half the mean gap between painted slices of a painted slice (growing
  outward from what the user painted).

Each is segmented with the prior of the *painted* slices only (pseudo-labels never act as painted slices), and
scored the way the benchmark scores (IoU pooled over every unlabelled slice, ECE in the foreground band).
Seeds 100 and 101 by default, so that nothing is tuned on the benchmark's draws. Writes every run to ``--out``
(finished draws are kept: running again resumes) and prints a paired table with a two-sided sign test.
Not a test: one torch job at a time on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Trainer"))
sys.path.insert(0, str(ROOT / "measurements"))

from ablate_default import paired_table  # noqa: E402

VARIANTS = ("warm", "pseudo-all", "pseudo-confident", "pseudo-near")


def pseudo_slices(variant: str, seg, labelled, n: int, axis: int, sure: float) -> list[int]:
    """The slices ``variant`` pseudo-labels, from the first round's segmentation ``seg``."""
    import numpy as np

    from mismatch.inference import UNCERTAIN_CONFIDENCE

    painted = set(int(s) for s in labelled)
    others = [s for s in range(n) if s not in painted]
    if variant == "warm":
        return []
    if variant == "pseudo-all":
        return others
    if variant == "pseudo-near":
        lab = sorted(painted)
        gap = (lab[-1] - lab[0]) / max(1, len(lab) - 1) if len(lab) > 1 else n
        reach = max(1.0, gap / 2)
        return [s for s in others if min(abs(s - p) for p in lab) <= reach]
    if variant == "pseudo-confident":
        keep = []
        for s in others:
            lab_s = np.take(seg.labels, s, axis=axis)
            conf_s = np.take(seg.confidence, s, axis=axis)
            unsure = conf_s < UNCERTAIN_CONFIDENCE
            band = (lab_s > 0) | unsure
            if not band.any() or (~unsure[band]).mean() >= sure:
                keep.append(s)
        return keep
    raise ValueError(variant)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["ctchest-lungs", "pyradiomics-brain1", "pyradiomics-breast1",
                                                      "mni152-gm", "synthetic-vessels-lung"])
    ap.add_argument("--labelled", type=int, default=3)
    ap.add_argument("--placement", choices=["random", "even"], default="random")
    ap.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--sure", type=float, default=0.9,
                    help="pseudo-confident: the share of a slice's structure-or-unsure voxels that must be sure")
    ap.add_argument("--steps-fraction", type=float, default=None,
                    help="the self-training round's steps as a fraction of the first's (default: WARM_START's)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, help="first training's steps (default: the preset's; fewer only to try "
                                              "the script)")
    args = ap.parse_args(argv)

    from mismatch.cli import configure_threads

    configure_threads(None)
    import numpy as np

    from mismatch.benchmark.classical import labelled_slices_only
    from mismatch.benchmark.datasets import draw_split
    from mismatch.benchmark.runner import AXIS_NAMES, BenchmarkConfig, _cases
    from mismatch.data import Normalisation
    from mismatch.events import Reporter
    from mismatch.inference import segment_volume
    from mismatch.pipeline import painted_slice_prior
    from mismatch.train import fit, warm_start_config

    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else []
    config = BenchmarkConfig(datasets=args.datasets, methods=["mismatch"], placement=args.placement,
                             **({"steps": args.steps} if args.steps else {}))
    quiet = Reporter(progress_bar=False, quiet=True)
    for dataset in args.datasets:
        for seed in args.seeds:
            def same_draw(r, dataset=dataset, seed=seed):
                return (r["dataset"], r["seed"], r["placement"], r["n_labelled"]) == \
                    (dataset, seed, args.placement, args.labelled)

            if {"default", *args.variants} <= {r["variant"] for r in done if same_draw(r)}:
                continue
            done = [r for r in done if not same_draw(r)]
            for case in _cases(dataset, config):
                labelled, _, test = draw_split(case.label, case.axis, args.labelled, seed, placement=args.placement)
                sparse = labelled_slices_only(case.label, labelled, case.axis)
                volume = Normalisation(hu_window=case.window).apply(case.image)
                axis, n = AXIS_NAMES[case.axis], case.label.shape[case.axis]
                k = len(case.classes) + 1
                train_config = config.train_config("mismatch", seed=seed, axis=axis, checkpoint_every=10 ** 9)
                prior = painted_slice_prior(sparse, labelled, axis, case.spacing, k, train_config.prior, volume)

                def segment(networks):
                    t0 = time.monotonic()
                    seg = segment_volume(networks, volume, axis=axis, truth=case.label, eval_slices=test.tolist(),
                                         prior=prior, outputs=("labels", "confidence"))
                    ev = seg.evaluation["mean"]
                    return seg, {"iou": float(ev["iou"]), "ece_band": ev["calibration"]["band"]["ece"],
                                 "ece_all": ev["calibration"]["all"]["ece"],
                                 "segment_seconds": round(time.monotonic() - t0, 1)}

                t0 = time.monotonic()
                first = fit([volume], sparse, labelled, k, train_config, reporter=quiet)
                train_s = time.monotonic() - t0
                seg, scores = segment(first.networks())
                rows = [{"variant": "default", **scores, "train_seconds": round(train_s, 1), "pseudo_slices": 0}]
                print(f"{dataset} seed {seed} {labelled.tolist()} default: IoU {scores['iou']:.3f} "
                      f"({train_s:.0f} s)", flush=True)
                warm = warm_start_config(train_config, None if args.steps_fraction is None
                                         else {"steps_fraction": args.steps_fraction})
                for variant in args.variants:
                    extra = pseudo_slices(variant, seg, labelled, n, case.axis, args.sure)
                    labels = sparse.copy()
                    if extra:
                        idx = [slice(None)] * 3
                        idx[case.axis] = extra
                        labels[tuple(idx)] = seg.labels[tuple(idx)]
                    slices = np.asarray(sorted(set(labelled.tolist()) | set(extra)))
                    t0 = time.monotonic()
                    fitted = fit([volume, volume] if extra else [volume], labels, slices, k, warm, reporter=quiet,
                                 init_state=first.snapshots[-1], init_optimizer=first.optimizer_state)
                    secs = time.monotonic() - t0
                    _, scores = segment(fitted.networks())
                    rows.append({"variant": variant, **scores, "train_seconds": round(secs, 1),
                                 "pseudo_slices": len(extra)})
                    print(f"{dataset} seed {seed} {variant}: IoU {scores['iou']:.3f} ({len(extra)} pseudo-labelled "
                          f"slices, {secs:.0f} s)", flush=True)
                for r in rows:
                    done.append({"dataset": dataset, "case": case.name, "seed": seed, "placement": args.placement,
                                 "n_labelled": args.labelled, "labelled_slices": labelled.tolist(), **r})
            out.write_text(json.dumps(done, indent=1))
    report(done, args)
    print(f"\ncommand: python measurements/probe_selftrain.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    return 0


def report(done: list[dict], args) -> None:
    runs = [r for r in done if r["placement"] == args.placement and r["n_labelled"] == args.labelled
            and r["dataset"] in args.datasets and r["seed"] in args.seeds]
    names = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    print(f"\n{args.labelled} labelled slices, placement {args.placement}\n")
    paired_table(runs, names, note=lambda row: f" ({row['pseudo_slices']})")
    for n in names:
        band = [x["ece_band"] - y["ece_band"] for x in runs if x["variant"] == n for y in runs
                if y["variant"] == "default" and (x["dataset"], x["case"], x["seed"]) ==
                (y["dataset"], y["case"], y["seed"])]
        if band:
            print(f"{n}: ECE in the foreground band {100 * sum(band) / len(band):+.2f} points against the default")


if __name__ == "__main__":
    sys.exit(main())
