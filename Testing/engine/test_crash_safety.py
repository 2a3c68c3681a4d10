"""Nothing lost when the process is killed: checkpoints and model folders are written as one unit.

A kill is simulated at every moment that matters: right after each rename (``os.replace``) that the writer
makes, in-process (an exception nothing catches, so no clean-up runs past the rename) for every such moment,
and with a real SIGKILL in a child process for the moment between the two renames of a folder swap. The
old writer (weights replaced, then the JSON) fails these tests: a kill between its two replacements left
weights of one checkpoint beside the state of another, and ``--resume`` went on silently.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from discs import disc_volume, two_painted_squares
from mismatch.errors import UserError
from mismatch.io import swap_names
from mismatch.modelfile import load_checkpoint, load_model, read_card, save_checkpoint, save_model
from mismatch.models import build_model
from mismatch.train import TrainConfig, fit

TRAINER = str(Path(__file__).resolve().parents[2] / "Trainer")


class Killed(BaseException):
    """The process died here (a BaseException: no ``except Exception`` clean-up runs)."""


@contextmanager
def killed_after_replace(n: int, monkeypatch):
    """``os.replace`` works as usual, and the process "dies" right after its ``n``-th call. Yields the list of
    calls made so far."""
    real = os.replace
    calls: list[tuple[str, str]] = []

    def replace(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        calls.append((str(src), str(dst)))
        if len(calls) == n:
            raise Killed(f"killed after os.replace({src}, {dst})")

    monkeypatch.setattr(os, "replace", replace)
    try:
        yield calls
    finally:
        monkeypatch.setattr(os, "replace", real)


@pytest.fixture(scope="module")
def arrays():
    return two_painted_squares()


CONFIG = dict(method="mismatch", steps=6, width=4, batch_size=1, patch_size=16, checkpoint_every=2, seed=0)


def _fit(arrays, folder, resume=False, average_span=0.0, **kw):
    vol, labels = arrays
    return fit([vol], labels, np.array([1, 4]), 2, TrainConfig(**CONFIG, average_span=average_span),
               checkpoint_dir=folder, resume=resume, checkpoint_seconds=None, **kw)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# average_span 0.5: the weights of steps 4 to 6 are averaged, so the checkpoint of step 4 holds an average begun
@pytest.mark.parametrize("average_span", [0.0, 0.5])
def test_a_kill_after_any_rename_of_a_checkpoint_resumes_to_the_uninterrupted_result(arrays, tmp_path, monkeypatch,
                                                                                     average_span):
    reference = _fit(arrays, tmp_path / "reference", average_span=average_span).snapshots[-1]
    n, seen = 0, []
    while True:
        n += 1
        folder = tmp_path / f"kill{n}" / "checkpoint"
        with killed_after_replace(n, monkeypatch) as calls:
            try:
                _fit(arrays, folder, average_span=average_span)
                finished = True
            except Killed:
                finished = False
        if finished:   # no n-th rename: every moment has been tried
            break
        seen.append(calls[-1])
        try:
            result = _fit(arrays, folder, resume=True, average_span=average_span)
        except UserError as exc:   # only acceptable before the first checkpoint is complete
            assert "no checkpoint" in str(exc), (n, calls[-1], exc)
            result = _fit(arrays, folder, average_span=average_span)
        assert _same(result.snapshots[-1], reference), f"kill after {calls[-1]} resumed to other weights"
        assert result.steps_done == CONFIG["steps"]
    assert n >= 3, seen   # the checkpoints at steps 2 and 4 were written, the second one replacing the first
    new, old = swap_names(tmp_path / "reference" / "checkpoint")
    assert not new.exists() and not old.exists()


@pytest.mark.parametrize("seconds,expected", [(None, []), (3600.0, []), (1e-9, [1, 2, 3, 4, 5])])
def test_checkpoints_by_time_as_well_as_by_steps(arrays, tmp_path, monkeypatch, seconds, expected):
    import mismatch.modelfile

    written = []
    real = mismatch.modelfile.save_checkpoint
    monkeypatch.setattr(mismatch.modelfile, "save_checkpoint",
                        lambda folder, tensors, state: (written.append(state["step"]), real(folder, tensors, state)))
    vol, labels = arrays
    config = TrainConfig(**{**CONFIG, "checkpoint_every": 1000})   # never by steps in a 6-step run
    fit([vol], labels, np.array([1, 4]), 2, config, checkpoint_dir=tmp_path / "checkpoint", checkpoint_seconds=seconds)
    assert written == expected
    if expected:   # the last one is there, whole, for a kill -9 to resume from
        assert load_checkpoint(tmp_path / "checkpoint")[1]["step"] == expected[-1]


def _checkpoint(step: int, scale: float) -> tuple[dict, dict]:
    return {"model.w": torch.full((3, 3), scale)}, {"step": step, "config": {}, "optimizer": {}, "sampler": {},
                                                     "history": [], "snapshots": 0}


def test_a_torn_or_damaged_checkpoint_is_refused_in_one_line(tmp_path):
    save_checkpoint(tmp_path / "a", *_checkpoint(2, 1.0))
    save_checkpoint(tmp_path / "b", *_checkpoint(4, 2.0))
    tensors, state = load_checkpoint(tmp_path / "a")
    assert state["step"] == 2 and torch.equal(tensors["model.w"], torch.full((3, 3), 1.0))

    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "state.json").write_bytes((tmp_path / "a" / "state.json").read_bytes())
    (torn / "state.safetensors").write_bytes((tmp_path / "b" / "state.safetensors").read_bytes())
    with pytest.raises(UserError, match="torn") as info:
        load_checkpoint(torn)
    assert "\n" not in str(info.value) and "without --resume" in str(info.value)

    damaged = tmp_path / "b" / "state.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(UserError, match="damaged"):
        load_checkpoint(tmp_path / "b")
    (tmp_path / "a" / "state.json").write_text('{"step": 2, "conf')
    with pytest.raises(UserError, match="not valid JSON"):
        load_checkpoint(tmp_path / "a")
    with pytest.raises(UserError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing")


def _model(seed: int):
    torch.manual_seed(seed)
    net = build_model("mismatch", width=4)
    card = {"architecture": net.config.to_dict(), "classes": [{"value": 1, "name": f"model{seed}", "color": [1, 0, 0]}],
            "channels": [{"name": "ct.nrrd"}], "normalisation": {"method": "zscore", "hu_window": None},
            "slice_axis": "k"}
    return net.state_dict(), card


def test_a_kill_while_a_model_is_replaced_leaves_the_old_or_the_new_model_whole(tmp_path, monkeypatch):
    old_state, old_card = _model(1)
    new_state, new_card = _model(2)
    n = 0
    while True:
        n += 1
        folder = tmp_path / f"kill{n}" / "model"
        save_model(folder, [old_state], old_card)
        (folder / "checkpoint").mkdir()   # what a training run leaves there until it completes
        with killed_after_replace(n, monkeypatch):
            try:
                save_model(folder, [new_state], new_card)
                break
            except Killed:
                pass
        card, nets = load_model(folder)   # never a checksum error: one whole model or the other
        state = nets[0].state_dict()
        name = card["classes"][0]["name"]
        assert (name, _same(state, old_state if name == "model1" else new_state)) in {("model1", True),
                                                                                        ("model2", True)}
        assert read_card(folder)["classes"][0]["name"] == name
        save_model(folder, [new_state], new_card)   # the next write finishes or redoes the swap
        assert load_model(folder)[0]["classes"][0]["name"] == "model2"
        assert sorted(p.name for p in folder.parent.iterdir()) == ["model"]
        assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]
    assert n >= 3


def test_a_folder_with_other_files_is_never_replaced(tmp_path):
    state, card = _model(1)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a model's"):
        save_model(tmp_path, [state], card)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# -- with a real kill -9 in a child process -------------------------------------------------------------

KILLER = """
import os, signal, sys
n, match = int(os.environ["KILL_AFTER"]), os.environ["KILL_MATCH"]
real, count = os.replace, [0]
def replace(src, dst, *a, **k):
    real(src, dst, *a, **k)
    if match in os.path.basename(str(dst)):
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from mismatch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run(argv, kill_after=None, match=""):
    env = dict(os.environ, PYTHONPATH=TRAINER, OMP_NUM_THREADS="1")
    env.update(KILL_AFTER=str(kill_after or 0), KILL_MATCH=match)
    return subprocess.run([sys.executable, "-c", KILLER, *argv], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def files(tmp_path):
    image, labels, _ = disc_volume((8, 24, 28), (12, 14), 5, [2, 5])
    for name, array in (("image.nrrd", image), ("labels.nrrd", labels)):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / name))
    return tmp_path


