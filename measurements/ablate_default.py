"""One change to the default recipe, measured against the default itself on the same draws.

    python measurements/ablate_default.py --variant no-augment '{"augment": false}' \
        [--method mismatch] [--datasets mni152-gm synthetic-vessels-lung ctchest-lungs] [--labelled 3]
        [--seeds 100 101] [--out ablation.json]

For each data set and seed, trains ``--method`` twice on the same labelled-slice draw
(:func:`mismatch.benchmark.datasets.draw_split`), once with the default preset and once with the
variant's settings on top of it (JSON: the method's options, or fields of :class:`mismatch.train.TrainConfig`
such as ``alpha``, the consistency weight, or ``unlabelled_batch_size``), and scores both the way
``mismatch benchmark`` does (the product's segmentation: with the painted slices for MisMatch; IoU on every
unlabelled slice). The seeds default to 100 and 101 so that choices made with this script are not tuned on
the benchmark's draws (seeds 0 to 4).
Prints a Markdown table with the paired differences and a two-sided sign test, and writes every run to
``--out`` (finished pairs are kept: running again resumes). One torch job at a time on a small CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Trainer"))


def sign_test_p(diffs: list[float]) -> float:
    """Two-sided exact sign test of paired differences (ties left out)."""
    pos = sum(d > 0 for d in diffs)
    n = sum(d != 0 for d in diffs)
    if n == 0:
        return 1.0
    k = min(pos, n - pos)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired_table(runs: list[dict], names: list[str], reference: str = "default",
                 note=lambda row: "") -> dict[str, list[float]]:
    """Print a Markdown table of each variant's IoU minus the ``reference`` variant's on the same draw (rows
    of ``runs`` with ``dataset``, ``case``, ``seed``, ``labelled_slices``, ``variant`` and ``iou``), and a
    line per variant with the mean difference and a two-sided sign test. ``note(row)``: text after a cell.
    Returns the differences by variant."""
    print("| data set | seed | labelled slices | default IoU % | " + " | ".join(f"{n} (points)" for n in names)
          + " |\n|---|---:|---|---:|" + "---:|" * len(names))
    diffs: dict[str, list[float]] = {n: [] for n in names}
    for r in runs:
        if r["variant"] != reference:
            continue
        same = {x["variant"]: x for x in runs if (x["dataset"], x["case"], x["seed"]) ==
                (r["dataset"], r["case"], r["seed"])}
        cells = []
        for n in names:
            if n not in same:
                cells.append("–")
                continue
            d = same[n]["iou"] - r["iou"]
            diffs[n].append(d)
            cells.append(f"{100 * d:+.1f}{note(same[n])}")
        print(f"| {r['dataset']} | {r['seed']} | {r['labelled_slices']} | {100 * r['iou']:.1f} | "
              + " | ".join(cells) + " |")
    for n, d in diffs.items():
        if d:
            print(f"\n{n} minus {reference}: mean {100 * sum(d) / len(d):+.1f} points over {len(d)} runs, ahead on "
                  f"{sum(x > 0 for x in d)}, behind on {sum(x < 0 for x in d)}; two-sided sign test "
                  f"p = {sign_test_p(d):.3f}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", nargs=2, metavar=("NAME", "JSON"), required=True,
                    help="a name and the method options (JSON) that the variant sets on top of the default")
    ap.add_argument("--method", default="mismatch")
    ap.add_argument("--datasets", nargs="+", default=["mni152-gm", "synthetic-vessels-lung", "ctchest-lungs"])
    ap.add_argument("--labelled", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    ap.add_argument("--out", default="ablation.json")
    ap.add_argument("--steps", type=int, help="training steps (default: the preset's; fewer only to try the script)")
    args = ap.parse_args(argv)

    from mismatch.cli import configure_threads

    configure_threads(None)
    from mismatch.benchmark.runner import BenchmarkConfig, run_one

    name, options = args.variant[0], json.loads(args.variant[1])

    from dataclasses import fields

    from mismatch.train import TrainConfig

    @dataclass
    class Variant(BenchmarkConfig):
        method_options: dict = field(default_factory=dict)
        settings: dict = field(default_factory=dict)   # TrainConfig fields, e.g. {"unlabelled_batch_size": 2}

        def train_config(self, method, **overrides):
            return super().train_config(method, method_options=dict(self.method_options),
                                        **{**overrides, **self.settings})

    # the variant's keys: TrainConfig's own fields (alpha among them; they win over the run's own alpha) set the
    # training, the rest are the method's options
    train_fields = {f.name for f in fields(TrainConfig)} - {"method_options"}
    settings = {k: options.pop(k) for k in list(options) if k in train_fields}

    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else []
    budget = {"steps": args.steps} if args.steps else {}
    configs = {"default": Variant(datasets=args.datasets, methods=[args.method], **budget),
               name: Variant(datasets=args.datasets, methods=[args.method], method_options=options,
                             settings=settings, **budget)}
    for dataset in args.datasets:
        for seed in args.seeds:
            for variant, config in configs.items():
                if any(r["dataset"] == dataset and r["seed"] == seed and r["variant"] == variant for r in done):
                    continue
                spec = {"dataset": dataset, "method": args.method, "n_labelled": args.labelled, "seed": seed,
                        "alpha": config.alpha, "group": "main"}
                for r in run_one(spec, config, device="cpu"):
                    done.append({"dataset": dataset, "seed": seed, "variant": variant, "case": r["case"],
                                 "iou": r["iou"], "network_alone_iou": r["other"]["iou"],
                                 "seconds": r["seconds"]})
                    print(f"{dataset} seed {seed} {variant}: IoU {r['iou']:.3f} ({r['seconds']:.0f} s)", flush=True)
                out.write_text(json.dumps(done, indent=1))
    rows, diffs = [], []
    for dataset in args.datasets:
        for seed in args.seeds:
            pair = {r["variant"]: r for r in done if r["dataset"] == dataset and r["seed"] == seed}
            if "default" in pair and name in pair:
                d = pair[name]["iou"] - pair["default"]["iou"]
                diffs.append(d)
                rows.append(f"| {dataset} | {seed} | {100 * pair['default']['iou']:.1f} | "
                            f"{100 * pair[name]['iou']:.1f} | {100 * d:+.1f} |")
    print(f"\n| data set | seed | default IoU % | {name} IoU % | difference (points) |\n|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    if diffs:
        print(f"\n{name} minus default: mean {100 * sum(diffs) / len(diffs):+.1f} points over {len(diffs)} pairs, "
              f"ahead on {sum(d > 0 for d in diffs)}; two-sided sign test p = {sign_test_p(diffs):.3f}")
    print(f"\ncommand: python measurements/ablate_default.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
