"""mismatch.data: slice lists, labelled slices, normalisation, the two-stream sampler, the CTChest4 loader."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from mismatch.data import (AXES, Normalisation, TwoStreamSampler, axis_index, check_label_values, context_slices,
                           labelled_slices, load_ctchest, painted_slices, parse_slice_list, place_on_grid,
                           slice_with_context, take_slice)
from mismatch.errors import UserError
from mismatch.io import Geometry

# -- axes, slice lists, labelled slices ----------------------------------------------------------------


def test_axis_index():
    assert [axis_index(a) for a in "kji"] == [0, 1, 2] and AXES == {"k": 0, "j": 1, "i": 2}
    for bad in ("x", "", "0", "kk"):
        with pytest.raises(UserError, match="use k"):
            axis_index(bad)


def test_parse_slice_list():
    assert parse_slice_list("3,7,12") == [3, 7, 12]
    assert parse_slice_list("12, 3,10-14,3") == [3, 10, 11, 12, 13, 14]
    assert parse_slice_list(" 5 - 6 ") == [5, 6]
    assert parse_slice_list("") == [] and parse_slice_list("1;2") == [1, 2]   # as the module reads it
    for bad in ("3,a", "1 2", "-1", "5-3", "2.5", "3-"):
        with pytest.raises(UserError, match="slice"):
            parse_slice_list(bad)


def test_labelled_slices_by_content_and_explicit():
    labels = np.zeros((6, 5, 4), np.uint8)
    labels[1, 2, 2] = 1
    labels[4, 0, 3] = 2
    assert labelled_slices(labels).tolist() == [1, 4]
    out = labelled_slices(labels, "k", explicit=[0, 4])        # slice 0: labelled, all background
    assert out.tolist() == [0, 1, 4] and out.dtype == np.int64
    assert labelled_slices(labels, "j").tolist() == [0, 2]
    assert labelled_slices(labels, "i").tolist() == [2, 3]
    assert labelled_slices(labels, "i", explicit=[0]).tolist() == [0, 2, 3]
    with pytest.raises(UserError, match="outside"):
        labelled_slices(labels, "k", explicit=[6])
    with pytest.raises(UserError, match="outside"):
        labelled_slices(labels, "i", explicit=[4])
    with pytest.raises(UserError, match="outside"):
        labelled_slices(labels, "j", explicit=[-1])


def test_painted_slices_count_the_empty_slices_as_labelled_and_refuse_a_painted_one():
    labels = np.zeros((6, 5, 4), np.uint8)
    labels[2, 1, 1] = 1
    assert painted_slices(labels, "k", None, "labels.nrrd", empty=[0, 5]).tolist() == [0, 2, 5]
    assert painted_slices(labels, "k", [3], "labels.nrrd", empty=[3, 0]).tolist() == [0, 2, 3]
    with pytest.raises(UserError, match="slice 2 along axis k is listed in --empty-slices"):
        painted_slices(labels, "k", None, "labels.nrrd", empty=[2])
    with pytest.raises(UserError, match="no labelled slice"):
        painted_slices(np.zeros_like(labels), "k", None, "labels.nrrd")


def test_take_slice_is_a_view():
    vol = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    assert take_slice(vol, "k", 1).shape == (2, 4, 5)
    assert take_slice(vol, "j", 2).shape == (2, 3, 5)
    assert take_slice(vol, "i", 4).shape == (2, 3, 4)
    assert take_slice(vol[0], "i", 4).shape == (3, 4)
    np.testing.assert_array_equal(take_slice(vol, "j", 2), vol[:, :, 2, :])
    assert np.shares_memory(take_slice(vol, "i", 1), vol)


def test_check_label_values():
    labels = np.array([[[0, 1, 2]]])
    check_label_values(labels, 3)
    with pytest.raises(UserError, match="label value 2"):
        check_label_values(labels, 2)


# -- normalisation -------------------------------------------------------------------------------------

def test_normalisation_zscore_per_channel():
    rng = np.random.default_rng(0)
    image = np.stack([rng.normal(100, 20, (4, 8, 8)), rng.normal(-5, 0.1, (4, 8, 8))]).astype(np.float32)
    out = Normalisation().apply(image)
    assert out.dtype == np.float32 and out.shape == image.shape and not np.shares_memory(out, image)
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(1, 2, 3)), 1, atol=1e-4)
    assert image.mean() > 40          # input untouched


def test_normalisation_hu_window_clips():
    image = np.array([-3000, -1000, 0, 400, 2000, 3000], np.float32).reshape(1, 1, 2, 3)
    out = Normalisation(hu_window=(-1000, 400)).apply(image)
    assert out[0, 0, 0, 0] == out[0, 0, 0, 1]                   # -3000 clipped to -1000
    assert out[0, 0, 1, 0] == out[0, 0, 1, 1] == out[0, 0, 1, 2]  # 400, 2000, 3000 all at 400
    clipped = np.clip(image, -1000, 400)
    np.testing.assert_allclose(out, (clipped - clipped.mean()) / clipped.std(), atol=1e-5)
    with pytest.raises(UserError, match="window"):
        Normalisation(hu_window=(400, -1000)).apply(image)


def test_normalisation_constant_channel_gives_zeros():
    image = np.stack([np.full((3, 4, 4), 1234.5, np.float32), np.arange(48, dtype=np.float32).reshape(3, 4, 4)])
    with np.errstate(all="raise"):
        out = Normalisation().apply(image)
    assert np.isfinite(out).all() and not out[0].any() and out[1].std() > 0.9
    # a window that flattens everything is a constant channel too
    assert not Normalisation(hu_window=(-1000, -900)).apply(image[1:] + 5000).any()


def test_normalisation_dict_round_trip():
    for n in (Normalisation(), Normalisation(hu_window=(-1000.0, 400.0))):
        assert Normalisation.from_dict(json.loads(json.dumps(n.to_dict()))) == n
    with pytest.raises(UserError, match="zscore"):
        Normalisation.from_dict({"method": "minmax", "hu_window": None})   # a card naming another method


# -- sampler -------------------------------------------------------------------------------------------

def make_case(k=10, j=40, i=48, channels=2, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((channels, k, j, i)).astype(np.float32)
    labels = np.zeros((k, j, i), np.uint8)
    return image, labels


def test_sampler_shapes_dtypes():
    image, labels = make_case()
    labels[2, 5:9, 6:10] = 1
    s = TwoStreamSampler([image], labels, [2, 5], patch_size=16, seed=0)
    assert s.num_labelled == 2 and s.num_unlabelled == 8
    x, y = s.labelled_batch(3)
    assert x.shape == (3, 2, 16, 16) and x.dtype == np.float32
    assert y.shape == (3, 16, 16) and y.dtype == np.int64
    u = s.unlabelled_batch(5)
    assert u.shape == (5, 2, 16, 16) and u.dtype == np.float32


@pytest.mark.parametrize("axis", ["k", "j", "i"])
def test_every_unlabelled_slice_once_per_pass(axis):
    image = np.zeros((1, 6, 7, 8), np.float32)
    ax = axis_index(axis)
    n = image.shape[1 + ax]
    index = np.arange(n, dtype=np.float32).reshape([n if d == ax else 1 for d in range(3)])
    image[0] = index                                       # every voxel holds its slice index
    extra = np.full((1, 3, 7, 8), 100.0, np.float32)
    extra[0] += np.arange(3, dtype=np.float32).reshape(3, 1, 1) if axis == "k" else 0
    labels = np.zeros(image.shape[1:], np.uint8)
    s = TwoStreamSampler([image, extra], labels, [1, 3], axis=axis, patch_size=None, seed=3)
    n_extra = extra.shape[1 + ax]
    assert s.num_unlabelled == n - 2 + n_extra
    for _ in range(3):                                      # three passes
        batch = s.unlabelled_batch(s.num_unlabelled)
        seen = sorted(float(b[0].max()) for b in batch)
        own = [v for v in seen if v < 100]
        assert own == [float(k) for k in range(n) if k not in (1, 3)]
        assert len(seen) - len(own) == n_extra


def test_labelled_stream_cycles_in_passes():
    image = np.zeros((1, 8, 16, 16), np.float32)
    image[0] = np.arange(8, dtype=np.float32).reshape(8, 1, 1)
    labels = np.zeros((8, 16, 16), np.uint8)
    s = TwoStreamSampler([image], labels, [1, 4, 6], patch_size=None, seed=1)
    drawn = [int(x[0].max()) for _ in range(4) for x in s.labelled_batch(3)[0]]
    for p in range(4):
        assert sorted(drawn[3 * p:3 * p + 3]) == [1, 4, 6]


def test_foreground_centred_crops_contain_foreground():
    image, labels = make_case(k=4, j=200, i=220, channels=1)
    labels[1, 150:153, 10:13] = 2                 # a small structure in a corner
    s = TwoStreamSampler([image], labels, [1], patch_size=32, seed=0, foreground_fraction=1.0)
    for _ in range(20):
        _, y = s.labelled_batch(2)
        assert (y == 2).any(axis=(1, 2)).all()
    s = TwoStreamSampler([image], labels, [1], patch_size=32, seed=0, foreground_fraction=0.0)
    hits = sum(int((s.labelled_batch(1)[1] > 0).any()) for _ in range(100))
    assert hits < 30                               # uniform crops mostly miss it


def test_labelled_crop_matches_image_crop():
    """Image and label crops come from the same place."""
    image = np.zeros((1, 3, 50, 60), np.float32)
    labels = np.zeros((3, 50, 60), np.uint8)
    labels[1, 20:30, 25:35] = 1
    image[0, 1] = labels[1] * 7.0
    s = TwoStreamSampler([image], labels, [1], patch_size=24, seed=5, foreground_fraction=0.5)
    for _ in range(20):
        x, y = s.labelled_batch(2)
        np.testing.assert_array_equal(x[:, 0] == 7.0, y == 1)


@pytest.mark.parametrize("axis", ["k", "j", "i"])
def test_slice_with_context_stacks_the_neighbours_channels_and_repeats_the_ends(axis):
    """2.5D input: the slice's channels, then those of the slice before and after it (then two before and two
    after with context 2); past the first or last slice, that slice again. Context 0 is the slice itself."""
    rng = np.random.default_rng(0)
    v = rng.random((2, 5, 6, 7)).astype(np.float32)
    n = v.shape[1 + axis_index(axis)]
    assert context_slices(2, n, 2) == [2, 1, 3, 0, 4]
    assert context_slices(0, n, 2) == [0, 0, 1, 0, 2] and context_slices(n - 1, n, 1) == [n - 1, n - 2, n - 1]
    np.testing.assert_array_equal(slice_with_context(v, axis, 3, 0), take_slice(v, axis, 3))
    for s in range(n):
        x = slice_with_context(v, axis, s, 2)
        assert x.shape == (10,) + take_slice(v, axis, s).shape[1:]
        for i, d in enumerate([0, -1, 1, -2, 2]):
            np.testing.assert_array_equal(x[2 * i:2 * i + 2], take_slice(v, axis, min(max(s + d, 0), n - 1)))


@pytest.mark.parametrize("axis", ["k", "j", "i"])
def test_segment_reads_each_slice_with_the_neighbours_training_reads(axis):
    """Inference gathers a batch's neighbours at once; each slice's input must be :func:`slice_with_context`'s,
    channel for channel (two image channels, two neighbours a side), or the network sees another order than
    it learned."""
    import torch

    from mismatch.inference import segment_volume
    from mismatch.models import build_model

    torch.manual_seed(0)
    v = np.random.default_rng(1).random((2, 6, 24, 24)).astype(np.float32)
    net = build_model("mismatch", in_channels=2, width=4, context=2).eval()
    conf = np.moveaxis(segment_volume([net], v, axis=axis, outputs=("confidence",)).confidence, axis_index(axis), 0)
    with torch.no_grad():
        for s in range(conf.shape[0]):
            p = net.predict(torch.from_numpy(slice_with_context(v, axis, s, 2))[None])[0][0, 0].numpy()
            # the two memory layouts round apart by up to 5e-5; a wrong channel order is 0.2 off
            np.testing.assert_allclose(conf[s], np.maximum(p, 1 - p), atol=2e-4)


def test_sampler_with_context_gives_each_crop_its_neighbours():
    """The sampler's crops with ``context``: the same crop of the slice and of its neighbours, the label the
    slice's own."""
    image = np.zeros((1, 6, 40, 40), np.float32)
    for s in range(6):
        image[0, s] = s          # each slice holds its own index
    labels = np.zeros((6, 40, 40), np.uint8)
    labels[0, 10:20, 10:20] = 1
    labels[3, 10:20, 10:20] = 1
    s = TwoStreamSampler([image], labels, [0, 3], patch_size=16, seed=1, context=1)
    for _ in range(4):
        x, y = s.labelled_batch(2)
        assert x.shape == (2, 3, 16, 16) and y.shape == (2, 16, 16)
        for b in range(2):
            centre = int(x[b, 0, 0, 0])
            assert centre in (0, 3)
            assert int(x[b, 1, 0, 0]) == max(centre - 1, 0) and int(x[b, 2, 0, 0]) == min(centre + 1, 5)
    xu = s.unlabelled_batch(4)
    assert xu.shape == (4, 3, 16, 16)
    assert all(int(x[1, 0, 0]) == max(int(x[0, 0, 0]) - 1, 0) for x in xu)


