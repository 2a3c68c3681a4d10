#!/usr/bin/env bash
# One command from a fresh clone: set up .venv with the test dependencies and run every test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh" demo,test,slicer
cd "$root"
exec .venv/bin/python -m pytest -q "$@"
