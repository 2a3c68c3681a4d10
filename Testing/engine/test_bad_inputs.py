"""Every bad input gets one line on stderr and exit status 2, found before any work; nothing is modified.

Each case here is a row of the table in docs/contract.md ("Bad input: what was tried and what it says").
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from discs import disc_volume
from mismatch.cli import main
from test_cli import TINY
from test_cli import _write as _write_oblique

TRAINER = str(Path(__file__).resolve().parents[2] / "Trainer")
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _write(array, path, spacing=(0.8, 0.9, 2.5)):
    """test_cli's writer on an axis-aligned grid at the origin."""
    return _write_oblique(array, path, spacing=spacing, origin=(0.0, 0.0, 0.0), direction=IDENTITY)


@pytest.fixture
def case(tmp_path):
    """A 10-slice volume (32 x 40 slices) with a disc, labels on slices 2 and 6, and a model trained on it."""
    image, labels, disc = disc_volume((10, 32, 40), (16, 20), 6, [2, 6])
    d = tmp_path
    c = {"image": _write(image, d / "image.nrrd"), "labels": _write(labels, d / "labels.nrrd"),
         "truth": _write(disc.astype(np.uint8), d / "truth.nrrd"), "array": image, "disc": disc, "dir": d}
    return c


@pytest.fixture
def model(case):
    out = case["dir"] / "model"
    assert main(["train", case["image"], "--labels", case["labels"], "--out", str(out), *TINY]) == 0
    return out


def _bad(argv, capsys, *words, after_start=False):
    """Exit 2 and one line on stderr (``after_start``: the last line, after what training printed before it
    failed)."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and (len(err.splitlines()) == 1 or after_start), err
    err = err.splitlines()[-1]
    assert err.startswith("mismatch "), err
    for word in words:
        assert word.lower() in err.lower(), err
    return err


def _bad_argparse(argv, capsys, *words):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1, err
    for word in words:
        assert word.lower() in err.lower(), err
    return err


@pytest.fixture
def read_only(tmp_path):
    """A folder nobody can create files in (chmod; as root, the immutable attribute); skipped where neither
    works."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if os.access(folder, os.W_OK) and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        (folder / "probe").touch()
        (folder / "probe").unlink()
        writable = True
    except OSError:
        writable = False
    if writable:
        pytest.skip("cannot make a read-only folder here")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=False)
    folder.chmod(0o755)


# -- train ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option,value,word", [
    ("--lr", "nan", "finite"), ("--lr", "inf", "finite"), ("--lr", "0", "above 0"), ("--lr", "-0.001", "above 0"),
    ("--alpha", "nan", "finite"), ("--alpha", "-1", "0 or more"), ("--alpha-rampup", "2", "between 0 and 1"),
    ("--unlabelled-batch-size", "-2", "0 or more"), ("--threads", "0", "at least 1"),
    ("--checkpoint-seconds", "nan", "finite"),
])
def test_numbers_that_make_no_sense_are_refused_in_one_line(case, capsys, option, value, word):
    err = _bad_argparse(["train", case["image"], "--labels", case["labels"], "--out", str(case["dir"] / "m"),
                         *TINY, option, value], capsys, option, word)
    assert "usage" not in err
    assert not (case["dir"] / "m").exists()


def test_a_network_too_large_for_the_memory_says_which_setting_to_lower(case, capsys, monkeypatch):
    import mismatch.train

    def built(*args, **kwargs):
        raise AssertionError("the training was set up: the network's size was not checked first")

    monkeypatch.setattr(mismatch.train, "_new_run", built)   # refused from its size alone, before anything is built
    _bad(["train", case["image"], "--labels", case["labels"], "--out", str(case["dir"] / "m"), *TINY[:2],
          "--patch-size", "0", "--device", "cpu", "--width", "100000"], capsys, "--width 100000", "smaller --width")
    assert not (case["dir"] / "m").exists()


def test_running_out_of_memory_in_a_step_is_one_line_naming_the_settings(case, capsys, monkeypatch):
    import mismatch.train

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 99999999999 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(mismatch.train, "_one_step", no_memory)
    _bad(["train", case["image"], "--labels", case["labels"], "--out", str(case["dir"] / "m"), *TINY],
         capsys, "out of memory", "--width (now 4)", "--batch-size (now 2)", "--patch-size (now 0)", after_start=True)


