"""The ``mismatch`` command end to end on small files, and every bad input the issue lists."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from discs import disc_volume
from mismatch.cli import main

def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return tuple((rz @ ry @ rx).ravel().tolist())


OBLIQUE = _rotation(0.15, -0.2, 0.3)  # an exactly orthonormal, oblique direction


def _write(array, path, spacing=(0.8, 0.9, 2.5), origin=(-10.0, 20.0, 5.0), direction=OBLIQUE):
    img = sitk.GetImageFromArray(array)
    if img.GetDimension() == 3 and img.GetNumberOfComponentsPerPixel() == 1:
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return str(path)


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def case(tmp_path):
    """A 10-slice volume with a bright disc, lung-CT-like intensities, labels on slices 2 and 6."""
    image, labels, disc = disc_volume((10, 32, 40), (16, 20), 6, [2, 6])
    return {"image": _write(image, tmp_path / "image.nrrd"),
            "labels": _write(labels, tmp_path / "labels.nrrd"),
            "truth": _write(disc.astype(np.uint8), tmp_path / "truth.nrrd"),
            "array": image, "lab": labels, "dir": tmp_path}


TINY = ["--steps", "3", "--width", "4", "--patch-size", "0", "--batch-size", "2", "--device", "cpu"]


def _events(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_train_segment_evaluate_end_to_end(case, capsys):
    d = case["dir"]
    before = {p: _digest(case[p]) for p in ("image", "labels")}
    assert main(["train", case["image"], "--labels", case["labels"], "--out", str(d / "model"),
                 "--events", str(d / "train.jsonl"), *TINY]) == 0
    events = _events(d / "train.jsonl")
    assert events[-1]["event"] == "end" and events[-1]["status"] == "completed"
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["step"] == 3 and progress[-1]["total"] == 3
    assert {"loss", "terms", "elapsed", "eta"} <= set(progress[-1])
    card = json.loads((d / "model" / "model.json").read_text())
    assert card["summary"]["labelled_slices"] == [2, 6]
    assert not (d / "model" / "checkpoint").exists()

    assert main(["segment", case["image"], "--model", str(d / "model"), "--out", str(d / "seg.nii.gz"),
                 "--confidence", str(d / "conf.mha"), "--disagreement", str(d / "dis.nrrd"),
                 "--report", str(d / "report.json"), "--truth", case["truth"], "--eval-slices", "0,4,8",
                 "--device", "cpu"]) == 0
    ref = sitk.ReadImage(case["image"])
    for name in ("seg.nii.gz", "conf.mha", "dis.nrrd"):
        out = sitk.ReadImage(str(d / name))
        assert out.GetSize() == ref.GetSize()
        np.testing.assert_allclose(out.GetSpacing(), ref.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(out.GetDirection(), ref.GetDirection(), atol=1e-5)
    conf = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "conf.mha")))
    assert conf.min() >= 0.5 - 1e-6 and conf.max() <= 1.0
    report = json.loads((d / "report.json").read_text())
    ranked = [s["slice"] for s in report["uncertain_slices"]]
    assert 2 not in ranked and 6 not in ranked and len(ranked) == 8
    assert report["evaluation"]["slices"] == [0, 4, 8]
    assert {"mean", "positive_decoder", "negative_decoder"} <= set(report["evaluation"])

    capsys.readouterr()
    assert main(["evaluate", "--prediction", str(d / "seg.nii.gz"), "--truth", case["truth"],
                 "--confidence", str(d / "conf.mha"), "--diagram", str(d / "rel.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["iou"] <= 1 and "calibration" in result
    assert (d / "rel.png").stat().st_size > 1000
    assert before == {p: _digest(case[p]) for p in ("image", "labels")}


def test_fill_labels_the_unpainted_slices_from_the_painted_ones_without_a_network(case, capsys):
    """`mismatch fill`: the painted slices as painted, the others from them and the image, in one run with no
    model; the input files untouched; a label map with nothing painted is one clear error."""
    d = case["dir"]
    before = {p: _digest(case[p]) for p in ("image", "labels")}
    assert main(["fill", case["image"], "--labels", case["labels"], "--out", str(d / "filled.nrrd"),
                 "--report", str(d / "next.json"), "--events", str(d / "fill.jsonl")]) == 0
    report = json.loads((d / "next.json").read_text())
    ranked = [row["slice"] for row in report["uncertain_slices"]]
    assert report["ranking"] == "gap" and report["slice_axis"] == "k"
    assert ranked and not {2, 6} & set(ranked) and ranked[0] in (4, 8)   # mid-gap, or 2/3 of the way to the end
    end = _events(d / "fill.jsonl")[-1]
    assert end["event"] == "end" and end["status"] == "completed" and end["labelled_slices"] == [2, 6]
    filled = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "filled.nrrd")))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(case["truth"])).astype(bool)
    np.testing.assert_array_equal(filled[[2, 6]], case["lab"][[2, 6]])
    between = filled[3:6].astype(bool), truth[3:6]   # the growing disc between the painted slices
    assert (between[0] & between[1]).sum() / (between[0] | between[1]).sum() > 0.9
    assert before == {p: _digest(case[p]) for p in ("image", "labels")}
    empty = _write(np.zeros_like(case["lab"]), d / "empty.nrrd")
    capsys.readouterr()
    assert main(["fill", case["image"], "--labels", empty, "--out", str(d / "f2.nrrd")]) == 2
    assert "empty" in capsys.readouterr().err and not (d / "f2.nrrd").exists()


def test_fill_runs_without_loading_torch(case):
    """The fill needs numpy and scipy only: the command does not import torch (about two seconds of its wait)."""
    d = case["dir"]
    code = ("import sys; from mismatch.cli import main; "
            f"status = main(['fill', {case['image']!r}, '--labels', {case['labels']!r}, '--out', "
            f"{str(d / 'f.nrrd')!r}, '--report', {str(d / 'r.json')!r}]); print(status, 'torch' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "Trainer"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.split()[-2:] == ["0", "False"], done.stdout + done.stderr


def test_fill_report_looks_past_the_fill_where_the_image_goes_on_like_the_painted_structure(tmp_path):
    """Three slices painted at one end of a disc that runs through the whole volume: the fill ends about half a
    gap below them, but the image goes on looking like the painted disc, so the first slice to paint next is
    past the fill's end (beyond_filled), not the next slice at its edge. A strip of the disc's intensity, painted
    as background, keeps the disc from being an intensity range (which the fill would follow to the end)."""
    image, labels, _ = disc_volume((24, 32, 40), (16, 20), 6, [17, 19, 21], growth=0.0)
    image[:, 2:4, 2:14] = 40.0
    img, lab = _write(image, tmp_path / "image.nrrd"), _write(labels, tmp_path / "labels.nrrd")
    assert main(["fill", img, "--labels", lab, "--out", str(tmp_path / "f.nrrd"),
                 "--report", str(tmp_path / "next.json")]) == 0
    filled = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "f.nrrd")))
    assert not filled[:10].any()           # the fill itself stops near the painted slices
    first = json.loads((tmp_path / "next.json").read_text())["uncertain_slices"][0]
    assert first["beyond_filled"] is True and first["slice"] < 12


def test_fill_says_when_an_intensity_range_is_the_structure_and_an_empty_slice_stops_it(tmp_path, capsys):
    """A disc of one intensity through the whole volume, painted on three slices at one end: one intensity range
    reproduces the painting, so the fill follows it to the volume's end, and the command says so, with the
    range in the image's units (between the background's -800 and the disc's 40 HU) and how to stop it; a slice
    marked empty where the disc goes on stops it there (the range no longer reproduces the painted slices)."""
    image, labels, disc = disc_volume((24, 32, 40), (16, 20), 6, [17, 19, 21], growth=0.0)
    img, lab = _write(image, tmp_path / "image.nrrd"), _write(labels, tmp_path / "labels.nrrd")
    capsys.readouterr()
    assert main(["fill", img, "--labels", lab, "--out", str(tmp_path / "f.nrrd"),
                 "--events", str(tmp_path / "fill.jsonl")]) == 0
    err = capsys.readouterr().err
    note = next(line for line in err.splitlines() if "reproduce the painted slices" in line)
    assert _events(tmp_path / "fill.jsonl")[-1]["notes"] == [note]      # for the panel, in the end event
    low = float(note.split("the intensities from ")[1].split(" up ")[0])   # the disc is the brightest: open above
    assert note.startswith("class_1: ") and -800 < low < 40 and "mark a slice there as empty" in note
    filled = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "f.nrrd"))) > 0
    assert filled[:5].sum() >= 0.9 * disc[:5].sum()                # far past the painted slices, the range holds
    assert main(["fill", img, "--labels", lab, "--out", str(tmp_path / "g.nrrd"), "--empty-slices", "12"]) == 0
    assert "reproduce the painted slices" not in capsys.readouterr().err
    stopped = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "g.nrrd"))) > 0
    assert not stopped[:13].any() and stopped[17:22].any()
    # segment with the painted slices says the same (its network is a tiny one here; the note is the prior's)
    assert main(["train", img, "--labels", lab, "--out", str(tmp_path / "model"), *TINY]) == 0
    capsys.readouterr()
    assert main(["segment", img, "--model", str(tmp_path / "model"), "--labels", lab,
                 "--out", str(tmp_path / "s.nrrd"), "--device", "cpu"]) == 0
    assert note in capsys.readouterr().err


def _seg_nrrd(array, path, start_ijk, names):
    """A label map saved as Slicer saves a segmentation: a .seg.nrrd cropped to the segments' box (starting
    at voxel ``start_ijk`` of the case's grid), its segments named in the header."""
    axes = np.asarray(OBLIQUE).reshape(3, 3) * np.asarray((0.8, 0.9, 2.5))
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((0.8, 0.9, 2.5))
    img.SetOrigin(tuple((np.asarray((-10.0, 20.0, 5.0)) + axes @ np.asarray(start_ijk, float)).tolist()))
    img.SetDirection(OBLIQUE)
    for n, (value, name) in enumerate(names.items()):
        for key, text in (("ID", f"Segment_{n + 1}"), ("Name", name), ("LabelValue", str(value)), ("Layer", "0"),
                          ("Color", "0.2 0.8 0.4")):
            img.SetMetaData(f"Segment{n}_{key}", text)
    sitk.WriteImage(img, str(path))
    return str(path)


