#!/usr/bin/env bash
# One command from a fresh clone: set up .venv with the test dependencies and run every test suite.
# Then, where a Python 3.12 is installed (the Python that 3D Slicer 5.10 and later embed), the Slicer-side suite
# (Testing/slicer) runs a second time on it, in .venv/slicer-py3.12 (created here: slicer-core, numpy, SimpleITK,
# pytest, slicerio, pillow, jsonschema; no torch, so the tests that need the real engine skip there).
# With arguments, only the first run, with those arguments (set MISMATCH_PY312=1 to run the second one too).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh" demo,test,slicer
cd "$root"

find_python312() {
    local candidate
    for candidate in "${PYTHON312:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 \
                     /usr/local/bin/python3.12 /usr/bin/python3.12; do
        [ -n "$candidate" ] || continue
        if "$candidate" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

status=0
.venv/bin/python -m pytest -q "$@" || status=$?

if [ $# -eq 0 ] || [ "${MISMATCH_PY312:-0}" = 1 ]; then
    if py312="$(find_python312)"; then
        venv=.venv/slicer-py3.12
        stamp="$venv/.installed"
        if [ ! -x "$venv/bin/python" ]; then
            "$py312" -m venv "$venv"
        fi
        if [ ! -f "$stamp" ] || [ "$0" -nt "$stamp" ]; then
            "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
            "$venv/bin/python" -m pip install -q "slicer-core>=5.13" numpy SimpleITK pytest slicerio pillow jsonschema
            touch "$stamp"
        fi
        echo "== The Slicer-side suite on Python 3.12 (Slicer 5.10's Python; slicer-core, no torch) =="
        "$venv/bin/python" -m pytest -q -p no:cacheprovider Testing/slicer || status=$?
    else
        echo "== No Python 3.12 here: the Slicer-side suite ran on $(.venv/bin/python --version 2>&1) only =="
    fi
fi
exit "$status"