def test_train_into_a_read_only_folder_fails_before_any_work(case, capsys, read_only, monkeypatch):
    import mismatch.io

    monkeypatch.setattr(mismatch.io, "read_image", lambda *a, **k: pytest.fail("read the image first"))
    _bad(["train", case["image"], "--labels", case["labels"], "--out", str(read_only / "model"), *TINY], capsys,
         "--out", "cannot write")


def test_train_never_replaces_a_folder_of_other_files(case, capsys):
    _bad(["train", case["image"], "--labels", case["labels"], "--out", str(case["dir"]), *TINY], capsys,
         "not a model's", "image.nrrd")
    assert (case["dir"] / "image.nrrd").exists() and not (case["dir"] / "model.json").exists()


def _labelled_batch_shapes(monkeypatch) -> list[tuple[int, int]]:
    """A list that receives the ``(H, W)`` of every labelled batch the training draws from now on."""
    import mismatch.data

    shapes = []
    real = mismatch.data.TwoStreamSampler.labelled_batch

    def spy(self, batch_size):
        x, y = real(self, batch_size)
        shapes.append(tuple(x.shape[-2:]))
        return x, y

    monkeypatch.setattr(mismatch.data.TwoStreamSampler, "labelled_batch", spy)
    return shapes


def test_a_patch_larger_than_the_slice_trains_on_unpadded_slices(case, capsys, monkeypatch):
    shapes = _labelled_batch_shapes(monkeypatch)
    out = case["dir"] / "big-patch"
    assert main(["train", case["image"], "--labels", case["labels"], "--out", str(out), "--steps", "2",
                 "--width", "4", "--batch-size", "2", "--device", "cpu", "--patch-size", "256"]) == 0
    assert shapes and all(tuple(s) == (32, 40) for s in shapes), shapes   # the slice, not 256 x 256
    assert json.loads((out / "model.json").read_text())["training"]["patch_size"] == 256


def test_the_first_half_of_the_steps_trains_on_the_smaller_early_patches(case, monkeypatch):
    shapes = _labelled_batch_shapes(monkeypatch)
    out = case["dir"] / "early"
    tiny = ["--width", "4", "--batch-size", "2", "--device", "cpu", "--steps", "4"]
    assert main(["train", case["image"], "--labels", case["labels"], "--out", str(out), *tiny,
                 "--patch-size", "24", "--early-patch-size", "16"]) == 0
    assert shapes == [(16, 16)] * 2 + [(24, 24)] * 2, shapes
    assert json.loads((out / "model.json").read_text())["training"]["early_patch_size"] == 16
    shapes.clear()   # 0: the full patch from the first step
    assert main(["train", case["image"], "--labels", case["labels"], "--out", str(case["dir"] / "full"), *tiny,
                 "--patch-size", "24", "--early-patch-size", "0"]) == 0
    assert shapes == [(24, 24)] * 4, shapes


def test_an_early_patch_too_small_is_one_line_before_any_work(case, capsys):
    _bad(["train", case["image"], "--labels", case["labels"], "--out", str(case["dir"] / "m"), *TINY,
          "--early-patch-size", "8"], capsys, "--early-patch-size 8", "at least 16")


def _checkpoint_left(case, monkeypatch) -> Path:
    """A run whose checkpoint (step 2 of 3) is left behind: the model write never happens."""
    import mismatch.api

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed

    out = case["dir"] / "model"
    monkeypatch.setattr(mismatch.api, "save_model", killed)
    with pytest.raises(Killed):
        main(["train", case["image"], "--labels", case["labels"], "--out", str(out), *TINY,
              "--checkpoint-every", "1"])
    monkeypatch.undo()
    assert (out / "checkpoint" / "state.json").exists()
    return out


