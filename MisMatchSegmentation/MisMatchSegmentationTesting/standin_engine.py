"""A stand-in for ``python -m mismatch`` that speaks the contract (docs/contract.md) in a few milliseconds.

Usage: ``python standin_engine.py MODE COMMAND [contract arguments]``. Modes:

- ``ok``: train writes a model folder, segment writes every output on the image's grid (SimpleITK), fill the
  painted slices copied to the nearest unpainted ones (its ``end`` event with one of the engine's ``notes``);
- ``oom``: train runs out of GPU memory while ``--batch-size`` is above 2 and, like the engine, halves its batches
  (a warning ``log`` event) and goes on like ok;
- ``oom-fail``: train runs out of GPU memory even with one slice per batch: the engine's one-line error, exit 2;
- ``slow``: emits progress for ever, starts a grandchild (its pid in ``$STANDIN_LOG/grandchild.pid``); on SIGTERM
  or SIGINT (or when the ``--stop-file`` appears), like the engine, finishes its step (0.3 s), writes
  ``--out``/checkpoint/state.json, ends with a ``cancelled`` event and exit 130;
- ``stubborn``: like slow but ignores SIGTERM and the stop file (must be killed);
- ``deaf``: ignores SIGTERM but stops like slow when ``--stop-file`` appears (an engine that signals cannot
  reach, as behind a launcher on Windows);
- ``crash``: writes to stderr and dies from SIGKILL without an ``end`` event;
- ``gate``: one event, then waits for ``$STANDIN_LOG/go`` before the rest (events must arrive one by one);
- ``usererror``: one line on stderr, a failed end event, exit 2.

Like the engine, train accepts ``--empty-slices``, and segment accepts ``--labels PAINTED`` (checked to be on the
image's grid with a painted voxel; its painted slices are kept as painted) with ``--labelled-slices`` /
``--empty-slices`` (refused without ``--labels``). With ``--labels``, the report's rows carry
``removed_fraction``: 0, or the fractions in ``$STANDIN_REMOVED`` (JSON ``{"slice": fraction}``), and the
painted file is copied to ``$STANDIN_LOG/labels-seen.nrrd`` (the job folder is gone once the job is over).

Each call appends its arguments to ``$STANDIN_LOG/calls.jsonl``. The file ships with the module (the in-Slicer
self-test runs it with Slicer's own Python) and needs only numpy and SimpleITK, never torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

LOG = Path(os.environ.get("STANDIN_LOG", "."))


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def option(args: list[str], name: str, default=None):
    return args[args.index(name) + 1] if name in args else default


def slices_of(text: str | None) -> list[int]:
    out = []
    for part in (text or "").split(","):
        if part:
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def user_error(message: str) -> int:
    print(f"mismatch: error: {message}", file=sys.stderr)
    emit("end", status="failed", message=message, elapsed=0.0)
    return 2


def images_of(args: list[str]) -> list[str]:
    out = []
    for a in args[1:]:
        if a.startswith("--"):
            break
        out.append(a)
    return out


def train(args: list[str], mode: str) -> int:
    batch = int(option(args, "--batch-size", "4"))
    if mode == "oom-fail":
        emit("start", phase="train", total=3, device="cuda:0")
        return user_error("the GPU ran out of memory even with one slice per batch on cuda:0; use a smaller "
                          "--patch-size or --width, or --device cpu")
    if mode == "oom" and batch > 2:
        emit("start", phase="train", total=3, device="cuda:0")
        emit("log", level="warning", message=f"GPU out of memory: retrying with batch sizes {batch // 2} labelled "
                                             f"+ {batch // 2} unlabelled")
    steps = int(option(args, "--steps", "3"))
    emit("start", phase="load", total=None)
    emit("start", phase="train", total=steps, device="cpu")
    for step in range(1, steps + 1):
        emit("progress", phase="train", step=step, total=steps, loss=1.0 / step,
             terms={"dice": 0.9 / step, "consistency": 0.01, "alpha": 0.002}, elapsed=0.01 * step,
             eta=0.01 * (steps - step))
    out = Path(option(args, "--out"))
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    weights.write_bytes(b"stand-in weights " + str(batch).encode())
    classes = json.loads(Path(option(args, "--classes")).read_text()) if "--classes" in args else [
        {"value": 1, "name": "class_1", "color": [0.5, 0.5, 0.5]}]
    card = {"format": "mismatch-model", "format_version": 1, "engine_version": "stand-in",
            "architecture": {"name": option(args, "--method", "mismatch"), "width": 4,
                             "in_channels": len(images_of(args)), "num_classes": len(classes) + 1},
            "classes": classes, "channels": [{"name": Path(p).name} for p in images_of(args)],
            "normalisation": {"method": "zscore"}, "slice_axis": option(args, "--axis", "k"),
            "training": {"batch_size": batch}, "summary": {"steps": steps, "final_losses": {"loss": 1.0 / steps}},
            "weights": {"file": weights.name, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                        "snapshots": 1}}
    (out / "model.json").write_text(json.dumps(card))
    emit("end", status="completed", message=f"model written to {out}", elapsed=0.05,
         final_losses={"loss": 1.0 / steps})
    return 0


def segment(args: list[str]) -> int:
    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(images_of(args)[0])
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    card = json.loads((Path(option(args, "--model")) / "model.json").read_text())
    values = [c["value"] for c in card["classes"]]
    if "--no-labels" in args and "--labels" in args:
        return user_error("--no-labels and --labels: give one")
    if ("--empty-slices" in args or "--labelled-slices" in args) and "--labels" not in args:
        return user_error("--labelled-slices / --empty-slices need --labels (the painted label map)")
    painted = None
    if "--labels" in args:
        painted_image = sitk.ReadImage(option(args, "--labels"))
        if (painted_image.GetSize() != image.GetSize()
                or not np.allclose(painted_image.GetOrigin(), image.GetOrigin(), atol=1e-4)
                or not np.allclose(painted_image.GetSpacing(), image.GetSpacing(), atol=1e-6)
                or not np.allclose(painted_image.GetDirection(), image.GetDirection(), atol=1e-6)):
            return user_error("--labels is not on the image's grid")
        painted = sitk.GetArrayFromImage(painted_image)
        shutil.copyfile(option(args, "--labels"), LOG / "labels-seen.nrrd")
        if not set(np.unique(painted).tolist()) <= {0, *values}:
            return user_error("--labels holds values that are not the model's classes")
        axis = "kji".index(card.get("slice_axis", "k"))
        labelled = sorted(set(np.flatnonzero(painted.any(axis=tuple(a for a in range(3) if a != axis))).tolist())
                          | set(slices_of(option(args, "--labelled-slices")))
                          | set(slices_of(option(args, "--empty-slices"))))
        if not painted.any():
            return user_error("--labels: no painted slice")
    emit("start", phase="segment", total=array.shape[0])
    threshold = float(np.median(array))
    labels = np.zeros(array.shape, np.uint8)
    labels[array < threshold] = values[0]
    if len(values) > 1:
        labels[:, :, : array.shape[2] // 2][labels[:, :, : array.shape[2] // 2] > 0] = values[1]
    if painted is not None:  # the painted slices are kept as painted
        index = [slice(None)] * 3
        index[axis] = labelled
        labels[tuple(index)] = painted[tuple(index)]
    confidence = np.full(array.shape, 0.75, np.float32)
    disagreement = np.linspace(0, 0.5, array.shape[0], dtype=np.float32)[:, None, None] * np.ones_like(confidence)
    for path, data in ((option(args, "--out"), labels), (option(args, "--confidence"), confidence),
                       (option(args, "--disagreement"), disagreement)):
        if path:
            out = sitk.GetImageFromArray(data)
            out.CopyInformation(image)
            sitk.WriteImage(out, path)
    emit("progress", phase="segment", step=array.shape[0], total=array.shape[0], loss=None, terms={},
         elapsed=0.01, eta=0.0)
    report = {"slice_axis": card.get("slice_axis", "k"),
              "uncertain_slices": [{"slice": int(s), "disagreement": float(0.5 * s / array.shape[0]),
                                    "uncertain_fraction": 0.1} for s in range(array.shape[0] - 1, -1, -1)]}
    if painted is not None:
        removed = {int(k): float(v) for k, v in json.loads(os.environ.get("STANDIN_REMOVED", "{}")).items()}
        report["uncertain_slices"] = [dict(row, removed_fraction=removed.get(row["slice"], 0.0))
                                      for row in report["uncertain_slices"] if row["slice"] not in labelled]
    if "--truth" in args:
        bins = [{"lower": b / 10, "upper": (b + 1) / 10, "count": 10 * b, "confidence": b / 10 + 0.05,
                 "accuracy": b / 10} if b else {"lower": 0, "upper": 0.1, "count": 0, "confidence": None,
                                               "accuracy": None} for b in range(10)]
        cal = {"all": {"n_bins": 10, "ece": 0.05, "mce": 0.05, "bins": bins}}
        report["evaluation"] = {"slices": [int(s) for s in option(args, "--eval-slices", "").split(",") if s],
                                "mean": {"iou": 0.8, "calibration": cal},
                                "positive_decoder": {"iou": 0.7, "calibration": {"all": dict(cal["all"], ece=0.07)}},
                                "negative_decoder": {"iou": 0.6, "calibration": {"all": dict(cal["all"], ece=0.09)}}}
    if option(args, "--report"):
        Path(option(args, "--report")).write_text(json.dumps(report))
    emit("end", status="completed", message="segmentation written", elapsed=0.02, slices=int(array.shape[0]))
    return 0


def fill(args: list[str]) -> int:
    """Like the engine's fill: the painted slices as painted, every other slice a copy of the nearest painted one."""
    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(images_of(args)[0])
    painted_image = sitk.ReadImage(option(args, "--labels"))
    if painted_image.GetSize() != image.GetSize():
        return user_error("--labels is not on the image's grid")
    painted = sitk.GetArrayFromImage(painted_image)
    axis = "kji".index(option(args, "--axis", "k"))
    moved = np.moveaxis(painted, axis, 0)
    labelled = sorted(set(np.flatnonzero(moved.reshape(moved.shape[0], -1).any(1)).tolist())
                      | set(slices_of(option(args, "--labelled-slices"))))
    if not labelled:
        return user_error(f"{option(args, '--labels')}: the label map is empty (all zero)")
    emit("start", phase="fill", total=moved.shape[0])
    nearest = [min(labelled, key=lambda p: abs(p - s)) for s in range(moved.shape[0])]
    out = sitk.GetImageFromArray(np.moveaxis(moved[nearest], 0, axis).copy())
    out.CopyInformation(image)
    sitk.WriteImage(out, option(args, "--out"))
    if option(args, "--report"):   # the unpainted slices, farthest from a painted one first
        rows = [{"slice": s, "foreground_fraction": 0.1, "disagreement": 0.0,
                 "distance": min(abs(s - p) for p in labelled)} for s in range(moved.shape[0]) if s not in labelled]
        rows.sort(key=lambda r: -r["distance"])
        Path(option(args, "--report")).write_text(json.dumps({"slice_axis": option(args, "--axis", "k"),
                                                              "ranking": "gap", "filled": True,
                                                              "uncertain_slices": rows}))
    emit("end", status="completed", message=f"filled label map written to {option(args, '--out')}", elapsed=0.01,
         labelled_slices=labelled, notes=["a note of the stand-in's fill for the user"])
    return 0


