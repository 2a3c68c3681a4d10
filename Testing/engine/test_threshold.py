"""Where an intensity range is the structure: the range found on the painted slices, the prior's vote for it, and
the Threshold + Islands baseline."""

import numpy as np
import pytest

from mismatch.benchmark.runner import FREE
from mismatch.benchmark.tables import BASELINES
from mismatch.benchmark.threshold import threshold_islands
from mismatch.prior import PriorSettings, SlicePrior, best_range, intensity_range_notes, intensity_ranges


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


def column_painted_at_one_end():
    """A bright column through all 40 slices of a 40 x 24 x 24 volume, painted on three slices bunched at one end
    (30, 32, 34): ``(rng, shape, truth, image, sparse, painted)``, the generator left for more noise."""
    rng = np.random.default_rng(3)
    shape = (40, 24, 24)
    yy, xx = np.mgrid[:shape[1], :shape[2]]
    truth = np.broadcast_to(((yy - 12) ** 2 + (xx - 12) ** 2 <= 25)[None], shape).astype(np.uint8)
    image = (rng.normal(0.0, 0.02, shape) + truth).astype(np.float32)
    sparse = np.zeros_like(truth)
    painted = [30, 32, 34]
    sparse[painted] = truth[painted]
    return rng, shape, truth, image, sparse, painted


def test_past_the_end_the_range_decides_instead_of_the_shape_and_the_end_penalty():
    """A bright column through all 40 slices, painted on three slices bunched at one end (30, 32, 34): far past
    the painted range the range votes for the column (the shape's extrapolation and the end penalty give way);
    within ``range_far`` gaps of the end, and for a painting no range reproduces, nothing changes."""
    rng, shape, truth, image, sparse, painted = column_painted_at_one_end()
    settings = PriorSettings()
    assert settings.range_beyond > 0
    on = SlicePrior(sparse, painted, 0, (1.0, 1.0, 1.0), 2, settings, image)
    off = SlicePrior(sparse, painted, 0, (1.0, 1.0, 1.0), 2, PriorSettings(range_beyond=0.0), image)
    far = on.log_odds(5)[0]
    beta = settings.range_beta * settings.range_beyond / settings.weight
    inside = (image[5] >= on.ranges[0][0]) & (image[5] < on.ranges[0][1])
    assert np.array_equal(inside, truth[5] > 0)
    assert np.allclose(far[inside], beta) and (far[~inside] <= -beta).all()   # four times the range's vote
    assert (off.log_odds(5)[0] < 0).all()                                     # without it: cut off
    filled = on.label_map(shape)[:28] > 0                   # the fill goes on to the end (give or take a noise voxel)
    assert filled[truth[:28] > 0].all() and (filled & (truth[:28] == 0)).sum() <= 2
    assert not (off.label_map(shape)[:20] > 0).any()
    # a slice past the outermost painted one but within end_reach + range_far gaps of it: as before
    assert np.array_equal(on.log_odds(29), off.log_odds(29))
    # a painting that no intensity range reproduces: as before, far past the end too
    flat = rng.normal(0.0, 0.05, shape).astype(np.float32)
    assert np.array_equal(SlicePrior(sparse, painted, 0, (1.0, 1.0, 1.0), 2, settings, flat).log_odds(5),
                          SlicePrior(sparse, painted, 0, (1.0, 1.0, 1.0), 2, PriorSettings(range_beyond=0.0),
                                     flat).log_odds(5))


def test_the_range_takes_over_gradually_over_range_ramp_gaps():
    """With ``range_ramp``, the range's share past the end rises linearly over the ramp's gaps before ``range_far``:
    the log-odds are the step's two sides mixed in that proportion, the same as the step outside the ramp, and a
    painting no range reproduces is unchanged."""
    rng, shape, truth, image, sparse, painted = column_painted_at_one_end()
    step = SlicePrior(sparse, painted, 0, (1.0, 1.0, 1.0), 2, PriorSettings(), image)
    ramp = SlicePrior(sparse, painted, 0, (1.0, 1.0, 1.0), 2, PriorSettings(range_ramp=0.5), image)
    never = SlicePrior(sparse, painted, 0, (1.0, 1.0, 1.0), 2, PriorSettings(range_far=1e9), image)
    always = SlicePrior(sparse, painted, 0, (1.0, 1.0, 1.0), 2, PriorSettings(range_far=-1e9), image)
    st = PriorSettings()
    for s in range(30):
        beyond = (30 - s) / 2.0 - st.end_reach          # slices past the end over the gap (2 slices), less the reach
        share = min(1.0, max(0.0, (beyond - st.range_far + 0.5) / 0.5))
        assert ramp.range_takeover(beyond)[0] == pytest.approx(share)
        if beyond <= 0:                                  # no penalty, no takeover yet: as the step
            assert np.array_equal(ramp.log_odds(s), step.log_odds(s))
        if share == 1.0:
            assert np.allclose(ramp.log_odds(s), step.log_odds(s))
        # the shape term and the range's vote are linear in the share: the mix of never and always
        mixed = (1 - share) * never.log_odds(s) + share * always.log_odds(s)
        assert np.allclose(ramp.log_odds(s), mixed, atol=1e-4)
    assert 0 < ramp.range_takeover(0.25)[0] < 1 and step.range_takeover(0.25)[0] == 0
    flat = rng.normal(0.0, 0.05, shape).astype(np.float32)
    assert np.array_equal(SlicePrior(sparse, painted, 0, (1.0, 1.0, 1.0), 2, PriorSettings(range_ramp=0.5),
                                     flat).log_odds(5),
                          SlicePrior(sparse, painted, 0, (1.0, 1.0, 1.0), 2, PriorSettings(), flat).log_odds(5))
    recorded = PriorSettings(range_ramp=0.5).to_dict()
    recorded.pop("range_ramp")                         # settings recorded before the ramp: the step
    assert PriorSettings.from_dict(recorded).range_ramp == 0.0


