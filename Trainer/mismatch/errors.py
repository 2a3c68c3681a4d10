"""Errors the user can act on.

A :class:`UserError` is bad input or a bad request, not a bug: the command line prints its message as one
line and exits with status 2, without a traceback. The message says what is wrong and what to do.
A stop signal (:func:`on_stop_signals`) is how a user or the panel cancels a command.
"""

import signal
from contextlib import contextmanager

#: what stops a command: Ctrl+C, a parent's terminate, and on Windows Ctrl+Break (what a console's
#: Ctrl+Break or a parent's ``CTRL_BREAK_EVENT`` sends)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGBREAK,) if hasattr(signal, "SIGBREAK") else ())


class UserError(Exception):
    """Bad input: one line that says what is wrong and what to do about it."""


class Cancelled(Exception):
    """Training was asked to stop (SIGINT / SIGTERM) and stopped cleanly after a checkpoint."""


@contextmanager
def on_stop_signals(handler):
    """Call ``handler(signum, frame)`` on :data:`STOP_SIGNALS` while the block runs, then put the previous
    handlers back (outside the main thread, where Python allows no handler, nothing is installed)."""
    previous = {}
    for sig in STOP_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):   # not the main thread
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
