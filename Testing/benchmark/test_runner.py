"""`mismatch benchmark` end to end on a tiny synthetic phantom: runs, resume, report, devices."""

from __future__ import annotations

import json

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


def test_bad_patch_size_is_one_clear_error(tmp_path, capsys):
    assert main(["benchmark", "--quick", "--out", str(tmp_path), "--patch-size", "8"]) == 2
    assert "--patch-size 8" in capsys.readouterr().err
