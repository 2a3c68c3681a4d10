"""Run the engine (``python -m mismatch ...``) as a child process and read its events as they arrive.

Pure Python (no Qt, no Slicer): two reader threads put what the child writes on a queue; the panel drains
the queue from a timer (``poll``), so the GUI thread never blocks. The child runs in its own process group
(POSIX: a new session; Windows: a new process group) so that *cancel* reaches the whole tree, e.g. data
loader workers, and nothing is left behind when the engine itself ends.

Every run ends with exactly one ``finished`` event::

    {"event": "finished", "status": "completed"|"cancelled"|"failed", "message": "...",
     "returncode": 0, "stderr": ["last", "lines"]}

which merges the engine's own ``end`` event (docs/contract.md) with its exit status: a child that crashes or
is killed without writing ``end`` is reported as ``failed`` with the last lines it wrote on stderr.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_CANCELLED = 130
STDERR_TAIL = 30


def engine_source_dir() -> Path | None:
    """The folder that holds the ``mismatch`` package: packaged next to the module, or the source tree."""
    module_dir = Path(__file__).resolve().parent.parent  # MisMatchSegmentation/
    for candidate in (module_dir / "MisMatchEngine",  # installed extension (see the module's CMakeLists.txt)
                      module_dir.parent / "Trainer"):  # source checkout
        if (candidate / "mismatch" / "__init__.py").is_file():
            return candidate
    return None


def find_python(executable: str | None = None, which=shutil.which) -> str:
    """The Python interpreter to run the engine with.

    In 3D Slicer ``sys.executable`` may be the application itself, so Slicer's own console interpreter
    ``PythonSlicer`` is preferred (next to the executable, then on PATH); outside Slicer, the running Python.
    ``MISMATCH_PYTHON`` overrides both (e.g. a separate environment with a CUDA build of torch).
    """
    override = os.environ.get("MISMATCH_PYTHON")
    if override:
        return override
    executable = executable or sys.executable
    exe_dir = Path(executable).parent
    suffix = ".exe" if os.name == "nt" else ""
    for candidate in (exe_dir / f"PythonSlicer{suffix}", exe_dir.parent / "bin" / f"PythonSlicer{suffix}"):
        if candidate.is_file():
            return str(candidate)
    on_path = which("PythonSlicer")
    if on_path:
        return on_path
    if Path(executable).name.lower().startswith("python"):
        return executable
    raise RuntimeError(f"no Python interpreter found to run the engine (PythonSlicer next to {executable} "
                       "or on PATH); set MISMATCH_PYTHON to a Python with torch installed")


def engine_command(arguments: list[str], python: str | None = None) -> list[str]:
    """``[python, "-u", "-m", "mismatch", *arguments]``."""
    return [python or find_python(), "-u", "-m", "mismatch", *arguments]


def engine_environment(base: dict | None = None, engine_dir: Path | None = None) -> dict:
    """The child's environment: the engine package first on PYTHONPATH, unbuffered, UTF-8 output."""
    env = dict(os.environ if base is None else base)
    engine_dir = engine_dir or engine_source_dir()
    if engine_dir is not None:
        parts = [str(engine_dir)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


class EngineProcess:
    """One child process with its events on a queue.

    ``args``: the full command line. ``poll()`` returns the events that arrived since the last call (never
    blocks); after the child has ended and all its output is read, the last one is ``finished``.
    """

    def __init__(self, args: list[str], env: dict | None = None, cwd: str | None = None,
                 kill_grace: float = 10.0):
        self.args = list(args)
        self.env = env
        self.cwd = cwd
        self.kill_grace = kill_grace
        self.returncode: int | None = None
        self.cancel_requested = False
        self.end_event: dict | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self._queue: queue.Queue = queue.Queue()
        self._proc: subprocess.Popen | None = None
        self._threads: list[threading.Thread] = []
        self._finished = False
        self._kill_timer: threading.Timer | None = None

    # -- life cycle -----------------------------------------------------------------------------------
    def start(self) -> "EngineProcess":
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = (subprocess.CREATE_NEW_PROCESS_GROUP
                                       | getattr(subprocess, "CREATE_NO_WINDOW", 0))
        else:
            kwargs["start_new_session"] = True  # own process group: cancel reaches the whole tree
        self._proc = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=self.env, cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        out = threading.Thread(target=self._read_stdout, name="mismatch-stdout", daemon=True)
        err = threading.Thread(target=self._read_stderr, name="mismatch-stderr", daemon=True)
        waiter = threading.Thread(target=self._wait, args=(out, err), name="mismatch-wait", daemon=True)
        self._threads = [out, err, waiter]
        for t in self._threads:
            t.start()
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        """True until the ``finished`` event has been handed out by :meth:`poll`."""
        return self._proc is not None and not self._finished

    def cancel(self) -> None:
        """Ask the engine to stop (it ends the current step, writes a checkpoint and a ``cancelled`` event);
        if it is still there after ``kill_grace`` seconds, kill the whole process tree."""
        if self._proc is None or self._proc.poll() is not None or self.cancel_requested:
            self.cancel_requested = True
            return
        self.cancel_requested = True
        if os.name == "nt":
            try:
                self._proc.send_signal(signal.CTRL_BREAK_EVENT)
            except OSError:
                pass
        else:
            self._signal_group(signal.SIGTERM)
        self._kill_timer = threading.Timer(self.kill_grace, self.kill)
        self._kill_timer.daemon = True
        self._kill_timer.start()

    def kill(self) -> None:
        """End the child and everything it started, now."""
        if self._proc is None:
            return
        if os.name == "nt":
            if self._proc.poll() is None:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._proc.pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        else:
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self._proc.pid, sig)  # the child is its session's leader: pgid == pid
        except (ProcessLookupError, PermissionError):
            pass

    # -- reading --------------------------------------------------------------------------------------
    def poll(self) -> list[dict]:
        """Every event that arrived since the last call, in order; never blocks."""
        events = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            events.append(item)
            if item.get("event") == "finished":
                self._finished = True
        return events

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> list[dict]:
        """Block until the run has finished (tests and scripts only; the panel uses :meth:`poll`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        events = []
        while self.running:
            events += self.poll()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the engine did not finish within {timeout} s")
            time.sleep(interval)
        return events

    def _read_stdout(self) -> None:
        for line in self._proc.stdout:
            line = line.strip()
            if not line:
                continue
            event = parse_event(line)
            if event.get("event") == "end":
                self.end_event = event
            self._queue.put(event)
        self._proc.stdout.close()

    def _read_stderr(self) -> None:
        for line in self._proc.stderr:
            line = line.rstrip()
            if line:
                self.stderr_tail.append(line)
        self._proc.stderr.close()

    def _wait(self, *readers: threading.Thread) -> None:
        self.returncode = self._proc.wait()
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        if os.name != "nt":
            self._signal_group(signal.SIGKILL)  # leftovers of the tree would keep the pipes open
        for reader in readers:
            reader.join(timeout=10)
        self._queue.put(finished_event(self.returncode, self.end_event, self.cancel_requested,
                                       list(self.stderr_tail)))


def parse_event(line: str) -> dict:
    """One line of the child's stdout: a contract event, or plain text wrapped as a ``log`` event."""
    try:
        event = json.loads(line)
    except ValueError:
        return {"event": "log", "level": "info", "message": line}
    if not isinstance(event, dict) or "event" not in event:
        return {"event": "log", "level": "info", "message": line}
    return event


def finished_event(returncode: int, end: dict | None, cancel_requested: bool, stderr: list[str]) -> dict:
    """Merge the engine's ``end`` event with its exit status into one outcome."""
    status = (end or {}).get("status")
    message = (end or {}).get("message") or ""
    if returncode == 0 and status in (None, "completed"):
        status = "completed"
    elif cancel_requested or returncode == EXIT_CANCELLED or status == "cancelled":
        status, message = "cancelled", message or "cancelled"
    else:
        status = "failed"
        if not message:
            message = describe_exit(returncode)
            if stderr:
                message += ": " + stderr[-1]
    return {"event": "finished", "status": status, "message": message, "returncode": returncode,
            "stderr": stderr, "end": end}


def describe_exit(returncode: int) -> str:
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"the engine was killed ({name})"
    return f"the engine stopped unexpectedly (exit status {returncode})"