def test_slices_smaller_than_the_patch_are_taken_whole_not_padded():
    # Padding a small side up to the patch trained the network on a constant border that inference never
    # shows it; the sampler takes such a side whole and the network pads it to its multiple of 8 as it does
    # at inference.
    image = np.full((2, 3, 10, 6), 5.0, np.float32)
    image[1] -= 9.0
    image[:, :, 0, 0] += 1.0
    labels = np.ones((3, 10, 6), np.uint8)
    s = TwoStreamSampler([image], labels, [0], patch_size=16, seed=0)
    x, y = s.labelled_batch(1)
    assert x.shape == (1, 2, 10, 6) and y.shape == (1, 10, 6)
    assert np.array_equal(x[0], image[:, 0]) and y[0].sum() == 60
    u = s.unlabelled_batch(2)
    assert u.shape == (2, 2, 10, 6)


def test_volumes_of_other_sizes_are_padded_centred_to_one_batch():
    small = np.full((1, 3, 10, 6), 5.0, np.float32)
    small[:, :, 0, 0] = 4.0
    big = np.zeros((1, 3, 20, 20), np.float32)
    s = TwoStreamSampler([small, big], np.ones((3, 10, 6), np.uint8), [0], patch_size=16, seed=0)
    u = s.unlabelled_batch(5)
    assert u.shape == (5, 1, 16, 16)
    smalls = [b for b in u if b[0, 0, 0] == 4.0]   # a small slice, padded with its minimum
    assert smalls and np.all(smalls[0][0, 3:13, 5:11] >= 4.0)


