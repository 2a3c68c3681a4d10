#!/usr/bin/env bash
# Installs PyTorch 2.13.0 into a Python environment, the build that fits this machine (scripts/setup.sh calls it).
#
#   MISMATCH_TORCH unset or auto: the CUDA build where `nvidia-smi -L` runs and lists a GPU, else the CPU build
#   MISMATCH_TORCH=cuda  the CUDA build: PyPI's torch for Linux (CUDA libraries as nvidia-* packages, a few GB),
#                        asked for as torch===2.13.0 (no local label), so that a +cpu build never stands in for it
#   MISMATCH_TORCH=cpu   the CPU build (no CUDA libraries): torch==2.13.0+cpu from PyTorch's CPU index,
#                        https://download.pytorch.org/whl/cpu, or the +cpu wheel that pip's own configuration
#                        (find-links, a local index) already offers, without asking the CPU index
#   MISMATCH_TORCH=skip  leave torch alone (one you installed yourself, e.g. a ROCm build)
# On macOS there is one build, PyPI's (CPU and the Apple GPU, MPS); MISMATCH_TORCH=cuda is an error there.
# MISMATCH_TORCH_DRY_RUN=1 prints the pip command instead of running it.
# Usage: scripts/install-torch.sh [PYTHON]   (default: .venv/bin/python of this project)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${1:-$root/.venv/bin/python}"
version="2.13.0"
cpu_index="https://download.pytorch.org/whl/cpu"
choice="${MISMATCH_TORCH:-auto}"

say() { echo "install-torch: $*"; }

case "$choice" in
    auto|cpu|cuda|skip) ;;
    *) echo "install-torch: MISMATCH_TORCH=$choice: use cpu, cuda or skip, or leave it unset (auto)" >&2; exit 2 ;;
esac
if [ "$choice" = skip ]; then
    say "MISMATCH_TORCH=skip: torch left as it is (the engine needs torch >= 2.1; without one, installing the engine pulls PyPI's latest)"
    exit 0
fi

system="$(uname -s)"
why="MISMATCH_TORCH=$choice"
if [ "$choice" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && gpus="$(nvidia-smi -L 2>/dev/null)" && [[ "$gpus" == *GPU* ]]; then
        choice=cuda
        why="nvidia-smi lists an NVIDIA GPU"
    else
        choice=cpu
        why="no NVIDIA GPU (nvidia-smi missing or failing)"
    fi
fi

# The version a plain `pip install torch==2.13.0` would pick with this pip configuration ("" if unknown):
# 2.13.0+cpu where pip's configuration offers a local CPU wheel, 2.13.0 (the CUDA build on Linux) from PyPI.
plain_build() {
    "$py" -m pip install --dry-run --ignore-installed --no-deps --quiet --retries 1 --timeout 30 --report - \
        "torch==$version" 2>/dev/null | "$py" -c '
import json, sys
try:
    print(json.load(sys.stdin)["install"][0]["metadata"]["version"])
except Exception:
    pass' 2>/dev/null || true
}

if [ "$system" = Darwin ]; then
    if [ "$choice" = cuda ]; then
        echo "install-torch: MISMATCH_TORCH=cuda: PyTorch has no CUDA build for macOS; leave MISMATCH_TORCH unset (PyPI's build, CPU and the Apple GPU)" >&2
        exit 2
    fi
    what="PyPI's build for macOS (CPU and the Apple GPU, MPS)"
    args=("torch==$version")
elif [ "$choice" = cuda ]; then
    # exactly 2.13.0, without a local label: neither an installed nor an offered +cpu build stands in for it
    what="the CUDA build (PyPI's torch for Linux, with its nvidia-* CUDA packages)"
    args=("torch===$version")
else
    built="$(plain_build)"
    if [[ "$built" == *+cpu ]]; then
        what="the CPU build ($built, which pip's configuration offers)"
        args=("torch==$built")
    else
        what="the CPU build (torch==$version+cpu from $cpu_index)"
        args=("torch==$version+cpu" --index-url "$cpu_index")
    fi
fi

say "$why: installing PyTorch $version, $what"
command=("$py" -m pip install -q "${args[@]}")
if [ "${MISMATCH_TORCH_DRY_RUN:-0}" = 1 ]; then
    echo "DRY RUN: ${command[*]}"
    exit 0
fi
"${command[@]}"
"$py" - "$choice" <<'EOF'
import sys

import torch

cuda = torch.version.cuda
print(f"install-torch: installed torch {torch.__version__} ({'CUDA ' + cuda if cuda else 'no CUDA'})")
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    print("install-torch: warning: this CUDA build sees no usable GPU (is the NVIDIA driver recent enough for CUDA "
          f"{cuda}?); 'mismatch' will run on the CPU. MISMATCH_TORCH=cpu installs the smaller CPU build.",
          file=sys.stderr)
EOF
