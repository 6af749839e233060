#!/usr/bin/env bash
# Every GPU check of issues 4 and 5 in ONE run, sized for a session's 15 minutes of device
# time (at most 555 s, the sum of the stage timeouts, + 5 s per stage that has to be killed:
# each stage has its own, so a slow one cannot starve the rest). From the repository root,
# with the device tool:
#
#   run(command="RAWGAN_COMMIT=<sha> bash benchmarks/gpu_session.sh", timeout_s=590)
#
# or on any CUDA machine: bash benchmarks/gpu_session.sh. Everything lands in $OUT (the
# device tool's folder), else in benchmarks/results/gpu-session-<UTC time>/: summary.txt (the
# device, each stage's exit status and time), one log per stage, bench_gpu.py's JSON: seven
# files, inside the device tool's limit of eight. Copy the JSON to benchmarks/results/ and
# commit it with the device, the date and the commit (it holds them).
#
# Stages (seconds are the timeouts, not predictions):
#   1. tests/test_cupy_ops.py           every op vs NumPy float64, TF32, the graphed step (200)
#   2. tests/test_numba_ops.py          the Numba kernels on the real device (70)
#   3. rawgan train --cuda-graph        a short toy run through the captured step (30)
#   4. bench_gpu.py                     SGEMM, the step, its per-kernel profile, layers,
#                                       elementwise, at batch 64 and 256 (195; in that order,
#                                       the JSON rewritten after each section)
#   5. compute-sanitizer memcheck       every kernel and tile once (60), if installed
# A stage past its timeout gets SIGINT (pytest then prints where it was and what failed so
# far; rawgan train saves), SIGKILL 5 s later; a test running over 60 s has its traceback
# dumped to the log (pytest's faulthandler_timeout), so a hang shows where it hangs.
# The GPU image has CuPy, Numba, PyTorch, h5py, tqdm: rawgan itself runs from the tree
# (PYTHONPATH), nothing is installed.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results/gpu-session-$(date -u +%Y%m%dT%H%M)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
{
    date -u +%FT%TZ
    echo "commit ${RAWGAN_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
    nvidia-smi -L 2>&1
    "$PY" -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)"
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"

stage() {  # stage NAME SECONDS COMMAND...: run it, keep its log and exit status
    local name=$1 limit=$2
    shift 2
    echo "== $name (timeout ${limit}s)"
    local t0=$SECONDS
    timeout -s INT -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
    tail -n 15 "$OUT/$name.log"
}

HANG="-o faulthandler_timeout=60"
stage cupy-tests 200 "$PY" -m pytest -q -rfE $HANG -m "gpu and not slow" tests/test_cupy_ops.py
NUMBA_ENABLE_CUDASIM=0 stage numba-tests 70 "$PY" -m pytest -q -rfE $HANG tests/test_numba_ops.py
stage train-graphed 30 "$PY" -m rawgan.cli train --backend cupy --cuda-graph --model mlp \
    --data ring --noise-dim 2 --batch-size 256 --num-examples 25600 --epochs 1 \
    --no-progress --out /tmp/rawgan-graphed-run
stage bench 195 "$PY" benchmarks/bench_gpu.py --batches 64 256 --repeats 10 --step-repeats 10 \
    --warmup 3 --json "$OUT/bench-gpu.json"
if command -v compute-sanitizer > /dev/null; then  # every kernel once (SANITIZER_SCRIPT)
    stage sanitizer 60 "$PY" -m pytest -q $HANG -m slow tests/test_cupy_ops.py -k memcheck
fi
cat "$OUT/summary.txt"
