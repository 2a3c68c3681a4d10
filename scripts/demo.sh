#!/usr/bin/env bash
# One command from a fresh clone: set up .venv (torch 2.13.0, CUDA or CPU build: see README) and run the demo on real data.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh" demo,test
cd "$root"
exec .venv/bin/mismatch demo --out "${1:-demo-output}"