@pytest.mark.parametrize("damage,word", [
    (lambda c: (c / "state.json").write_text('{"step": 2, "con'), "not valid JSON"),
    (lambda c: (c / "state.json").write_text("[1, 2]"), "not a JSON object"),
    (lambda c: (c / "state.safetensors").write_bytes((c / "state.safetensors").read_bytes()[:100]), "damaged"),
    (lambda c: (c / "state.safetensors").unlink(), "incomplete"),
])
def test_resume_from_a_damaged_checkpoint_is_refused_in_one_line(case, capsys, monkeypatch, damage, word):
    out = _checkpoint_left(case, monkeypatch)
    damage(out / "checkpoint")
    capsys.readouterr()
    _bad(["train", case["image"], "--labels", case["labels"], "--out", str(out), *TINY, "--resume"], capsys,
         word, "without --resume")


# -- segment ----------------------------------------------------------------------------------------------

def test_segment_checks_every_output_before_the_inference(case, model, capsys, read_only, monkeypatch):
    import mismatch.api

    monkeypatch.setattr(mismatch.api, "segment_volume", lambda *a, **k: pytest.fail("segmented first"))
    seg = ["segment", case["image"], "--model", str(model), "--device", "cpu"]
    _bad([*seg, "--out", str(read_only / "seg.nrrd")], capsys, "--out", "cannot write")
    _bad([*seg, "--out", str(case["dir"] / "s.nrrd"), "--confidence", str(read_only / "c.nrrd")], capsys,
         "--confidence", "cannot write")
    _bad([*seg, "--out", str(case["dir"] / "s.nrrd"), "--report", str(read_only / "r.json")], capsys, "--report")
    _bad([*seg, "--out", str(case["dir"] / "s.png")], capsys, "unsupported file type")
    _bad([*seg, "--out", str(case["dir"])], capsys, "is a folder")
    # two outputs on one path: the one written last would replace the other
    _bad([*seg, "--out", str(case["dir"] / "s.nrrd"), "--confidence", str(case["dir"] / "s.nrrd")], capsys,
         "two outputs")
    _bad([*seg, "--out", str(case["dir"] / "s.nrrd"), "--disagreement", str(case["dir"] / "sub" / ".." / "s.nrrd")],
         capsys, "two outputs")
    assert not (case["dir"] / "s.nrrd").exists()


def test_segment_labels_on_another_grid_and_slices_without_labels(case, model, capsys):
    other = _write(np.zeros((10, 32, 40), np.uint8), case["dir"] / "other.nrrd", spacing=(1.0, 1.0, 1.0))
    seg = ["segment", case["image"], "--model", str(model), "--out", str(case["dir"] / "s.nrrd"), "--device", "cpu"]
    _bad([*seg, "--labels", other], capsys, "different grid")
    _bad([*seg, "--empty-slices", "3"], capsys, "need --labels")
    _bad([*seg, "--labels", case["labels"], "--empty-slices", "40"], capsys, "40")
    _bad([*seg, "--labels", case["labels"], "--empty-slices", "0,6"], capsys, "slice 6", "--empty-slices",
         "painted voxels")
    assert not (case["dir"] / "s.nrrd").exists()


def test_a_constant_image_is_refused_before_training(case, capsys):
    flat = _write(np.full((10, 32, 40), -1000, np.int16), case["dir"] / "flat.nrrd")
    _bad(["train", flat, "--labels", case["labels"], "--out", str(case["dir"] / "m"), *TINY], capsys,
         "flat.nrrd", "every voxel is -1000", "nothing to learn")
    assert not (case["dir"] / "m").exists()


def test_a_painted_slice_listed_as_empty_is_refused_before_any_work(case, capsys):
    """Slice 6 is painted: listing it as empty says the opposite, so train and fill refuse it in one line and
    write nothing (the panel refuses the same, jobfolder.check_empty_slices)."""
    labels = case["labels"]
    _bad(["train", case["image"], "--labels", labels, "--out", str(case["dir"] / "m"), *TINY,
          "--empty-slices", "0,6"], capsys, "slice 6", "painted voxels", "--empty-slices")
    assert not (case["dir"] / "m").exists()
    _bad(["fill", case["image"], "--labels", labels, "--out", str(case["dir"] / "f.nrrd"), "--empty-slices", "6-8"],
         capsys, "slice 6", "painted voxels")
    assert not (case["dir"] / "f.nrrd").exists()
    assert main(["fill", case["image"], "--labels", labels, "--out", str(case["dir"] / "f.nrrd"),
                 "--empty-slices", "0,9"]) == 0


