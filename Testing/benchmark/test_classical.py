"""Slicer's Fill between slices and Grow from seeds (slicer-core), always through the child process."""

import signal
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest

from mismatch.benchmark import classical
from mismatch.benchmark.classical import labelled_slices_only, run_in_subprocess

pytestmark = pytest.mark.skipif(not classical.slicer_filters_available(), reason="slicer-core is not installed")

N = 24
K, J, I = np.mgrid[:N, :N, :N]
SPHERE = ((K - 12) ** 2 + (J - 12) ** 2 + (I - 12) ** 2) <= 8 ** 2
SLICES = [6, 12, 18]


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_labelled_slices_only():
    out = labelled_slices_only(SPHERE.astype(np.uint8), [12], axis=1)
    assert out[:, 12].sum() == SPHERE[:, 12].sum() and out.sum() == out[:, 12].sum()


def test_fill_between_slices_sphere_and_two_classes():
    out = run_in_subprocess("fill_between_slices", labels=SPHERE.astype(np.uint8), labelled_slices=SLICES, axis=0,
                            spacing=(2.0, 1.0, 1.0))
    assert out.shape == SPHERE.shape and set(np.unique(out)) <= {0, 1}
    between = slice(SLICES[0] + 1, SLICES[-1])
    assert dice(out[between] == 1, SPHERE[between]) > 0.7
    assert np.array_equal(out[SLICES] == 1, SPHERE[SLICES])  # the labelled slices are kept
    assert not out[: SLICES[0]].any() and not out[SLICES[-1] + 1:].any()  # no extrapolation

    # two classes (upper / lower half), slices along i: both classes on every labelled slice, interpolated
    # together in one multi-label image as the effect does
    two = np.where(SPHERE, np.where(K < 12, 1, 2), 0).astype(np.uint8)
    out2 = run_in_subprocess("slicer-fill-between", labels=two, labelled_slices=SLICES, axis=2)
    between = slice(SLICES[0] + 1, SLICES[-1])
    for c in (1, 2):
        assert dice(out2[:, :, between] == c, two[:, :, between] == c) > 0.7


def test_grow_from_seeds_bright_sphere_and_two_classes():
    rng = np.random.default_rng(0)
    two = np.where(SPHERE, np.where(I < 12, 1, 2), 0).astype(np.uint8)
    # class 1 bright, class 2 brighter, background dark, all noisy
    image = (np.choose(two, [-800.0, 60.0, 300.0]) + rng.normal(0, 20, two.shape)).astype(np.float32)
    out = run_in_subprocess("grow_from_seeds", image=image, labels=SPHERE.astype(np.uint8), labelled_slices=SLICES,
                            axis=0, spacing=(2.0, 1.0, 1.0))
    assert set(np.unique(out)) <= {0, 1}
    assert dice(out == 1, SPHERE) > 0.7
    out2 = run_in_subprocess("slicer-grow-from-seeds", image=image[None], labels=two, labelled_slices=SLICES,
                             axis=1)
    for c in (1, 2):
        assert dice(out2 == c, two == c) > 0.7


def test_child_crash_after_writing_counts_as_success_and_failure_before_raises(monkeypatch):
    run = subprocess.run

    def crashed_at_exit(*args, **kwargs):   # the child runs, then reports the crash at exit (SIGSEGV)
        done = run(*args, **kwargs)
        return subprocess.CompletedProcess(done.args, -signal.SIGSEGV, done.stdout, done.stderr)

    monkeypatch.setattr(classical, "subprocess", SimpleNamespace(run=crashed_at_exit))
    out = run_in_subprocess("fill_between_slices", labels=SPHERE.astype(np.uint8), labelled_slices=SLICES)
    assert out.shape == SPHERE.shape and out.any()
    with pytest.raises(RuntimeError, match="labels must be"):  # fails in the child before writing
        run_in_subprocess("fill_between_slices", labels=SPHERE[0].astype(np.uint8), labelled_slices=[3])
    with pytest.raises(ValueError, match="unknown filter"):
        run_in_subprocess("threshold", labels=SPHERE)