def test_one_dimension_smaller_than_patch():
    image, labels = make_case(k=2, j=10, i=60, channels=1)
    labels[0, 4, 50] = 1
    s = TwoStreamSampler([image], labels, [0], patch_size=16, seed=0, foreground_fraction=1.0)
    x, y = s.labelled_batch(4)
    assert x.shape == (4, 1, 10, 16) and (y == 1).sum() == 4


def test_whole_slice_mode_pads_only_to_a_common_size():
    image, labels = make_case(k=5, j=37, i=50, channels=1)
    extra = np.random.default_rng(1).standard_normal((1, 4, 41, 19)).astype(np.float32)
    labels[2, 3, 4] = 1
    s = TwoStreamSampler([image, extra], labels, [2], patch_size=0, seed=0)
    x, y = s.labelled_batch(2)
    assert x.shape == (2, 1, 37, 50) and y.shape == (2, 37, 50)   # the network pads to x8 itself
    assert int(y.sum()) == 2
    for _ in range(5):
        u = s.unlabelled_batch(3)
        assert u.shape[2] in (37, 41) and u.shape[3] in (19, 50)
    s_j = TwoStreamSampler([image], labels, [3], axis="j", patch_size=None)
    x, y = s_j.labelled_batch(1)
    assert x.shape == (1, 1, 5, 50) and y.shape == (1, 5, 50)


