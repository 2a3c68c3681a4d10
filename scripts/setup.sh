#!/usr/bin/env bash
# Creates .venv beside the project and installs the engine with everything the demo and the tests need.
# Idempotent: a second run only checks that the environment is there. Usage: scripts/setup.sh [extras]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${1:-demo,test}"
py="${PYTHON:-python3}"
if ! "$py" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)'; then
    echo "setup: MisMatch needs Python 3.10 to 3.12; '$py' is $("$py" --version 2>&1). Set PYTHON=/path/to/python3.x." >&2
    exit 2
fi
stamp=".venv/.installed-$extras"
if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    # torch 2.13.0: the CUDA build where an NVIDIA GPU answers, else the CPU build (scripts/install-torch.sh).
    bash scripts/install-torch.sh .venv/bin/python   # CUDA build with an NVIDIA GPU, else CPU; MISMATCH_TORCH=cpu|cuda|skip
    .venv/bin/python -m pip install -q -e ".[$extras]"
    touch "$stamp"
fi
