"""One trajectory of ``mismatch simulate`` again, a first training and one warm round, each segmented with
the default prior and with variants of its settings: what a round marked, and what the prior makes of it.

    python measurements/loop_round_prior.py --dataset ctchest-lungs --seed 3 --first 11 19 27 \
        --then 10 16 22 28 [--variant NAME JSON ...] [--out FILE.json]

The rounds are trained as the simulation trains them (:func:`mismatch.benchmark.loop.train_round`, the first
with ``--seed``, the warm one from its model with the warm-start settings and seed ``1000 * seed + n``), so
a round of a ``loop.json`` comes out again (on the same machine and torch). For each round and variant
(JSON keys of :class:`mismatch.prior.PriorSettings` on top of the default): the IoU of the whole volume (the
labelled slices as painted) and of the unlabelled slices, where the prior's end moved
(``extended_ends``), and the foreground voxels on the slices where the structure is not. One torch
job at a time on a small CPU.
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
    ap.add_argument("--dataset", default="ctchest-lungs")
    ap.add_argument("--seed", type=int, default=3, help="the simulation's draw and training seed")
    ap.add_argument("--first", type=int, nargs="+", required=True, help="the first round's labelled slices")
    ap.add_argument("--then", type=int, nargs="+", required=True, help="the warm round's labelled slices")
    ap.add_argument("--method", default="mismatch")
    ap.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "JSON"))
    ap.add_argument("--out", help="write the rows as JSON")
    args = ap.parse_args(argv)

    from mismatch.cli import configure_threads

    configure_threads(None)
    import numpy as np
    import torch

    from mismatch.benchmark.classical import labelled_slices_only
    from mismatch.benchmark.loop import AXIS_NAMES, LoopConfig, _cases, train_round
    from mismatch.data import Normalisation
    from mismatch.inference import segment_volume
    from mismatch.models import ArchitectureConfig, SegmentationNetwork
    from mismatch.pipeline import painted_slice_prior
    from mismatch.train import build_method

    config = LoopConfig(datasets=[args.dataset], methods=[args.method], device="cpu")
    case = _cases(args.dataset, config, None)[0]
    volume = Normalisation(hu_window=case.window).apply(case.image)
    axis = AXIS_NAMES[case.axis]
    device = torch.device("cpu")
    truth = case.label > 0
    plane = tuple(a for a in range(3) if a != case.axis)
    outside = np.flatnonzero(~truth.any(axis=plane)).tolist()   # the slices without the structure
    variants = {"default": {}, **{name: json.loads(js) for name, js in args.variant}}

    first_cfg = config.train_config(args.method, seed=args.seed, axis=axis, checkpoint_every=10 ** 9)
    _, first_state = train_round(case, volume, args.first, first_cfg, device)
    warm_cfg = config.warm_config(args.method, seed=args.seed * 1000 + len(args.then), axis=axis,
                                  checkpoint_every=10 ** 9)
    _, warm_state = train_round(case, volume, args.then, warm_cfg, device, init_state=first_state)

    arch = ArchitectureConfig(name=build_method(first_cfg).architecture, in_channels=volume.shape[0],
                              num_classes=int(case.label.max()) + 1, width=first_cfg.width,
                              pasb_side=first_cfg.pasb_side)
    rows = []
    for round_name, state, labelled in (("first", first_state, args.first), ("warm", warm_state, args.then)):
        net = SegmentationNetwork(arch)
        net.load_state_dict({k: v for k, v in state.items() if not k.startswith("optim.")})
        net.eval()
        sparse = labelled_slices_only(case.label, labelled, case.axis)
        test = [s for s in range(truth.shape[case.axis]) if s not in set(labelled)]
        for name, settings in variants.items():
            prior = painted_slice_prior(sparse, np.asarray(labelled), first_cfg.axis, case.spacing, arch.num_classes,
                                        {**first_cfg.prior, **settings}, volume)
            seg = segment_volume([net], volume, axis=first_cfg.axis, prior=prior, outputs=("labels",))
            found = seg.labels > 0
            on_test = np.take(found, test, case.axis), np.take(truth, test, case.axis)
            row = {"round": round_name, "labelled": list(labelled), "variant": name,
                   "extended_ends": {str(k): v for k, v in seg.extended_ends.items()},
                   "iou_volume": float((found & truth).sum() / max(1, (found | truth).sum())),
                   "iou_unlabelled": float((on_test[0] & on_test[1]).sum() / max(1, (on_test[0] | on_test[1]).sum())),
                   "voxels_outside_extent": int(np.take(found, outside, case.axis).sum())}
            rows.append(row)
            print(f"{round_name} {labelled} {name}: whole volume {100 * row['iou_volume']:.1f} %, unlabelled "
                  f"{100 * row['iou_unlabelled']:.1f} %, end moved {row['extended_ends'] or 'no'}, "
                  f"{row['voxels_outside_extent']} voxels on slices outside the structure", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": shlex.join(["python", "measurements/loop_round_prior.py",
                                                                   *(argv if argv is not None else sys.argv[1:])]),
                                              "dataset": args.dataset, "seed": args.seed, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