def _train_argv(d, out, *extra):
    return ["train", str(d / "image.nrrd"), "--labels", str(d / "labels.nrrd"), "--out", str(out), "--steps", "6",
            "--width", "4", "--patch-size", "0", "--batch-size", "1", "--device", "cpu", *extra]


def _weights_sha(model_dir) -> str:
    return json.loads((Path(model_dir) / "model.json").read_text())["weights"]["sha256"]


def test_kill_9_between_the_renames_of_a_checkpoint_then_resume(files):
    d = files
    done = _run(_train_argv(d, d / "reference", "--checkpoint-every", "2"))
    assert done.returncode == 0, done.stderr
    # the second checkpoint (step 4): killed when the first has been moved aside and the new one not yet in
    killed = _run(_train_argv(d, d / "model", "--checkpoint-every", "2"), kill_after=2, match="checkpoint")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (d / "model" / "model.json").exists()
    resumed = _run(_train_argv(d, d / "model", "--checkpoint-every", "2", "--resume", "--events", str(d / "ev")))
    assert resumed.returncode == 0, resumed.stderr
    assert any("resuming at step 4" in json.loads(line).get("message", "")
               for line in (d / "ev").read_text().splitlines())
    assert _weights_sha(d / "model") == _weights_sha(d / "reference")
    assert sorted(p.name for p in (d / "model").iterdir()) == ["model.json", "model.safetensors",
                                                              "optimizer.safetensors", "painted.safetensors"]


