"""Time to result as a user gets it: ``mismatch train`` with its defaults, then ``mismatch segment`` with the
painted labels, on a real MRI slab the size the product is for (60 x 217 x 181 voxels: 60 axial slices of
nilearn's MNI152 T1 template at 1 mm, grey matter = GM probability > 0.5, 3 labelled slices).

    python measurements/bench_time_to_result.py [--slices 60] [--size 256] [--labelled 3] [--device cpu]
                                                [--retrain] [--slab FILE.npz] [--save-slab FILE.npz]
                                                [--out FILE.json]

``--save-slab FILE.npz`` writes the slab (image and grey-matter label, before padding) and stops;
``--slab FILE.npz`` reads it instead of nilearn's template: the way to time a machine without nilearn (a
GPU machine with no network), on the very same voxels.

``--size N`` pads each slice with the template's background (0) to at least N x N voxels, centred: the
product's time target is stated for a 60-slice 256 x 256 volume; without it the slab keeps the template's
in-plane size.

``--retrain`` then takes one turn of the annotate-and-retrain loop: the slice that the first segmentation's
report ranks first ("Label next") gets its true labels, and the model is trained again on the 4 slices twice,
warm from the first model (``mismatch train --init``, the default warm start) and from scratch (the full
default training), each followed by ``mismatch segment``; it prints the seconds and the IoU of each on the
slices labelled in neither round (the issue-12 target: a warm round at most a quarter of the first training's
time, at no loss of IoU against training from scratch).

Runs the two commands as a user would (separate processes, files in a temporary folder) and prints the wall
time of each, the training steps actually run, and the IoU on every unlabelled slice. Needs nilearn (the
benchmark extra: scripts/setup-benchmark.sh). Not a test: the figures depend on the machine and its load;
run it on an otherwise idle machine and record what else was running.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Trainer"))


def mni_slab(n_slices: int):
    from nilearn.datasets import load_mni152_gm_template, load_mni152_template

    t1 = np.asarray(load_mni152_template(resolution=1).get_fdata(), np.float32).transpose(2, 1, 0)
    gm = np.asarray(load_mni152_gm_template(resolution=1).get_fdata(), np.float32).transpose(2, 1, 0)
    k0 = t1.shape[0] // 2 - n_slices // 2
    image, label = t1[k0:k0 + n_slices], (gm[k0:k0 + n_slices] > 0.5).astype(np.uint8)
    return image, label


def write(array, path):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(img, str(path))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=60)
    ap.add_argument("--labelled", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=0, help="pad each slice to at least SIZE x SIZE (0: no padding)")
    ap.add_argument("--retrain", action="store_true",
                    help="also time one warm-start round after labelling the suggested slice, and from scratch")
    ap.add_argument("--out", help="also write the figures as JSON")
    ap.add_argument("--slab", help="read the slab from this .npz (written by --save-slab) instead of nilearn")
    ap.add_argument("--save-slab", help="write the slab to this .npz and stop")
    ap.add_argument("--train-args", default="", metavar="ARGS",
                    help="options added to the first `mismatch train` (e.g. '--unlabelled-batch-size 4': a "
                         "setting other than the default, timed on the same host)")
    args = ap.parse_args()

    if args.slab:
        with np.load(args.slab) as f:
            image, label = f["image"], f["label"]
        if image.shape[0] != args.slices:
            ap.error(f"--slab holds {image.shape[0]} slices, not --slices {args.slices}")
    else:
        image, label = mni_slab(args.slices)
    if args.save_slab:
        np.savez_compressed(args.save_slab, image=image, label=label)
        print(f"slab {image.shape} written to {args.save_slab}")
        return 0
    if args.size:
        pads = [(0, 0)] + [((max(0, args.size - d)) // 2, max(0, args.size - d) - max(0, args.size - d) // 2)
                           for d in image.shape[1:]]
        image, label = np.pad(image, pads), np.pad(label, pads)
    n = image.shape[0]
    labelled = np.linspace(0, n - 1, args.labelled + 2).round().astype(int)[1:-1]   # evenly spaced, inside
    sparse = np.zeros_like(label)
    sparse[labelled] = label[labelled]
    exe = [sys.executable, "-m", "mismatch"]
    trainer = str(Path(__file__).resolve().parents[1] / "Trainer")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (trainer, os.environ.get("PYTHONPATH")) if p)}
    device = ["--device", args.device]

    def run(*argv) -> float:
        t0 = time.monotonic()
        subprocess.run(exe + [str(a) for a in argv] + device, check=True, env=env, stdout=subprocess.DEVNULL)
        return time.monotonic() - t0

    def iou_on(seg_path, test):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(seg_path))) > 0
        p, t = seg[test], label[test] > 0
        return float((p & t).sum() / max(1, (p | t).sum()))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write(image, tmp / "t1.nrrd")
        write(sparse, tmp / "painted.nrrd")
        t_train = run("train", tmp / "t1.nrrd", "--labels", tmp / "painted.nrrd", "--out", tmp / "model",
                      "--seed", args.seed, *shlex.split(args.train_args))
        t_segment = run("segment", tmp / "t1.nrrd", "--model", tmp / "model", "--labels", tmp / "painted.nrrd",
                        "--out", tmp / "seg.nrrd", "--report", tmp / "report.json")
        card = json.loads((tmp / "model" / "model.json").read_text())
        test = np.setdiff1d(np.arange(n), labelled)
        iou = iou_on(tmp / "seg.nrrd", test)
        result = {"volume": list(image.shape), "labelled_slices": labelled.tolist(), "device": args.device,
                  "train_seconds": round(t_train, 1), "segment_seconds": round(t_segment, 1),
                  "total_seconds": round(t_train + t_segment, 1), "steps": card["summary"]["steps"],
                  **({"train_args": args.train_args} if args.train_args else {}),
                  "iou_unlabelled": round(iou, 4)}
        if args.retrain:
            report = json.loads((tmp / "report.json").read_text())
            nxt = int(report["uncertain_slices"][0]["slice"])
            sparse[nxt] = label[nxt]
            write(sparse, tmp / "painted2.nrrd")
            test2 = np.setdiff1d(test, [nxt])
            rounds = {}
            for name, extra in (("warm", ["--init", tmp / "model"]), ("scratch", [])):
                t_tr = run("train", tmp / "t1.nrrd", "--labels", tmp / "painted2.nrrd", "--out", tmp / name,
                           "--seed", args.seed, *extra)
                t_sg = run("segment", tmp / "t1.nrrd", "--model", tmp / name, "--labels", tmp / "painted2.nrrd",
                           "--out", tmp / f"seg-{name}.nrrd")
                steps = json.loads((tmp / name / "model.json").read_text())["summary"]["steps"]
                rounds[name] = {"train_seconds": round(t_tr, 1), "segment_seconds": round(t_sg, 1),
                                "steps": steps, "iou_unlabelled": round(iou_on(tmp / f"seg-{name}.nrrd", test2), 4)}
            result["retrain"] = {
                "added_slice": nxt, "first_round_iou_on_same_slices": round(iou_on(tmp / "seg.nrrd", test2), 4),
                **rounds,
                "warm_over_first_training": round(rounds["warm"]["train_seconds"] / t_train, 3),
            }
    gpu = ""
    if args.device.startswith("cuda"):
        import torch

        gpu = f", {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    result.update({"torch_threads": os.environ.get("OMP_NUM_THREADS", "default"),
                   "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, {platform.processor() or '?'}"
                              + gpu})
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