def slow(mode: str, args: list[str]) -> int:
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (LOG / "grandchild.pid").write_text(str(grandchild.pid))
    (LOG / "engine.pid").write_text(str(os.getpid()))
    stop = []
    stop_file = Path(option(args, "--stop-file")) if "--stop-file" in args else None
    if mode in ("stubborn", "deaf"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: stop.append("SIGTERM"))
        signal.signal(signal.SIGINT, lambda *_: stop.append("SIGINT"))
    emit("start", phase="train", total=100000, device="cpu")
    step = 0
    while not stop:
        step += 1
        emit("progress", phase="train", step=step, total=100000, loss=0.5, terms={}, elapsed=step * 0.02, eta=1e3)
        time.sleep(0.02)
        if mode != "stubborn" and stop_file is not None and stop_file.exists():
            stop.append("stop file")
    time.sleep(0.3)  # the step in progress ends before the checkpoint is written
    out = option(args, "--out")
    if out:
        folder = Path(out) / "checkpoint"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "state.json").write_text(json.dumps({"step": step, "config": {"steps": 100000}}))
    emit("end", status="cancelled", message=f"stopped by {stop[0]} at step {step} of 100000; checkpoint written; "
                                             "run again with --resume to continue", elapsed=step * 0.02)
    return 130


