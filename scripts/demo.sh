#!/usr/bin/env bash
# One command from a fresh clone: set up .venv (CPU build of torch) and run the demo on real data.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh" demo,test
cd "$root"
exec .venv/bin/mismatch demo --out "${1:-demo-output}"
