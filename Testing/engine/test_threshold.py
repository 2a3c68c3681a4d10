"""Where an intensity range is the structure: the range found on the painted slices, the prior's vote for it, and
the Threshold + Islands baseline."""

import numpy as np
import pytest

from mismatch.benchmark.runner import FREE
from mismatch.benchmark.tables import BASELINES
from mismatch.benchmark.threshold import threshold_islands
from mismatch.prior import PriorSettings, SlicePrior, best_range, intensity_ranges


def ball(shape, centre, radius):
    zz, yy, xx = np.mgrid[:shape[0], :shape[1], :shape[2]]
    return (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius ** 2


def test_best_range_finds_the_band_that_reproduces_the_members():
    values = np.arange(100.0)
    low, high, iou = best_range(values, (values >= 20) & (values < 60), np.arange(0.0, 101.0))
    assert (low, high, iou) == (20.0, 60.0, 1.0)
    low, high, iou = best_range(values, values >= 70, np.arange(0.0, 101.0, 10.0))
    assert low == 70.0 and high >= 100.0 and iou == 1.0
    # a structure that no band reproduces: members scattered over the whole range
    rng = np.random.default_rng(0)
    assert best_range(values, rng.random(100) < 0.3, np.arange(0.0, 101.0))[2] < 0.6
    with pytest.raises(ValueError, match="not painted"):
        best_range(values, np.zeros(100, bool), np.arange(0.0, 101.0))


def volume_with_a_bright_ball(shape=(20, 32, 32), seed=0):
    """A bright ball (the structure) and a bright blob apart from it, on a darker noisy background."""
    rng = np.random.default_rng(seed)
    truth = ball(shape, (10, 12, 12), 7)
    blob = ball(shape, (10, 26, 26), 3)
    image = rng.normal(0.0, 0.05, shape) + np.where(truth | blob, 1.0, 0.0)
    return image.astype(np.float32), truth.astype(np.uint8)


def test_threshold_islands_keeps_the_range_connected_to_the_painted_voxels():
    image, truth = volume_with_a_bright_ball()
    sparse = np.zeros_like(truth)
    sparse[[6, 14]] = truth[[6, 14]]
    out = threshold_islands(image, sparse, [6, 14], axis=0)
    assert np.array_equal(out[[6, 14]], truth[[6, 14]])
    assert np.array_equal(out > 0, truth > 0)          # the ball on every slice, the blob apart from it dropped
    # a painted slice with a dark hole painted as structure stays as painted
    sparse[6, 12, 12] = 1
    image[6, 12, 12] = -1.0
    assert threshold_islands(image, sparse, [6, 14], axis=0)[6, 12, 12] == 1
    assert "threshold-islands" in FREE and "threshold-islands" in BASELINES


def test_the_prior_votes_for_an_intensity_range_only_where_it_reproduces_the_painting():
    image, truth = volume_with_a_bright_ball()
    sparse = np.zeros_like(truth)
    sparse[[6, 14]] = truth[[6, 14]]
    (low, high, iou), = intensity_ranges(image, sparse, [6, 14], 0, 1)
    assert iou > 0.95 and 0.1 < low < 0.8 and high > 1.0
    on = SlicePrior(sparse, [6, 14], 0, (1.0, 1.0, 1.0), 2, PriorSettings(), image)
    off = SlicePrior(sparse, [6, 14], 0, (1.0, 1.0, 1.0), 2, PriorSettings(range_beta=0.0), image)
    assert on.ranges[0] is not None and off.ranges == [None]
    gain = on.log_odds(10)[0] - off.log_odds(10)[0]
    weight = PriorSettings().weight
    inside = (image[10] >= on.ranges[0][0]) & (image[10] < on.ranges[0][1])
    assert np.allclose(gain, np.where(inside, 4.0, -4.0) / weight)   # for the class in the range, against it outside
    assert inside[truth[10] > 0].all() and not inside[:, :4].any()
    # a painting that no intensity range reproduces (a structure of the background's intensity): no vote
    flat = np.random.default_rng(1).normal(0.0, 0.05, image.shape).astype(np.float32)
    plain = SlicePrior(sparse, [6, 14], 0, (1.0, 1.0, 1.0), 2, PriorSettings(), flat)
    assert plain.ranges == [None]
    assert np.array_equal(plain.log_odds(10), SlicePrior(sparse, [6, 14], 0, (1.0, 1.0, 1.0), 2,
                                                           PriorSettings(range_beta=0.0), flat).log_odds(10))


def test_settings_recorded_before_the_range_vote_segment_without_it():
    recorded = PriorSettings().to_dict()
    recorded.pop("range_beta")
    assert PriorSettings.from_dict(recorded).range_beta == 0.0
    assert PriorSettings.from_dict(None).range_beta == PriorSettings().range_beta > 0
