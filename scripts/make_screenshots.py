#!/usr/bin/env python
"""Render the extension's screenshots (Resources/Screenshots/*.png) from real outputs of the engine.

What it does, as the Slicer module would (the same ``mismatch`` command lines, files on the CT's grid):

1. takes the demo volume, the chest CT ``CTChest4`` shipped in the ``slicerio`` package, and keeps the lung
   labels of 3 slices (everything else unlabelled);
2. ``mismatch train`` on them (``--steps``, default 180 as the default preset, on the CPU);
3. ``mismatch segment --labels`` (the painted slices guide the segmentation, as the panel's Segment does), with
   the confidence and disagreement volumes and a report evaluated against the full lung labels of every slice
   that was not painted;
4. renders, from those files: a slice view (CT, segment outline, confidence map), the segment's 3D surface
   (VTK, offscreen) and the reliability diagram (matplotlib).

Nothing here is a mock-up of the panel: the pictures show what the module puts into the scene, rendered
outside Slicer. Usage: ``.venv/bin/python scripts/make_screenshots.py [--steps N] [--work DIR] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Trainer"))

LUNG = {"value": 1, "name": "lungs", "color": [0.85, 0.45, 0.35]}
from mismatch.data import CT_WINDOW as HU_WINDOW  # noqa: E402  (what mismatch train clips a CT to)


def run(args: list[str], work: Path) -> None:
    command = [sys.executable, "-u", "-m", "mismatch", *args]
    print("$", " ".join(command[3:]), flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "Trainer"), os.environ.get("PYTHONPATH", "")]))
    subprocess.run(command, check=True, cwd=work, env=env, stdout=subprocess.DEVNULL)


def make_outputs(work: Path, steps: int, width: int | None) -> dict:
    import SimpleITK as sitk
    import slicerio

    from mismatch.data import load_ctchest
    from mismatch.demo import pick_labelled_slices

    work.mkdir(parents=True, exist_ok=True)
    ct_path = Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"
    _, truth, _ = load_ctchest("lungs")
    labelled = pick_labelled_slices(truth, 3)
    unlabelled = [k for k in range(truth.shape[0]) if k not in labelled]
    reference = sitk.ReadImage(str(ct_path))
    sparse = np.zeros_like(truth)
    sparse[labelled] = truth[labelled]
    for name, array in (("labels.nrrd", sparse), ("truth.nrrd", truth)):
        image = sitk.GetImageFromArray(array.astype(np.uint8))
        image.CopyInformation(reference)
        sitk.WriteImage(image, str(work / name))
    (work / "classes.json").write_text(json.dumps([LUNG]))
    slices = ",".join(map(str, labelled))
    started = time.monotonic()
    train = [str(ct_path), "--labels", "labels.nrrd", "--classes", "classes.json", "--labelled-slices", slices,
             "--steps", str(steps), "--device", "cpu", "--out", "model",
             f"--hu-window={HU_WINDOW[0]:g},{HU_WINDOW[1]:g}"]
    if width:
        train += ["--width", str(width)]
    run(["train", *train], work)
    run(["segment", str(ct_path), "--model", "model", "--labels", "labels.nrrd", "--out", "segmentation.nrrd",
         "--confidence", "confidence.nrrd", "--disagreement", "disagreement.nrrd", "--report", "report.json",
         "--truth", "truth.nrrd", "--eval-slices", ",".join(map(str, unlabelled)), "--device", "cpu"], work)
    print(f"engine: {time.monotonic() - started:.0f} s", flush=True)
    return {"ct": ct_path, "labelled": labelled, "steps": steps}


def read(path: Path):
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def render_slice(work: Path, info: dict, out: Path) -> str:
    """CT slice with the segment outline (left) and the confidence map with the same outline (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ct, image = read(info["ct"])
    seg, _ = read(work / "segmentation.nrrd")
    confidence, _ = read(work / "confidence.nrrd")
    labelled = info["labelled"]
    # the unlabelled slice halfway between the first two painted slices: what the model had to fill in
    k = (labelled[0] + labelled[1]) // 2
    sx, sy = image.GetSpacing()[:2]
    extent = (0, ct.shape[2] * sx, ct.shape[1] * sy, 0)
    fig, axes = plt.subplots(1, 2, figsize=(9.2, 4.9), dpi=80)
    for ax, overlay in zip(axes, (False, True)):
        ax.imshow(np.clip(ct[k], *HU_WINDOW), cmap="gray", extent=extent)
        if overlay:
            shown = ax.imshow(confidence[k], cmap="viridis", vmin=0.5, vmax=1.0, alpha=0.55, extent=extent)
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="confidence (probability of the predicted class)")
        ax.contour(np.linspace(0, extent[1], ct.shape[2]), np.linspace(0, extent[2], ct.shape[1]), seg[k] == 1,
                   levels=[0.5], colors=[LUNG["color"]], linewidths=1.6)
        ax.set_axis_off()
    axes[0].set_title(f"CT slice {k} (not painted): segment outline", fontsize=10)
    axes[1].set_title("confidence map, same outline", fontsize=10)
    fig.suptitle(f"MisMatch on CTChest4: lungs painted on slices {', '.join(map(str, labelled))} only, "
                 f"{info['steps']} training steps on the CPU", fontsize=10)
    fig.tight_layout()
    path = out / "slice-confidence.png"
    fig.savefig(path)
    plt.close(fig)
    return f"slice {k}"


