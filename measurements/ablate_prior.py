"""Settings of the painted slices' prior, measured on the same trained networks.

    python measurements/ablate_prior.py --variant no-end '{"end_penalty": 0}' [--variant NAME JSON ...] \
        [--datasets ctchest-lungs pyradiomics-brain1 pyradiomics-breast1 mni152-gm synthetic-vessels-lung]
        [--files IMAGE LABELS ...] [--axis k|j|i]
        [--labelled 3] [--placement random] [--seeds 100 101] [--out prior-ablation.json] [--cache DIR]
        [--train '{"alpha": 1.0}']

The prior acts when a volume is segmented, not when it is trained, so each variant is scored on the same
networks: for each data set and seed, MisMatch is trained once at the default preset on a labelled-slice
draw (:func:`mismatch.benchmark.datasets.draw_split`, ``--placement`` as in ``mismatch benchmark``), then the
volume is segmented with the default prior and with each variant's settings on top of it (JSON keys of
:class:`mismatch.prior.PriorSettings`), and scored the way ``mismatch benchmark`` does (IoU pooled over every
unlabelled slice). The seeds default to 100 and 101 so that choices made with this script are not tuned on
the benchmark's draws (seeds 0 to 4). Prints a Markdown table with the paired differences and a two-sided
sign test per variant, and writes every run to ``--out`` (finished data set and seed pairs are kept: running
again resumes; a new variant trains them again, unless ``--cache`` keeps the trained networks: then only the
segmentations run again). One torch job at a time on a small CPU.

``--gfs-beta B ...`` (a probe, not a product setting; needs slicer-core): Slicer's *Grow from seeds*, seeded
with the same painted slices as the benchmark seeds it, as a third expert beside the network and the prior:
``B`` log-odds for the structure where it grows the structure, ``-B`` where it grows background (variants
``gfs-B``), and Grow from seeds alone (``grow-from-seeds``) for comparison.

``--network-clip C ...`` (a probe, not a product setting; binary data sets): the network's log-odds clipped to
``+-C`` before the prior is added (variants ``clip-C``), so that a confident network cannot outvote the prior
by more than ``C``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Trainer"))
sys.path.insert(0, str(ROOT / "measurements"))

from ablate_default import paired_table  # noqa: E402


DEFAULT_DATASETS = ("ctchest-lungs", "pyradiomics-brain1", "pyradiomics-breast1", "mni152-gm", "synthetic-vessels-lung")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "JSON"),
                    help="a name and the prior settings (JSON) that the variant sets on top of the default")
    ap.add_argument("--datasets", nargs="+", default=None,
                    help=f"benchmark data sets (default: {' '.join(DEFAULT_DATASETS)}; none when --files is given)")
    ap.add_argument("--files", nargs=2, action="append", default=[], metavar=("IMAGE", "LABELS"),
                    help="also a volume of one's own with a label on every slice (as mismatch benchmark --files)")
    ap.add_argument("--axis", choices=["k", "j", "i"], default="k",
                    help="slice the --files volumes along this axis of the image grid (as mismatch benchmark --axis)")
    ap.add_argument("--labelled", type=int, default=3)
    ap.add_argument("--placement", choices=["random", "even"], default="random")
    ap.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    ap.add_argument("--out", default="prior-ablation.json")
    ap.add_argument("--steps", type=int, help="training steps (default: the preset's; fewer only to try the script)")
    ap.add_argument("--cache", help="a folder that keeps the trained networks, so that trying other variants on "
                                    "the same draws does not train them again")
    ap.add_argument("--train", default="{}", metavar="JSON",
                    help="training settings on top of the default (fields of mismatch.train.TrainConfig, e.g. "
                         "'{\"alpha\": 1.0}'): the prior's variants on networks trained otherwise")
    ap.add_argument("--gfs-beta", type=float, nargs="*", default=[], metavar="B",
                    help="probe: Grow from seeds as a third expert with these log-odds (needs slicer-core)")
    ap.add_argument("--network-clip", type=float, nargs="*", default=[], metavar="C",
                    help="probe: the network's log-odds clipped to +-C before the prior is added (binary data sets)")
    args = ap.parse_args(argv)

    from mismatch.cli import configure_threads

    configure_threads(None)
    import numpy as np
    import torch

    from mismatch.benchmark.datasets import draw_split, files_datasets
    from mismatch.benchmark.classical import labelled_slices_only, run_in_subprocess
    from mismatch.benchmark.runner import AXIS_NAMES, BenchmarkConfig, _cases
    from mismatch.data import Normalisation
    from mismatch.events import Reporter
    from mismatch.inference import segment_volume
    from mismatch.metrics import evaluate_arrays
    from mismatch.pipeline import painted_slice_prior
    from mismatch.prior import PriorSettings, SlicePrior
    from mismatch.train import fit

    class GrowFromSeedsExpert(SlicePrior):
        """The default prior plus Grow from seeds' label map as a vote of +-beta log-odds (after the weight)."""

        def __init__(self, *a, grown=None, beta=0.0, **kw):
            super().__init__(*a, **kw)
            self.grown, self.beta = grown, beta

        def log_odds(self, s):
            lo = super().log_odds(s)
            grown = np.take(self.grown, int(s), axis=self.axis)
            votes = np.stack([np.where(grown == c, 1.0, -1.0) for c in range(1, self.n_fg + 1)]).astype(np.float32)
            return lo + (self.beta / self.settings.weight) * votes

    variants = {"default": {}, **{name: json.loads(options) for name, options in (args.variant or [])}}
    probes = [f"gfs-{b:g}" for b in args.gfs_beta] + (["grow-from-seeds"] if args.gfs_beta else []) + \
        [f"clip-{c:g}" for c in args.network_clip]
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else []
    files = files_datasets(args.files, axis=args.axis)
    if args.datasets is None:
        args.datasets = [] if files else list(DEFAULT_DATASETS)
    args.datasets += [d for d in files if d not in args.datasets]
    config = BenchmarkConfig(datasets=args.datasets, methods=["mismatch"], placement=args.placement,
                             dataset_options=files,
                             **({"steps": args.steps} if args.steps else {}))
    default_prior = config.train_config("mismatch").prior
    train = json.loads(args.train)
    for dataset in args.datasets:
        for seed in args.seeds:
            def same_draw(r, dataset=dataset, seed=seed):
                return (r["dataset"], r["seed"], r["placement"], r["n_labelled"], r.get("train", {})) == \
                    (dataset, seed, args.placement, args.labelled, train)

            if set(variants) | set(probes) <= {r["variant"] for r in done if same_draw(r)}:
                continue
            done = [r for r in done if not same_draw(r)]
            for case in _cases(dataset, config):
                labelled, _, test = draw_split(case.label, case.axis, args.labelled, seed, placement=args.placement)
                sparse = labelled_slices_only(case.label, labelled, case.axis)
                norm = Normalisation(hu_window=case.window)
                volume = norm.apply(case.image)
                axis = AXIS_NAMES[case.axis]
                t0 = time.monotonic()
                tag = "".join(f"-{k}{v}" for k, v in sorted(train.items()))
                cached = Path(args.cache) / f"{case.name}-{args.placement}-{args.labelled}-{seed}{tag}.pt" \
                    if args.cache else None
                if cached is not None and cached.exists():
                    networks, train_s = torch.load(cached, weights_only=False)
                else:
                    networks = fit([volume], sparse, labelled, len(case.classes) + 1,
                                   config.train_config("mismatch", seed=seed, axis=axis, checkpoint_every=10 ** 9,
                                                       **train),
                                   reporter=Reporter(progress_bar=False, quiet=True)).networks()
                    train_s = time.monotonic() - t0
                    if cached is not None:
                        cached.parent.mkdir(parents=True, exist_ok=True)
                        torch.save((networks, train_s), cached)

                def score(prior) -> tuple[float, dict]:
                    """IoU and the ECE (foreground band, all voxels) of the volume segmented with ``prior``."""
                    seg = segment_volume(networks, volume, axis=axis, truth=case.label, eval_slices=test.tolist(),
                                         prior=prior, outputs=("labels",))
                    cal = seg.evaluation["mean"]["calibration"]
                    return float(seg.evaluation["mean"]["iou"]), {"ece_band": cal["band"]["ece"],
                                                                  "ece_all": cal["all"]["ece"]}

                scores, ece = {}, {}   # variant -> (IoU, the prior settings or None); variant -> its ECE
                for variant, options in variants.items():
                    settings = {**default_prior, **options}
                    iou, ece[variant] = score(painted_slice_prior(sparse, labelled, axis, case.spacing,
                                                                  len(case.classes) + 1, settings, volume))
                    scores[variant] = (iou, settings)
                if args.gfs_beta:
                    grown = run_in_subprocess("slicer-grow-from-seeds", image=case.image[0], labels=sparse,
                                              labelled_slices=labelled.tolist(), axis=case.axis,
                                              spacing=list(case.spacing))
                    scores["grow-from-seeds"] = (evaluate_arrays(grown, case.label, slices=test.tolist(),
                                                                 axis=case.axis, classes=list(case.classes))["iou"],
                                                 None)
                    for beta in args.gfs_beta:
                        iou, ece[f"gfs-{beta:g}"] = score(GrowFromSeedsExpert(
                            sparse, labelled, case.axis, case.spacing, len(case.classes) + 1,
                            PriorSettings.from_dict(default_prior), grown=grown, beta=beta))
                        scores[f"gfs-{beta:g}"] = (iou, default_prior)
                for c in args.network_clip:
                    with network_clipped(c):
                        iou, ece[f"clip-{c:g}"] = score(painted_slice_prior(
                            sparse, labelled, axis, case.spacing, len(case.classes) + 1, default_prior, volume))
                    scores[f"clip-{c:g}"] = (iou, default_prior)
                for variant, (iou, settings) in scores.items():
                    done.append({"dataset": dataset, "case": case.name, "seed": seed, "placement": args.placement,
                                 "n_labelled": args.labelled, "labelled_slices": labelled.tolist(),
                                 "variant": variant, "prior": settings, "train": train, "iou": float(iou),
                                 **ece.get(variant, {}), "train_seconds": round(train_s, 1)})
                    print(f"{dataset} seed {seed} {labelled.tolist()} {variant}: IoU {iou:.3f}", flush=True)
            out.write_text(json.dumps(done, indent=1))
    runs = [r for r in done if r["placement"] == args.placement and r["n_labelled"] == args.labelled
            and r["dataset"] in args.datasets and r["seed"] in args.seeds and r.get("train", {}) == train]
    names = [v for v in list(variants) + probes if v != "default"]
    print(f"\n{args.labelled} labelled slices, placement {args.placement}\n")
    paired_table(runs, names)
    with_ece = [r for r in runs if r.get("ece_band") is not None]
    if with_ece:
        order = [v for v in list(variants) + probes if any(r["variant"] == v for r in with_ece)]
        print("\nECE in the foreground band % (all voxels %), per run:\n")
        print("| data set | seed | " + " | ".join(order) + " |\n|---|---:|" + "---:|" * len(order))
        keys = sorted({(r["dataset"], r["case"], r["seed"]) for r in with_ece})
        for key in keys:
            same = {r["variant"]: r for r in with_ece if (r["dataset"], r["case"], r["seed"]) == key}
            print(f"| {key[0]} | {key[2]} | " + " | ".join(
                f"{100 * same[v]['ece_band']:.1f} ({100 * same[v]['ece_all']:.2f})" if v in same else "–"
                for v in order) + " |")
        for v in order:
            band = [r["ece_band"] for r in with_ece if r["variant"] == v]
            print(f"\n{v}: mean ECE in the band {100 * sum(band) / len(band):.2f} % over {len(band)} runs")
    print(f"\ncommand: python measurements/ablate_prior.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    return 0


@contextlib.contextmanager
def network_clipped(c: float):
    """Within it, the segmentation adds the prior to the network's log-odds clipped to ``+-c`` (binary models)."""
    import torch

    import mismatch.inference as inference

    fuse = inference._fuse

    def clipped(mean, prior, slices, binary):
        if binary:
            mean = torch.sigmoid(torch.logit(mean.float().clamp(1e-6, 1 - 1e-6)).clamp(-c, c))
        return fuse(mean, prior, slices, binary)

    inference._fuse = clipped
    try:
        yield
    finally:
        inference._fuse = fuse


if __name__ == "__main__":
    sys.exit(main())
