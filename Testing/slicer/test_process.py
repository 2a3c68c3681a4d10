"""The child-process runner: events as they arrive, cancel of the whole tree, failures reported."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from conftest import poll_until, progressed, standin_command, wait_until

from MisMatchSegmentationLib import process
from MisMatchSegmentationLib.process import EngineProcess

posix_only = pytest.mark.skipif(os.name == "nt", reason="process groups and signals are POSIX here")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


def test_events_arrive_while_the_child_is_still_running(standin_log):
    proc = EngineProcess(standin_command("gate") + ["train"]).start()
    first = poll_until(proc, lambda ev: any(e["event"] == "start" for e in ev))
    assert proc.running and not any(e["event"] == "finished" for e in first)
    assert proc.poll() == []  # never blocks, nothing new while the child waits
    (standin_log / "go").write_text("")
    rest = proc.wait(timeout=20)
    kinds = [e["event"] for e in rest]
    assert kinds == ["progress", "log", "end", "finished"]
    assert rest[1]["message"] == "plain text, not an event"
    assert rest[-1]["status"] == "completed" and rest[-1]["returncode"] == 0
    assert not proc.running


@posix_only
def test_cancel_ends_the_child_and_its_children(standin_log):
    proc = EngineProcess(standin_command("slow") + ["train"]).start()
    poll_until(proc, progressed)
    grandchild = int((standin_log / "grandchild.pid").read_text())
    assert alive(grandchild)
    proc.cancel()
    events = proc.wait(timeout=20)
    finished = events[-1]
    assert finished["status"] == "cancelled" and finished["returncode"] == 130
    assert "checkpoint" in finished["message"]
    wait_until(lambda: not alive(grandchild), what="the engine's own child gone after the cancel")


@posix_only
def test_a_child_that_ignores_the_request_is_killed_with_its_tree(standin_log):
    proc = EngineProcess(standin_command("stubborn") + ["train"], kill_grace=0.5).start()
    poll_until(proc, progressed)
    grandchild = int((standin_log / "grandchild.pid").read_text())
    proc.cancel()
    finished = proc.wait(timeout=20)[-1]
    assert finished["status"] == "cancelled" and finished["returncode"] == -signal.SIGKILL
    wait_until(lambda: not alive(grandchild), what="the engine's own child killed with it")


@posix_only
def test_a_crashed_child_is_a_failure_with_its_last_stderr_lines(standin_log):
    proc = EngineProcess(standin_command("crash") + ["train"]).start()
    finished = proc.wait(timeout=20)[-1]
    assert finished["status"] == "failed"
    assert "killed (SIGKILL)" in finished["message"]
    assert "Segmentation fault in a stand-in" in finished["message"]
    assert finished["stderr"][-1] == "Segmentation fault in a stand-in"


def test_a_user_error_keeps_the_engine_message(standin_log):
    finished = EngineProcess(standin_command("usererror") + ["train"]).start().wait(timeout=20)[-1]
    assert finished["status"] == "failed" and finished["returncode"] == 2
    assert finished["message"] == "labels.nrrd is not on the image grid"


def test_a_missing_interpreter_fails_to_start():
    with pytest.raises(OSError):
        EngineProcess(["/nonexistent/PythonSlicer", "-m", "mismatch"]).start()


def test_finished_event_merges_end_event_and_exit_status():
    f = process.finished_event
    assert f(0, {"status": "completed", "message": "ok"}, False, [])["status"] == "completed"
    assert f(0, None, False, [])["status"] == "completed"
    assert f(130, {"status": "cancelled", "message": "c"}, True, [])["status"] == "cancelled"
    assert f(-9, None, True, [])["status"] == "cancelled"
    assert f(0, {"status": "failed", "message": "bad"}, False, [])["status"] == "failed"
    crashed = f(-11, None, False, ["boom"])
    assert crashed["status"] == "failed" and crashed["message"] == "the engine was killed (SIGSEGV): boom"
    assert f(1, None, False, [])["message"] == "the engine stopped unexpectedly (exit status 1)"


def test_parse_event_wraps_plain_text():
    assert process.parse_event('{"event": "log", "message": "x"}')["message"] == "x"
    assert process.parse_event("Warning: something")["event"] == "log"
    assert process.parse_event("[1, 2]")["message"] == "[1, 2]"


def test_find_python_prefers_pythonslicer(tmp_path, monkeypatch):
    monkeypatch.delenv("MISMATCH_PYTHON", raising=False)
    app = tmp_path / "bin" / ("SlicerApp-real.exe" if os.name == "nt" else "SlicerApp-real")
    app.parent.mkdir()
    app.write_text("")
    # in Slicer, sys.executable can be the application: never run that with -m mismatch
    with pytest.raises(RuntimeError, match="MISMATCH_PYTHON"):
        process.find_python(str(app), which=lambda name: None)
    assert process.find_python(str(app), which=lambda name: "/opt/Slicer/bin/PythonSlicer") == "/opt/Slicer/bin/PythonSlicer"
    beside = app.parent / ("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
    beside.write_text("")
    assert process.find_python(str(app), which=lambda name: None) == str(beside)
    # outside Slicer: the running Python
    assert process.find_python(sys.executable, which=lambda name: None) == sys.executable
    monkeypatch.setenv("MISMATCH_PYTHON", "/envs/cuda/bin/python")
    assert process.find_python(str(app)) == "/envs/cuda/bin/python"


def test_engine_environment_puts_the_engine_first_on_pythonpath(tmp_path):
    env = process.engine_environment({"PYTHONPATH": "/somewhere"}, engine_dir=tmp_path)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path), "/somewhere"]
    assert env["PYTHONUNBUFFERED"] == "1"
    source = process.engine_source_dir()
    assert source is not None and (source / "mismatch" / "__init__.py").is_file()
    assert process.engine_command(["train"], python="py") == ["py", "-u", "-m", "mismatch", "train"]


# -- cancel behind Slicer's launcher (PythonSlicer starts python-real and forwards no signal) ----------------
def fake_pythonslicer(folder: Path) -> str:
    """An executable named like Slicer's launcher that is the stand-in launcher (a parent forwarding no
    signal, returning its child's exit status)."""
    from conftest import STANDIN_LAUNCHER

    path = folder / "bin" / "PythonSlicer"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STANDIN_LAUNCHER}" "$@"\n')
    path.chmod(0o755)
    return str(path)