def test_a_segmentation_saved_by_slicer_trains_segments_and_evaluates_by_its_names(case, capsys):
    """The labels and the truth as Slicer saves segmentations (.seg.nrrd, cropped to the segments): read on
    the image's grid, the segment names and colours kept by the model, the result written as a .seg.nrrd
    with them."""
    d = case["dir"]
    box = (slice(None), slice(4, 28), slice(6, 34))               # K, J, I: the case's disc lies inside
    painted = _seg_nrrd(case["lab"][box], d / "painted.seg.nrrd", (6, 4, 0), {1: "tumour"})
    truth = sitk.GetArrayFromImage(sitk.ReadImage(case["truth"]))
    assert truth[box].sum() == truth.sum()
    truth_seg = _seg_nrrd(truth[box], d / "truth.seg.nrrd", (6, 4, 0), {1: "tumour"})
    assert main(["train", case["image"], "--labels", painted, "--out", str(d / "model"), *TINY]) == 0
    assert "placed on the image's grid" in capsys.readouterr().err
    card = json.loads((d / "model" / "model.json").read_text())
    assert card["classes"] == [{"value": 1, "name": "tumour", "color": [0.2, 0.8, 0.4]}]
    assert card["summary"]["labelled_slices"] == [2, 6]
    assert main(["segment", case["image"], "--model", str(d / "model"), "--labels", painted,
                 "--out", str(d / "result.seg.nrrd"), "--device", "cpu"]) == 0
    from mismatch.io import segment_names

    assert segment_names(d / "result.seg.nrrd") == {1: {"name": "tumour", "color": [0.2, 0.8, 0.4]}}
    result = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "result.seg.nrrd")))
    np.testing.assert_array_equal(result[[2, 6]], case["lab"][[2, 6]])   # the painted slices as painted
    capsys.readouterr()
    assert main(["evaluate", "--prediction", str(d / "result.seg.nrrd"), "--truth", truth_seg]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--prediction", str(d / "result.seg.nrrd"), "--truth", case["truth"]]) == 0
    assert json.loads(capsys.readouterr().out)["iou"] == direct["iou"]
    assert main(["fill", case["image"], "--labels", painted, "--out", str(d / "filled.seg.nrrd")]) == 0
    assert segment_names(d / "filled.seg.nrrd") == {1: {"name": "tumour", "color": [0.2, 0.8, 0.4]}}


def test_a_ct_in_hounsfield_units_is_windowed_by_default_and_an_mri_is_not(case):
    """--hu-window auto (the default, what the panel gets): the disc case's CT values (air at -800 HU) are
    clipped to the CT window the benchmark measures; the same image moved above zero (an MRI's range) is
    not clipped; none and an explicit window are kept as given; a model continued with --init keeps its own.
    The model card records what was used."""
    d = case["dir"]
    mri = _write(case["array"] + 1000.0, d / "mri.nrrd")

    def window(image, *extra):
        out = d / f"model-{len(list(d.glob('model-*')))}"
        assert main(["train", image, "--labels", case["labels"], "--out", str(out), "--events",
                     str(out) + ".jsonl", *TINY, *extra]) == 0
        said = [e["message"] for e in _events(str(out) + ".jsonl") if e["event"] == "log"]
        return json.loads((out / "model.json").read_text())["normalisation"]["hu_window"], said

    hu, said = window(case["image"])
    assert hu == [-1000.0, 400.0] and any("Hounsfield" in m for m in said)
    hu, said = window(mri)
    assert hu is None and not any("Hounsfield" in m for m in said)
    assert window(case["image"], "--hu-window", "none")[0] is None
    assert window(case["image"], "--hu-window=-500,500")[0] == [-500.0, 500.0]
    # continued with --init, the model keeps the window it was trained with (here: none, on the CT); a window
    # given explicitly still wins
    hu, said = window(case["image"], "--init", str(d / "model-2"))
    assert hu is None and not any("clipped" in m for m in said)
    hu, said = window(mri, "--init", str(d / "model-0"))
    assert hu == [-1000.0, 400.0] and any("--init model" in m for m in said)
    assert window(case["image"], "--init", str(d / "model-0"), "--hu-window=-500,500")[0] == [-500.0, 500.0]


def test_auto_window_looks_at_the_darkest_voxel():
    from mismatch.data import CT_WINDOW, auto_window

    assert auto_window(np.full((1, 2, 3, 3), -3024.0, np.float32)) == CT_WINDOW   # a scanner's padding
    assert auto_window(np.full((1, 2, 3, 3), -400.0, np.float32)) is None         # no air: not clipped
    assert auto_window(np.zeros((1, 0, 3, 3), np.float32)) is None


def _bad(argv, capsys, match):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert match.lower() in err.lower(), err
    return err


def test_bad_inputs_give_one_clear_line_and_change_nothing(case, capsys):
    d = case["dir"]
    arr, lab = case["array"], case["lab"]
    digests = {p: _digest(case[p]) for p in ("image", "labels")}
    train = lambda *a: ["train", *a, "--out", str(d / "m"), *TINY]  # noqa: E731

    _bad(train(str(d / "missing.nrrd"), "--labels", case["labels"]), capsys, "not found")
    (d / "junk.nrrd").write_text("not an image")
    _bad(train(str(d / "junk.nrrd"), "--labels", case["labels"]), capsys, "junk.nrrd")
    other = _write(lab, d / "other_grid.nrrd", spacing=(1.0, 1.0, 1.0))
    _bad(train(case["image"], "--labels", other), capsys, "grid")
    empty = _write(np.zeros_like(lab), d / "empty.nrrd")
    _bad(train(case["image"], "--labels", empty), capsys, "paint")
    full = _write(np.ones_like(lab), d / "full.nrrd")
    _bad(train(case["image"], "--labels", full), capsys, "supervised")
    nan = arr.copy(); nan[3, 4, 5] = np.nan
    _bad(train(_write(nan, d / "nan.nrrd"), "--labels", case["labels"]), capsys, "NaN")
    two_d = _write(arr[0], d / "slice2d.nrrd")
    _bad(train(two_d, "--labels", case["labels"]), capsys, "2D")
    four_d = sitk.JoinSeries([sitk.GetImageFromArray(arr)] * 2)
    sitk.WriteImage(four_d, str(d / "four.nrrd"))
    _bad(train(str(d / "four.nrrd"), "--labels", case["labels"]), capsys, "4D")
    shifted = _write(arr, d / "shifted.nrrd", origin=(0.0, 0.0, 0.0))
    _bad(train(case["image"], shifted, "--labels", case["labels"]), capsys, "grid")
    two = lab.copy(); two[2, 0, 0] = 2
    (d / "classes.json").write_text(json.dumps([{"value": 1, "name": "disc"}]))
    _bad(train(case["image"], "--labels", _write(two, d / "two.nrrd"), "--classes", str(d / "classes.json")),
         capsys, "not among")
    _bad(["train", case["image"], "--labels", case["labels"], "--out", str(d / "m"), "--device", "cuda:3"],
         capsys, "cuda")
    assert main(["train", case["image"], "--labels", case["labels"], "--out", str(d / "m"), *TINY]) == 0
    capsys.readouterr()
    _bad(["segment", case["image"], case["image"], "--model", str(d / "m"), "--out", str(d / "s.nrrd")],
         capsys, "channel")
    _bad(["segment", case["image"], "--model", str(d / "m"), "--out", case["image"]], capsys, "input")
    _bad(["segment", case["image"], "--model", str(d / "nomodel"), "--out", str(d / "s.nrrd")], capsys, "model")
    assert digests == {p: _digest(case[p]) for p in ("image", "labels")}


def _run(argv, **kw):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "Trainer"))
    return subprocess.Popen([sys.executable, "-m", "mismatch", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_sigterm_writes_a_checkpoint_and_resume_finishes(case):
    d = case["dir"]
    events = d / "events.jsonl"
    argv = ["train", case["image"], "--labels", case["labels"], "--out", str(d / "model"), "--steps", "400",
            "--width", "4", "--patch-size", "0", "--batch-size", "1", "--device", "cpu", "--events", str(events)]
    proc = _run(argv)
    deadline = time.monotonic() + 120
    while not (events.exists() and any(json.loads(l).get("event") == "progress" for l in events.read_text().splitlines())):
        assert proc.poll() is None and time.monotonic() < deadline, "the training never reported a step"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = _events(events)[-1]
    assert last["status"] == "cancelled" and "--resume" in last["message"]
    state = json.loads((d / "model" / "checkpoint" / "state.json").read_text())
    assert 0 < state["step"] < 400
    assert not (d / "model" / "model.json").exists()

    proc = _run(argv + ["--resume"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    log = [e for e in _events(events) if e["event"] == "log"]
    assert any(f"resuming at step {state['step']}" in e["message"] for e in log)
    assert (d / "model" / "model.json").exists() and not (d / "model" / "checkpoint").exists()


def test_method_options_reach_the_method_and_the_card(case, capsys):
    out = case["dir"] / "model-mt"
    assert main(["train", str(case["image"]), "--labels", str(case["labels"]), "--out", str(out), *TINY,
                 "--method", "mt", "--method-option", "ema_decay=0.9",
                 "--method-option", "consistency_weight=0.5"]) == 0
    card = json.loads((out / "model.json").read_text())
    assert card["training"]["method_options"] == {"ema_decay": 0.9, "consistency_weight": 0.5}
    capsys.readouterr()
    _bad(["train", str(case["image"]), "--labels", str(case["labels"]), "--out", str(case["dir"] / "m2"), *TINY,
          "--method", "mt", "--method-option", "threshold=0.9"], capsys, "not a setting of --method mt")
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage error
        main(["train", str(case["image"]), "--labels", str(case["labels"]), "--out", str(case["dir"] / "m3"),
              *TINY, "--method-option", "oops"])
    assert exit_info.value.code == 2 and "KEY=VALUE" in capsys.readouterr().err


# -- help text (issue 10, item 9) ---------------------------------------------------------------------------

def _subcommands():
    import argparse

    from mismatch.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_option_of_every_subcommand_has_help_text():
    import argparse

    missing = []
    for name, parser in _subcommands().items():
        if not parser.description:
            missing.append(f"{name}: no description")
        for action in parser._actions:
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.metavar or action.dest}")
        assert parser.format_help()   # every help string formats (a stray % would not)
    assert not missing, "without help: " + ", ".join(missing)


def test_train_help_shows_each_presets_defaults():
    """The defaults shown come from TrainConfig and PRESETS, not from numbers written in the help."""
    from mismatch.train import PRESETS, TrainConfig

    train = _subcommands()["train"]
    helps = {a.dest: a.help for a in train._actions}
    d = TrainConfig()
    for name in ("width", "batch_size", "patch_size", "seed", "steps"):
        assert f"default {getattr(d, name)}" in helps[name], (name, helps[name])
        for preset, values in PRESETS.items():
            if name in values["config"] and values["config"][name] != getattr(d, name):
                assert f"--preset {preset}: {values['config'][name]}" in helps[name], (name, helps[name])
    assert "--preset paper: 24" in helps["width"] and "--preset paper: 176" in helps["patch_size"]


def test_segment_evaluate_and_demo_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0
    assert "Segment every slice of IMAGE" in text and "one per channel" in text and "'mismatch train --out'" in text
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the label map to evaluate" in text and "the reference label map" in text and "slice axis" in text
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default demo-output" in text and "random seed" in text and "default auto" in text


def test_segment_of_the_trained_image_keeps_its_painted_slices_without_labels(case, capsys):
    """The model folder keeps the painted slices it was trained from: ``segment`` of that same image without
    ``--labels`` gives what ``--labels`` gives (the painted slices kept as painted, guiding the others); on an
    image that differs on those slices, with ``--no-labels`` or from a folder without them, the network
    segments alone."""
    d = case["dir"]
    assert main(["train", case["image"], "--labels", case["labels"], "--out", str(d / "model"), *TINY]) == 0
    assert (d / "model" / "painted.safetensors").is_file()

    def segment(image, name, *extra):
        capsys.readouterr()
        assert main(["segment", image, "--model", str(d / "model"), "--out", str(d / f"{name}.nrrd"),
                     "--confidence", str(d / f"{name}-conf.nrrd"), "--device", "cpu", *extra]) == 0
        log = capsys.readouterr()
        read = lambda p: sitk.GetArrayFromImage(sitk.ReadImage(str(d / p)))  # noqa: E731
        return read(f"{name}.nrrd"), read(f"{name}-conf.nrrd"), log.out + log.err

    kept, kept_conf, log = segment(case["image"], "kept")
    assert "painted slice(s) the model was trained from (2, 6" in log
    given, given_conf, _ = segment(case["image"], "given", "--labels", case["labels"])
    alone, alone_conf, _ = segment(case["image"], "alone", "--no-labels")
    np.testing.assert_array_equal(kept, given)
    np.testing.assert_array_equal(kept_conf, given_conf)
    np.testing.assert_array_equal(kept[[2, 6]], case["lab"][[2, 6]])   # the painted slices as painted
    assert not np.array_equal(kept_conf, alone_conf)

    changed = case["array"].copy()
    changed[2] += 50.0
    other, other_conf, log = segment(_write(changed, d / "changed.nrrd"), "other")
    assert "not the same on its painted slices" in log
    other_alone, other_alone_conf, _ = segment(_write(changed, d / "changed2.nrrd"), "other-alone", "--no-labels")
    np.testing.assert_array_equal(other_conf, other_alone_conf)

    _bad(["segment", case["image"], "--model", str(d / "model"), "--out", str(d / "x.nrrd"), "--labels",
          case["labels"], "--no-labels"], capsys, "--no-labels")
    (d / "model" / "painted.safetensors").unlink()   # a model written before the painted slices were kept
    old, old_conf, _ = segment(case["image"], "old")
    np.testing.assert_array_equal(old_conf, alone_conf)


def test_train_finds_labels_painted_along_another_axis(case, capsys):
    """Labels painted on separate slices along j, trained without --axis: the model's slices run along j (not
    along k, where every slice across the disc holds paint and would count as labelled), the log says so, and
    segment of the same image keeps those slices."""
    d = case["dir"]
    truth = sitk.GetArrayFromImage(sitk.ReadImage(case["truth"]))
    painted = np.zeros_like(truth)
    painted[:, [12, 20]] = truth[:, [12, 20]]
    labels = _write(painted, d / "painted-j.nrrd")
    capsys.readouterr()
    assert main(["train", case["image"], "--labels", labels, "--out", str(d / "model"), *TINY]) == 0
    log = capsys.readouterr()
    assert "separate slice(s) along j" in log.out + log.err
    card = json.loads((d / "model" / "model.json").read_text())
    assert card["slice_axis"] == "j" and card["summary"]["labelled_slices"] == [12, 20]
    assert main(["segment", case["image"], "--model", str(d / "model"), "--out", str(d / "seg.nrrd"),
                 "--device", "cpu"]) == 0
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "seg.nrrd")))
    np.testing.assert_array_equal(seg[:, [12, 20]], painted[:, [12, 20]])
    capsys.readouterr()   # along k (as before --axis auto): every slice across the disc would count as labelled
    _bad(["train", case["image"], "--labels", labels, "--out", str(d / "model-k"), "--axis", "k", *TINY], capsys,
         "every slice")


