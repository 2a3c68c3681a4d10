"""Run the engine (``python -m mismatch ...``) as a child process and read its events as they arrive.

Pure Python (no Qt, no Slicer): two reader threads put what the child writes on a queue; the panel drains
the queue from a timer (``poll``), so the GUI thread never blocks. The child runs in its own process group
(POSIX: a new session; Windows: a new process group) so that *cancel* reaches the whole tree (behind
``PythonSlicer``, the launcher and the interpreter it starts), and nothing is left behind when the engine
itself ends.

Every run ends with exactly one ``finished`` event::

    {"event": "finished", "status": "completed"|"cancelled"|"failed", "message": "...",
     "returncode": 0, "stderr": ["last", "lines"]}

which merges the engine's own ``end`` event (docs/contract.md) with its exit status: a child that crashes or
is killed without writing ``end`` is reported as ``failed`` with the last lines it wrote on stderr.

Cancel inside Slicer: ``PythonSlicer`` is a launcher that starts ``python-real`` as its child and forwards no
signal. A SIGTERM to the launcher would end the launcher only, and killing the group after it would end the
engine before it writes its checkpoint. So a launcher (see :func:`is_launcher`) is left alone: SIGTERM goes to
the real interpreter (the launcher's children), the launcher then returns the engine's own exit status, and
the tree is killed only after ``kill_grace`` seconds, or once every process that holds the output pipes has
ended. Where signals cannot reach the engine (Windows), a stop file in the job folder is the other way: it
is written on cancel (``stop_file``) for an engine that watches it.

Every process still running when the Python that started it exits (Slicer quitting) is killed with its tree
(:func:`kill_all`, registered with ``atexit``; the widget also calls it on ``aboutToQuit``).
"""

from __future__ import annotations

import atexit
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
import weakref
from pathlib import Path

from .engine import contract, engine_source_dir

STDERR_TAIL = 30


def find_python(executable: str | None = None, which=shutil.which) -> str:
    """The Python interpreter to run the engine with.

    In 3D Slicer ``sys.executable`` may be the application itself, so Slicer's own console interpreter
    ``PythonSlicer`` is preferred (next to the executable, then on PATH); outside Slicer, the running Python.
    ``MISMATCH_PYTHON`` overrides both (e.g. a separate environment with a CUDA build of torch).
    """
    override = python_override()
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


def is_launcher(executable: str) -> bool:
    """True for Slicer's ``PythonSlicer`` (a CTK launcher that runs ``python-real`` as its child)."""
    return Path(str(executable)).name.lower().startswith("pythonslicer")


def python_override() -> str | None:
    """``MISMATCH_PYTHON``: another interpreter for the engine (e.g. an environment with a CUDA torch)."""
    return os.environ.get("MISMATCH_PYTHON") or None


def startup_environment() -> dict | None:
    """The environment Slicer was started with, before its launcher set ``PYTHONHOME`` / ``PYTHONPATH`` for
    its own Python (``slicer.util.startupEnvironment()``); None outside Slicer."""
    try:
        import slicer.util
    except ImportError:
        return None
    get = getattr(slicer.util, "startupEnvironment", None)
    if get is None or getattr(slicer, "app", None) is None:
        return None
    try:
        return dict(get())
    except Exception:  # an old Slicer without the launcher's saved environment
        return None


