"""Weight averaging over the last steps (``TrainConfig.average_span``): the schedule, the average, the presets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from discs import two_painted_squares

from mismatch.errors import UserError
from mismatch.train import (TWO_DECODER_METHODS, TrainConfig, TrainingRun, average_from, fit, learning_rate,
                            preset_config)


def _old_schedule(step: int, config: TrainConfig) -> float:
    """The schedule before weight averaging: warm-up, then a cosine to 1 % of the peak at the last step."""
    warm = max(1, int(config.warmup * config.steps))
    if step < warm:
        return config.lr * (step + 1) / warm
    t = (step - warm) / max(1, config.steps - warm)
    return config.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def test_without_averaging_the_schedule_is_unchanged():
    config = TrainConfig(steps=180, average_span=0.0)
    assert [learning_rate(s, config) for s in range(180)] == [_old_schedule(s, config) for s in range(180)]


def test_the_averaged_steps_run_at_the_floor_after_a_cosine_that_reaches_it():
    config = TrainConfig(steps=180, lr=2e-3, average_span=0.3, lr_floor=0.25)
    first = average_from(config)
    assert first == 180 - 54 + 1   # the last 54 steps (1-based 127 to 180)
    rates = [learning_rate(s, config) for s in range(180)]
    warm = int(config.warmup * config.steps)
    assert rates[:warm] == [_old_schedule(s, config) for s in range(warm)]   # the same warm-up
    assert max(rates) == pytest.approx(2e-3)
    assert all(b <= a + 1e-15 for a, b in zip(rates[warm:], rates[warm + 1:]))   # never rising after the warm-up
    assert rates[first - 2] > 0.25 * 2e-3   # the step before the averaged ones is still above the floor
    assert rates[first - 1:] == pytest.approx([0.25 * 2e-3] * 54)   # every averaged step (0-based from first - 1)
    assert average_from(TrainConfig(steps=3, average_span=0.01)) == 3   # at least the last step


def test_the_network_kept_is_the_mean_of_the_weights_after_the_averaged_steps(monkeypatch):
    vol, labels = two_painted_squares()
    seen: list[tuple[int, dict]] = []
    real = TrainingRun.accumulate_average

    def record(run):
        seen.append((run.step, {k: v.detach().clone() for k, v in run.net.state_dict().items()}))
        real(run)

    monkeypatch.setattr(TrainingRun, "accumulate_average", record)
    config = TrainConfig(method="mismatch", steps=8, width=4, batch_size=1, patch_size=16, seed=0,
                         average_span=0.5, checkpoint_every=0)
    result = fit([vol], labels, np.array([1, 4]), 2, config)
    assert [step for step, _ in seen] == [5, 6, 7, 8]
    assert len(result.snapshots) == 1
    kept = result.snapshots[0]
    last = seen[-1][1]
    assert any(not torch.allclose(kept[k], last[k]) for k in kept)   # not the last weights
    for k, v in kept.items():
        mean = sum(state[k].double() for _, state in seen) / len(seen)
        assert torch.allclose(v.double(), mean, atol=1e-6), k
    assert result.networks()[0](torch.zeros(1, 1, 24, 24))[0].shape == (1, 1, 24, 24)


def test_the_default_preset_averages_the_two_decoder_methods_only():
    for method in TWO_DECODER_METHODS:
        assert preset_config("default", method).average_span == 0.3
    for method in ("unet", "unet-strong", "sup2", "mt", "fixmatch", "cct", "mta", "morph"):
        assert preset_config("default", method).average_span == 0.0
    assert preset_config("paper", "mismatch").average_span == 0.0   # the paper's recipe keeps its last weights
    assert preset_config("default", "mismatch", average_span=0.0).average_span == 0.0


@pytest.mark.parametrize("settings,words", [
    ({"average_span": 0.3, "snapshots": 3}, "--average-span 0"),
    ({"average_span": 1.0}, "--average-span 1"),
    ({"average_span": -0.1}, "--average-span -0.1"),
    ({"average_span": 0.3, "lr_floor": 0.0}, "lr_floor"),
])
def test_settings_that_cannot_run_are_refused_before_training(settings, words):
    config = TrainConfig(steps=4, width=4, **settings)
    with pytest.raises(UserError, match=words.replace("-", r"\-")):
        fit([np.zeros((1, 4, 16, 16), np.float32)], np.zeros((4, 16, 16), np.int64), np.array([1]), 2, config)


def test_a_warm_round_averages_as_its_first_training_unless_told_otherwise():
    from mismatch.train import warm_start_config

    first = preset_config("default", "mismatch")
    warm = warm_start_config(first)
    assert warm.steps == 36 and warm.average_span == 0.3 and average_from(warm) == 36 - 11 + 1
    assert warm_start_config(first, {"average_span": 0.0}).average_span == 0.0
    assert warm.lr_floor == first.lr_floor
    flat = warm_start_config(first, {"lr_floor": 1.0, "warmup": 0.0})   # measurements/ablate_warm.py's flat tail
    assert {learning_rate(s, flat) for s in range(flat.steps)} == {flat.lr}
    assert warm_start_config(preset_config("default", "unet-strong")).average_span == 0.0
