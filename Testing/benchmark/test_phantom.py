"""The SYNTHETIC phantoms: the vessel tree (determinism, connectivity, radii, label against tubes, intensities,
mask) and the lesion (determinism, one part inside the mask, reaching its edge, slices past both ends)."""

import numpy as np
import pytest
from scipy import ndimage

from mismatch.benchmark.phantom import MURRAY_RATIO, lesion_phantom, segment_distance, vessel_phantom

SHAPE, SPACING = (40, 64, 64), (1.0, 0.8, 0.8)


@pytest.fixture(scope="module")
def phantom():
    return vessel_phantom(shape=SHAPE, spacing=SPACING, seed=3, n_roots=2, max_depth=4, root_radius_mm=2.5)


def _distance_to_tubes(info, shape, spacing):
    """For every voxel: min over tubes of (distance to the centreline - radius), mm."""
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), -1)
    best = np.full(shape, np.inf)
    for s in info["segments"]:
        d = segment_distance(grid, np.array(s["start"]), np.array(s["end"])) - s["radius"]
        best = np.minimum(best, d)
    return best


def test_deterministic_and_seed_dependent(phantom):
    image, label, info = phantom
    again = vessel_phantom(shape=SHAPE, spacing=SPACING, seed=3, n_roots=2, max_depth=4, root_radius_mm=2.5)
    assert np.array_equal(image, again[0]) and np.array_equal(label, again[1])
    other = vessel_phantom(shape=SHAPE, spacing=SPACING, seed=4, n_roots=2, max_depth=4, root_radius_mm=2.5)
    assert not np.array_equal(label, other[1])
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert image.shape == label.shape == SHAPE
    assert info["synthetic"] and info["name"].startswith("synthetic")


@pytest.mark.parametrize("n_roots,seed", [(1, 0), (2, 1), (3, 2)])
def test_one_connected_component_per_root(n_roots, seed):
    _, label, info = vessel_phantom(shape=SHAPE, spacing=SPACING, seed=seed, n_roots=n_roots, max_depth=4,
                                    root_radius_mm=2.5)
    _, n = ndimage.label(label, structure=np.ones((3, 3, 3)))
    assert n == n_roots
    assert {s["root"] for s in info["segments"]} == set(range(n_roots))


def test_radii_decrease_with_depth_murray_like(phantom):
    _, _, info = phantom
    segs = info["segments"]
    assert len(segs) > 6 and max(s["depth"] for s in segs) >= 2
    for s in segs:
        if s["parent"] >= 0:
            ratio = s["radius"] / segs[s["parent"]]["radius"]
            assert 0.95 * MURRAY_RATIO <= ratio <= 1.05 * MURRAY_RATIO
            assert s["depth"] == segs[s["parent"]]["depth"] + 1
        assert s["radius"] >= info["min_radius_mm"]
    by_depth = {}
    for s in segs:
        by_depth.setdefault(s["depth"], []).append(s["radius"])
    means = [np.mean(by_depth[d]) for d in sorted(by_depth)]
    assert all(a > b for a, b in zip(means, means[1:]))


def test_label_matches_the_tubes(phantom):
    _, label, info = phantom
    spacing = np.array(SPACING)
    d = _distance_to_tubes(info, SHAPE, SPACING)
    # inside every tube <=> labelled (the label is occupancy >= 0.5, i.e. the voxel centre inside a tube)
    assert np.array_equal(label.astype(bool), d <= 0)
    # nothing farther than one voxel from every tube is labelled
    assert not label[d > spacing.max()].any()
    # the voxels nearest to points along each centreline are labelled
    for s in info["segments"]:
        a, b = np.array(s["start"]), np.array(s["end"])
        for t in np.linspace(0, 1, 9):
            idx = tuple(np.rint((a + t * (b - a)) / spacing).astype(int))
            assert label[idx] == 1
    # every tube stays inside the volume
    for s in info["segments"]:
        for p in (s["start"], s["end"]):
            assert (np.array(p) >= 0).all() and (np.array(p) <= (np.array(SHAPE) - 1) * spacing).all()


