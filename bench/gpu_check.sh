#!/usr/bin/env bash
# The one command for a session that has a GPU: build, run the GPU tests, the benchmarks, then the whole suite;
# logs and results go under $OUT (the device tool brings that folder back: at most 8 files).
#   run(command="bash bench/gpu_check.sh", timeout_s=420)
# Phases are time-boxed (GPU leases are 15 minutes in all) and ordered by what only a GPU can check.
# The GPU hosts have torch+CUDA, triton and pytest but no network: build in place with the machine's python.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import triton; print('triton', triton.__version__)" || true
  git rev-parse HEAD 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
echo "== build"
if ! timeout 240 env LSAP_REQUIRE_EXT=1 MAX_JOBS=16 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; exit 1
fi
"$PY" -c "import lsap_kernels as L; print('backends', L.available_backends())" | tee -a "$OUT/env.txt"
echo "== GPU tests (cuda/triton cases and gpu-marked)"
timeout 150 "$PY" -m pytest -q -rs -p no:cacheprovider -m "gpu" tests > "$OUT/tests_gpu.log" 2>&1
echo "gpu-marked exit $?"
timeout 150 "$PY" -m pytest -q -rs -p no:cacheprovider -k "cuda or triton" tests --ignore tests/test_build.py \
  >> "$OUT/tests_gpu.log" 2>&1
echo "cuda/triton exit $?"; grep -E "passed|failed|error" "$OUT/tests_gpu.log" | tail -4
echo "== benchmarks"
timeout 150 "$PY" bench/bench_style.py --out "$OUT" > "$OUT/bench_style.log" 2>&1
echo "bench exit $?"; tail -20 "$OUT/bench_style.log"
echo "== whole suite (CPU tests already run in CI; here for CUDA-side effects)"
# -v: with xdist the failures are named as they happen, so a time-boxed run still says which ones failed
timeout "${SUITE_TIMEOUT:-120}" "$PY" -m pytest -v -rfs -p no:cacheprovider -n 12 tests --ignore tests/test_build.py \
  > "$OUT/tests_all.log" 2>&1
echo "suite exit $?"; grep -E "FAILED|ERROR" "$OUT/tests_all.log" | head -20; tail -2 "$OUT/tests_all.log"
