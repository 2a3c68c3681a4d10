"""The painted slices grown through the image (Grow from seeds in the engine) and its vote in the prior."""

import numpy as np
import pytest

from mismatch.grow import MAX_VOXELS, grown_box
from mismatch.prior import PriorSettings, SlicePrior, shape_interpolation


def grow_margins(image, sparse, labelled, axis=0, num_classes=None, max_voxels=MAX_VOXELS):
    """:func:`grown_box`'s margins on the whole grid ``[N, K, J, I]`` (0 outside the box)."""
    lab = np.unique(np.asarray(labelled, dtype=np.int64))
    n_fg = int(num_classes - 1) if num_classes else int(np.max(np.take(sparse, lab, axis=axis), initial=0))
    out = np.zeros((n_fg,) + np.shape(sparse), dtype=np.float32)
    grown = grown_box(image, sparse, lab, axis, n_fg + 1, max_voxels)
    if grown is not None:
        out[(slice(None),) + grown[0]] = grown[1]
    return out


def grow_from_painted(image, sparse, labelled, axis=0, num_classes=None, max_voxels=MAX_VOXELS):
    """Class indices grown from the painted slices (each voxel the class with a positive margin), the
    painted slices kept as painted: what the prior's growing vote labels."""
    margins = grow_margins(image, sparse, labelled, axis, num_classes, max_voxels)
    out = np.zeros(np.shape(sparse), dtype=np.int16)
    if len(margins):
        best = np.argmax(margins, axis=0)
        out = np.where(np.take_along_axis(margins, best[None], 0)[0] > 0, best + 1, 0).astype(np.int16)
    index = [slice(None)] * 3
    index[axis] = list(labelled)
    out[tuple(index)] = np.asarray(sparse)[tuple(index)]
    return out