def _draw(sampler, n=6):
    out = []
    for _ in range(n):
        x, y = sampler.labelled_batch(2)
        out += [x, y, sampler.unlabelled_batch(3)]
    return out


def test_same_seed_same_batches():
    image, labels = make_case()
    labels[3, 10:20, 10:20] = 1
    a = _draw(TwoStreamSampler([image], labels, [3, 7], patch_size=16, seed=11))
    b = _draw(TwoStreamSampler([image], labels, [3, 7], patch_size=16, seed=11))
    c = _draw(TwoStreamSampler([image], labels, [3, 7], patch_size=16, seed=12))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def test_state_dict_resumes_exactly():
    image, labels = make_case()
    labels[3, 10:20, 10:20] = 1
    s = TwoStreamSampler([image], labels, [3, 7], patch_size=16, seed=4)
    _draw(s, 5)
    state = json.loads(json.dumps(s.state_dict()))
    expected = _draw(s, 8)
    fresh = TwoStreamSampler([image], labels, [3, 7], patch_size=16, seed=999)
    fresh.load_state_dict(state)
    assert all(np.array_equal(p, q) for p, q in zip(expected, _draw(fresh, 8)))
    other = TwoStreamSampler([image], labels, [3], patch_size=16)
    with pytest.raises(UserError, match="checkpoint"):
        other.load_state_dict(state)