def test_settings_recorded_before_the_range_vote_segment_without_it():
    recorded = PriorSettings().to_dict()
    recorded.pop("range_beta")
    recorded.pop("range_beyond")
    assert PriorSettings.from_dict(recorded).range_beta == 0.0
    assert PriorSettings.from_dict(recorded).range_beyond == 0.0
    assert PriorSettings.from_dict(None).range_beta == PriorSettings().range_beta > 0


def test_the_note_gives_the_range_in_the_images_units_and_only_for_a_class_that_has_one():
    image, truth = volume_with_a_bright_ball()
    sparse = np.zeros_like(truth)
    sparse[[6, 14]] = truth[[6, 14]]
    prior = SlicePrior(sparse, [6, 14], 0, (1.0, 1.0, 1.0), 2, PriorSettings(), image)
    low, high = prior.ranges[0]
    assert high == np.inf                                  # the ball is the brightest: the range is open above
    note, = intensity_range_notes(prior, [{"name": "ball"}], mean=100.0, std=2.0)
    assert note.startswith(f"ball: the intensities from {low * 2.0 + 100.0:.4g} up reproduce the painted slices")
    assert f"IoU {prior.range_ious[0]:.2f}" in note and "mark a slice there as empty" in note
    flat = np.random.default_rng(1).normal(0.0, 0.05, image.shape).astype(np.float32)
    assert intensity_range_notes(SlicePrior(sparse, [6, 14], 0, (1.0, 1.0, 1.0), 2, PriorSettings(), flat),
                                 [{"name": "ball"}]) == []


def test_a_volume_whose_every_class_has_a_range_is_tempered_more_without_changing_a_label():
    import torch

    from mismatch.inference import _fuse

    image, truth = volume_with_a_bright_ball()
    sparse = np.zeros_like(truth)
    sparse[[6, 14]] = truth[[6, 14]]
    ranged = SlicePrior(sparse, [6, 14], 0, (1.0, 1.0, 1.0), 2, PriorSettings(), image)
    plain = SlicePrior(sparse, [6, 14], 0, (1.0, 1.0, 1.0), 2, PriorSettings(range_temperature=0.0), image)
    assert ranged.ranged.all() and ranged.temperature == 3.0 and plain.temperature == 1.5
    flat = np.zeros_like(image)   # no range reproduces the painting: the usual temperature
    assert SlicePrior(sparse, [6, 14], 0, (1.0, 1.0, 1.0), 2, PriorSettings(), flat).temperature == 1.5
    # settings recorded before it (a model card of an earlier engine) keep the usual temperature
    recorded = PriorSettings.from_dict({k: v for k, v in PriorSettings().to_dict().items() if k != "range_temperature"})
    assert SlicePrior(sparse, [6, 14], 0, (1.0, 1.0, 1.0), 2, recorded, image).temperature == 1.5
    mean = torch.from_numpy(np.random.default_rng(1).random((20, 1, 32, 32)).astype(np.float32))
    hot, cool = _fuse(mean, plain, range(20), True), _fuse(mean, ranged, range(20), True)
    assert torch.equal(hot > 0.5, cool > 0.5)   # the same labels
    unpainted = [s for s in range(20) if s not in (6, 14)]
    assert ((cool[unpainted] - 0.5).abs() <= (hot[unpainted] - 0.5).abs() + 1e-6).all()   # less confident
    assert ((cool[unpainted] - 0.5).abs() < (hot[unpainted] - 0.5).abs() - 1e-3).any()
