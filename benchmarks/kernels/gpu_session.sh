#!/bin/bash
# One device call: GPU tests of kernels/ then the benchmarks, logs and JSON into $OUT.
#   bash benchmarks/kernels/gpu_session.sh <test seconds> <run_all args...>
# (test seconds 0 skips the tests; TEST_PATHS narrows them)
set -o pipefail
export PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TEST_S=$1; shift
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$OUT/env.txt"
if [ "$TEST_S" != "0" ]; then
  timeout "$TEST_S" python3 -m pytest ${TEST_PATHS:-tests/kernels} -q -p no:cacheprovider -rs --timeout 120 2>&1 \
    | tee "$OUT/gpu_tests.log" | grep -v "^\[" | tail -25
fi
python3 benchmarks/kernels/run_all.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -E "^\||^===|Error|error|budget" | tail -80
