"""Progress when nobody watches a terminal: a plain line at a steady interval on stderr; events unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import mismatch.events
from mismatch.events import Reporter

TRAINER = str(Path(__file__).resolve().parents[2] / "Trainer")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_plain_line_first_then_every_interval_and_at_the_end(monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr(mismatch.events.time, "monotonic", clock)
    reporter = Reporter(progress_lines=True, line_seconds=30)
    reporter.start("train", total=100)
    for step in range(1, 101):
        clock.now += 1.0   # one second a step
        reporter.progress("train", step, 100, loss=0.5)
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split()[2] for line in lines] == ["1/100", "31/100", "61/100", "91/100", "100/100"]
    assert lines[1] == "train step 31/100 loss 0.5000 elapsed 0:31 eta 1:09"


def test_lines_by_default_only_without_a_terminal_and_without_events_on_stdout(capsys):
    # under pytest's capture stderr is not a terminal
    assert Reporter().progress_lines and not Reporter().progress_bar
    assert not Reporter(events="-").progress_lines          # stdout is the machine channel
    assert not Reporter(progress_bar=False).progress_lines  # library callers that asked for silence
    assert not Reporter(quiet=True).progress_lines


def _write(array, path):
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return str(path)


def test_redirected_training_and_segmentation_print_progress_lines(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 24, 24)).astype(np.float32)
    labels = np.zeros((6, 24, 24), np.uint8)
    labels[[1, 4], 6:18, 6:18] = 1
    d = tmp_path
    env = dict(os.environ, PYTHONPATH=TRAINER, OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "mismatch"]
    train = [*base, "train", _write(image, d / "image.nrrd"), "--labels", _write(labels, d / "labels.nrrd"),
             "--out", str(d / "model"), "--steps", "4", "--width", "4", "--patch-size", "0", "--device", "cpu"]
    done = subprocess.run(train, env=env, capture_output=True, text=True, timeout=300)   # stderr is a pipe
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("train step")]
    assert lines[0].startswith("train step 1/4 loss ") and lines[-1].startswith("train step 4/4 loss ")
    assert all(" elapsed " in line and " eta " in line for line in lines)
    assert "\r" not in done.stderr   # no progress bar drawn into a log file

    seg = [*base, "segment", str(d / "image.nrrd"), "--model", str(d / "model"), "--out", str(d / "seg.nrrd"),
           "--device", "cpu"]
    done = subprocess.run(seg, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert any(line.startswith("segment step 6/6") for line in done.stderr.splitlines()), done.stderr

    # with the events on stdout, stdout is all JSON and stderr carries no progress lines
    done = subprocess.run([*train, "--out", str(d / "model2"), "--events", "-"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert all(json.loads(line)["event"] for line in done.stdout.splitlines())
    assert "train step" not in done.stderr