def tilted_tube(n=24, size=48, radius=4.0, contrast=1.0, noise=0.05, seed=0):
    """A bright tube that moves 1 voxel per slice across the image: interpolating between painted slices
    misses it, following its edges finds it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    label = np.zeros((n, size, size), np.uint8)
    for k in range(n):
        label[k] = (yy - size / 2) ** 2 + (xx - 8 - k * 32 / n) ** 2 <= radius ** 2
    image = contrast * label + noise * rng.standard_normal(label.shape)
    return image.astype(np.float32), label


def dice(a, b):
    return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


def test_growing_follows_a_moving_structure_between_painted_slices():
    image, label = tilted_tube()
    labelled = [4, 12, 20]
    sparse = np.where(np.isin(np.arange(24), labelled)[:, None, None], label, 0)
    grown = grow_from_painted(image, sparse, labelled, axis=0)
    between = slice(5, 20)
    assert dice(grown[between] > 0, label[between] > 0) > 0.9
    assert dice(shape_interpolation(sparse, labelled)[between] > 0, label[between] > 0) < 0.8
    for s in labelled:                                         # the painted slices stay as painted
        assert np.array_equal(grown[s], sparse[s])


def test_growing_runs_in_the_grown_box_of_the_painted_voxels_and_along_any_axis():
    image, label = tilted_tube()
    labelled = [10, 12]
    sparse = np.where(np.isin(np.arange(24), labelled)[:, None, None], label, 0)
    grown = grow_from_painted(image, sparse, labelled, axis=0)
    assert not grown[:7].any() and not grown[16:].any()       # box: painted range +- 3 slices
    moved = grow_from_painted(np.moveaxis(image, 0, 2), np.moveaxis(sparse, 0, 2), labelled, axis=2)
    assert np.array_equal(np.moveaxis(moved, 2, 0), grown)


def test_margins_are_large_behind_a_clear_edge_and_small_behind_a_faint_one():
    clear_img, label = tilted_tube(contrast=1.0)
    faint_img, _ = tilted_tube(contrast=0.1, noise=0.05)
    labelled = [4, 12, 20]
    sparse = np.where(np.isin(np.arange(24), labelled)[:, None, None], label, 0)
    clear = grow_margins(clear_img, sparse, labelled, axis=0)[0]
    faint = grow_margins(faint_img, sparse, labelled, axis=0)[0]
    inside = label.astype(bool)
    inside[labelled] = False
    assert np.median(clear[inside]) > 0.3
    assert np.median(np.abs(faint[inside])) < 0.5 * np.median(clear[inside])


def test_two_classes_grow_apart_and_a_big_box_is_grown_on_a_coarser_grid():
    size = 64
    yy, xx = np.mgrid[:size, :size]
    label = np.zeros((10, size, size), np.uint8)
    label[:, (yy - 20) ** 2 + (xx - 20) ** 2 <= 64] = 1
    label[:, (yy - 44) ** 2 + (xx - 44) ** 2 <= 64] = 2
    image = (label > 0).astype(np.float32) + 0.5 * (label == 2)
    sparse = np.where(np.isin(np.arange(10), [2, 7])[:, None, None], label, 0)
    fine = grow_from_painted(image, sparse, [2, 7], axis=0, num_classes=3)
    assert np.array_equal(fine[3:7], label[3:7])
    coarse = grow_from_painted(image, sparse, [2, 7], axis=0, num_classes=3, max_voxels=5000)
    assert coarse.shape == label.shape
    assert dice(coarse[3:7] == 1, label[3:7] == 1) > 0.85 and dice(coarse[3:7] == 2, label[3:7] == 2) > 0.85


def test_nothing_painted_grows_nothing_and_shapes_must_match():
    image = np.zeros((6, 8, 8), np.float32)
    assert not grow_from_painted(image, np.zeros((6, 8, 8), np.uint8), [1, 4], axis=0).any()
    with pytest.raises(ValueError, match="differ"):
        grow_from_painted(image, np.zeros((6, 8, 9), np.uint8), [1], axis=0)


def test_the_prior_votes_with_the_grown_structure_only_when_asked_and_given_the_image():
    image, label = tilted_tube()
    labelled = [4, 12, 20]
    sparse = np.where(np.isin(np.arange(24), labelled)[:, None, None], label, 0)
    settings = PriorSettings(grow_beta=4.0, intensity_beta=0.0, range_beta=0.0)
    voting = SlicePrior(sparse, labelled, 0, (1.0, 1.0, 1.0), 2, settings, image=image)
    blind = SlicePrior(sparse, labelled, 0, (1.0, 1.0, 1.0), 2, settings)
    off = SlicePrior(sparse, labelled, 0, (1.0, 1.0, 1.0), 2,
                     PriorSettings(grow_beta=0.0, intensity_beta=0.0, range_beta=0.0), image=image)
    s = 8                                                      # the tube has moved off the painted shapes
    vote = (voting.log_odds(s) - blind.log_odds(s))[0] * settings.weight
    assert np.array_equal(off.log_odds(s), blind.log_odds(s))
    assert vote[label[s] > 0].min() > 3.0                      # +beta where the tube is
    assert vote[(label[s] == 0) & (label[4] > 0)].max() < -3.0  # -beta where it was on the painted slice
    assert (voting.log_odds(s)[0][label[s] > 0] > 0).all()     # the prior alone now finds the tube


def test_settings_recorded_before_the_image_vote_keep_segmenting_without_it():
    old = PriorSettings(grow_beta=4.0).to_dict()
    del old["grow_beta"], old["grow_scale"], old["intensity_beta"]
    assert PriorSettings.from_dict(old).grow_beta == 0.0 and PriorSettings.from_dict(old).intensity_beta == 0.0
    assert PriorSettings.from_dict(PriorSettings(grow_beta=3.0).to_dict()).grow_beta == 3.0
    assert PriorSettings.from_dict(PriorSettings(intensity_beta=0.5).to_dict()).intensity_beta == 0.5
    before_counts = PriorSettings().to_dict()
    del before_counts["intensity_counts"]                     # a card of the first version with intensities
    assert PriorSettings.from_dict(before_counts).intensity_counts == 0.0
    assert PriorSettings.from_dict(PriorSettings().to_dict()).intensity_counts == PriorSettings().intensity_counts > 0


def test_the_intensity_vote_marks_the_painted_intensity_band_where_no_path_joins_it():
    """Two bright tubes, only one painted: the edges cannot reach the other (dark background between), the
    painted voxels' intensities say it is the structure's intensity; background intensity votes against."""
    image, label = tilted_tube(radius=3.0)
    other = np.roll(label, 12, axis=2)                         # a second tube, 12 columns on, never painted
    image = image + other
    labelled = [4, 12, 20]
    sparse = np.where(np.isin(np.arange(24), labelled)[:, None, None], label, 0)
    base = PriorSettings(grow_beta=0.0, intensity_beta=0.0)
    voting = SlicePrior(sparse, labelled, 0, (1.0, 1.0, 1.0), 2,     # the full ratios: no counts to damp them
                        PriorSettings(grow_beta=0.0, intensity_beta=2.0, intensity_counts=0.0), image=image)
    plain = SlicePrior(sparse, labelled, 0, (1.0, 1.0, 1.0), 2, base, image=image)
    box = voting.intensity[0]
    s = 8
    vote = (voting.log_odds(s) - plain.log_odds(s))[0] * voting.settings.weight
    in_box = np.zeros(label[s].shape, bool)
    in_box[box[1:]] = True
    assert vote[(other[s] > 0) & in_box].min() > 2.0           # bright, unpainted: the structure's intensity
    dark = vote[(label[s] == 0) & (other[s] == 0) & in_box]    # the background's intensity (and noise)
    assert np.median(dark) < -2.0 and np.mean(dark < 0) > 0.99
    assert not vote[~in_box].any()                            # nothing outside the box
    assert np.abs(vote).max() <= 2.0 * 4.0 + 1e-5             # clipped at +-4 log-ratio, times the weight


def test_intensity_counts_weaken_the_ratios_of_a_class_painted_on_few_voxels():
    from mismatch.prior import intensity_log_ratios

    image, label = tilted_tube(radius=2.0)
    labelled = [4, 12, 20]
    sparse = np.where(np.isin(np.arange(24), labelled)[:, None, None], label, 0)
    box = (slice(0, 24), slice(0, 48), slice(0, 48))
    strengths = []
    for counts in (0.0, 100.0, 1e6):
        bins, ratios = intensity_log_ratios(image, sparse, labelled, 0, 1, box, counts)
        assert ratios.shape == (1, len(bins) - 1) and np.abs(ratios).max() <= 4.0 + 1e-6
        strengths.append(float(np.abs(ratios).mean()))
    assert strengths[0] > strengths[1] > strengths[2] and strengths[2] < 0.05
