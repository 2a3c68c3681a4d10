#!/usr/bin/env bash
# Sets up what `mismatch benchmark` needs: the engine with the demo, test and benchmark extras (via
# scripts/setup.sh: nilearn for mni152-gm, slicerio for CTChest4, scipy for the free baselines, slicer-core
# on Python 3.11 for Slicer's effects), then the pyradiomics 3.0.1 source distribution in .data/ (the
# benchmark reads its data/brain1 and data/breast1 cases straight from the tarball; pyradiomics itself is not
# installed). Idempotent: a second run only checks. Usage: scripts/setup-benchmark.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh demo,test,benchmark
sdist=".data/pyradiomics-3.0.1.tar.gz"
if [ ! -f "$sdist" ]; then
    mkdir -p .data
    # The sdist, not the wheel (only the sdist has data/); its metadata step needs numpy and setuptools from
    # the venv, hence --no-build-isolation.
    .venv/bin/python -m pip download -q --no-deps --no-binary pyradiomics --no-build-isolation \
        pyradiomics==3.0.1 -d .data
fi
if [ ! -f "$sdist" ]; then
    echo "setup-benchmark: pip download did not leave $sdist" >&2
    exit 1
fi
echo "setup-benchmark: ready; pyradiomics data in $root/$sdist"
