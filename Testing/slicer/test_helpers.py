"""Devices, dependency installation and model cards: the decisions, with stand-ins for Slicer's parts."""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from MisMatchSegmentationLib import devices, install, modelcard
from MisMatchSegmentationLib.process import engine_environment


def test_devices_list_each_gpu_with_free_memory():
    found, message = devices.describe({"torch": "2.5", "cuda_build": "12.4", "cuda_available": True, "mps": False,
                                       "gpus": [{"index": 0, "name": "RTX A6000", "free": 40 * 2**30, "total": 48 * 2**30},
                                                {"index": 1, "name": "T4", "free": None, "total": 16 * 2**30}]})
    assert [d.id for d in found] == ["cuda:0", "cuda:1", "cpu"] and message == ""
    assert found[0].label == "GPU 0: RTX A6000 (40.0 of 48.0 GiB free)" and found[1].label == "GPU 1: T4 (16.0 GiB)"
    found, message = devices.describe({"torch": "2.5", "mps": True, "system": "Darwin", "machine": "arm64"})
    assert [d.id for d in found] == ["mps", "cpu"] and not message


@pytest.mark.parametrize("probe, why", [
    ({"torch": None}, "PyTorch is not installed yet"),
    ({"torch": None, "error": "OSError: libcudnn"}, "could not be loaded (OSError: libcudnn)"),
    ({"torch": "2.5+cpu", "cuda_build": None, "system": "Linux"}, "CPU-only build"),
    ({"torch": "2.5", "cuda_build": "12.4", "system": "Windows"}, "found no NVIDIA GPU: check that the GPU driver"),
    ({"torch": "2.5", "system": "Darwin", "machine": "x86_64"}, "no usable Apple GPU"),
])
def test_no_gpu_message_says_why(probe, why):
    found, message = devices.describe(probe)
    assert [d.id for d in found] == ["cpu"]
    assert why in message and message.endswith("Training runs on the CPU (slower).")


def test_the_probe_runs_in_the_engine_python():
    pytest.importorskip("torch", reason="torch is not installed in this Python (the Python 3.12 run has none)")
    probe = devices.probe_devices(sys.executable, env=engine_environment(), timeout=120)
    assert probe["error"] is None and probe["torch"]
    found, _ = devices.describe(probe)
    assert found[-1].id == "cpu"
    failed = devices.probe_devices("/nonexistent/python")
    assert failed["torch"] is None and "did not run" in failed["error"]


