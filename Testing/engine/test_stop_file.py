"""`mismatch train --stop-file`: the way a parent that cannot signal the engine asks it to stop."""

import json

import numpy as np
import SimpleITK as sitk

from mismatch.cli import main
from mismatch.train import StopRequest


def _case(tmp_path):
    img = np.random.default_rng(0).normal(size=(6, 24, 24)).astype(np.float32)
    lab = np.zeros((6, 24, 24), np.uint8)
    lab[2, 8:16, 8:16] = 1
    for a, name in ((img, "img.nrrd"), (lab, "lab.nrrd")):
        sitk.WriteImage(sitk.GetImageFromArray(a), str(tmp_path / name))
    return str(tmp_path / "img.nrrd"), str(tmp_path / "lab.nrrd")


def test_stop_request_sees_the_file_appear(tmp_path):
    flag = StopRequest(tmp_path / "STOP")
    assert not flag and flag.reason is None
    (tmp_path / "STOP").write_text("")
    assert flag and "STOP" in flag.reason
    assert not StopRequest()
    asked = StopRequest()
    asked.request("SIGTERM")
    assert asked and asked.reason == "SIGTERM"


def test_train_stops_at_the_stop_file_with_a_checkpoint_and_resumes(tmp_path, capsys):
    img, lab = _case(tmp_path)
    stop = tmp_path / "STOP"
    stop.write_text("")
    args = ["train", img, "--labels", lab, "--out", str(tmp_path / "model"), "--steps", "3", "--width", "4",
            "--patch-size", "0", "--device", "cpu", "--threads", "1", "--stop-file", str(stop)]
    assert main(args) == 130
    assert "stop file" in capsys.readouterr().err
    assert not (tmp_path / "model" / "model.json").exists()
    stop.unlink()
    assert main(args + ["--resume"]) == 0
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    assert card["summary"]["steps"] == 3
