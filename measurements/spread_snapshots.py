"""Does averaging snapshots or seeds cut the run-to-run spread? One painting, many training seeds.

    python measurements/spread_snapshots.py --dataset pyradiomics-breast1 --seeds 8 --snapshots 5 \
        [--labelled 3] [--out FILE.json]
    python measurements/spread_snapshots.py --dataset pyradiomics-breast1 --seeds 5 --ensemble 3 [--steps N] \
        [--out FILE.json]
    python measurements/spread_snapshots.py --dataset pyradiomics-breast1 --seeds 10 --snapshots 1 --flips

The benchmark's evenly spaced painting (``draw_split(..., placement="even")``, the same slices for every
seed) is trained once per seed at the default preset without its weight averaging (``average_span`` 0),
keeping ``--snapshots`` snapshots over the last ``snapshot_span`` of training, and the volume is segmented
with the painted slices' prior three ways: the last snapshot alone (the default before the averaging), the
snapshots' predictions averaged (``--snapshots K`` of ``mismatch train``), and one network with the
snapshots' weights averaged. With ``--ensemble K`` instead, K * seeds
networks are trained (one snapshot each), and each of the ``--seeds`` ensembles averages the predictions of K
of them, trained with different seeds (disjoint groups); the single networks are reported too. Prints the
IoU on the unlabelled slices per seed and the mean and standard deviation over seeds. ``--placement random
--draw D`` paints the slices of the benchmark's random draw ``D`` instead (a painting outside the benchmark's
for choices); ``--batch-size`` trains with that many labelled and unlabelled slices a step; ``--flips`` also
segments with the last snapshot's prediction averaged over the slice and its mirror images (test-time flips:
left-right, then all four of left-right and up-down), on the same networks. One torch job at a time on a
small CPU.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Trainer"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="pyradiomics-breast1")
    ap.add_argument("--seeds", type=int, default=8, help="how many training seeds, from --first-seed")
    ap.add_argument("--snapshots", type=int, default=5)
    ap.add_argument("--labelled", type=int, default=3)
    ap.add_argument("--ensemble", type=int, default=0, help="average K networks of different seeds instead")
    ap.add_argument("--placement", choices=["even", "random"], default="even",
                    help="the painting: the benchmark's evenly spaced slices, or a random draw (--draw)")
    ap.add_argument("--draw", type=int, default=0, help="the draw's seed for --placement random")
    ap.add_argument("--first-seed", type=int, default=0, help="training seeds start here")
    ap.add_argument("--batch-size", type=int, help="labelled and unlabelled slices a step (default: the preset's)")
    ap.add_argument("--flips", action="store_true",
                    help="also segment with the last snapshot's prediction averaged over mirrored slices "
                         "(test-time flips: left-right, and all four of left-right and up-down)")
    ap.add_argument("--steps", type=int, help="training steps of each network (default: the preset's)")
    ap.add_argument("--out", help="write the IoUs as JSON")
    args = ap.parse_args(argv)

    from mismatch.cli import configure_threads

    configure_threads(None)
    import numpy as np
    import torch

    from mismatch.benchmark.datasets import draw_split
    from mismatch.benchmark.classical import labelled_slices_only
    from mismatch.benchmark.loop import AXIS_NAMES, LoopConfig, _cases
    from mismatch.data import Normalisation
    from mismatch.events import Reporter
    from mismatch.inference import segment_volume
    from mismatch.models import SegmentationNetwork
    from mismatch.pipeline import painted_slice_prior
    from mismatch.train import fit

    class Mirrored(torch.nn.Module):
        """``net`` seeing the slice mirrored along ``dims``, its outputs mirrored back: passed beside ``net`` in
        the networks :func:`~mismatch.inference.segment_volume` averages, it averages the prediction over the
        mirrored slices (test-time flips). Shares ``net``'s weights."""

        def __init__(self, net, dims):
            super().__init__()
            self.net, self.dims = net, tuple(dims)
            self.config, self.decoder_names = net.config, net.decoder_names

        def forward(self, x):
            return [logits.flip(self.dims) for logits in self.net(x.flip(self.dims))]

        def probabilities(self, logits):
            return self.net.probabilities(logits)

    config = LoopConfig(datasets=[args.dataset], methods=["mismatch"], device="cpu",
                        **({"batch_size": args.batch_size} if args.batch_size else {}))
    seeds = range(args.first_seed, args.first_seed + args.seeds * max(1, args.ensemble))   # the training seeds
    case = _cases(args.dataset, config, None)[0]
    volume = Normalisation(hu_window=case.window).apply(case.image)
    labelled, _, test = draw_split(case.label, case.axis, args.labelled, args.draw, placement=args.placement)
    labelled = np.asarray(sorted(labelled))
    sparse = labelled_slices_only(case.label, labelled, case.axis)
    truth = case.label > 0
    num_classes = int(case.label.max()) + 1
    print(f"{args.dataset}: painted slices {labelled.tolist()}", flush=True)

    def iou(networks, cfg) -> float:
        prior = painted_slice_prior(sparse, labelled, cfg.axis, case.spacing, num_classes, cfg.prior, volume)
        seg = segment_volume(networks, volume, axis=cfg.axis, prior=prior, outputs=("labels",))
        found, true = np.take(seg.labels > 0, test, case.axis), np.take(truth, test, case.axis)
        return float((found & true).sum() / max(1, (found | true).sum()))

    if args.ensemble:
        ious = {"one network": [], f"{args.ensemble} seeds averaged": []}
        group: list = []
        for seed in seeds:
            cfg = config.train_config("mismatch", seed=seed, axis=AXIS_NAMES[case.axis], checkpoint_every=10 ** 9)
            cfg.steps = args.steps or cfg.steps
            fitted = fit([volume], sparse, labelled, num_classes, cfg, device=torch.device("cpu"),
                         reporter=Reporter(progress_bar=False, quiet=True))
            group += fitted.networks()[-1:]
            ious["one network"].append(iou(group[-1:], cfg))
            print(f"seed {seed}: one network {100 * ious['one network'][-1]:.1f} %", flush=True)
            if len(group) == args.ensemble:
                ious[f"{args.ensemble} seeds averaged"].append(iou(group, cfg))
                print(f"  ensemble of seeds {seed - args.ensemble + 1}..{seed}: "
                      f"{100 * ious[f'{args.ensemble} seeds averaged'][-1]:.1f} %", flush=True)
                group = []
    else:
        ious = {"last snapshot": [], "snapshots' predictions averaged": [], "snapshots' weights averaged": []}
        if args.flips:
            ious.update({"last snapshot, left-right flip averaged": [], "last snapshot, 4 flips averaged": []})
        for seed in seeds:
            cfg = config.train_config("mismatch", seed=seed, axis=AXIS_NAMES[case.axis], checkpoint_every=10 ** 9)
            cfg.steps = args.steps or cfg.steps
            # several snapshots, each the weights of its step: the recipe before the default averaged the last
            # steps' weights into one network (which refuses --snapshots above 1)
            cfg.snapshots, cfg.average_span = args.snapshots, 0.0
            fitted = fit([volume], sparse, labelled, num_classes, cfg, device=torch.device("cpu"),
                         reporter=Reporter(progress_bar=False, quiet=True))
            nets = fitted.networks()
            mean_net = SegmentationNetwork(fitted.architecture)
            mean_net.load_state_dict({k: (sum(s[k].double() for s in fitted.snapshots) / len(fitted.snapshots))
                                      .to(fitted.snapshots[0][k].dtype) for k in fitted.snapshots[0]})
            mean_net.eval()
            variants = [nets[-1:], nets, [mean_net]]
            if args.flips:
                variants += [[nets[-1], Mirrored(nets[-1], (-1,))],
                             [nets[-1]] + [Mirrored(nets[-1], d) for d in ((-1,), (-2,), (-2, -1))]]
            for name, networks in zip(ious, variants):
                ious[name].append(iou(networks, cfg))
            print(f"seed {seed}: " + ", ".join(f"{k} {100 * v[-1]:.1f} %" for k, v in ious.items()), flush=True)
    for name, values in ious.items():
        print(f"{name}: {100 * np.mean(values):.1f} % +- {100 * np.std(values, ddof=1):.1f} (sd over "
              f"{len(values)} seeds)")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": shlex.join(["python", "measurements/spread_snapshots.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
            "dataset": args.dataset, "labelled": labelled.tolist(), "snapshots": args.snapshots,
            "ensemble": args.ensemble, "placement": args.placement,
            "batch_size": config.train_config("mismatch").batch_size, "training_seeds": [seeds[0], seeds[-1]],
            "iou_unlabelled": ious}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
