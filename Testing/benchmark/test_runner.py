"""`mismatch benchmark` end to end on a tiny synthetic phantom: runs, resume, report, devices."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mismatch.benchmark import runner
from mismatch.benchmark.classical import slicer_filters_available
from mismatch.benchmark.runner import BenchmarkConfig, plan_runs, run_benchmark, run_key
from mismatch.cli import main
from mismatch.errors import UserError

TINY = {"synthetic-vessels": {"shape": [12, 40, 40], "spacing": [1.0, 1.0, 1.0]}}


def tiny_config(**kw) -> BenchmarkConfig:
    base = dict(datasets=["synthetic-vessels"], labelled=[2], seeds=2, methods=["unet", "mismatch"],
                alpha_sweep=[0.0, 0.002], steps=2, width=4, batch_size=1, patch_size=32, lr=1e-3,
                dataset_options=TINY, devices=["cpu"])
    base.update(kw)
    return BenchmarkConfig(**base)


def test_plan_counts_main_runs_and_the_alpha_sweep():
    specs = plan_runs(tiny_config(labelled=[2, 3], seeds=3))
    main_runs = [s for s in specs if s["group"] == "main"]
    sweep = [s for s in specs if s["group"] == "alpha"]
    assert len(main_runs) == 2 * 3 * 2
    # alpha 0.002 is the main table's run: only alpha 0 is added, on the smallest count
    assert len(sweep) == 3 and {s["alpha"] for s in sweep} == {0.0} and {s["n_labelled"] for s in sweep} == {2}
    assert all(s["alpha"] is None for s in main_runs if s["method"] == "unet")
    assert len({run_key(s) for s in specs}) == len(specs)
    # no MisMatch asked for: no sweep of it (the free baselines alone train nothing)
    assert {s["method"] for s in plan_runs(tiny_config(methods=["nearest-slice", "threshold-islands"]))} == \
        {"nearest-slice", "threshold-islands"}


def test_unknown_method_is_a_user_error():
    with pytest.raises(UserError, match="unknown method"):
        plan_runs(tiny_config(methods=["mismatch", "nope"]))


def test_benchmark_end_to_end_then_resume(tmp_path, capsys):
    methods = ["unet", "mismatch"] + (runner.CLASSICAL if slicer_filters_available() else [])
    data = run_benchmark(tiny_config(methods=methods), tmp_path, log=lambda m: None)
    runs = data["runs"]
    assert len(runs) == 2 * len(methods) + 2  # + the alpha-0 sweep
    for r in runs:
        assert 0.0 <= r["iou"] <= 1.0
        assert r["labelled_slices"] and r["test_slices"]
        assert not set(r["labelled_slices"]) & set(r["test_slices"])
        assert r["synthetic"] is True
        assert len(r["per_slice_iou"]) == r["n_test"]
    mm = [r for r in runs if r["method"] == "mismatch"][0]
    assert set(mm["decoders"]) == {"mean", "positive_decoder", "negative_decoder"}
    assert 0.0 <= mm["ece_band"] <= 1.0 and mm["params"] > 0
    # the two seeds draw different labelled slices
    assert len({tuple(r["labelled_slices"]) for r in runs if r["method"] == "unet"}) == 2
    saved = json.loads((tmp_path / "runs.json").read_text())
    assert len(saved["runs"]) == len(runs) and saved["config"]["training"]["steps"] == 2
    text = (tmp_path / "results.md").read_text()
    assert "SYNTHETIC" in text and "| MisMatch |" in text and "| alpha |" in text
    assert (tmp_path / "fig5-ece-iou-synthetic-vessels.png").stat().st_size > 1000
    assert (tmp_path / "fig4-reliability-synthetic-vessels.png").stat().st_size > 1000

    # resume: nothing left to train; the report is rebuilt from runs.json alone
    logs = []
    again = run_benchmark(tiny_config(methods=methods), tmp_path, log=logs.append)
    assert len(again["runs"]) == len(runs) and any("0 to do" in m for m in logs)
    (tmp_path / "results.md").unlink()
    assert main(["benchmark", "--out", str(tmp_path), "--report-only"]) == 0
    assert (tmp_path / "results.md").exists()
    assert main(["benchmark", "--out", str(tmp_path / "none"), "--report-only"]) == 2   # no runs.json yet
    # other settings in the same folder would mix budgets: refused
    with pytest.raises(UserError, match="other training settings"):
        run_benchmark(tiny_config(methods=methods, steps=3), tmp_path, log=lambda m: None)


def test_half_finished_benchmark_resumes(tmp_path):
    config = tiny_config(alpha_sweep=[], seeds=2)
    first = run_benchmark(tiny_config(alpha_sweep=[], seeds=1), tmp_path, log=lambda m: None)
    assert len(first["runs"]) == 2
    logs = []
    second = run_benchmark(config, tmp_path, log=logs.append)
    assert len(second["runs"]) == 4 and any("2 already in" in m for m in logs)
    assert second["runs"][:2] == first["runs"]


def test_runs_spread_over_two_workers(tmp_path):
    data = run_benchmark(tiny_config(methods=["unet"], alpha_sweep=[], devices=["cpu", "cpu"]), tmp_path,
                         log=lambda m: None)
    assert sorted(r["seed"] for r in data["runs"]) == [0, 1]
    assert all(r["device"] == "cpu" for r in data["runs"])


def test_quick_mode_from_the_command_line(tmp_path, monkeypatch):
    """`mismatch benchmark --quick` with its defaults (CTChest4 lungs, width 8, whole-budget settings),
    cut to two methods, one seed and a few steps so that the test stays short."""
    seen = {}
    real = runner.run_benchmark

    def spy(config, out_dir, **kw):
        seen["config"] = config
        return real(config, out_dir, **kw)

    monkeypatch.setattr(runner, "run_benchmark", spy)
    status = main(["benchmark", "--quick", "--out", str(tmp_path), "--methods", "unet", "mismatch",
                   "--seeds", "1", "--steps", "3", "--alpha-sweep"])
    assert status == 0
    config = seen["config"]
    assert config.datasets == ["ctchest-lungs"] and config.width == 8 and config.labelled == [3]
    assert config.steps == 3 and config.alpha_sweep == []
    runs = json.loads((tmp_path / "runs.json").read_text())["runs"]
    assert {r["method"] for r in runs} == {"unet", "mismatch"} and all(r["dataset"] == "ctchest-lungs" for r in runs)
    assert "| MisMatch |" in (tmp_path / "results.md").read_text()


def test_placement_from_the_command_line(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(runner, "run_benchmark", lambda config, out_dir, **kw: seen.setdefault("config", config))
    assert main(["benchmark", "--quick", "--out", str(tmp_path), "--placement", "even"]) == 0
    assert seen["config"].placement == "even"
    seen.clear()
    assert main(["benchmark", "--out", str(tmp_path)]) == 0
    assert seen["config"].placement == "random"           # the default keeps the earlier draws


def test_bad_patch_size_is_one_clear_error(tmp_path, capsys):
    assert main(["benchmark", "--quick", "--out", str(tmp_path), "--patch-size", "8"]) == 2
    assert "--patch-size 8" in capsys.readouterr().err


# -- the free baselines -------------------------------------------------------------------------------------

def _cylinder_case():
    """12 slices of 2 mm; a square rod of constant cross-section on slices 2..9 only, brighter than the rest."""
    from mismatch.benchmark.datasets import Case
    from mismatch.io import Geometry

    label = np.zeros((12, 32, 32), np.uint8)
    label[2:10, 10:20, 12:22] = 1
    rng = np.random.default_rng(0)
    image = (rng.normal(0, 0.1, label.shape) + label).astype(np.float32)[None]
    geometry = Geometry((32, 32, 12), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return Case("tiny-rod", image, label, geometry, axis=0, classes={1: "rod"})


def test_default_methods_hold_the_free_baselines_and_the_strong_unet():
    from mismatch.methods import METHODS

    assert runner.FREE == ["nearest-slice", "shape-interpolation", "threshold-islands"]
    assert runner.LEARNED.index("unet-strong") == runner.LEARNED.index("unet") + 1
    assert BenchmarkConfig().methods == runner.LEARNED + runner.FREE + runner.CLASSICAL
    specs = plan_runs(BenchmarkConfig(datasets=["tiny-rod"], labelled=[2], seeds=1, alpha_sweep=[]))
    planned = [s["method"] for s in specs]
    assert set(runner.FREE) <= set(planned) and all(s["alpha"] is None for s in specs if s["method"] in runner.FREE)
    assert set(runner.LEARNED) <= set(planned) and set(runner.LEARNED) <= set(METHODS)
    with pytest.raises(UserError, match="unknown method"):
        plan_runs(tiny_config(methods=["unet-stronger"]))


def test_free_baselines_count_false_positives_on_empty_slices(tmp_path, monkeypatch):
    """The two interpolating baselines copy the rod beyond the outermost labelled slices, onto the 4 slices
    without it: test = the 10 unlabelled slices, 6 with the rod and 4 without, so the pooled IoU is 6 / 10 exactly
    (1.0 if only the slices with foreground were tested)."""
    import mismatch.prior as prior
    from mismatch.benchmark import datasets

    case = _cylinder_case()
    monkeypatch.setitem(datasets.DATASETS, "tiny-rod", lambda **kw: [case])
    monkeypatch.setattr(runner, "_CASES", {})
    calls = []
    real = prior.shape_interpolation

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(prior, "shape_interpolation", spy)
    config = tiny_config(datasets=["tiny-rod"], dataset_options={}, methods=runner.FREE + ["mismatch"],
                         alpha_sweep=[], seeds=2, patch_size=32)
    data = run_benchmark(config, tmp_path, log=lambda m: None)
    free = [r for r in data["runs"] if r["method"] in runner.FREE]
    assert len(free) == 6 and {r["method"] for r in free} == set(runner.FREE)
    free = [r for r in free if r["method"] != "threshold-islands"]
    for r in free:
        assert r["n_test"] == 10 and set(r["test_slices"]) == set(range(12)) - set(r["labelled_slices"])
        assert {0, 1, 10, 11} <= set(r["test_slices"])
        assert r["iou"] == pytest.approx(0.6)
        assert r["ece_band"] is None and r["params"] == 0 and r["train_seconds"] == 0.0
        assert r["seconds"] >= 0 and r["ms_per_slice"] == pytest.approx(1000 * r["seconds"] / 12, rel=0.01, abs=1e-3)
        assert r["per_slice_iou"].count(0.0) == 4 and r["per_slice_iou"].count(1.0) == 6
    assert calls and all(c["spacing"] == (2.0, 1.0, 1.0) and c["num_classes"] == 2 for c in calls)
    mm = [r for r in data["runs"] if r["method"] == "mismatch"]
    assert all(r["seconds"] >= r["train_seconds"] > 0 for r in mm)
    text = (tmp_path / "results.md").read_text()
    assert "| Nearest labelled slice (copy) |" in text and "| Shape-based interpolation |" in text
    assert "## Against the best free baseline" in text
    # the rod is brighter than all else: thresholding it and keeping what touches the painted voxels finds it
    # whole, and nothing on the empty slices
    threshold = [r["iou"] for r in data["runs"] if r["method"] == "threshold-islands"]
    assert len(threshold) == 2 and min(threshold) > 0.99
    assert f"| 2 | best baseline: Threshold + Islands | {100 * np.mean(threshold):.1f} ±" in text
    assert "every slice that is not labelled" in text
    line = next(l for l in text.splitlines() if l.startswith("| 2 | MisMatch |"))
    diff = float(line.split("|")[4])
    assert diff == pytest.approx(100 * (np.mean([r["iou"] for r in mm]) - np.mean(threshold)), abs=0.051)


def test_runs_tested_on_other_slices_are_not_mixed(tmp_path):
    old = {"config": {"training": tiny_config().training_settings()},
           "runs": [{"dataset": "synthetic-vessels", "method": "unet", "n_labelled": 2, "seed": 0, "iou": 0.5,
                     "group": "main", "alpha": None}]}
    (tmp_path / "runs.json").write_text(json.dumps(old))
    with pytest.raises(UserError, match="other slices"):
        run_benchmark(tiny_config(), tmp_path, log=lambda m: None)
    assert main(["benchmark", "--out", str(tmp_path), "--report-only"]) == 0
    text = (tmp_path / "results.md").read_text()
    assert "before split version 2" in text and "## Against the best free baseline" in text
    assert "| 2 | best baseline: Sup1 (U-Net) | 50.0 ± 0.0 | ref. | ref. | – | – |" in text


def test_a_cancel_stops_the_benchmark_and_keeps_the_finished_runs(tmp_path, monkeypatch):
    from mismatch.errors import Cancelled

    real = runner.run_one
    calls = []

    def run_one(spec, config, device="auto"):
        calls.append(spec)
        if len(calls) == 2:    # Ctrl-C / SIGTERM during the second run
            raise Cancelled("stopped by SIGTERM")
        return real(spec, config, device=device)

    monkeypatch.setattr(runner, "run_one", run_one)
    with pytest.raises(Cancelled):
        run_benchmark(tiny_config(methods=["nearest-slice"], alpha_sweep=[], seeds=3), tmp_path, log=lambda m: None)
    saved = json.loads((tmp_path / "runs.json").read_text())
    assert len(calls) == 2 and len(saved["runs"]) == 1 and not saved.get("failed")


def test_runs_made_with_other_method_options_or_prior_are_not_resumed(tmp_path):
    settings = tiny_config().training_settings()
    assert settings["method_options"] and settings["prior"]  # the default preset's, part of the budget
    for changed in ({"method_options": {}}, {"prior": None}):
        old = {"config": {"training": {**settings, **changed}}, "runs": []}
        (tmp_path / "runs.json").write_text(json.dumps(old))
        with pytest.raises(UserError, match="another --out folder"):
            run_benchmark(tiny_config(), tmp_path, log=lambda m: None)


def test_even_placement_uses_the_same_slices_for_every_seed_and_is_not_mixed_with_random(tmp_path):
    config = tiny_config(methods=["nearest-slice", "unet"], alpha_sweep=[], seeds=2, placement="even")
    data = run_benchmark(config, tmp_path, log=lambda m: None)
    assert len({tuple(r["labelled_slices"]) for r in data["runs"]}) == 1
    assert {r["placement"] for r in data["runs"]} == {"even"}
    unet = [r for r in data["runs"] if r["method"] == "unet"]
    assert {r["seed"] for r in unet} == {0, 1}
    assert "evenly spaced over the structure's extent" in (tmp_path / "results.md").read_text()
    with pytest.raises(UserError, match="--placement even"):
        run_benchmark(tiny_config(methods=["nearest-slice"], alpha_sweep=[], seeds=2), tmp_path, log=lambda m: None)
    assert main(["benchmark", "--out", str(tmp_path), "--report-only"]) == 0


def test_files_of_ones_own_are_a_data_set(tmp_path, capsys):
    """``--files IMAGE LABELS``: a volume of one's own with full labels, benchmarked and simulated like the named
    data sets (named file-<image name>, its label values as classes, a CT in HU windowed as train does); a bad
    file is one clear error."""
    import SimpleITK as sitk

    from mismatch.benchmark.datasets import files_datasets, load_dataset

    k, j, i = np.mgrid[:12, :24, :28]
    disc = ((j - 12) ** 2 + (i - 14) ** 2 <= (5 + (k % 3)) ** 2) & (k >= 2) & (k <= 9)
    image = np.where(disc, 40.0, -800.0).astype(np.float32) + np.random.default_rng(0).normal(0, 5, disc.shape)
    paths = {}
    for name, array in (("ct.nii.gz", image.astype(np.float32)), ("truth.nrrd", (disc * 3).astype(np.uint8))):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing((0.8, 0.8, 2.0))
        sitk.WriteImage(img, str(tmp_path / name))
        paths[name] = str(tmp_path / name)

    files = files_datasets([[paths["ct.nii.gz"], paths["truth.nrrd"]], [paths["ct.nii.gz"], paths["truth.nrrd"]]])
    assert list(files) == ["file-ct", "file-ct-2"]
    (case,) = load_dataset("file-ct", **files["file-ct"])
    assert case.classes == {1: "label 3"} and int(case.label.max()) == 1 and case.window is not None
    assert case.spacing == pytest.approx((2.0, 0.8, 0.8))

    out = tmp_path / "bench"
    assert main(["benchmark", "--out", str(out), "--files", paths["ct.nii.gz"], paths["truth.nrrd"], "--methods",
                 "nearest-slice", "shape-interpolation", "--labelled", "2", "--seeds", "1", "--placement", "even",
                 "--alpha-sweep"]) == 0
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert {(r["dataset"], r["method"]) for r in runs} == {("file-ct", "nearest-slice"),
                                                           ("file-ct", "shape-interpolation")}
    assert all(0 < r["iou"] <= 1 for r in runs)
    assert "file-ct" in (out / "results.md").read_text()

    sim = tmp_path / "sim"
    assert main(["simulate", "--out", str(sim), "--files", paths["ct.nii.gz"], paths["truth.nrrd"], "--methods",
                 "unet-strong", "--start", "2", "--max-labelled", "3", "--seeds", "1", "--policies", "even",
                 "--steps", "2", "--width", "4", "--patch-size", "0", "--batch-size", "2", "--device", "cpu",
                 "--no-reference"]) == 0
    rounds = json.loads((sim / "loop.json").read_text())["rounds"]
    assert [(r["dataset"], r["n_labelled"]) for r in rounds] == [("file-ct", 2), ("file-ct", 3)]

    capsys.readouterr()
    assert main(["benchmark", "--out", str(tmp_path / "bad"), "--files", paths["ct.nii.gz"],
                 str(tmp_path / "missing.nrrd"), "--methods", "nearest-slice", "--labelled", "2", "--seeds", "1",
                 "--alpha-sweep"]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.nrrd" in err and "Traceback" not in err


def test_files_sliced_along_another_axis(tmp_path, capsys):
    """``--axis`` slices a volume of one's own along j or i: a structure on 2 of 6 k-slices cannot give 3
    labelled slices along k (one clear error that names --axis), and along i it can; the data set's name says
    the axis, so that runs along two axes never pass for each other. ``--axis`` without ``--files`` is an
    error."""
    import SimpleITK as sitk

    from mismatch.benchmark.datasets import files_datasets, load_dataset

    k, j, i = np.mgrid[:6, :16, :30]
    slab = (k >= 2) & (k <= 3) & (abs(j - 8) <= 4) & (i >= 4) & (i <= 25)
    image = np.where(slab, 100.0, 0.0).astype(np.float32) + np.random.default_rng(0).normal(0, 5, slab.shape)
    paths = []
    for name, array in (("mri.nii.gz", image.astype(np.float32)), ("truth.nrrd", slab.astype(np.uint8))):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / name))
        paths.append(str(tmp_path / name))

    assert list(files_datasets([paths], axis="i")) == ["file-mri-axis-i"]
    (case,) = load_dataset("file-mri-axis-i", **files_datasets([paths], axis="i")["file-mri-axis-i"])
    assert case.axis == 2

    args = ["--files", *paths, "--methods", "nearest-slice", "--labelled", "3", "--seeds", "1", "--alpha-sweep"]
    capsys.readouterr()
    assert main(["benchmark", "--out", str(tmp_path / "k"), *args]) == 2
    err = capsys.readouterr().err
    assert "--axis" in err and "Traceback" not in err
    assert main(["benchmark", "--out", str(tmp_path / "i"), "--axis", "i", *args]) == 0
    runs = json.loads((tmp_path / "i" / "runs.json").read_text())["runs"]
    assert [(r["dataset"], r["n_slices"], len(r["labelled_slices"])) for r in runs] == [("file-mri-axis-i", 30, 3)]
    assert main(["benchmark", "--out", str(tmp_path / "x"), "--axis", "j", "--datasets", "ctchest-lungs"]) == 2
    assert "--files" in capsys.readouterr().err


def test_several_classes_record_each_class_iou_and_the_report_shows_them(tmp_path):
    """A data set of two classes: every run (a free tool and a trained one) records each class's IoU by name,
    whose mean is the headline IoU, and results.md gains a per-class table; a one-class data set has none."""
    import SimpleITK as sitk

    k, j, i = np.mgrid[:10, :24, :28]
    left = ((j - 12) ** 2 + (i - 8) ** 2 <= 16) & (k >= 1) & (k <= 8)
    right = ((j - 12) ** 2 + (i - 20) ** 2 <= (3 + k % 2) ** 2) & (k >= 2) & (k <= 7)
    image = np.where(left, 60.0, np.where(right, 200.0, 0.0)).astype(np.float32)
    image += np.random.default_rng(0).normal(0, 5, image.shape).astype(np.float32)
    label = (left * 1 + right * 2).astype(np.uint8)
    paths = []
    for name, array in (("two.nrrd", image), ("two-label.nrrd", label)):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / name))
        paths.append(str(tmp_path / name))
    out = tmp_path / "bench"
    assert main(["benchmark", "--out", str(out), "--files", *paths, "--methods", "nearest-slice", "mismatch",
                 "--labelled", "3", "--seeds", "1", "--placement", "even", "--alpha-sweep", "--steps", "2",
                 "--width", "4", "--patch-size", "0", "--batch-size", "2", "--devices", "cpu"]) == 0
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert {r["method"] for r in runs} == {"nearest-slice", "mismatch"}
    for r in runs:
        assert set(r["class_iou"]) == {"label 1", "label 2"}
        assert np.mean(list(r["class_iou"].values())) == pytest.approx(r["iou"])
    text = (out / "results.md").read_text()
    assert "## Each class" in text and "| label 2 |" in text

    from mismatch.benchmark.tables import class_table
    assert class_table([{**r, "class_iou": None} for r in runs]) == "_No runs with several classes._"


def test_runs_recorded_before_a_neutral_prior_setting_still_resume(tmp_path):
    """A folder's prior recorded before a setting existed is read as that setting at its old value: where
    today's default is that value (range_ramp 0: the step of before) the runs resume; where it is not
    (range_temperature, 0 before), they are another budget and refused."""
    from mismatch.benchmark.runner import check_same_settings
    from mismatch.prior import PriorSettings

    today = {"steps": 180, "prior": PriorSettings().to_dict()}
    older = {"steps": 180, "prior": {k: v for k, v in today["prior"].items() if k != "range_ramp"}}
    check_same_settings(tmp_path / "runs.json", {"training": older}, "training", today, "runs")
    oldest = {"steps": 180, "prior": {k: v for k, v in older["prior"].items() if k != "range_temperature"}}
    with pytest.raises(UserError, match="other training settings"):
        check_same_settings(tmp_path / "runs.json", {"training": oldest}, "training", today, "runs")
    with pytest.raises(UserError, match="other training settings"):   # the budget itself is still compared
        check_same_settings(tmp_path / "runs.json", {"training": {**older, "steps": 150}}, "training", today, "runs")
    check_same_settings(tmp_path / "runs.json", {"training": {"steps": 3, "prior": None}}, "training",
                        {"steps": 3, "prior": None}, "runs")   # no prior recorded: compared as it is
