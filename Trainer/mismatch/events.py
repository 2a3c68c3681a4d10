"""Progress reporting: JSON-lines events for programs (the Slicer module) and a progress bar for people.

The event format is fixed by ``docs/contract.md``: one JSON object per line, flushed as written, the last
line an ``end`` event with ``status`` completed, cancelled or failed.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import IO, Any


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 6)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Reporter:
    """Writes events to a JSON-lines stream and/or draws a progress bar on a terminal.

    ``events``: a path, ``"-"`` for stdout, or None. ``progress_bar``: draw a bar on stderr (default:
    only when stderr is a terminal and events do not go to stdout).
    """

    def __init__(self, events: str | None = None, progress_bar: bool | None = None, quiet: bool = False):
        self._stream: IO[str] | None = None
        self._owns_stream = False
        if events == "-":
            self._stream = sys.stdout
        elif events:
            self._stream = open(events, "a", encoding="utf-8", buffering=1)
            self._owns_stream = True
        if progress_bar is None:
            progress_bar = sys.stderr.isatty() and events != "-" and not quiet
        self.progress_bar = progress_bar
        self.quiet = quiet
        self.start_time = time.monotonic()
        self._phase_start = self.start_time
        self._ended = False
        self._bar_drawn = False

    # -- events ---------------------------------------------------------------------------------------
    def emit(self, event: str, **fields: Any) -> None:
        if self._stream is None:
            return
        record = {"event": event, **_clean(fields)}
        self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()

    def start(self, phase: str, total: int | None = None, **fields: Any) -> None:
        self._phase_start = time.monotonic()
        self.emit("start", phase=phase, total=total, **fields)

    def progress(self, phase: str, step: int, total: int, loss: float | None = None,
                 terms: dict | None = None, first_step: int = 0) -> None:
        now = time.monotonic()
        elapsed = now - self._phase_start
        done = step - first_step
        eta = elapsed / done * (total - step) if done > 0 else None
        self.emit("progress", phase=phase, step=step, total=total, loss=loss, terms=terms or {},
                  elapsed=elapsed, eta=eta)
        if self.progress_bar:
            self._draw(phase, step, total, loss, elapsed, eta)

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message)
        if not self.quiet and (self._stream is not sys.stdout):
            self._clear_bar()
            print(("warning: " if level == "warning" else "") + message, file=sys.stderr)

    def end(self, status: str, message: str = "", **fields: Any) -> None:
        if self._ended:
            return
        self._ended = True
        self._clear_bar()
        self.emit("end", status=status, message=message, elapsed=time.monotonic() - self.start_time, **fields)

    def close(self) -> None:
        self._clear_bar()
        if self._owns_stream and self._stream is not None:
            self._stream.close()
        self._stream = None

    # -- terminal bar ---------------------------------------------------------------------------------
    def _draw(self, phase: str, step: int, total: int, loss: float | None, elapsed: float, eta: float | None) -> None:
        width = 30
        frac = min(1.0, step / total) if total else 0.0
        filled = int(round(width * frac))
        bar = "#" * filled + "-" * (width - filled)
        loss_text = f" loss {loss:.4f}" if loss is not None and math.isfinite(loss) else ""
        line = (f"\r{phase:>8} [{bar}] {step}/{total}{loss_text} "
                f"elapsed {format_duration(elapsed)} left {format_duration(eta)}")
        sys.stderr.write(line)
        sys.stderr.flush()
        self._bar_drawn = True

    def _clear_bar(self) -> None:
        if self._bar_drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._bar_drawn = False
