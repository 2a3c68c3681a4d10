#!/usr/bin/env bash
# The checks and figures that need an NVIDIA GPU, in one run (a GPU machine is often lent for minutes only):
#
#   bash measurements/gpu_checks.sh OUTDIR [SLAB.npz]
#
# 1. the CUDA tests (Testing/engine/test_cuda.py: training with mixed precision, segmenting on the GPU and
#    the same model on the CPU);
# 2. time to result as a user gets it (bench_time_to_result.py --device cuda --retrain: the default training
#    and segmentation of the 60-slice 256 x 256 MRI slab, then one warm-start round of the loop and the same
#    round from scratch); SLAB.npz is the slab written by `bench_time_to_result.py --save-slab` on a machine
#    with nilearn, for a GPU machine without it;
# 3. `mismatch segment` end to end (bench_segment.py --device cuda): ms per 512 x 512 slice and a whole
#    512 x 512 x 300 CT with every output of the panel.
#
# Each step has its own time limit and its log in OUTDIR; a failing step does not stop the next. Needs the
# engine's dependencies (torch with CUDA, numpy, SimpleITK, scipy, safetensors, matplotlib) and pytest.
set -u
out=${1:?usage: gpu_checks.sh OUTDIR [SLAB.npz]}
slab=${2:-}
mkdir -p "$out"
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here" || exit 1
export PYTHONPATH="$here/Trainer${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
# A normal installation (pip, Slicer's PyTorch extension) holds the bytecode of every module. Where
# site-packages holds none and cannot take any (a read-only image), or where the environment forbids writing
# it (PYTHONDONTWRITEBYTECODE), Python would compile torch's sources again in every process: on the one GPU
# machine measured, 2,300 modules and 5 s a training process. A writable cache stands in for the .pyc files;
# one import fills it before anything is timed, and machine.txt says whether bytecode is cached.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-${TMPDIR:-/tmp}/mismatch-pycache}
"$py" -c "import torch, torch._dynamo, mismatch.cli, mismatch.api, mismatch.train, mismatch.inference, mismatch.prior" \
    || echo "warning: the engine does not import" >&2

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc, $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
    tail -n 25 "$out/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  "$py" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  "$py" -c "import sys; print('bytecode cached:', not sys.dont_write_bytecode, 'in', sys.pycache_prefix)"
  nproc; } 2>&1 | tee "$out/machine.txt"

TIMEFORMAT="%R s"
{ echo "start-up of a process that imports torch and initialises CUDA, three times:"
  for i in 1 2 3; do time "$py" -c "import torch; torch.zeros(1, device='cuda')"; done; } 2>&1 | tee -a "$out/machine.txt"

step cuda-tests 120 "$py" -m pytest -q -p no:cacheprovider Testing/engine/test_cuda.py
slab_args=()
[ -n "$slab" ] && slab_args=(--slab "$slab")
step time-to-result 200 "$py" measurements/bench_time_to_result.py --device cuda --size 256 --retrain \
    "${slab_args[@]}" --out "$out/time-to-result-gpu.json"
step segment 220 "$py" measurements/bench_segment.py --device cuda --lengths 8 64 --full 300 --repeats 2 \
    --out "$out/segment-gpu.json"
cat "$out/summary.txt"