def engine_environment(base: dict | None = None, engine_dir: Path | None = None, foreign: bool | None = None,
                       startup=startup_environment) -> dict:
    """The child's environment: the engine package first on PYTHONPATH, unbuffered, UTF-8 output.

    ``foreign`` (default: ``MISMATCH_PYTHON`` is set): the engine runs in another interpreter, which must not
    see Slicer's own ``PYTHONHOME`` / ``PYTHONPATH`` / ``PYTHONNOUSERSITE``: it starts from the environment
    Slicer itself was started with (``startup()``), or from this one without those variables."""
    if foreign is None:
        foreign = base is None and python_override() is not None
    if base is None and foreign:
        base = startup()
        if base is None:
            base = {k: v for k, v in os.environ.items()
                    if k not in ("PYTHONHOME", "PYTHONPATH", "PYTHONNOUSERSITE")}
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
                 kill_grace: float = 10.0, launcher: bool | None = None, stop_file: str | Path | None = None,
                 log_file: str | Path | None = None):
        self.args = list(args)
        self.env = env
        self.cwd = cwd
        self.kill_grace = kill_grace
        self.launcher = is_launcher(self.args[0]) if launcher is None else bool(launcher)
        self.stop_file = Path(stop_file) if stop_file else None
        self.log_file = Path(log_file) if log_file else None
        self._log_lock = threading.Lock()
        self._output: queue.Queue = queue.Queue()
        self._known_tree: set[int] = set()
        self._kill_deadline: float | None = None
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
        _LIVE.add(self)
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
        if self.stop_file is not None:
            try:
                self.stop_file.write_text("cancel requested\n", encoding="utf-8")
            except OSError:
                pass
        if os.name == "nt":
            # the whole console process group (the launcher and python-real) gets Ctrl+Break; the engine
            # handles SIGBREAK like SIGTERM
            try:
                self._proc.send_signal(signal.CTRL_BREAK_EVENT)
            except OSError:
                pass
        else:
            targets = self.interpreter_pids()
            for pid in targets:
                _signal_pid(pid, signal.SIGTERM)
            if not targets:  # a launcher that has not started the interpreter yet: nothing to checkpoint
                self._signal_group(signal.SIGTERM)
        self._kill_deadline = time.monotonic() + self.kill_grace
        self._kill_timer = threading.Timer(self.kill_grace, self.kill)
        self._kill_timer.daemon = True
        self._kill_timer.start()

    def interpreter_pids(self, wait: float = 2.0) -> list[int]:
        """The processes that run the engine: the child itself, or, behind a launcher, the launcher's children
        (waiting up to ``wait`` seconds for the launcher to start its interpreter)."""
        if self._proc is None:
            return []
        if not self.launcher:
            return [self._proc.pid]
        deadline = time.monotonic() + wait
        while True:
            children = child_pids(self._proc.pid)
            if children or self._proc.poll() is not None or time.monotonic() > deadline:
                self._known_tree.update(children)
                return children
            time.sleep(0.02)

    def kill(self) -> None:
        """End the child and everything it started, now."""
        if self._proc is None:
            return
        if os.name == "nt":
            if self._proc.poll() is None:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._proc.pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            return
        tree = set(descendant_pids(self._proc.pid)) | self._known_tree
        self._known_tree |= tree
        self._signal_group(signal.SIGKILL)
        for pid in tree:  # also what left the group (a process that called setsid)
            _signal_pid(pid, signal.SIGKILL)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self._proc.pid, sig)  # the child is its session's leader: pgid == pid
        except (ProcessLookupError, PermissionError):
            pass

    def take_output(self) -> list[tuple[str, str]]:
        """Every line the child wrote since the last call, as ``(stream, line)``; never blocks."""
        out = []
        while True:
            try:
                out.append(self._output.get_nowait())
            except queue.Empty:
                return out

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

    def _record(self, stream: str, line: str) -> None:
        self._output.put((stream, line))
        if self.log_file is not None:
            with self._log_lock:
                try:
                    with open(self.log_file, "a", encoding="utf-8") as f:
                        f.write(line + "\n")
                except OSError:
                    pass

    def _read_stdout(self) -> None:
        for line in self._proc.stdout:
            line = line.strip()
            if not line:
                continue
            self._record("stdout", line)
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
                self._record("stderr", line)
        self._proc.stderr.close()

    def _wait(self, *readers: threading.Thread) -> None:
        self.returncode = self._proc.wait()
        # Behind a launcher that has gone (killed, or crashed), the engine may still be finishing its step and
        # writing its checkpoint: give it until the kill deadline (when cancelling) or a moment (anything
        # else), then kill what is left of the tree (leftovers would keep the pipes open).
        if self._kill_deadline is not None:
            end = self._kill_deadline
        else:
            end = time.monotonic() + 2.0
        interpreters = [pid for pid in self._known_tree if pid != self._proc.pid]
        while interpreters and any(pid_alive(pid) for pid in interpreters) and time.monotonic() < end:
            time.sleep(0.05)
        if os.name == "nt" and self.launcher:  # no process list there: the pipes close when python-real ends
            for reader in readers:
                reader.join(timeout=max(0.0, end - time.monotonic()))
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        if os.name != "nt":
            self.kill()  # leftovers of the tree would keep the pipes open
        for reader in readers:
            reader.join(timeout=10)
        _LIVE.discard(self)
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
    elif cancel_requested or returncode == contract.EXIT_CANCELLED or status == "cancelled":
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


# -- process trees ------------------------------------------------------------------------------------------
def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _parent_map() -> dict[int, int]:
    """``{pid: parent pid}`` of every process: /proc on Linux, ``ps`` elsewhere on POSIX; {} on Windows."""
    parents: dict[int, int] = {}
    proc = Path("/proc")
    if proc.is_dir() and (proc / "self" / "stat").exists():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[-1].split()  # the command name may hold spaces and parentheses
            if len(fields) > 1:
                parents[int(entry.name)] = int(fields[1])
        return parents
    if os.name == "nt":
        return parents
    try:
        out = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return parents
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            parents[int(parts[0])] = int(parts[1])
    return parents


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (empty where the system does not say)."""
    return sorted(child for child, parent in _parent_map().items() if parent == pid)


def descendant_pids(pid: int) -> list[int]:
    """Every process below ``pid``, children first."""
    parents = _parent_map()
    out, todo = [], [pid]
    while todo:
        current = todo.pop(0)
        children = sorted(c for c, p in parents.items() if p == current and c not in out)
        out.extend(children)
        todo.extend(children)
    return out


_LIVE: "weakref.WeakSet[EngineProcess]" = weakref.WeakSet()


def kill_all() -> int:
    """Kill every engine process tree this Python started that is still running (Slicer quitting); returns
    how many there were."""
    count = 0
    for process in list(_LIVE):
        if process._proc is not None and process._proc.poll() is None:
            process.kill()
            count += 1
    return count


atexit.register(kill_all)