def test_context_trains_segments_and_is_kept_by_init(case, capsys):
    """``--context 1``: the card records it, ``segment`` reads each slice with its neighbours (the whole volume
    segmented, the same as the network on slices built by hand), and ``--init`` continues with the model's
    context whatever the option says."""
    import torch

    from mismatch.data import Normalisation, slice_with_context
    from mismatch.modelfile import load_model

    d = case["dir"]
    assert main(["train", case["image"], "--labels", case["labels"], "--out", str(d / "m1"), *TINY,
                 "--context", "1"]) == 0
    card = json.loads((d / "m1" / "model.json").read_text())
    assert card["architecture"]["context"] == 1 and card["architecture"]["in_channels"] == 1
    assert card["format_version"] == 2   # an engine of card version 1 says "update" rather than failing to load
    assert main(["segment", case["image"], "--model", str(d / "m1"), "--out", str(d / "seg.nrrd"),
                 "--confidence", str(d / "conf.nrrd"), "--no-labels", "--device", "cpu"]) == 0
    conf = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "conf.nrrd")))
    _, nets = load_model(d / "m1")
    volume = Normalisation.from_dict(card["normalisation"]).apply(case["array"][None].astype(np.float32))
    net = nets[0].eval()
    with torch.no_grad():
        for s in (0, 4, 9):   # the ends repeat their own slice as the missing neighbour
            p = net.predict(torch.from_numpy(slice_with_context(volume, "k", s, 1))[None])[0][0, 0].numpy()
            np.testing.assert_allclose(conf[s], np.maximum(p, 1 - p), atol=1e-5)
    assert main(["train", case["image"], "--labels", case["labels"], "--out", str(d / "m2"), *TINY,
                 "--init", str(d / "m1"), "--context", "0"]) == 0
    assert json.loads((d / "m2" / "model.json").read_text())["architecture"]["context"] == 1
    assert main(["train", case["image"], "--labels", case["labels"], "--out", str(d / "m3"), *TINY]) == 0
    plain = json.loads((d / "m3" / "model.json").read_text())
    assert plain["architecture"]["context"] == 0 and plain["format_version"] == 1   # readable as before
    capsys.readouterr()