def test_all_labelled_volume():
    image, labels = make_case(k=4)
    s = TwoStreamSampler([image], labels, [0, 1, 2, 3], patch_size=16)
    assert s.num_unlabelled == 0
    s.labelled_batch(2)
    with pytest.raises(UserError, match="--method unet"):
        s.unlabelled_batch(2)


def test_sampler_input_errors():
    image, labels = make_case(k=4)
    with pytest.raises(UserError, match="outside"):
        TwoStreamSampler([image], labels, [4])
    with pytest.raises(UserError, match="shape"):
        TwoStreamSampler([image], labels[:3], [0])
    with pytest.raises(UserError, match="channels"):
        TwoStreamSampler([image, image[:1]], labels, [0])
    with pytest.raises(UserError, match="labelled slice"):
        TwoStreamSampler([image], labels, []).labelled_batch(1)


def test_sampler_reads_a_large_volume_without_copies():
    """A 512 x 512 x 600 volume (630 MB as a read-only broadcast view, so no memory is used): the sampler and
    its batches allocate about the batches themselves (4 + 4 patches of 176 x 176: 1 MB), never a copy of
    the volume or of its labelled slices. What that is in milliseconds: measurements/bench_speed.py."""
    import tracemalloc

    plane = np.random.default_rng(0).standard_normal((1, 1, 512, 512)).astype(np.float32)
    volume = np.broadcast_to(plane, (1, 600, 512, 512))
    mask = np.zeros((1, 512, 512), np.uint8)
    mask[0, 200:230, 300:320] = 1
    labels = np.broadcast_to(mask, (600, 512, 512))
    tracemalloc.start()   # numpy reports its allocations to tracemalloc
    try:
        s = TwoStreamSampler([volume], labels, list(range(0, 600, 50)), patch_size=176, seed=0)
        _, set_up = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(20):
            xl, yl = s.labelled_batch(4)
            xu = s.unlabelled_batch(4)
        _, batches = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert xl.shape == (4, 1, 176, 176) and yl.shape == (4, 176, 176) and xu.shape == (4, 1, 176, 176)
    assert set_up < 2**20, f"the sampler allocated {set_up / 2**20:.1f} MB when made"
    # the 12 labelled slices alone are 12 MB; the whole volume 630 MB
    assert batches < 8 * 2**20, f"{batches / 2**20:.1f} MB at the peak of drawing batches"


# -- demo data -----------------------------------------------------------------------------------------

def test_ct_chest_lungs(ct_chest):
    image, labels, geometry = ct_chest
    assert image.dtype == np.float32 and labels.dtype == np.uint8
    assert image.shape == (1, 34, 128, 128) and geometry.size == (128, 128, 34)
    assert set(np.unique(labels).tolist()) == {0, 1}
    lung_hu = image[0][labels > 0]
    assert (lung_hu < -400).mean() > 0.95
    nonempty = labels.reshape(labels.shape[0], -1).any(1)
    assert nonempty.mean() > 0.6
    # both lungs: foreground on both sides of the mid-line (along I) on a central slice
    k = int(np.argmax(labels.reshape(labels.shape[0], -1).sum(1)))
    cols = np.flatnonzero(labels[k].any(0))
    assert cols.min() < 64 < cols.max()


def test_ct_chest_other_structure_and_unknown():
    pytest.importorskip("slicerio")
    image, ribs, _ = load_ctchest("Ribs")
    assert ribs.any() and (image[0][ribs > 0] > 0).mean() > 0.5   # bone is bright
    with pytest.raises(UserError, match="lungs"):
        load_ctchest("liver")


def test_ct_chest_without_slicerio(monkeypatch):
    monkeypatch.setitem(sys.modules, "slicerio", None)
    with pytest.raises(UserError, match="pip install slicerio"):
        load_ctchest()