def test_kill_9_while_an_existing_model_is_replaced_keeps_a_whole_model(files):
    d = files
    assert _run(_train_argv(d, d / "model", "--seed", "1")).returncode == 0
    first = _weights_sha(d / "model")
    # killed between moving the old model folder aside and renaming the new one into place
    killed = _run(_train_argv(d, d / "model", "--seed", "2"), kill_after=1, match="model.mismatch-old")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    seg = _run(["segment", str(d / "image.nrrd"), "--model", str(d / "model"), "--out", str(d / "seg.nrrd"),
                "--device", "cpu"])
    assert seg.returncode == 0, seg.stderr     # the new model, complete, is found
    assert read_card(d / "model")["training"]["seed"] == 2
    again = _run(_train_argv(d, d / "model", "--seed", "1"))
    assert again.returncode == 0, again.stderr
    assert _weights_sha(d / "model") == first
    assert sorted(p.name for p in d.iterdir() if "model" in p.name) == ["model"]


def test_kill_9_before_the_first_step_checkpoint_loses_only_the_time_since_the_last_one(files):
    """The issue's case: a checkpoint every 100 steps, killed at step 86. Here: every 1000 steps, a time
    checkpoint after every step (--checkpoint-seconds tiny), killed right after the first one is in place."""
    d = files
    plain = _run(_train_argv(d, d / "reference"))
    assert plain.returncode == 0, plain.stderr
    argv = _train_argv(d, d / "model", "--checkpoint-every", "1000", "--checkpoint-seconds", "0.000001")
    killed = _run(argv, kill_after=1, match="checkpoint")
    assert killed.returncode == -signal.SIGKILL, killed.stderr   # a checkpoint was written by time
    resumed = _run([*argv, "--resume", "--events", str(d / "ev")])
    assert resumed.returncode == 0, resumed.stderr
    assert any("resuming at step 1 of 6" in json.loads(line).get("message", "")
               for line in (d / "ev").read_text().splitlines())
    assert _weights_sha(d / "model") == _weights_sha(d / "reference")