def test_two_unlabelled_slices_a_step_by_default_and_as_many_as_labelled_for_the_paper():
    """The default's unlabelled batch (2) reaches a run from the command line when the option is not given;
    ``0`` and ``--preset paper`` mean as many as the labelled batch; a benchmark records the setting, so that
    runs made with another unlabelled batch are not resumed into the same results."""
    from mismatch.benchmark.runner import BenchmarkConfig
    from mismatch.cli import build_parser
    from mismatch.train import preset_config

    def configured(*argv):
        args = build_parser().parse_args(["train", "img.nrrd", "--labels", "l.nrrd", "--out", "m", *argv])
        return preset_config(args.preset, args.method, batch_size=args.batch_size,
                             unlabelled_batch_size=args.unlabelled_batch_size)

    assert configured().unlabelled_batch_size == 2
    assert configured("--unlabelled-batch-size", "0").unlabelled_batch_size == 0
    assert configured("--preset", "paper").unlabelled_batch_size == 0
    assert configured("--preset", "paper", "--unlabelled-batch-size", "3").unlabelled_batch_size == 3
    assert BenchmarkConfig().budget_settings()["unlabelled_batch_size"] == 2
    assert "unlabelled_batch_size" not in BenchmarkConfig(preset="paper").budget_settings()
