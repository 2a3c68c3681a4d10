"""More steps where a step is cheap (``TrainConfig.max_steps_scale``): how many, when, and what ``fit`` does."""

from __future__ import annotations

import numpy as np
import pytest
from discs import two_painted_squares

from mismatch.cli import build_parser
from mismatch.errors import UserError
from mismatch.events import Reporter
from mismatch.train import (STEP_OVERHEAD_PIXELS, TWO_DECODER_METHODS, TrainConfig, fit, preset_config,
                            scaled_steps, slice_shape)


def test_slices_at_least_as_large_as_the_patch_keep_the_steps():
    config = preset_config("default", "mismatch")
    assert config.max_steps_scale == 3.0 and config.patch_size == 128
    for shape in [(128, 128), (256, 256), (512, 384), (144, 208)]:
        assert scaled_steps(config, shape) == config.steps


def test_smaller_slices_get_the_steps_that_cost_what_the_patch_costs_up_to_the_cap():
    config = preset_config("default", "mismatch")
    n = config.batch_size + config.unlabelled_batch_size

    def cost(h, w):   # the pixels of the early (96) and the full (128) patch, each half the steps
        early, full = (min(96, h), min(96, w)), (min(128, h), min(128, w))
        pad = [(-(-a // 8) * 8) * (-(-b // 8) * 8) for a, b in (early, full)]
        return sum(n * p + STEP_OVERHEAD_PIXELS for p in pad)

    for shape in [(92, 74), (120, 120), (34, 128), (25, 256)]:
        expected = round(config.steps * cost(10 ** 4, 10 ** 4) / cost(*shape))
        assert scaled_steps(config, shape) == min(3 * config.steps, expected) > config.steps
    assert scaled_steps(config, (21, 45)) == 3 * config.steps            # the cap
    assert scaled_steps(config, (8, 8)) == 3 * config.steps
    assert scaled_steps(config, (120, 127)) >= config.steps               # never fewer


def test_the_scale_is_the_default_for_the_two_decoder_methods_only_and_off_for_whole_slices():
    for method in TWO_DECODER_METHODS:
        assert preset_config("default", method).max_steps_scale == 3.0
    for method in ("unet", "unet-strong", "sup2", "mt", "fixmatch", "cct"):
        assert preset_config("default", method).max_steps_scale == 1.0
        assert scaled_steps(preset_config("default", method), (21, 45)) == 180
    assert preset_config("paper", "mismatch").max_steps_scale == 1.0
    whole = preset_config("default", "mismatch", patch_size=0)
    assert scaled_steps(whole, (21, 45)) == whole.steps                  # the slices are the patches already
    assert scaled_steps(preset_config("default", "mismatch", max_steps_scale=1.0), (21, 45)) == 180


def test_slice_shape_is_the_plane_across_the_axis():
    volume = np.zeros((2, 5, 6, 7), np.float32)
    assert slice_shape(volume, "k") == (6, 7)
    assert slice_shape(volume, "j") == (5, 7)
    assert slice_shape(volume, "i") == (5, 6)


def test_fit_trains_the_scaled_steps_and_says_so():
    vol, labels = two_painted_squares()   # slices of 24 x 24 pixels
    # a 128-pixel patch costs 2.2 times a step on these slices: the cap of 2 holds
    config = TrainConfig(steps=3, width=4, batch_size=1, unlabelled_batch_size=1, patch_size=128,
                         early_patch_size=0, max_steps_scale=2.0)
    messages = []
    reporter = Reporter(progress_bar=False, quiet=True)
    reporter.log = lambda message, level="info": messages.append(message)
    result = fit([vol], labels, np.array([1, 4]), 2, config, reporter=reporter)
    assert result.steps_done == len(result.history) == 6
    assert any("24 x 24 pixels" in m and "6 steps instead of 3" in m for m in messages)
    assert config.steps == 3   # the caller's settings are left as they are
    plain = fit([vol], labels, np.array([1, 4]), 2, TrainConfig(steps=3, width=4, batch_size=1, patch_size=32),
                reporter=Reporter(progress_bar=False, quiet=True))
    assert plain.steps_done == 3


def test_a_scale_below_one_is_refused_and_the_command_takes_it():
    with pytest.raises(UserError, match="--max-steps-scale 0.5"):
        fit([np.zeros((1, 4, 16, 16), np.float32)], np.zeros((4, 16, 16), np.int64), np.array([1]), 2,
            TrainConfig(steps=2, width=4, max_steps_scale=0.5))
    args = build_parser().parse_args(["train", "img.nrrd", "--labels", "l.nrrd", "--out", "m",
                                      "--max-steps-scale", "1"])
    assert args.max_steps_scale == 1.0


def test_the_benchmark_records_the_scale_so_that_runs_without_it_are_not_resumed_into():
    from mismatch.benchmark.runner import BenchmarkConfig, check_same_settings

    settings = BenchmarkConfig().training_settings()
    assert settings["max_steps_scale"] == 3.0
    before = {k: v for k, v in settings.items() if k != "max_steps_scale"}
    with pytest.raises(UserError, match="other training settings"):
        check_same_settings(__import__("pathlib").Path("runs.json"), {"settings": before}, "settings", settings,
                            "runs")
    assert "max_steps_scale" not in BenchmarkConfig(preset="paper").training_settings()
