"""Progress reporting: JSON-lines events for programs (the Slicer module) and, for people, a progress bar on
a terminal or, when stderr is not a terminal (redirected to a log file, a job scheduler), a plain line at a
steady interval.

The event format is fixed by ``docs/contract.md``: one JSON object per line, flushed as written, the last
line an ``end`` event with ``status`` completed, cancelled or failed.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import IO, Any

from .contract import format_duration


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 6)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # replaced or closed streams
        return False


#: Seconds between two plain progress lines when stderr is not a terminal.
PROGRESS_LINE_SECONDS = 30.0


class Reporter:
    """Writes events to a JSON-lines stream and shows progress to people on stderr.

    ``events``: a path, ``"-"`` for stdout, or None. ``progress_bar``: draw a bar on stderr (default:
    only when stderr is a terminal and events do not go to stdout). ``progress_lines``: without a bar,
    print a plain line (``train step 40/200 loss 0.4312 elapsed 0:12 eta 0:48``) on stderr for the first
    progress of a phase, then every ``line_seconds``, and for its last step (default: when ``progress_bar``
    is left to choose, stderr is not a terminal and events do not go to stdout, which is then the machine
    channel).
    """

    def __init__(self, events: str | None = None, progress_bar: bool | None = None, quiet: bool = False,
                 progress_lines: bool | None = None, line_seconds: float = PROGRESS_LINE_SECONDS):
        self._stream: IO[str] | None = None
        self._owns_stream = False
        if events == "-":
            self._stream = sys.stdout
        elif events:
            self._stream = open(events, "a", encoding="utf-8", buffering=1)
            self._owns_stream = True
        terminal = _isatty(sys.stderr)
        if progress_lines is None:   # a caller that turned the bar off wants no progress on stderr at all
            progress_lines = progress_bar is None and not terminal and events != "-" and not quiet
        if progress_bar is None:
            progress_bar = terminal and events != "-" and not quiet
        self.progress_bar = progress_bar
        self.progress_lines = bool(progress_lines) and not progress_bar
        self.line_seconds = line_seconds
        self._last_line: float | None = None
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
        self._last_line = None
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
        elif self.progress_lines and (self._last_line is None or now - self._last_line >= self.line_seconds
                                      or step >= total):
            self._last_line = now
            loss_text = f" loss {loss:.4f}" if loss is not None and math.isfinite(loss) else ""
            print(f"{phase} step {step}/{total}{loss_text} elapsed {format_duration(elapsed)} "
                  f"eta {format_duration(eta)}", file=sys.stderr, flush=True)

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