def test_a_launcher_is_recognised_by_its_name():
    assert process.is_launcher("/opt/Slicer-5.10.0/bin/PythonSlicer")
    assert process.is_launcher(r"C:\Slicer 5.10.0\bin\PythonSlicer.exe".replace("\\", "/"))
    assert not process.is_launcher(sys.executable) and not process.is_launcher("/usr/bin/python3.12")


@posix_only
def test_cancel_behind_a_launcher_reaches_the_engine_and_keeps_its_checkpoint(standin_log, tmp_path):
    from conftest import STANDIN

    out = tmp_path / "model"
    launcher = fake_pythonslicer(tmp_path)
    # a grace long enough for a busy machine: the engine's own exit status and checkpoint show it was reached
    proc = EngineProcess([launcher, "-u", str(STANDIN), "slow", "train", "--out", str(out)], kill_grace=60).start()
    assert proc.launcher
    poll_until(proc, progressed)
    engine = int((standin_log / "engine.pid").read_text())
    grandchild = int((standin_log / "grandchild.pid").read_text())
    assert engine != proc.pid and proc.interpreter_pids() == [engine]
    proc.cancel()
    events = proc.wait(timeout=90)
    finished = events[-1]
    # killed after the grace period, the launcher would have ended with -SIGKILL and no checkpoint
    assert finished["status"] == "cancelled" and finished["returncode"] == 130, "the engine was not reached"
    assert "checkpoint written" in finished["message"] and "SIGTERM" in finished["message"]
    assert (out / "checkpoint" / "state.json").is_file(), "the engine was killed before writing its checkpoint"
    wait_until(lambda: not alive(engine) and not alive(grandchild), what="the engine and its child gone")


