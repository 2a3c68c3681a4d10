"""``mismatch demo``: the main job on real data shipped in a package, with no download.

The chest CT ``CTChest4`` and its segmentation ship in the ``slicerio`` wheel. The demo keeps the lung
labels of 3 slices (everything else is treated as unlabelled) and does what a user of the product gets:
MisMatch trained with the default settings, the volume segmented with the painted slices guiding it
(``mismatch segment --labels``). For comparison, on the same 3 slices: what a user has for free (copying the
nearest labelled slice, shape-based interpolation) and a strong supervised U-Net. It reports IoU, Dice and
calibration against the full labels on every slice it did not train on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .data import CT_WINDOW, Normalisation, load_ctchest
from .device import describe, resolve_device
from .events import Reporter
from .ranking import rank_uncertain_slices
from .modelfile import save_model
from .pipeline import train_and_segment
from .prior import nearest_slice, shape_interpolation
from .train import preset_config

LUNG_CLASS = {"value": 1, "name": "lungs", "color": [0.77, 0.47, 0.42]}


def pick_labelled_slices(labels: np.ndarray, n: int = 3) -> list[int]:
    """``n`` slices spread evenly over the structure's extent along k (the first axis of ``[K, J, I]``)."""
    present = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(1))
    picks = np.quantile(present, np.linspace(0, 1, n + 2)[1:-1]).round().astype(int)
    return sorted({int(present[np.abs(present - p).argmin()]) for p in picks})


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def run_demo(out_dir: str = "demo-output", steps: int | None = None, width: int | None = None, seed: int = 0,
             device: str = "auto", n_labelled: int = 3, quiet: bool = False) -> dict:
    from .io import atomic_output, write_text_atomic, write_volume
    from .plots import loss_curve, reliability_diagram

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)

    image, truth, geometry = load_ctchest("lungs")
    labelled = pick_labelled_slices(truth, n_labelled)
    sparse = np.zeros_like(truth)
    sparse[labelled] = truth[labelled]
    test_slices = [k for k in range(truth.shape[0]) if k not in set(labelled)]
    norm = Normalisation(hu_window=CT_WINDOW)
    volume = norm.apply(image)
    say = (lambda *a: None) if quiet else print
    say(f"MisMatch demo: chest CT {geometry.describe()} (CTChest4 from the slicerio package)")
    configs = {m: preset_config("default", m, steps=steps, width=width, seed=seed, hu_window=CT_WINDOW)
               for m in ("mismatch", "unet-strong")}
    say(f"lung labels kept on slices {labelled} only; the other {len(test_slices)} slices are unlabelled "
        f"for training and used for testing; default settings ({configs['mismatch'].steps} steps, width "
        f"{configs['mismatch'].width}), device {describe(dev)}")

    results = {"labelled_slices": labelled, "test_slices": test_slices, "steps": configs["mismatch"].steps,
               "width": configs["mismatch"].width, "device": str(dev), "seed": seed, "models": {}, "free": {}}
    from .metrics import evaluate_arrays

    for name, fn in (("nearest labelled slice", lambda: nearest_slice(sparse, labelled, 0)),
                     ("shape-based interpolation",
                      lambda: shape_interpolation(sparse, labelled, 0, geometry.spacing[::-1], 2))):
        t0 = time.monotonic()
        pred = fn()
        ev = evaluate_arrays(pred, truth, slices=test_slices, axis=0, classes=[1])
        results["free"][name] = {"iou": ev["iou"], "dice": ev["dice"], "seconds": round(time.monotonic() - t0, 2)}
        say(f"{name} (free, at once): IoU {_fmt(ev['iou'])}  Dice {_fmt(ev['dice'])}")
    curves = {}
    for method, config in configs.items():
        say(f"training {method} ...")
        classes = [LUNG_CLASS]
        # the product: segment with the painted slices guiding it; the strong U-Net: the network alone
        run = train_and_segment(volume, sparse, labelled, classes, config, normalisation=norm,
                                spacing_kji=geometry.spacing[::-1], geometry=geometry, channels=["CTChest4.nrrd"],
                                device=dev, reporter=Reporter(progress_bar=None if not quiet else False, quiet=quiet),
                                use_prior=method == "mismatch" and bool(config.prior), truth=truth,
                                eval_slices=test_slices, training={"demo": True})
        fitted, nets, seg, prior, train_s = run.fitted, run.networks, run.segmentation, run.prior, run.train_seconds
        save_model(out / f"model-{method}", fitted.snapshots, run.card)
        write_volume(seg.labels, geometry, out / f"{method}-segmentation.nrrd")
        write_volume(seg.confidence, geometry, out / f"{method}-confidence.nrrd")
        if method == "mismatch":
            write_volume(seg.disagreement, geometry, out / "mismatch-disagreement.nrrd")
            write_volume(seg.labels, geometry, out / "mismatch.seg.nrrd", segments=classes)
        ev = seg.evaluation
        results["models"][method] = {
            "train_seconds": round(train_s, 1), "segment_seconds": round(seg.seconds, 2),
            "painted_slices_guide": prior is not None,
            "parameters": fitted.parameters, "evaluation": ev,
            "uncertain_slices": rank_uncertain_slices(seg.slice_scores, exclude=labelled,
                                                      two_decoders=len(nets[0].decoders) == 2)[:5],
        }
        for name in ["mean"] + [n.replace(" ", "_") for n in nets[0].decoder_names]:
            label = {"mean": "MisMatch (default)" if method == "mismatch" else "strong U-Net"}.get(
                name, name.replace("_", " "))
            if method != "mismatch" and name != "mean":
                continue
            curves[label] = ev[name]["calibration"]["band"]
        with atomic_output(out / f"{method}-loss.png") as tmp:
            loss_curve(fitted.history, tmp)
        m = ev["mean"]
        say(f"{method}: IoU {_fmt(m.get('iou'))}  Dice {_fmt(m.get('dice'))}  "
            f"ECE all voxels {_fmt(m['calibration']['all']['ece'])}  "
            f"ECE foreground band {_fmt(m['calibration']['band']['ece'])}  ({train_s:.0f} s training)")

    diagram = out / "reliability.png"
    order = [k for k in ("positive decoder", "negative decoder", "MisMatch (default)", "strong U-Net") if k in curves]
    with atomic_output(diagram) as tmp:
        reliability_diagram({k: curves[k] for k in order}, tmp,
                            title="CTChest4 lungs, 3 labelled slices: reliability in the foreground band")
    results["reliability_diagram"] = diagram.name
    write_text_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")
    write_text_atomic(out / "report.md", _report(results, geometry.describe()))
    say(f"wrote {out}/: mismatch.seg.nrrd (load in Slicer), *-segmentation.nrrd, *-confidence.nrrd, "
        f"reliability.png, report.md, results.json, model-mismatch/, model-unet-strong/")
    return results