def main() -> int:
    mode, args = sys.argv[1], sys.argv[2:]
    LOG.mkdir(parents=True, exist_ok=True)
    with open(LOG / "calls.jsonl", "a") as f:
        f.write(json.dumps({"mode": mode, "args": args, "pid": os.getpid()}) + "\n")
    if mode in ("slow", "stubborn", "deaf"):
        return slow(mode, args)
    if mode == "crash":
        print("Traceback (most recent call last):\nSegmentation fault in a stand-in", file=sys.stderr, flush=True)
        emit("start", phase="train", total=10)
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "gate":
        emit("start", phase="train", total=2)
        while not (LOG / "go").exists():
            time.sleep(0.01)
        emit("progress", phase="train", step=1, total=2, loss=0.3, terms={}, elapsed=1.0, eta=1.0)
        print("plain text, not an event", flush=True)
        emit("end", status="completed", message="done", elapsed=2.0)
        return 0
    if mode == "usererror":
        print("mismatch train: error: labels.nrrd is not on the image grid", file=sys.stderr)
        emit("end", status="failed", message="labels.nrrd is not on the image grid", elapsed=0.0)
        return 2
    return {"train": lambda: train(args, mode), "fill": lambda: fill(args)}.get(args[0], lambda: segment(args))()


if __name__ == "__main__":
    sys.exit(main())