def test_intensities_partial_volume_and_noise(phantom):
    image, label, info = phantom
    background = image[ndimage.binary_dilation(label, iterations=3) == 0]
    assert -900 < background.mean() < -800 and 15 < background.std() < 45
    occ = info["occupancy"]
    assert ((occ > 0) & (occ < 1)).any()  # partial-volume edge
    core = occ >= 0.999
    assert core.any() and image[core].mean() > -100  # enhanced vessel (40..200 HU, blurred, noisy)
    assert all(40 <= v <= 200 for v in info["vessel_hu"])
    assert image.min() > -1200 and image.max() < 400


def test_placed_inside_a_mask_and_background():
    shape = (30, 60, 60)
    k, j, i = np.mgrid[:30, :60, :60]
    mask = ((k - 15) / 13.0) ** 2 + ((j - 30) / 26.0) ** 2 + ((i - 30) / 26.0) ** 2 <= 1.0
    ct = np.where(mask, -850.0, 40.0).astype(np.float32)
    image, label, info = vessel_phantom(spacing=(1.0, 1.0, 1.0), seed=5, background=ct, mask=mask, n_roots=2,
                                        max_depth=3, root_radius_mm=2.0, noise_hu=5.0)
    assert image.shape == shape and label.any()
    assert not label[~mask].any()
    far = ~ndimage.binary_dilation(mask, iterations=2)
    assert abs(image[far].mean() - 40.0) < 2  # the given background is kept away from the vessels
    _, n = ndimage.label(label, structure=np.ones((3, 3, 3)))
    assert n == 2


def test_bad_arguments():
    with pytest.raises(ValueError):
        vessel_phantom(shape=(20, 20, 20), root_radius_mm=0.2)
    with pytest.raises(ValueError):
        vessel_phantom(shape=(20, 20, 20), mask=np.zeros((20, 20, 20), bool))


def _lungs(shape=(40, 48, 48)):
    k, j, i = np.mgrid[:shape[0], :shape[1], :shape[2]]
    mask = ((k - 20) / 18.0) ** 2 + ((j - 24) / 21.0) ** 2 + ((i - 24) / 21.0) ** 2 <= 1.0
    return np.where(mask, -850.0, 40.0).astype(np.float32), mask


@pytest.mark.parametrize("pleural", [True, False])
def test_lesion_one_part_in_the_mask_with_slices_past_its_ends(pleural):
    ct, mask = _lungs()
    spacing = (1.5, 1.0, 1.0)
    image, label, info = lesion_phantom(ct, mask, spacing, seed=2, radius_mm=(7.0, 8.0), pleural=pleural,
                                        noise_hu=0.0, blur_voxels=0.0)
    again = lesion_phantom(ct, mask, spacing, seed=2, radius_mm=(7.0, 8.0), pleural=pleural, noise_hu=0.0,
                           blur_voxels=0.0)
    assert np.array_equal(image, again[0]) and np.array_equal(label, again[1])
    assert info["synthetic"] and info["pleural"] == pleural and 7.0 <= info["radius_mm"] <= 8.0
    _, n = ndimage.label(label, structure=np.ones((3, 3, 3)))
    assert n == 1
    assert not label[~ndimage.binary_dilation(mask)].any()
    first, last = info["slices"]
    assert label[first].any() and label[last].any() and not label[:first].any() and not label[last + 1:].any()
    assert first > 0 and last < label.shape[0] - 1
    # soft-tissue intensities inside; the given CT kept away from it
    assert image[label > 0].mean() > -450
    far = ~ndimage.binary_dilation(label > 0, iterations=3)
    assert np.array_equal(image[far], ct[far])
    # pleural: the lesion reaches the mask's edge (meets the wall); otherwise it stays inside
    edge = ndimage.binary_dilation(~mask, iterations=2)
    assert bool((label.astype(bool) & edge).any()) == pleural


def test_lesion_bad_arguments():
    ct, mask = _lungs((12, 12, 12))
    with pytest.raises(ValueError, match="no place"):
        lesion_phantom(ct, mask, (1.0, 1.0, 1.0), radius_mm=(30.0, 31.0))
    with pytest.raises(ValueError, match="one 3D shape"):
        lesion_phantom(ct, mask[:-1], (1.0, 1.0, 1.0))