def test_requirements_and_what_is_missing(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\nsafetensors>=0.4\nnumpy>=2  # never replace Slicer's\nSimpleITK\nsome_pkg[x]==1; python_version>'3'\n")
    assert install.read_requirements(req) == ["safetensors>=0.4", "some_pkg[x]==1; python_version>'3'"]

    def version_of(name):
        if name == "safetensors":
            return "0.4.5"
        raise importlib.metadata.PackageNotFoundError(name)
    assert install.missing(install.read_requirements(req), version_of) == ["some_pkg[x]==1; python_version>'3'"]


def test_torch_is_installed_through_pytorch_utils_and_a_refusal_is_explained(monkeypatch):
    monkeypatch.setattr(install, "torch_installed", lambda: False)
    calls = []

    class Utils:
        def installTorch(self, askConfirmation, torchVersionRequirement):
            calls.append((askConfirmation, torchVersionRequirement))
            return None  # the user said no
    with pytest.raises(install.InstallDeclined, match="PyTorch was not installed"):
        install.ensure_torch(Utils())
    assert calls == [(True, ">=2.1")]


def test_other_requirements_via_pip_ensure_or_pip_install(tmp_path, monkeypatch):
    req = tmp_path / "requirements.txt"
    req.write_text("not-installed-package-xyz>=1\n")
    ensured = []
    new = SimpleNamespace(packaging=SimpleNamespace(pip_ensure=lambda reqs, requester: ensured.append((reqs, requester))))
    assert install.ensure_requirements(req, slicer_module=new) == ["not-installed-package-xyz>=1"]
    assert ensured == [(["not-installed-package-xyz>=1"], "MisMatch")]
    installed = []
    old = SimpleNamespace(util=SimpleNamespace(pip_install=installed.append))
    install.ensure_requirements(req, slicer_module=old, confirm=lambda text: True)
    assert installed == ["not-installed-package-xyz>=1"]
    with pytest.raises(install.InstallDeclined):
        install.ensure_requirements(req, slicer_module=old, confirm=lambda text: False)


def write_model(folder, **changes):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    import hashlib

    card = {"format": "mismatch-model", "format_version": 1, "architecture": {"name": "mismatch", "width": 24,
            "in_channels": 1}, "classes": [{"value": 1, "name": "liver", "color": [1, 0, 0]}],
            "channels": [{"name": "ct"}], "normalisation": {"method": "zscore"}, "slice_axis": "k",
            "summary": {"steps": 300},
            "weights": {"file": "model.safetensors", "sha256": hashlib.sha256(b"weights").hexdigest()}}
    card.update(changes)
    (folder / "model.json").write_text(json.dumps(card))
    return folder


def test_model_card_validation(tmp_path):
    good = write_model(tmp_path / "good")
    card = modelcard.read_card(good)
    assert modelcard.describe(card) == "mismatch model (width 24) for liver, trained 300 steps"
    assert modelcard.read_card(good / "model.json")["classes"][0]["name"] == "liver"
    cases = [("format", "other", "not a MisMatch model card"),
             ("format_version", 9, "newer than this version reads .*update the MisMatch extension"),
             ("format_version", "one", "format_version 'one' is not a whole number"),
             ("classes", [], "positive integer values"), ("weights", {"file": "../x"}, "must sit in the model folder"),
             ("weights", {"file": "model.safetensors"}, "checksum")]   # a card without the checksum
    for n, (key, value, message) in enumerate(cases):
        with pytest.raises(modelcard.ModelCardError, match=message):
            modelcard.read_card(write_model(tmp_path / str(n), **{key: value}))
    for key in ("normalisation", "slice_axis"):   # the engine refuses a card without them: so does the module
        card = json.loads((write_model(tmp_path / key) / "model.json").read_text())
        (tmp_path / key / "model.json").write_text(json.dumps({k: v for k, v in card.items() if k != key}))
        with pytest.raises(modelcard.ModelCardError, match=f"lacks {key}"):
            modelcard.read_card(tmp_path / key)
    with pytest.raises(modelcard.ModelCardError, match="no model.json"):
        modelcard.read_card(tmp_path)
    (good / "model.safetensors").unlink()
    with pytest.raises(modelcard.ModelCardError, match="missing"):
        modelcard.read_card(good)


def test_the_module_reads_the_contract_file_of_the_engine_it_runs(tmp_path):
    """One contract (exit codes, slice lists, durations, card checks): the module loads the engine's own file,
    from the engine folder packaged with it, without importing the rest of the engine or torch."""
    import shutil
    import subprocess

    from MisMatchSegmentationLib import engine

    source = engine.engine_source_dir() / "mismatch" / "contract.py"
    packaged = tmp_path / "MisMatchEngine" / "mismatch"
    packaged.mkdir(parents=True)
    shutil.copy(source, packaged)
    loaded = engine.load_contract(tmp_path / "MisMatchEngine")
    assert Path(loaded.__file__) == packaged / "contract.py" and loaded.EXIT_CANCELLED == 130
    assert loaded.parse_slices("3, 7; 10-12") == [3, 7, 10, 11, 12] and loaded.format_duration(75) == "1:15"
    assert Path(engine.contract.__file__).resolve() == source.resolve()
    with pytest.raises(ImportError, match="reinstall the MisMatch extension"):
        engine.load_contract(tmp_path / "nothing")
    module_dir = Path(engine.__file__).resolve().parents[1]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from MisMatchSegmentationLib import jobfolder, modelcard; "
            "assert 'torch' not in sys.modules and 'mismatch' not in sys.modules, sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(module_dir)], capture_output=True, text=True)
    assert done.returncode == 0 or "No module named 'slicer'" in done.stderr, done.stderr


def test_copy_model_refuses_a_folder_with_other_files(tmp_path):
    model = write_model(tmp_path / "m")
    (model / "checkpoint").mkdir()
    copied = modelcard.copy_model(model, tmp_path / "copy")
    assert sorted(p.name for p in copied.iterdir()) == ["model.json", "model.safetensors"]
    (model / "optimizer.safetensors").write_bytes(b"moments")   # the optimiser's state goes with the model
    (model / "painted.safetensors").write_bytes(b"painted")    # and the painted slices it was trained from
    copied = modelcard.copy_model(model, tmp_path / "copy2")
    assert (copied / "optimizer.safetensors").read_bytes() == b"moments"
    assert (copied / "painted.safetensors").read_bytes() == b"painted"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("x")
    with pytest.raises(modelcard.ModelCardError, match="not empty"):
        modelcard.copy_model(model, busy)


# -- a failed install says what failed and what to do; progress instead of a wait cursor -------------------
def test_a_failed_torch_install_says_what_failed_and_what_to_do(monkeypatch):
    monkeypatch.setattr(install, "torch_installed", lambda: False)
    said = []

    class Utils:
        def installTorch(self, askConfirmation, torchVersionRequirement):
            raise OSError("[Errno 28] No space left on device")
    with pytest.raises(install.InstallFailed) as failure:
        install.ensure_torch(Utils(), progress=said.append)
    exc = failure.value
    assert exc.what == "PyTorch" and "No space left on device" in str(exc) and "free disk space" in str(exc)
    assert "Traceback" in exc.details and "OSError" in exc.details
    assert said and "several GB" in said[0]  # the panel showed what is being downloaded before it started


def test_a_failed_pip_install_names_the_packages_and_the_console_command(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("not-installed-package-xyz>=1\n")

    def pip_ensure(reqs, requester):
        raise RuntimeError("pip exited with status 1: no matching distribution")
    broken = SimpleNamespace(packaging=SimpleNamespace(pip_ensure=pip_ensure))
    said = []
    with pytest.raises(install.InstallFailed) as failure:
        install.ensure_requirements(req, slicer_module=broken, progress=said.append)
    assert failure.value.what == "not-installed-package-xyz>=1"
    assert "no matching distribution" in str(failure.value)
    assert "slicer.util.pip_install('not-installed-package-xyz>=1')" in str(failure.value)
    assert said == ["Installing not-installed-package-xyz>=1. pip's output follows here and in the Python console."]
    # the user saying no stays a refusal, not a failure
    old = SimpleNamespace(util=SimpleNamespace(pip_install=lambda r: None))
    with pytest.raises(install.InstallDeclined):
        install.ensure_requirements(req, slicer_module=old, confirm=lambda text: False)


def test_pips_log_lines_reach_the_panel_while_installing():
    import logging

    seen = []
    with install.forward_log(seen.append):
        logging.getLogger("some.module").info("Downloading torch-2.13.0-cp312-none-manylinux.whl (900.1 MB)")
    logging.getLogger().info("after the install")
    assert seen == ["Downloading torch-2.13.0-cp312-none-manylinux.whl (900.1 MB)"]


def test_nothing_to_install_means_no_dialog():
    def everything(name):
        return "9.9"

    def nothing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    assert install.dependencies_missing(everything) is False
    assert install.dependencies_missing(nothing) is True

    def all_but_torch(name):
        if name == "torch":
            raise importlib.metadata.PackageNotFoundError(name)
        return "9.9"
    assert install.dependencies_missing(all_but_torch) is True
    assert install.dependencies_missing(all_but_torch, torch=False) is False   # Fill runs without torch