def test_place_on_grid_cropped_and_layered(ct_chest):
    """A segmentation cropped to its extent (origin moved by whole voxels) lands at the same voxels."""
    _, labels, g = ct_chest
    mask_ijk = np.transpose(labels > 0, (2, 1, 0))                   # [I, J, K]
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.asarray(g.direction).reshape(3, 3) * np.asarray(g.spacing)
    ijk_to_lps[:3, 3] = g.origin
    lo, hi = (10, 20, 3), (120, 100, 30)
    cropped = mask_ijk[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    shifted = ijk_to_lps.copy()
    shifted[:3, 3] = ijk_to_lps[:3, :3] @ np.asarray(lo, float) + ijk_to_lps[:3, 3]
    expected = np.zeros_like(labels)
    expected[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = labels[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
    np.testing.assert_array_equal(place_on_grid(cropped, shifted, g), expected)
    # extending beyond the image (negative offset) drops the outside part
    padded = np.pad(mask_ijk, ((2, 0), (0, 3), (1, 1)))
    before = ijk_to_lps.copy()
    before[:3, 3] = ijk_to_lps[:3, :3] @ np.array([-2.0, 0.0, -1.0]) + ijk_to_lps[:3, 3]
    np.testing.assert_array_equal(place_on_grid(padded, before, g), labels)
    # half a voxel off: refused
    half = ijk_to_lps.copy()
    half[:3, 3] += ijk_to_lps[:3, 0] * 0.5
    with pytest.raises(UserError, match="reference"):
        place_on_grid(mask_ijk, half, g)


def test_segment_mask_layers():
    from mismatch.data import _segment_mask

    voxels = np.zeros((2, 4, 5, 6), np.uint8)          # slicerio layered: [layers, I, J, K]
    voxels[1, 1, 2, 3] = 3
    seg = {"voxels": voxels}
    assert _segment_mask(seg, {"labelValue": 3, "layer": 1}).sum() == 1
    assert _segment_mask(seg, {"labelValue": 3, "layer": 0}).sum() == 0
    assert _segment_mask({"voxels": voxels[1]}, {"labelValue": 3}).shape == (4, 5, 6)


def test_place_on_grid_simple_offset():
    g = Geometry((6, 5, 4), (1.0, 2.0, 3.0), (10.0, 20.0, 30.0), tuple(np.eye(3).ravel()))
    m = np.ones((2, 2, 2), bool)
    ijk = np.diag([1.0, 2.0, 3.0, 1.0])
    ijk[:3, 3] = (10.0 + 3, 20.0 + 2 * 2, 30.0 + 3 * 1)               # offset (3, 2, 1) voxels
    out = place_on_grid(m, ijk, g)
    assert out.shape == (4, 5, 6) and out.sum() == 8 and out[1:3, 2:4, 3:5].all()


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.int64, np.uint64, bool, np.float32])
def test_label_values_are_numpy_unique(dtype):
    from mismatch.data import label_values

    rng = np.random.default_rng(3)
    for a in (rng.integers(0, 4, (5, 6, 7)), rng.integers(-3, 12, (4, 9)) * 2, rng.integers(0, 300, 50),
              np.zeros((2, 3)), np.array([], dtype=np.int64), np.array([1, 17, 1])):
        if np.dtype(dtype).kind == "u" or dtype is bool:
            a = np.abs(a)
        a = a.astype(dtype)
        got, want = label_values(a), np.unique(a)
        assert got.dtype == want.dtype and np.array_equal(got, want), (dtype, a)


def test_painted_axis_finds_the_axis_the_labels_were_painted_along():
    """``mismatch train --axis auto``: separate painted slices along j or i are found; paint on k slices, a
    contiguous run of k slices, a dense structure and an empty map stay on k."""
    from mismatch.data import painted_axis

    blob = np.zeros((20, 30, 40), np.uint8)
    blob[5:15, 8:22, 10:30] = 1   # the whole structure
    for axis, slices in (("k", [6, 10, 13]), ("j", [9, 15, 20]), ("i", [12, 25]), ("j", [14])):
        painted = np.zeros_like(blob)
        index = [slice(None)] * 3
        index[{"k": 0, "j": 1, "i": 2}[axis]] = slices
        painted[tuple(index)] = blob[tuple(index)]
        assert painted_axis(painted)[0] == axis, (axis, slices)
    run = np.zeros_like(blob)
    run[7:10] = blob[7:10]   # three adjacent k slices: still k
    assert painted_axis(run)[0] == "k"
    assert painted_axis(blob)[0] == "k"   # every slice labelled: k
    assert painted_axis(np.zeros_like(blob))[0] == "k"
    assert "separate slice(s) along j" in painted_axis(np.where(np.arange(30)[None, :, None] == 9, blob, 0))[1]