def _report(results: dict, grid: str) -> str:
    lines = [
        "# MisMatch demo: lungs in a chest CT from 3 labelled slices", "",
        f"Data: CTChest4 ({grid}) and its segmentation, shipped in the `slicerio` package. Lung labels were kept "
        f"on slices {results['labelled_slices']} (k index) only; the remaining {len(results['test_slices'])} "
        "slices were unlabelled for training and are the test set below.", "",
        f"Budget: the default settings ({results['steps']} steps, width {results['width']}), device "
        f"{results['device']}, seed {results['seed']}. MisMatch is segmented as `mismatch segment --labels` does it: "
        "the painted slices kept as painted and guiding the others (the decoders' own rows are the network "
        "alone); the strong U-Net (Dice + cross-entropy, augmentation) is the network alone, what a user could "
        "train without this product.", "",
        "| free, at once | IoU | Dice |", "|---|---|---|",
        *[f"| {k} | {_fmt(v['iou'])} | {_fmt(v['dice'])} |" for k, v in results.get("free", {}).items()], "",
        "| model | IoU | Dice | ECE all voxels | ECE foreground band | MCE band | train s | parameters |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, r in results["models"].items():
        for name, ev in r["evaluation"].items():
            if name == "slices":
                continue
            label = {"mean": "MisMatch, default (guided by the painted slices)" if method == "mismatch"
                     else "strong U-Net (supervised)"}.get(
                name, f"  {name.replace('_', ' ')}")
            cal = ev["calibration"]
            lines.append(f"| {label} | {_fmt(ev.get('iou'))} | {_fmt(ev.get('dice'))} | {_fmt(cal['all']['ece'])} | "
                         f"{_fmt(cal['band']['ece'])} | {_fmt(cal['band']['mce'])} | "
                         f"{r['train_seconds'] if name == 'mean' else ''} | {r['parameters'] if name == 'mean' else ''} |")
    lines += ["", "ECE: 15 equal-width bins of top-label confidence; 'foreground band' = voxels within 3 voxels "
              "(in-plane) of the predicted or true lungs. See `reliability.png`.", "",
              "Most uncertain unlabelled slices (MisMatch, decoder disagreement): "
              + ", ".join(str(s["slice"]) for s in results["models"]["mismatch"]["uncertain_slices"]), ""]
    return "\n".join(lines)
