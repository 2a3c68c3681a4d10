"""Outputs are never half-written under their final name: a failure or a kill while writing leaves the
previous file (or none), and no temporary file behind when the process lives to clean up."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from mismatch.errors import UserError
from mismatch.io import Geometry, atomic_output, check_writable, read_volume, write_text_atomic, write_volume


class Killed(BaseException):
    pass


def test_a_failure_while_writing_keeps_the_previous_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "report.json"
    write_text_atomic(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".json" and tmp.name.startswith(".")
            tmp.write_text("half of the new one")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


GEOMETRY = Geometry(size=(5, 4, 3), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0),
                    direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


@pytest.mark.parametrize("ext,compress", [(".mhd", False), (".mhd", True), (".nhdr", False), (".nhdr", True)])
def test_two_file_formats_switch_to_the_new_data_with_one_rename(tmp_path, monkeypatch, ext, compress):
    target = tmp_path / f"seg{ext}"
    old = np.zeros(GEOMETRY.shape, np.uint8)
    new = np.ones(GEOMETRY.shape, np.uint8)
    write_volume(old, GEOMETRY, target, compress=compress)
    real = os.replace
    calls = []

    def replace(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) == 1:   # the new data file is in place, the header not yet
            raise Killed

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        write_volume(new, GEOMETRY, target, compress=compress)
    monkeypatch.setattr(os, "replace", real)
    np.testing.assert_array_equal(read_volume(target)[0], old)   # the previous header still reads its own data
    write_volume(new, GEOMETRY, target, compress=compress)
    np.testing.assert_array_equal(read_volume(target)[0], new)
    write_volume(new, GEOMETRY, target, compress=compress)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and target.name in names, names   # the header and its data; old data files removed


def test_check_writable(tmp_path):
    check_writable(tmp_path / "new" / "deeper" / "seg.nrrd", "--out")          # created on writing
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_writable(tmp_path / "file" / "seg.nrrd", "--out")
    with pytest.raises(UserError, match="is a folder"):
        check_writable(tmp_path, "--out")
    with pytest.raises(UserError, match="not a folder"):
        check_writable(tmp_path / "file", "--out", folder=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]               # the probe is gone


def test_the_demo_never_leaves_a_half_written_figure(tmp_path, monkeypatch):
    pytest.importorskip("slicerio")
    import mismatch.plots
    from mismatch.demo import run_demo

    (tmp_path / "reliability.png").write_bytes(b"the previous figure")

    def broken(curves, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise Killed

    monkeypatch.setattr(mismatch.plots, "reliability_diagram", broken)
    with pytest.raises(Killed):
        run_demo(str(tmp_path), steps=2, width=4, quiet=True)
    assert (tmp_path / "reliability.png").read_bytes() == b"the previous figure"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert (tmp_path / "mismatch.seg.nrrd").is_file() and (tmp_path / "model-mismatch" / "model.json").is_file()
