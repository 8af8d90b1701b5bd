#!/usr/bin/env bash
# Everything a lent GPU machine is used for, in one call (the lease is short and each start costs
# minutes): install, the GPU checks (CUDA kernel build + tests + timings, engine and retrieval on
# CUDA). The ML-1M stage-1 sweep (when the data travelled along in .device/ml-1m, never committed) runs
# first: it is the longest step and its checkpoints come back even if a later step runs out of time.
#   OUT=/tmp/out bash scripts/device_session.sh
set -uo pipefail
export PYTHONSAFEPATH=1   # never the repository root on sys.path: its kernels/ would hide the installed package
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dpr-device-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHON=${PYTHON:-python3} DPR_KERNEL_CACHE=$PWD/build/kernel-cache
[ -d .device/ortinc ] && export ORT_INCLUDE_DIR=$PWD/.device/ortinc   # ORT headers (no apt there)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PYTHON -m pip install -q --no-deps --no-build-isolation -e . > /tmp/dpr-pip.log 2>&1 \
  || $PYTHON -m pip install -q --no-deps --no-build-isolation . >> /tmp/dpr-pip.log 2>&1 \
  || { echo "pip install failed:"; tail -5 /tmp/dpr-pip.log; }
if [ -d .device/ml-1m ] && [ "${SWEEP_MIN:-3.5}" != 0 ]; then
  echo "== ML-1M stage-1 sweep (${SWEEP_MIN:-3.5} min per run, all runs at once)"
  bash scripts/ml1m_stage1_sweep.sh .device/ml-1m "$OUT" "${SWEEP_MIN:-3.5}"
fi
echo "== bench/gpu_check.sh"
timeout ${CHECK_TIMEOUT:-300} bash bench/gpu_check.sh > "$OUT/gpu_check.log" 2>&1; echo "gpu_check rc=$?"
grep -E "^(==|device|float|torch\.|  )|passed|failed|error|FAIL" "$OUT/gpu_check.log" | tail -40
[ -f build/bench-gpu.json ] && cp build/bench-gpu.json "$OUT/"
echo "== every other GPU test (engine, retrieval, serving; gpu_check ran the kernel and device-path ones)"
timeout ${TEST_TIMEOUT:-240} $PYTHON -m pytest -q -m gpu tests/ -p no:cacheprovider -rs \
  --deselect tests/test_kernels.py --deselect tests/test_moe_gate_op.py --deselect tests/test_device_path.py \
  > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?"; tail -8 "$OUT/gpu_tests.log"