@posix_only
def test_the_stop_file_stops_an_engine_that_signals_cannot_reach(standin_log, tmp_path):
    from conftest import STANDIN

    out, stop = tmp_path / "model", tmp_path / "STOP"
    proc = EngineProcess([fake_pythonslicer(tmp_path), "-u", str(STANDIN), "deaf", "train", "--out", str(out),
                          "--stop-file", str(stop)], kill_grace=60, stop_file=stop).start()
    poll_until(proc, progressed)
    proc.cancel()
    finished = proc.wait(timeout=90)[-1]
    # the engine's own end event and exit status: it stopped; killed after the grace period, it would have neither
    assert stop.is_file() and finished["returncode"] == 130
    assert finished["status"] == "cancelled" and "stop file" in finished["message"]
    assert (out / "checkpoint" / "state.json").is_file()


@posix_only
def test_a_launcher_that_ignores_everything_is_killed_with_its_tree(standin_log, tmp_path):
    from conftest import STANDIN

    proc = EngineProcess([fake_pythonslicer(tmp_path), "-u", str(STANDIN), "stubborn", "train"], kill_grace=0.5).start()
    poll_until(proc, progressed)
    engine = int((standin_log / "engine.pid").read_text())
    proc.cancel()
    finished = proc.wait(timeout=30)[-1]
    assert finished["status"] == "cancelled"
    wait_until(lambda: not alive(engine), what="the engine behind the launcher killed")


@posix_only
def test_every_output_line_is_kept_and_logged(standin_log, tmp_path):
    log = tmp_path / "job.log"
    proc = EngineProcess(standin_command("crash") + ["train"], log_file=log).start()
    proc.wait(timeout=20)
    lines = proc.take_output()
    # both streams kept, whatever order the two pipes deliver them in
    assert ("stderr", "Traceback (most recent call last):") in lines
    assert ("stderr", "Segmentation fault in a stand-in") in lines
    assert any(src == "stdout" and '"event": "start"' in text for src, text in lines)
    text = log.read_text()
    assert "Segmentation fault in a stand-in" in text and '"event": "start"' in text


@posix_only
def test_the_engine_tree_ends_when_the_python_that_started_it_exits(standin_log, tmp_path):
    """Slicer quitting while a job runs: nothing of the engine may survive the application."""
    import subprocess

    from conftest import MODULE_DIR

    script = (f"import sys, time, pathlib; sys.path.insert(0, {str(MODULE_DIR)!r})\n"
              "from MisMatchSegmentationLib.process import EngineProcess\n"
              f"p = EngineProcess({standin_command('slow') + ['train']!r}).start()\n"
              f"log = pathlib.Path({str(standin_log)!r})\n"
              "while not (log / 'grandchild.pid').exists(): time.sleep(0.02)\n"
              "print(p.pid, flush=True)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    engine, grandchild = int(out.stdout.split()[0]), int((standin_log / "grandchild.pid").read_text())
    try:
        wait_until(lambda: not alive(engine) and not alive(grandchild),
                   what="the engine's tree gone after the exit of the Python that started it")
    finally:
        for pid in (engine, grandchild):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_mismatch_python_starts_from_slicers_startup_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MISMATCH_PYTHON", "/envs/cuda/bin/python")
    monkeypatch.setenv("PYTHONHOME", "/opt/Slicer/lib/Python")
    monkeypatch.setenv("PYTHONPATH", "/opt/Slicer/lib/Python/lib/python3.12/site-packages")
    monkeypatch.setenv("PYTHONNOUSERSITE", "1")
    startup = {"PATH": "/usr/bin", "HOME": "/home/u", "CUDA_VISIBLE_DEVICES": "1"}
    env = process.engine_environment(engine_dir=tmp_path, startup=lambda: dict(startup))
    assert "PYTHONHOME" not in env and "PYTHONNOUSERSITE" not in env
    assert env["PYTHONPATH"] == str(tmp_path) and env["CUDA_VISIBLE_DEVICES"] == "1" and env["HOME"] == "/home/u"
    # outside Slicer (no startup environment): this one, without Slicer's Python variables
    env = process.engine_environment(engine_dir=tmp_path, startup=lambda: None)
    assert "PYTHONHOME" not in env and env["PYTHONPATH"] == str(tmp_path)
    # Slicer's own Python (no override): Slicer's environment as it is
    monkeypatch.delenv("MISMATCH_PYTHON")
    env = process.engine_environment(engine_dir=tmp_path, startup=lambda: dict(startup))
    assert env["PYTHONHOME"] == "/opt/Slicer/lib/Python"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path)