def render_surface(work: Path, info: dict, out: Path) -> None:
    """The segment's surface (discrete marching cubes, smoothed), anterior view, offscreen."""
    import vtk
    from vtk.util import numpy_support

    seg, image = read(work / "segmentation.nrrd")
    data = vtk.vtkImageData()
    k, j, i = seg.shape
    data.SetDimensions(i, j, k)
    data.SetSpacing(*image.GetSpacing())
    data.SetOrigin(*image.GetOrigin())
    data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(seg).ravel().astype(np.uint8),
                                                              deep=True))
    surface = vtk.vtkDiscreteMarchingCubes()
    surface.SetInputData(data)
    surface.SetValue(0, 1)
    smooth = vtk.vtkWindowedSincPolyDataFilter()
    smooth.SetInputConnection(surface.GetOutputPort())
    smooth.SetNumberOfIterations(25)
    smooth.SetPassBand(0.05)
    smooth.NormalizeCoordinatesOn()
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputConnection(smooth.GetOutputPort())
    mapper = vtk.vtkPolyDataMapper()
    mapper.SetInputConnection(normals.GetOutputPort())
    mapper.ScalarVisibilityOff()
    actor = vtk.vtkActor()
    actor.SetMapper(mapper)
    actor.GetProperty().SetColor(*LUNG["color"])
    actor.GetProperty().SetSpecular(0.2)
    renderer = vtk.vtkRenderer()
    renderer.AddActor(actor)
    renderer.SetBackground(0.76, 0.76, 0.87)  # Slicer's 3D view background
    renderer.SetBackground2(0.45, 0.45, 0.6)
    renderer.GradientBackgroundOn()
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.AddRenderer(renderer)
    window.SetSize(640, 520)
    camera = renderer.GetActiveCamera()
    normals.Update()
    bounds = normals.GetOutput().GetBounds()
    centre = [(bounds[2 * a] + bounds[2 * a + 1]) / 2 for a in range(3)]
    camera.SetFocalPoint(*centre)
    camera.SetPosition(centre[0], centre[1] - 1000.0, centre[2])  # LPS: anterior is -y; patient's right on the left
    camera.SetViewUp(0, 0, 1)
    renderer.ResetCamera()
    camera.Zoom(1.25)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(out / "surface-3d.png"))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()


def render_reliability(work: Path, info: dict, out: Path) -> dict:
    """Reliability diagram of the report's evaluation: the mean of the decoders and each decoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluation = json.loads((work / "report.json").read_text())["evaluation"]
    fig, ax = plt.subplots(figsize=(5.6, 5.2), dpi=80)
    ax.plot([0, 1], [0, 1], "--", color="0.5", label="perfect calibration")
    eces = {}
    for key, label, colour in (("mean", "mean of the decoders (the prediction)", "#1f77b4"),
                               ("positive_decoder", "positive attention shifting decoder", "#d62728"),
                               ("negative_decoder", "negative attention shifting decoder", "#2ca02c")):
        calibration = (evaluation.get(key) or {}).get("calibration", {}).get("all")
        if not calibration:
            continue
        bins = [b for b in calibration["bins"] if b.get("count") and b.get("confidence") is not None]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color=colour, label=label,
                markersize=4)
        eces[key] = calibration.get("ece")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    iou = (evaluation.get("mean") or {}).get("iou")
    ax.set_title("Reliability on the unpainted slices: ECE " + ", ".join(
        f"{k.split('_')[0]} {v:.3f}" for k, v in eces.items() if v is not None)
        + (f"\nIoU {iou:.3f} against the full lung labels" if iou is not None else ""), fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "reliability.png")
    plt.close(fig)
    return {"ece": eces, "iou": iou}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=180, help="training steps (default 180, the default preset's)")
    parser.add_argument("--width", type=int, default=None, help="network width (default: the engine's)")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "screenshots", help="engine files")
    parser.add_argument("--out", type=Path, default=ROOT / "Resources" / "Screenshots", help="where the PNGs go")
    parser.add_argument("--render-only", action="store_true", help="render from the files already in --work")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    info_path = args.work / "info.json"
    if args.render_only:
        info = json.loads(info_path.read_text())
        info["ct"] = Path(info["ct"])
    else:
        info = make_outputs(args.work, args.steps, args.width)
        info_path.write_text(json.dumps(dict(info, ct=str(info["ct"]))))
    shown = render_slice(args.work, info, args.out)
    render_surface(args.work, info, args.out)
    numbers = render_reliability(args.work, info, args.out)
    print(json.dumps({"slice": shown, "labelled": info["labelled"], "steps": info["steps"], **numbers}))
    for name in ("slice-confidence.png", "surface-3d.png", "reliability.png"):
        print(f"{args.out / name}: {(args.out / name).stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