def test_a_card_whose_channels_or_classes_disagree_with_the_network_is_refused(case, model, capsys):
    card = json.loads((model / "model.json").read_text())
    seg = ["segment", case["image"], "--model", str(model), "--out", str(case["dir"] / "s.nrrd"), "--device", "cpu"]
    (model / "model.json").write_text(json.dumps({**card, "channels": [{"name": "t1"}, {"name": "t2"}]}))
    _bad(seg, capsys, "2 channel(s)", "takes 1")
    two = [*card["classes"], {"value": 2, "name": "other", "color": [0, 0, 1]}]
    (model / "model.json").write_text(json.dumps({**card, "classes": two}))
    _bad(seg, capsys, "2 class(es)", "has 1")


@pytest.mark.parametrize("version,words", [("one", ("format_version 'one'", "not a whole number")),
                                           (None, ("format_version None",)), (1.5, ("format_version 1.5",)),
                                           (3, ("newer", "update the MisMatch engine"))])
def test_a_card_with_a_bad_format_version_is_refused_in_one_line(case, model, capsys, version, words):
    """The same check as the module's (mismatch.contract.check_card): a non-numeric version was a traceback."""
    card = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**card, "format_version": version}))
    seg = ["segment", case["image"], "--model", str(model), "--out", str(case["dir"] / "s.nrrd"), "--device", "cpu"]
    _bad(seg, capsys, *words)
    assert not (case["dir"] / "s.nrrd").exists()


# -- evaluate ---------------------------------------------------------------------------------------------

def test_evaluate_refuses_what_is_not_a_label_map_or_a_confidence(case, capsys):
    d = case["dir"]
    ev = ["evaluate", "--truth", case["truth"]]
    probability = _write(case["disc"].astype(np.float32) * 0.7, d / "probability.nrrd")
    _bad([*ev, "--prediction", probability], capsys, "non-integer")
    _bad(["evaluate", "--prediction", case["truth"], "--truth", probability], capsys, "non-integer")
    ct = case["image"]
    _bad([*ev, "--prediction", case["truth"], "--confidence", ct], capsys, "not probabilities", "-8")
    nan = np.full(case["disc"].shape, 0.9, np.float32)
    nan[1, 2, 3] = np.nan
    _bad([*ev, "--prediction", case["truth"], "--confidence", _write(nan, d / "nan.nrrd")], capsys, "1 voxel(s)",
         "NaN")
    _bad([*ev, "--prediction", case["truth"], "--diagram", str(d / "rel.png")], capsys, "needs --confidence")


def test_evaluate_checks_its_outputs_first(case, capsys, read_only):
    _bad(["evaluate", "--prediction", case["truth"], "--truth", case["truth"], "--out", str(read_only / "e.json")],
         capsys, "--out", "cannot write")
    _bad(["evaluate", "--prediction", case["truth"], "--truth", case["truth"], "--out", case["truth"]], capsys,
         "input")


# -- signals during start-up ------------------------------------------------------------------------------

def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_start_up_ends_with_one_line_and_exit_130(case, sig):
    events = case["dir"] / "events.jsonl"
    env = dict(os.environ, PYTHONPATH=TRAINER, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "mismatch", "train", case["image"], "--labels", case["labels"],
                             "--out", str(case["dir"] / "m"), *TINY, "--events", str(events)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _catches(proc.pid, signal.SIGTERM):   # the engine's handlers are in: it is starting up
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and f"stopped by {signal.Signals(sig).name}" in err, err
    end = json.loads(events.read_text().splitlines()[-1])
    assert end["event"] == "end" and end["status"] == "cancelled"


def test_demo_output_that_cannot_be_written(tmp_path, capsys, read_only):
    (tmp_path / "a-file").write_text("x")
    _bad(["demo", "--out", str(tmp_path / "a-file")], capsys, "not a folder")
    _bad(["demo", "--out", str(read_only)], capsys, "--out", "cannot write")
    _bad(["demo", "--out", str(read_only / "inside")], capsys, "--out", "cannot write")
