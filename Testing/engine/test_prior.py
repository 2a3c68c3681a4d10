"""What the painted slices imply: free baselines, the prior, connectivity, and their use in segmentation."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from mismatch.inference import segment_volume
from mismatch.methods.augment import anatomy_preserving
from mismatch.models import ArchitectureConfig, SegmentationNetwork
from mismatch.prior import (PriorSettings, SlicePrior, boundary_threshold, intensity_bin, joined_parts_per_slice,
                            keep_connected, nearest_slice, painted_pieces, shape_interpolation, signed_distance)


def disc(shape, centre, radius):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def test_signed_distance_gives_the_mask_back_and_handles_empty_slices():
    m = disc((32, 32), (16, 16), 6)
    sdf = signed_distance(m, (1.0, 1.0), absent=99.0)
    assert np.array_equal(sdf < 0, m)
    assert sdf.min() < -4 and sdf.max() > 8
    assert np.all(signed_distance(np.zeros((8, 8), bool), (1.0, 1.0), absent=99.0) == 99.0)


def test_shape_interpolation_grows_between_slices_and_copies_beyond():
    sparse = np.zeros((9, 40, 40), np.uint8)
    sparse[2] = disc((40, 40), (20, 20), 4)
    sparse[6] = disc((40, 40), (20, 20), 12)
    out = shape_interpolation(sparse, [2, 6], axis=0, spacing=(3.0, 1.0, 1.0))
    areas = out.reshape(9, -1).sum(1)
    assert np.array_equal(out[2], sparse[2]) and np.array_equal(out[6], sparse[6])
    assert areas[2] < areas[3] < areas[4] < areas[5] < areas[6]
    r4 = np.sqrt(areas[4] / np.pi)
    assert 7 <= r4 <= 9   # halfway between radius 4 and 12
    assert np.array_equal(out[0], sparse[2]) and np.array_equal(out[8], sparse[6])   # copied beyond
    near = nearest_slice(sparse, [2, 6], axis=0)
    assert np.array_equal(near[3], sparse[2]) and np.array_equal(near[5], sparse[6])


def test_shape_interpolation_along_another_axis_and_with_two_classes():
    sparse = np.zeros((30, 9, 30), np.uint8)
    sparse[:, 1] = disc((30, 30), (10, 10), 5) * 1 + disc((30, 30), (22, 22), 5) * 2
    sparse[:, 7] = disc((30, 30), (10, 10), 5) * 1   # class 2 absent on slice 7
    out = shape_interpolation(sparse, [1, 7], axis=1, spacing=(1.0, 2.0, 1.0), num_classes=3)
    # class 2 is painted on slice 1 and absent on slice 7: it shrinks and ends halfway
    assert set(np.unique(out[:, 3])) == {0, 1, 2} and (out[:, 3] == 2).sum() < (out[:, 2] == 2).sum()
    assert not (out[:, 5:7] == 2).any()
    assert np.array_equal(out[:, 4] == 1, sparse[:, 1] == 1)


def test_prior_is_sure_near_painted_slices_and_far_from_the_shape_and_shrinks_beyond():
    sparse = np.zeros((20, 40, 40), np.uint8)
    sparse[8] = disc((40, 40), (20, 20), 6)
    sparse[12] = disc((40, 40), (20, 20), 6)
    prior = SlicePrior(sparse, [8, 12], axis=0, spacing=(2.0, 1.0, 1.0), num_classes=2,
                       settings=PriorSettings(tau_mm=2.0, default_rate=0.5, end_penalty=0.0))
    mid = prior.log_odds(10)[0]
    assert mid.shape == (40, 40)
    assert mid[20, 20] > 1 and mid[0, 0] < -5           # inside: foreground; far corner: background
    beyond_near, beyond_far = prior.log_odds(14)[0], prior.log_odds(19)[0]
    assert (beyond_far > 0).sum() < (beyond_near > 0).sum() <= (mid > 0).sum()   # the structure ends
    assert prior.is_labelled(8) and not prior.is_labelled(10)
    assert prior.rate < 0.1    # the same disc on both slices: the outline does not move


def test_prior_ends_the_structure_past_a_quarter_gap_beyond_the_outermost_painted_slice():
    sparse = np.zeros((40, 40, 40), np.uint8)
    for s in (10, 18, 26):                        # painted every 8 slices
        sparse[s] = disc((40, 40), (20, 20), 8)
    settings = PriorSettings()
    with_end = SlicePrior(sparse, [10, 18, 26], 0, (1.0, 1.0, 1.0), 2, settings)
    without = SlicePrior(sparse, [10, 18, 26], 0, (1.0, 1.0, 1.0), 2, PriorSettings(end_penalty=0.0))
    assert with_end.gap_mm == 8.0
    for s in (11, 14, 22, 25, 27, 28):            # between the painted slices, and within a quarter gap beyond
        assert np.array_equal(with_end.log_odds(s), without.log_odds(s))
    # beyond: the weighted log-odds fall by end_penalty per gap past the reach, everywhere in the slice
    for s, gaps in ((34, 8 / 8 - 0.25), (2, 8 / 8 - 0.25), (38, 12 / 8 - 0.25)):
        drop = (without.log_odds(s) - with_end.log_odds(s)) * settings.weight
        assert np.allclose(drop, settings.end_penalty * gaps, atol=1e-4)
    # one painted slice has no gap: no end; settings recorded before the end existed segment without it
    single = SlicePrior(sparse, [18], 0, (1.0, 1.0, 1.0), 2, settings)
    assert single.gap_mm is None
    assert np.array_equal(single.log_odds(38), SlicePrior(sparse, [18], 0, (1.0, 1.0, 1.0), 2,
                                                          PriorSettings(end_penalty=0.0)).log_odds(38))
    old = {k: v for k, v in settings.to_dict().items() if not k.startswith("end_")}
    assert PriorSettings.from_dict(old).end_penalty == 0.0
    assert PriorSettings.from_dict(settings.to_dict()) == settings
    # settings recorded before the end followed the network keep the end where the painted slices put it
    before = {k: v for k, v in settings.to_dict().items() if k != "end_follows_network"}
    assert settings.end_follows_network and not PriorSettings.from_dict(before).end_follows_network


def test_boundary_rate_measures_how_fast_the_outline_moves():
    sparse = np.zeros((9, 60, 60), np.uint8)
    sparse[0] = disc((60, 60), (30, 30), 10)
    sparse[4] = disc((60, 60), (30, 30), 18)      # the radius grows 8 mm over 4 slices of 2 mm
    prior = SlicePrior(sparse, [0, 4], axis=0, spacing=(2.0, 1.0, 1.0), num_classes=2)
    assert 0.8 < prior.rate < 1.2


def test_bulge_rate_measures_how_far_a_shape_reaches_past_both_its_painted_neighbours():
    """A cone's middle section lies inside its larger neighbour: it reaches past neither (rate 0); a barrel's
    middle section reaches 4 mm past both neighbours' outlines over 4 mm of the slice axis (rate about 1); a
    class on fewer than three painted slices, or absent from an outer one, has no measure."""
    spacing = (2.0, 1.0, 1.0)
    cone = np.zeros((9, 60, 60), np.uint8)
    for s, r in ((0, 8), (2, 12), (4, 16)):
        cone[s] = disc((60, 60), (30, 30), r)
    assert SlicePrior(cone, [0, 2, 4], 0, spacing, 2).bulge == [0.0]
    barrel = cone.copy()
    barrel[0] = barrel[4] = disc((60, 60), (30, 30), 12)
    barrel[2] = disc((60, 60), (30, 30), 16)
    assert 0.8 < SlicePrior(barrel, [0, 2, 4], 0, spacing, 2).bulge[0] < 1.2
    assert SlicePrior(barrel, [0, 2], 0, spacing, 2).bulge == [None]
    barrel[4] = 0
    assert SlicePrior(barrel, [0, 2, 4], 0, spacing, 2).bulge == [None]


def test_what_both_painted_neighbours_call_outside_the_structure_votes_against_it_in_between():
    """Between two painted slices, a pixel outside the structure on both votes against it, more the farther
    it lies past the nearer outline (in units of the painted slices' own bulge), not inside either outline
    and not past the outermost painted slices; off (``agree_beta`` 0, settings recorded before it) it adds
    nothing; a class painted in many pieces (ribs: its pieces do not match from slice to slice) gets no vote."""
    sparse = np.zeros((20, 40, 40), np.uint8)
    for s, r in ((6, 8), (8, 10), (10, 8)):
        sparse[s] = disc((40, 40), (20, 20), r)
    spacing = (1.0, 1.0, 1.0)
    on = SlicePrior(sparse, [6, 8, 10], 0, spacing, 2, PriorSettings(agree_beta=2.0))
    off = SlicePrior(sparse, [6, 8, 10], 0, spacing, 2, PriorSettings(agree_beta=0.0))
    assert PriorSettings.from_dict({k: v for k, v in PriorSettings(agree_beta=2.0).to_dict().items()
                                    if k != "agree_beta"}).agree_beta == 0.0
    added = on.weight(7) * (on.log_odds(7) - off.log_odds(7))[0]
    assert added[20, 20] == 0 and added[20, 20 + 9] == 0             # inside the smaller neighbour's outline
    assert added[20, 20 + 12] < added[20, 20 + 11] < 0               # past both: against, more farther out
    assert added.min() == pytest.approx(-2.0 * 4.0)                   # at most agree_beta x the clip
    assert np.array_equal(on.log_odds(12), off.log_odds(12))         # past the painted range: nothing
    long_gap = SlicePrior(sparse, [6, 8, 10], 0, spacing, 2, PriorSettings(agree_beta=2.0, agree_pixels=0.5))
    assert np.array_equal(long_gap.log_odds(7), off.log_odds(7))     # the unit above agree_pixels: nothing
    ribs = np.zeros((20, 40, 40), np.uint8)
    for s in (6, 8, 10):
        ribs[s, 2::3, 2::3] = 1                                       # 169 pieces a slice
    many = SlicePrior(ribs, [6, 8, 10], 0, spacing, 2, PriorSettings(agree_beta=2.0))
    assert many.bulge == [None]
    assert np.array_equal(many.log_odds(7), SlicePrior(ribs, [6, 8, 10], 0, spacing, 2,
                                                       PriorSettings(agree_beta=0.0)).log_odds(7))


def test_keep_connected_drops_parts_not_touching_painted_voxels_of_their_class():
    pred = np.zeros((10, 20, 20), np.uint8)
    pred[2:8, 2:6, 2:6] = 1        # touches the painted voxels on slice 4
    pred[0:2, 14:18, 14:18] = 1    # a separate blob: dropped
    pred[5:7, 10:12, 2:4] = 2      # class 2, painted nowhere: kept
    sparse = np.zeros_like(pred)
    sparse[4, 3:5, 3:5] = 1
    out = keep_connected(pred, sparse, [4], axis=0)
    assert out[3, 3, 3] == 1 and out[0, 15, 15] == 0 and out[5, 10, 2] == 2
    assert (out == 1).sum() == (pred[2:8, 2:6, 2:6] == 1).sum()


def _twelve_pieces_painted() -> tuple[np.ndarray, np.ndarray]:
    """``(pred, sparse)`` of shape 9 x 40 x 40: class 1 painted on slices 0 and 8 in 12 separate pieces each,
    ``pred`` holding the painted slices as painted and nothing between."""
    pred = np.zeros((9, 40, 40), np.uint8)
    sparse = np.zeros_like(pred)
    for s in (0, 8):
        for n in range(12):
            sparse[s, 3 * n + 1, 2:4] = 1       # 12 separate pieces on each painted slice
    pred[(0, 8), :, :] = sparse[(0, 8), :, :]
    return pred, sparse


def test_a_class_painted_in_many_pieces_keeps_its_parts_that_touch_no_painted_voxel():
    """Ribs-like: a dozen small arcs on each painted slice that move between slices. With ``many_parts`` at or
    below the painted pieces a slice, the pieces of the slices between that touch no painted voxel are kept;
    above it (or 0), dropped as before; a class in one piece is dropped either way; a model card without the
    setting keeps the behaviour it was made with."""
    pred, sparse = _twelve_pieces_painted()
    pred[4, 1:38:3, 30:32] = 1                  # arcs of a slice between, touching no painted voxel
    pred[2:6, 10:14, 20:24] = 2                 # class 2: one painted piece, a part apart from it
    sparse[0, 30:34, 30:34] = 2
    pred[0, 30:34, 30:34] = 2
    assert painted_pieces(sparse[[0, 8]], 1, 0) == 12.0 and painted_pieces(sparse[[0, 8]], 2, 0) == 1.0
    kept = keep_connected(pred, sparse, [0, 8], axis=0, many_parts=12)
    assert (kept[4] == 1).sum() == (pred[4] == 1).sum()
    assert (kept[2:6] == 2).sum() == 0
    for many in (0, 13):
        assert (keep_connected(pred, sparse, [0, 8], axis=0, many_parts=many)[4] == 1).sum() == 0
    assert PriorSettings().many_parts == 12
    old = {k: v for k, v in PriorSettings().to_dict().items() if k != "many_parts"}
    assert PriorSettings.from_dict(old).many_parts == 0.0


def test_pieces_that_join_in_3d_make_one_structure_whose_parts_apart_are_dropped():
    """A spine painted sagittally: a dozen pieces on each painted slice (the processes), but the prediction joins
    them in 3D into one part. Counted in separate parts of the prediction, not in pieces of the painted section,
    the class is one structure: a part touching no painted voxel is dropped, as for any class in few pieces. The
    ribs-like case (each piece a part of its own) keeps such parts."""
    pred, sparse = _twelve_pieces_painted()
    pred[1:8, 1:36, 2:4] = 1                    # the slices between join every piece into one part
    pred[4, 30:34, 30:34] = 1                   # a part apart
    lab = [0, 8]
    assert painted_pieces(sparse[lab], 1, 0) == 12.0
    parts, _ = ndimage.label(pred == 1)
    assert joined_parts_per_slice(parts, sparse == 1, 0) == 1.0
    out = keep_connected(pred, sparse, lab, axis=0, many_parts=12, joined_parts=4)
    assert out[4, 31, 31] == 0 and (out[1:8, 1:36, 2:4] == 1).all()
    assert keep_connected(pred, sparse, lab, axis=0, many_parts=12)[4, 31, 31] == 1   # the rule before

    ribs, _ = _twelve_pieces_painted()
    ribs[4, 1:38:3, 30:32] = 1                  # arcs between, each apart: 12 parts a painted slice
    parts, _ = ndimage.label(ribs == 1)
    assert joined_parts_per_slice(parts, sparse == 1, 0) == 12.0
    kept = keep_connected(ribs, sparse, lab, axis=0, many_parts=12, joined_parts=4)
    assert (kept[4] == 1).sum() == (ribs[4] == 1).sum() == 13 * 2
    old = {k: v for k, v in PriorSettings().to_dict().items() if k != "joined_parts"}
    assert PriorSettings.from_dict(old).joined_parts == 0.0


def test_keep_connected_matches_labelling_the_whole_volume():
    """The parts are found in each class's bounding box: the same result as labelling the whole volume, on
    random label maps, painted slices along every axis, classes painted or not."""

    def whole_volume(pred, sparse, lab, axis):
        out = pred.copy()
        on = np.zeros(pred.shape, bool)
        index = [slice(None)] * 3
        index[axis] = lab
        on[tuple(index)] = True
        for c in [int(v) for v in np.unique(pred) if v]:
            seeds, mask = on & (sparse == c), pred == c
            comp, _ = ndimage.label(mask)
            keep = np.unique(comp[seeds & mask])
            if not (seeds & mask).any():
                out[mask] = 0 if seeds.any() else c
                continue
            out[mask & ~np.isin(comp, keep[keep > 0])] = 0
        return out

    rng = np.random.default_rng(0)
    for _ in range(200):
        shape = tuple(int(n) for n in rng.integers(3, 12, 3))
        axis = int(rng.integers(0, 3))
        pred = ((rng.random(shape) < rng.uniform(0.2, 0.6)) * rng.integers(1, 4, shape)).astype(np.uint8)
        lab = np.sort(rng.choice(shape[axis], size=int(rng.integers(1, 4)), replace=False))
        sparse = np.zeros(shape, np.uint8)
        index = [slice(None)] * 3
        index[axis] = lab
        sparse[tuple(index)] = ((rng.random(shape) < 0.3) * rng.integers(1, 4, shape))[tuple(index)]
        assert np.array_equal(keep_connected(pred, sparse, lab, axis), whole_volume(pred, sparse, lab, axis))


def test_segment_volume_keeps_painted_slices_and_removes_unconnected_parts():
    torch.manual_seed(0)
    net = SegmentationNetwork(ArchitectureConfig(name="mismatch", in_channels=1, num_classes=2, width=4)).eval()
    volume = np.random.default_rng(0).normal(size=(1, 8, 24, 24)).astype(np.float32)
    sparse = np.zeros((8, 24, 24), np.uint8)
    sparse[2, 8:16, 8:16] = 1
    sparse[5, 9:15, 9:15] = 1
    prior = SlicePrior(sparse, [2, 5, 7], axis=0, spacing=(1.0, 1.0, 1.0), num_classes=2)   # 7: empty
    seg = segment_volume([net], volume, axis="k", prior=prior)
    for s in (2, 5, 7):
        assert np.array_equal(seg.labels[s], sparse[s])
        assert np.all(seg.confidence[s] == 1.0)
    fg = seg.labels > 0
    assert np.array_equal(keep_connected(seg.labels, sparse, [2, 5, 7], 0), seg.labels)
    assert not fg[:, :4, :4].any()   # far from the painted shape: background
    plain = segment_volume([net], volume, axis="k")
    assert plain.labels.shape == seg.labels.shape


def test_anatomy_preserving_augmentation_keeps_labels_and_can_be_off():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 32, 32)
    y = torch.zeros(3, 32, 32, dtype=torch.long)
    y[:, 10:20, 12:22] = 1
    xa, ya = anatomy_preserving(x, y, probability=1.0)
    assert xa.shape == x.shape and ya.shape == y.shape and ya.dtype == y.dtype
    assert set(ya.unique().tolist()) <= {0, 1} and not torch.equal(xa, x)
    assert abs(int(ya.sum()) - int(y.sum())) < 0.4 * int(y.sum())   # rotated / scaled, not mirrored away
    x0, y0 = anatomy_preserving(x, y, probability=0.0)
    assert torch.equal(x0, x) and torch.equal(y0, y)


@pytest.mark.parametrize("bad", [[], [-1], [20]])
def test_prior_rejects_bad_slices(bad):
    with pytest.raises(ValueError):
        SlicePrior(np.zeros((20, 4, 4), np.uint8), bad, 0, (1, 1, 1), 2)


def test_segment_volume_with_two_classes_keeps_each_painted_class():
    torch.manual_seed(0)
    net = SegmentationNetwork(ArchitectureConfig(name="mismatch", in_channels=1, num_classes=3, width=4)).eval()
    volume = np.random.default_rng(1).normal(size=(1, 6, 24, 24)).astype(np.float32)
    sparse = np.zeros((6, 24, 24), np.uint8)
    sparse[1, 4:10, 4:10] = 1
    sparse[1, 14:20, 14:20] = 2
    sparse[4, 5:11, 5:11] = 1          # class 2 absent on slice 4: it ends halfway
    prior = SlicePrior(sparse, [1, 4], axis=0, spacing=(2.0, 1.0, 1.0), num_classes=3)
    assert prior.log_odds(2).shape == (2, 24, 24)
    seg = segment_volume([net], volume, axis="k", prior=prior)
    assert np.array_equal(seg.labels[1], sparse[1]) and np.array_equal(seg.labels[4], sparse[4])
    assert np.all(seg.confidence[[1, 4]] == 1.0)
    assert set(np.unique(seg.labels)) <= {0, 1, 2}
    # every part of each class touches that class's painted voxels (the untrained network's others are gone)
    assert np.array_equal(keep_connected(seg.labels, sparse, [1, 4], 0), seg.labels)


class _SeesBright(SegmentationNetwork):
    """A stand-in network that sees the bright structure of the image exactly (both decoders alike), and
    counts the slices it is run on."""

    def __init__(self):
        super().__init__(ArchitectureConfig(name="mismatch", in_channels=1, num_classes=2, width=4))
        self.slices_run = 0

    def forward(self, x, heads=None):
        self.slices_run += x.shape[0]
        z = 20.0 * (x[:, :1].float() - 0.5)
        return [z, z]


def _tube(first: int, last: int, n: int = 40) -> np.ndarray:
    """A bright tube of radius 6 on slices ``first..last`` of an ``n`` x 24 x 24 volume."""
    label = np.zeros((n, 24, 24), np.uint8)
    label[first:last + 1] = disc((24, 24), (12, 12), 6)
    return label


@pytest.mark.parametrize("batch", [1, 4])
def test_the_end_moves_out_where_the_network_alone_sees_the_painted_structure_go_on(batch):
    label = _tube(3, 37)                       # a long structure, painted close together near its top end
    painted = [28, 31, 34]
    sparse = np.zeros_like(label)
    sparse[painted] = label[painted]
    volume = label[None].astype(np.float32)
    net = _SeesBright()
    prior = SlicePrior(sparse, painted, 0, (1.0, 1.0, 1.0), 2)
    seg = segment_volume([net], volume, axis="k", prior=prior, batch_size=batch)
    assert seg.extended_ends == {-1: 3}    # below: 25 slices past 28; above: 3, no more than the gap
    assert prior.ends == {-1: 3, 1: 34}
    assert np.array_equal(seg.labels > 0, label > 0)
    assert net.slices_run == 40                # the slices run while finding the ends were kept for the pass
    assert [r["slice"] for r in seg.slice_scores if r.get("structure_goes_on")] == list(range(3, 28))
    # without the move, the prior past the painted range's quarter gap vetoes the network's +10 log-odds
    fixed = SlicePrior(sparse, painted, 0, (1.0, 1.0, 1.0), 2)
    assert fixed.log_odds(15)[0, 12, 12] * fixed.settings.weight < -10


def _bar(first: int, last: int, cols: tuple[int, int], n: int = 40) -> np.ndarray:
    """A bright bar (rows 4..19, columns ``cols``) on slices ``first..last`` of an ``n`` x 24 x 24 volume."""
    label = np.zeros((n, 24, 24), np.uint8)
    label[first:last + 1, 4:20, cols[0]:cols[1]] = 1
    return label


def test_the_end_stays_where_the_network_alone_sees_nothing_more_or_something_else():
    painted = [10, 14, 18]
    # a structure on the left on slices 8 to 12, on the right on 13 to 20
    label = _bar(8, 12, (4, 9)) | _bar(13, 20, (14, 19))
    sparse = np.zeros_like(label)
    sparse[painted] = label[painted]
    for image in (label, label | _bar(0, 7, (14, 19))):   # beyond its end nothing, or something else bright
        prior = SlicePrior(sparse, painted, 0, (1.0, 1.0, 1.0), 2)   # of the same size, in the painted box
        seg = segment_volume([_SeesBright()], image[None].astype(np.float32), axis="k", prior=prior,
                             outputs=("labels",))
        assert seg.extended_ends == {}
        assert prior.ends == {-1: 10, 1: 18}
    # the same thing on the painted structure's side: the structure going on
    image = label | _bar(0, 7, (4, 9))
    seg = segment_volume([_SeesBright()], image[None].astype(np.float32), axis="k",
                         prior=SlicePrior(sparse, painted, 0, (1.0, 1.0, 1.0), 2), outputs=())
    assert seg.extended_ends == {-1: 0}
    # a stretch no longer than the gap between painted slices is what the painting's spacing allows for
    label = _tube(6, 22)
    sparse = np.zeros_like(label)
    sparse[painted] = label[painted]
    seg = segment_volume([_SeesBright()], label[None].astype(np.float32), axis="k",
                         prior=SlicePrior(sparse, painted, 0, (1.0, 1.0, 1.0), 2), outputs=())
    assert seg.extended_ends == {}
    # one painted slice: no gap, no end rule
    seg = segment_volume([_SeesBright()], _tube(3, 37)[None].astype(np.float32), axis="k",
                         prior=SlicePrior(_tube(20, 20), [20], 0, (1.0, 1.0, 1.0), 2), outputs=())
    assert seg.extended_ends == {}
    # turned off (a model card from before the setting): the end stays where the painting puts it
    label = _tube(3, 37)
    sparse = np.zeros_like(label)
    sparse[[28, 31, 34]] = label[[28, 31, 34]]
    seg = segment_volume([_SeesBright()], label[None].astype(np.float32), axis="k", outputs=("labels",),
                         prior=SlicePrior(sparse, [28, 31, 34], 0, (1.0, 1.0, 1.0), 2,
                                          PriorSettings(end_follows_network=False)))
    assert seg.extended_ends == {} and not seg.labels[:20].any()


class _SeesTheTubesPlace(SegmentationNetwork):
    """A stand-in network that marks the tube's place (radius 6 around the centre) wherever the image is not
    background there, whatever its intensity: a network that has learnt the shape, never a slice without it."""

    def __init__(self):
        super().__init__(ArchitectureConfig(name="mismatch", in_channels=1, num_classes=2, width=4))
        self.place = torch.from_numpy(disc((24, 24), (12, 12), 6))

    def forward(self, x, heads=None):
        z = torch.where(self.place & (x[:, :1].float() > 0.2), 10.0, -10.0)
        return [z, z]


def _lung_over_liver() -> tuple[np.ndarray, np.ndarray]:
    """``(image, label)``: a dark tube (the lung, 0.9 here for the stand-in) on slices 20 to 37 of 40, over a
    grey organ (0.4) that fills its place below it and lies beside it on every slice (on the painted ones too)."""
    label = _tube(20, 37)
    image = np.zeros(label.shape, np.float32)
    image[3:20][:, disc((24, 24), (12, 12), 6)] = 0.4       # the organ under the tube's end
    image[:, 2:22, 19:23] = 0.4                               # and beside it, painted as background
    image[label > 0] = 0.9
    return image, label


def test_the_end_does_not_move_for_a_shape_without_the_painted_intensities():
    image, label = _lung_over_liver()
    painted = [28, 31, 34]                       # close together: a gap of 3; the tube reaches down to 20
    sparse = np.zeros_like(label)
    sparse[painted] = label[painted]
    volume = image[None]
    prior = SlicePrior(sparse, painted, 0, (1.0, 1.0, 1.0), 2, image=image)
    assert prior.intensity_support(10, (slice(None), slice(None)), image[10] == 0.4) < 0   # the organ
    assert prior.intensity_support(25, (slice(None), slice(None)), label[25] > 0) > 0      # the tube
    assert prior.intensity_support(25, (slice(None), slice(None)), np.zeros((24, 24), bool)) is None
    seg = segment_volume([_SeesTheTubesPlace()], volume, axis="k", prior=prior, outputs=("labels",))
    assert seg.extended_ends == {-1: 20}         # the tube goes on to 20; the organ below it is not the tube
    assert (seg.labels[20:] > 0).sum() == (label[20:] > 0).sum()
    organ = int((seg.labels[:20] > 0).sum())     # the end penalty from 20 on vetoes the stand-in's +10 further down
    scores = {r["slice"]: r for r in seg.slice_scores}
    assert scores[10]["network_intensity"] < 0 < scores[22]["network_intensity"]
    # without the intensities' check (a model card from before it), the organ's shape moves the end to 3
    old = {k: v for k, v in prior.settings.to_dict().items() if k != "end_intensity"}
    assert prior.settings.end_intensity and not PriorSettings.from_dict(old).end_intensity
    shape_only = SlicePrior(sparse, painted, 0, (1.0, 1.0, 1.0), 2, PriorSettings(end_intensity=False), image=image)
    seg = segment_volume([_SeesTheTubesPlace()], volume, axis="k", prior=shape_only, outputs=("labels",))
    assert seg.extended_ends == {-1: 3}
    assert "network_intensity" not in {k for r in seg.slice_scores for k in r}
    assert (seg.labels[:20] > 0).sum() > 2 * organ > 0   # marked down to slice 3, not 12



def test_a_share_of_the_painted_slices_intensity_support_is_needed_for_the_end_to_move():
    """Past a tumour's end a network that has never seen a slice without it may still mark its place, on tissue
    with some of its intensities: weaker support than on the painted slice is not the structure going on."""
    label = _tube(20, 37)
    place = disc((24, 24), (12, 12), 6)
    image = np.zeros(label.shape, np.float32)
    image[:, 2:22, 19:23] = 0.4                                       # painted as background beside the tube
    below = np.where(np.arange(24)[:, None] % 2 == 0, 0.9, 0.4) * np.ones((1, 24))  # half as the tube, half not
    image[3:20][:, place] = below[place]
    image[label > 0] = 0.9
    painted = [28, 31, 34]
    sparse = np.zeros_like(label)
    sparse[painted] = label[painted]
    ends, below_tube = {}, {}
    for share in (0.0, 0.5):
        # range_beta 0: a tumour's intensities are no range that reproduces its painting (this tube's are)
        prior = SlicePrior(sparse, painted, 0, (1.0, 1.0, 1.0), 2,
                           PriorSettings(end_intensity_share=share, range_beta=0.0), image=image)
        whole = (slice(None), slice(None))
        assert 0 < prior.intensity_support(10, whole, place) < 0.5 * prior.intensity_support(28, whole, place)
        seg = segment_volume([_SeesTheTubesPlace()], image[None], axis="k", prior=prior, outputs=("labels",))
        ends[share], below_tube[share] = seg.extended_ends, int((seg.labels[:20] > 0).sum())
    assert ends == {0.0: {-1: 3}, 0.5: {-1: 20}}   # with the share: as far as the tube goes, not its place below
    assert np.array_equal(seg.labels[20:] > 0, label[20:] > 0)
    assert below_tube[0.0] == 17 * place.sum() > 2 * below_tube[0.5]   # the end penalty from 20 on, not from 3
    # a model card from before the setting segments as it did: no share
    old = {k: v for k, v in PriorSettings(end_intensity_share=0.5).to_dict().items() if k != "end_intensity_share"}
    assert PriorSettings.from_dict(old).end_intensity_share == 0.0

def test_past_the_growing_box_the_intensities_vote_only_against():
    image, label = _lung_over_liver()
    image[5, 10:14, 10:14] = 0.9                 # something as dark as the tube far below it (bowel gas)
    painted = [28, 31, 34]
    sparse = np.zeros_like(label)
    sparse[painted] = label[painted]
    prior = SlicePrior(sparse, painted, 0, (1.0, 1.0, 1.0), 2, image=image)
    inside_only = SlicePrior(sparse, painted, 0, (1.0, 1.0, 1.0), 2, PriorSettings(intensity_beyond=False),
                             image=image)
    box = prior.intensity[0]
    assert box[0].start > 10                     # slice 10 is past the box along the slice axis
    organ, gas = (10, 12, 12), (5, 12, 12)
    _, bins, ratios = prior.intensity
    organ_ratio = ratios[0, intensity_bin(bins, np.float32(0.4))]
    assert organ_ratio < 0                       # painted beside the tube: unlike it
    vote = prior.log_odds(organ[0])[(0,) + organ[1:]] - inside_only.log_odds(organ[0])[(0,) + organ[1:]]
    assert vote == pytest.approx(prior.settings.intensity_beta / prior.settings.weight * organ_ratio, rel=1e-4)
    assert prior.log_odds(gas[0])[(0,) + gas[1:]] == inside_only.log_odds(gas[0])[(0,) + gas[1:]]
    inside = box[0].start + 1                    # in the box: both, the same votes
    assert np.array_equal(prior.log_odds(inside), inside_only.log_odds(inside))
    old = {k: v for k, v in prior.settings.to_dict().items() if k != "intensity_beyond"}
    assert prior.settings.intensity_beyond and not PriorSettings.from_dict(old).intensity_beyond


def test_extend_end_checks_its_side():
    sparse = _tube(10, 10)
    sparse[20] = _tube(20, 20)[20]
    prior = SlicePrior(sparse, [10, 20], 0, (1.0, 1.0, 1.0), 2)
    far = prior.log_odds(2)
    prior.extend_end(-1, 2)
    assert (prior.log_odds(2) > far).all()     # no end penalty there any more
    with pytest.raises(ValueError):
        prior.extend_end(-1, 12)
    with pytest.raises(ValueError):
        prior.extend_end(0, 5)


@pytest.mark.parametrize("classes", [2, 3])
def test_the_temperature_tempers_the_confidence_and_keeps_every_label(classes):
    """The combined log-odds divided by the temperature: the same label map, lower confidence off the painted
    slices (and 1 on them); settings recorded before the temperature segment untempered."""
    torch.manual_seed(0)
    net = SegmentationNetwork(ArchitectureConfig(name="mismatch", in_channels=1, num_classes=classes,
                                                 width=4)).eval()
    volume = np.random.default_rng(2).normal(size=(1, 6, 24, 24)).astype(np.float32)
    sparse = np.zeros((6, 24, 24), np.uint8)
    sparse[1, 4:12, 4:12] = 1
    sparse[4, 6:14, 6:14] = classes - 1
    segs = {t: segment_volume([net], volume, axis="k", prior=SlicePrior(
        sparse, [1, 4], axis=0, spacing=(2.0, 1.0, 1.0), num_classes=classes,
        settings=PriorSettings(temperature=t))) for t in (1.0, 2.0)}
    assert np.array_equal(segs[1.0].labels, segs[2.0].labels)
    assert np.all(segs[2.0].confidence[[1, 4]] == 1.0)
    off = [0, 2, 3, 5]
    assert np.all(segs[2.0].confidence[off] <= segs[1.0].confidence[off] + 1e-6)
    assert segs[2.0].confidence[off].mean() < segs[1.0].confidence[off].mean()
    old = {k: v for k, v in PriorSettings(temperature=2.0).to_dict().items() if k != "temperature"}
    assert PriorSettings.from_dict(old).temperature == 1.0


def test_past_the_painted_range_the_prior_weighs_beyond_scale_times_more():
    """Off the painted range the prior's weight in the fusion is ``beyond_scale`` times its weight between
    the painted slices (1 by default: the same everywhere); settings recorded before it weigh the same
    everywhere; a larger scale moves the fused probability towards the prior's only there."""
    sparse = _tube(10, 20)
    sparse[[11, 12, 13, 14, 16, 17, 18, 19]] = 0
    st = PriorSettings(beyond_scale=4.0)
    prior = SlicePrior(sparse, [10, 15, 20], 0, (1.0, 1.0, 1.0), 2, st)
    assert [prior.weight(s) for s in (10, 12, 20)] == [st.weight] * 3
    assert [prior.weight(s) for s in (9, 21, 39)] == [4 * st.weight] * 3
    plain = SlicePrior(sparse, [10, 15, 20], 0, (1.0, 1.0, 1.0), 2)
    assert PriorSettings().beyond_scale == 1.0 and plain.weight(39) == plain.weight(12)
    old = {k: v for k, v in st.to_dict().items() if k != "beyond_scale"}
    assert PriorSettings.from_dict(old).beyond_scale == 1.0
    assert PriorSettings.from_dict(st.to_dict()) == st
    torch.manual_seed(0)
    net = SegmentationNetwork(ArchitectureConfig(name="mismatch", in_channels=1, num_classes=2, width=4)).eval()
    volume = np.random.default_rng(3).normal(size=(1, *sparse.shape)).astype(np.float32)
    segs = {p: segment_volume([net], volume, axis="k", prior=p, outputs=("confidence", "labels"))
            for p in (plain, prior)}
    inside, outside = [12, 17], [5, 30]
    assert np.array_equal(segs[plain].confidence[inside], segs[prior].confidence[inside])
    assert not np.array_equal(segs[plain].confidence[outside], segs[prior].confidence[outside])


def test_boundary_threshold_finds_the_painted_outlines_intensity_and_how_sharp_it_is():
    """The logistic fit on the pixels along the painted outlines: the threshold halfway across a clear edge and
    a steep slope (negative for a structure darker than its surroundings); a flat one where the intensities
    inside and outside are the same; None for a class not painted."""
    rng = np.random.default_rng(0)
    label = np.zeros((5, 40, 40), np.uint8)
    for k in (1, 3):
        label[k] = disc((40, 40), (20, 20), 5 + 2 * k)
    image = np.where(label > 0, 200.0, -800.0) + rng.normal(0, 20, label.shape)
    (slope, threshold), = boundary_threshold(image, label, [1, 3], 0, 1)
    assert -450 < threshold < -150 and slope * 500 > 3   # at either side's intensity: over 3 log-odds
    (dark_slope, dark_threshold), = boundary_threshold(-image, label, [1, 3], 0, 1)
    assert dark_slope < 0 and 150 < dark_threshold < 450
    flat = rng.normal(0, 20, label.shape)
    (flat_slope, _), = boundary_threshold(flat, label, [1, 3], 0, 1)
    assert abs(flat_slope) * 20 < 0.5   # one standard deviation of the intensities: under half a log-odds
    assert boundary_threshold(image, label, [1, 3], 0, 2) == [boundary_threshold(image, label, [1, 3], 0, 1)[0],
                                                               None]


def _undecided_network(classes: int) -> SegmentationNetwork:
    """A MisMatch network whose every decoder says 0.5 (every class equally likely) everywhere."""
    net = SegmentationNetwork(ArchitectureConfig(name="mismatch", in_channels=1, num_classes=classes, width=4))
    for decoder in net.decoders:
        torch.nn.init.zeros_(decoder.classifier.weight)
        torch.nn.init.zeros_(decoder.classifier.bias)
    return net.eval()


@pytest.mark.parametrize("classes", [2, 3])
def test_the_painted_outlines_intensity_moves_the_outline_where_the_rest_is_in_doubt(classes):
    """A bright disc grows from radius 5 to 9 over slices 2 to 6 but is back to radius 5 on slice 4. With a
    network in doubt and the shape of the painted slices alone, slice 4 gets the interpolated radius 7; the
    painted outlines' intensity puts its outline on the image's edge. Past the outermost painted slices it only
    votes against the structure; with ``boundary_beta`` 0 (settings recorded before it) nothing changes; the
    prior's label map alone (``mismatch fill``) does not use it."""
    truth = np.zeros((9, 40, 40), np.uint8)
    for k, r in ((2, 5), (3, 5), (4, 5), (5, 8), (6, 9)):
        truth[k] = disc((40, 40), (20, 20), r)
    volume = np.where(truth > 0, 1.0, -1.0)[None].astype(np.float32)
    sparse = np.zeros_like(truth)
    sparse[[2, 6]] = truth[[2, 6]]
    plain = dict(grow_beta=0.0, intensity_beta=0.0, end_penalty=0.0, connected=False, range_beta=0.0)
    priors = {beta: SlicePrior(sparse, [2, 6], 0, (1.0, 1.0, 1.0), classes,
                               PriorSettings(boundary_beta=beta, **plain), image=volume[0]) for beta in (0.0, 2.0)}
    assert priors[0.0].boundary_vote(4) is None and priors[2.0].boundary_vote(4).shape == (classes - 1, 40, 40)
    assert priors[2.0].boundary_vote(1).max() == 0 and priors[2.0].boundary_vote(1).min() < 0   # past: only against
    assert priors[0.0].image is None and priors[2.0].image is not None   # the volume held only for a vote
    segs = {beta: segment_volume([_undecided_network(classes)], volume, axis="k", prior=p, outputs=("labels",))
            for beta, p in priors.items()}

    def iou(a, b):
        return (a & b).sum() / (a | b).sum()

    before, after = iou(segs[0.0].labels[4] > 0, truth[4] > 0), iou(segs[2.0].labels[4] > 0, truth[4] > 0)
    assert before < 0.7 and after > 0.95
    assert np.array_equal(segs[2.0].labels[[2, 6]], sparse[[2, 6]])
    filled = {beta: p.label_map(truth.shape) for beta, p in priors.items()}   # mismatch fill: without it
    assert np.array_equal(filled[0.0], filled[2.0])
    old = {k: v for k, v in PriorSettings(boundary_beta=2.0).to_dict().items() if k != "boundary_beta"}
    assert PriorSettings.from_dict(old).boundary_beta == 0.0 and PriorSettings().boundary_beta > 0
    # the weight a card records is the one it segments with: cards written at 2, before the default became 3
    assert PriorSettings().boundary_beta == 3.0
    assert PriorSettings.from_dict({**PriorSettings().to_dict(), "boundary_beta": 2.0}).boundary_beta == 2.0


def test_the_painted_outlines_intensity_votes_for_a_class_only_next_to_what_looks_outside_it():
    """A bright lesion touches a bright wall (the chest wall under a lung tumour): the painted outlines' fit says
    "bright is inside", which is true across the lesion's edge with the dark lung and says nothing where it meets
    the wall. With ``boundary_reach`` the vote for the class stands only within that many pixels of a pixel that
    the fit calls outside: on the lesion's rim next to the lung, not deep in the wall; the vote against the class
    is unchanged. Settings recorded before it (no ``boundary_reach``) vote everywhere."""
    shape = (5, 40, 40)
    truth = np.zeros(shape, np.uint8)
    for k in range(1, 4):
        truth[k] = disc((40, 40), (20, 14), 6)
    wall = np.zeros(shape, bool)
    wall[:, :, :10] = True                     # the wall: as bright as the lesion, to the lesion's left
    image = np.where((truth > 0) | wall, 1.0, -1.0).astype(np.float32)
    sparse = np.zeros_like(truth)
    sparse[[1, 3]] = truth[[1, 3]]
    votes = {reach: SlicePrior(sparse, [1, 3], 0, (1.0, 1.0, 1.0), 2,
                               PriorSettings(boundary_reach=reach), image=image).boundary_vote(2)[0]
             for reach in (0.0, 1.0)}
    assert votes[0.0][20, 6] > 1 and votes[1.0][20, 6] == 0        # deep in the wall: only without the reach
    assert votes[1.0][12, 9] > 1                                     # the wall's surface next to the lung: kept
    assert votes[1.0][20, 20] > 1 and votes[1.0][20, 19] > 1         # the lesion's rim next to the lung: kept
    assert votes[1.0][20, 14] == 0                                   # the lesion's middle: no edge near
    dark = votes[0.0] < 0
    assert np.array_equal(votes[0.0][dark], votes[1.0][dark])        # against the class: the same
    old = {k: v for k, v in PriorSettings(boundary_reach=1.0).to_dict().items() if k != "boundary_reach"}
    assert PriorSettings.from_dict(old).boundary_reach == 0.0
