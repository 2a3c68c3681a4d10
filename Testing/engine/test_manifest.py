"""Unlabelled manifests: the CSV and JSON forms, clear errors, slices read lazily and normalised like whole
volumes, a cache that never holds more than its bound, and training with a manifest from the command line."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import SimpleITK as sitk

from discs import disc_volume
from mismatch.cli import main
from mismatch.data import Normalisation, TwoStreamSampler, take_slice
from mismatch.errors import UserError
from mismatch.io import read_image
from mismatch.manifest import STAT_SLICES, ManifestPool, VolumeCache, nrrd_raw_layout, read_manifest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write(array, path, compress=False, spacing=(0.8, 0.9, 2.5)):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path), compress)
    return path


def _volume(shape=(9, 20, 24), seed=0, dtype=np.int16):
    rng = np.random.default_rng(seed)
    return (rng.normal(-200, 300, shape)).astype(dtype)


def _manifest(tmp_path, names, text=None):
    path = tmp_path / "pool.csv"
    path.write_text(text if text is not None else "path\n" + "\n".join(names) + "\n")
    return path


# -- the manifest file -----------------------------------------------------------------------------------

def test_manifest_forms(tmp_path):
    for n in range(3):
        _write(_volume(seed=n), tmp_path / f"v{n}.nrrd")
        _write(_volume(seed=n + 10), tmp_path / f"v{n}_t2.nii.gz")
    (tmp_path / "sub").mkdir()
    expect = [[tmp_path / "v0.nrrd"], [tmp_path / "v1.nrrd"]]
    forms = {
        "header.csv": "id,path,notes\na,v0.nrrd,first\n\n# skipped\nb,v1.nrrd,\n",
        "plain.csv": "v0.nrrd\n" + str(tmp_path / "v1.nrrd") + "\n",
        "list.json": json.dumps(["v0.nrrd", "v1.nrrd"]),
        "sub/up.csv": "path\n../v0.nrrd\n../v1.nrrd\n",
    }
    for name, text in forms.items():
        (tmp_path / name).write_text(text)
        got = [paths for _, paths in read_manifest(tmp_path / name)]
        assert [[p.resolve() for p in ps] for ps in got] == expect, name
    two = [[tmp_path / f"v{n}.nrrd", tmp_path / f"v{n}_t2.nii.gz"] for n in range(3)]
    (tmp_path / "two.csv").write_text("path,path_t2\n" + "".join(f"v{n}.nrrd,v{n}_t2.nii.gz\n" for n in range(3)))
    (tmp_path / "two_plain.csv").write_text("".join(f"v{n}.nrrd, v{n}_t2.nii.gz\n" for n in range(3)))
    (tmp_path / "two.json").write_text(json.dumps([[f"v{n}.nrrd", f"v{n}_t2.nii.gz"] for n in range(3)]))
    for name in ("two.csv", "two_plain.csv", "two.json"):
        assert [paths for _, paths in read_manifest(tmp_path / name)] == two, name
    pool = ManifestPool.open(tmp_path / "two.json", channels=2)
    assert [v.shape for v in pool.volumes] == [(2, 9, 20, 24)] * 3


def test_bad_manifests_are_one_clear_user_error(tmp_path):
    _write(_volume(), tmp_path / "v.nrrd")
    _write(_volume((20, 24)), tmp_path / "flat.nrrd")
    _write(_volume(shape=(9, 20, 25)), tmp_path / "w.nii")
    cases = {
        "missing.csv": (None, "manifest not found"),
        "empty.csv": ("# nothing\n\n", "lists no volumes"),
        "gone.csv": ("path\nv.nrrd\nnot_here.nrrd\n", "line 3: " + str(tmp_path / "not_here.nrrd") + ": file not found"),
        "bad.json": ("[1, ", "not valid JSON"),
        "dict.json": ('{"a": 1}', "expected a JSON list"),
        "nums.json": ("[1, 2]", "entry 1"),
        "nopath.csv": ("id,notes\na,b\n", "no 'path' column"),
        "flat.csv": ("flat.nrrd\n", "2D image"),
        "txt.csv": ("path\nv.txt\n", "unsupported file type"),
        "channels.csv": ("v.nrrd,v.nrrd\n", "2 channel(s) but the labelled case has 1"),
        "grids.csv": ("v.nrrd\n", None),
    }
    (tmp_path / "v.txt").write_text("x")
    for name, (text, match) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        if match is None:
            ManifestPool.open(tmp_path / name, channels=1)
            continue
        with pytest.raises(UserError, match=None) as info:
            ManifestPool.open(tmp_path / name, channels=1)
        message = str(info.value)
        assert match in message and "\n" not in message, (name, message)
    (tmp_path / "mixed.csv").write_text("v.nrrd,w.nii\n")
    with pytest.raises(UserError, match="different grids"):
        ManifestPool.open(tmp_path / "mixed.csv", channels=2)


# -- reading and normalising -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, compress, mode", [("v.nrrd", False, "memmap"), ("v.nhdr", False, "memmap"),
                                                  ("vz.nrrd", True, "whole"), ("v.nii", False, "stream"),
                                                  ("v.nii.gz", False, "stream"), ("v.mha", False, "stream"),
                                                  ("vz.mha", True, "stream")])
def test_lazy_slices_equal_the_whole_volume_normalised(tmp_path, name, compress, mode):
    array = _volume(shape=(STAT_SLICES - 3, 20, 24), seed=3)   # fewer slices than sampled: exact statistics
    _write(array, tmp_path / name, compress)
    for window in (None, (-400.0, 300.0)):
        pool = ManifestPool.open(_manifest(tmp_path, [name]), channels=1, hu_window=window)
        assert pool.sources[0].mode == mode
        image, _ = read_image([tmp_path / name])
        whole = Normalisation(hu_window=window).apply(image)
        lazy = pool.volumes[0]
        assert lazy.shape == whole.shape and lazy.ndim == 4
        for axis in "kji":
            for index in (0, 5, 12):
                np.testing.assert_allclose(take_slice(lazy, axis, index), take_slice(whole, axis, index),
                                           rtol=1e-5, atol=1e-5)


def test_normalisation_comes_from_a_strided_subsample(tmp_path):
    array = _volume(shape=(64, 16, 16), seed=1).astype(np.float32)
    array += np.linspace(0, 50, 64, dtype=np.float32)[:, None, None]   # a drift along K
    _write(array, tmp_path / "v.nii")
    pool = ManifestPool.open(_manifest(tmp_path, ["v.nii"]), channels=1)
    mean, std = pool.stats(0)
    assert pool.cache.reads == STAT_SLICES and pool.cache.volumes == 0   # only the sampled slices were read
    assert abs(mean[0] - array.mean()) < 0.05 * array.std() and abs(std[0] / array.std() - 1) < 0.05
    pool.stats(0)
    assert pool.cache.reads == STAT_SLICES   # remembered


def test_a_raw_nrrd_slice_is_read_without_loading_the_volume(tmp_path):
    array = _volume(shape=(64, 96, 128), seed=2)          # 1.5 MB
    _write(array, tmp_path / "big.nrrd")
    data, offset, dtype, shape = nrrd_raw_layout(tmp_path / "big.nrrd")
    assert shape == array.shape and dtype == np.dtype("<i2") and data == tmp_path / "big.nrrd"
    pool = ManifestPool.open(_manifest(tmp_path, ["big.nrrd"]), channels=1)
    pool.stats(0)
    tracemalloc.start()
    got = pool.volumes[0][:, 40]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < array.nbytes / 10, peak
    mean, std = pool.stats(0)
    np.testing.assert_allclose(got[0], (array[40] - mean[0]) / std[0], rtol=1e-5, atol=1e-5)


def test_non_finite_voxels_become_the_mean_with_one_warning(tmp_path):
    array = _volume(shape=(6, 12, 12), seed=4).astype(np.float32)
    array[2, 3, 4] = np.nan
    array[3, 0, 0] = np.inf
    _write(array, tmp_path / "v.mha")
    warnings = []
    pool = ManifestPool.open(_manifest(tmp_path, ["v.mha"]), channels=1, warn=warnings.append)
    slices = [pool.volumes[0][:, k] for k in range(6)]
    assert all(np.isfinite(s).all() for s in slices)
    assert slices[2][0, 3, 4] == 0 and len(warnings) == 1 and "NaN or infinite" in warnings[0]


# -- the cache -------------------------------------------------------------------------------------------

def test_the_cache_never_holds_more_than_its_bound(tmp_path):
    names = []
    for n in range(6):
        ext = (".nrrd", ".nii.gz", ".mha")[n % 3]
        _write(_volume(shape=(5 + n, 20 + 2 * n, 24), seed=n), tmp_path / f"v{n}{ext}")
        names.append(f"v{n}{ext}")
    labels = np.zeros((8, 32, 32), np.uint8)
    labels[3, 10:20, 10:20] = 1
    image = np.random.default_rng(0).normal(size=(1, 8, 32, 32)).astype(np.float32)
    for bound, max_bytes in ((2, None), (8, 6 * 20 * 24 * 4)):   # a volume bound, a byte bound (~6 slices)
        pool = ManifestPool.open(_manifest(tmp_path, names), channels=1, cache_volumes=bound, cache_bytes=max_bytes)
        sampler = TwoStreamSampler([image] + pool.volumes, labels, [3], patch_size=16, seed=0)
        total = sum(v.shape[1] for v in pool.volumes)
        for _ in range(3 * total // 4):   # three passes over every manifest slice
            batch = sampler.unlabelled_batch(4)
            assert batch.shape == (4, 1, 16, 16) and np.isfinite(batch).all()
            assert pool.cache.volumes <= bound
            assert max_bytes is None or pool.cache.bytes <= max_bytes
        assert pool.cache.peak_volumes <= bound and pool.cache.volume_loads > bound
        assert max_bytes is None or pool.cache.peak_bytes <= max_bytes
        assert "volume load" in pool.cache.describe()


def test_cache_lru_order():
    cache = VolumeCache(max_volumes=2)
    a = np.zeros((1, 4, 4), np.float32)
    cache.put_slice(0, (0, 0), a)
    cache.put_slice(1, (0, 0), a)
    assert cache.get_slice(0, (0, 0)) is a          # 0 is now the most recent
    cache.put_slice(2, (0, 0), a)                   # evicts 1
    assert cache.held() == [0, 2] and cache.get_slice(1, (0, 0)) is None
    with pytest.raises(UserError):
        VolumeCache(max_volumes=0)


# -- the command line ------------------------------------------------------------------------------------

def test_train_with_a_manifest_of_other_geometries(tmp_path, capsys):
    image, labels, disc = disc_volume((8, 32, 40), (16, 20), 6, [2, 5], growth=0.0)
    _write(image, tmp_path / "image.nrrd")
    _write(labels, tmp_path / "labels.nrrd")
    _write(_volume(shape=(5, 24, 52)), tmp_path / "u0.nrrd", spacing=(0.5, 0.5, 1.0))
    _write(_volume(shape=(7, 40, 28)), tmp_path / "u1.nii.gz", spacing=(1.2, 1.2, 3.0))
    manifest = _manifest(tmp_path, ["u0.nrrd", "u1.nii.gz"])
    base = ["train", str(tmp_path / "image.nrrd"), "--labels", str(tmp_path / "labels.nrrd"), "--steps", "2",
            "--width", "4", "--batch-size", "2", "--device", "cpu", "--cache-volumes", "1"]
    for patch in ("16", "0"):   # patches, and whole slices padded to a common size
        out = tmp_path / f"model{patch}"
        assert main([*base, "--patch-size", patch, "--out", str(out), "--unlabelled-manifest", str(manifest)]) == 0
        card = json.loads((out / "model.json").read_text())
        assert card["training"]["unlabelled_cases"] == 2 and card["training"]["unlabelled_manifest"] == "pool.csv"
    capsys.readouterr()
    for bad, match in ((tmp_path / "nope.csv", "manifest not found"),
                       (_manifest(tmp_path, [], text="path\nu0.nrrd\nu9.nrrd\n"), "u9.nrrd: file not found")):
        assert main([*base, "--out", str(tmp_path / "m"), "--unlabelled-manifest", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and match in err, err
    assert not (tmp_path / "m").exists()
