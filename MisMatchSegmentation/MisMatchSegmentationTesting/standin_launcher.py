"""A stand-in for Slicer's ``PythonSlicer`` launcher: runs ``python ARGS`` as its child and forwards no signal.

Like the CTK launcher behind ``PythonSlicer``, it waits for its child (``python-real`` in Slicer) and exits with
the child's exit status; a SIGTERM sent to it ends the launcher alone (Python's default action), leaving the
child running. The child's pid is written to ``$STANDIN_LOG/interpreter.pid`` when ``STANDIN_LOG`` is set.
Usage: ``python standin_launcher.py [python arguments]``.
"""

import os
import subprocess
import sys


def main() -> int:
    child = subprocess.Popen([sys.executable] + sys.argv[1:])
    log = os.environ.get("STANDIN_LOG")
    if log:
        with open(os.path.join(log, "interpreter.pid"), "w") as f:
            f.write(str(child.pid))
    code = child.wait()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
