#!/usr/bin/env bash
# The one command for a session that has a GPU: build, run every test (the gpu-marked ones included), then the
# benchmarks; logs and results go under $OUT (the device tool brings that folder back).
#   run(command="bash bench/gpu_check.sh")
# The GPU hosts have torch+CUDA and triton but no network: build in place with the machine's python. If pytest is
# missing there, carry wheels in .gpu_wheels/ (pip download pytest -d .gpu_wheels) and name it in `carry`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
{
  nvidia-smi || true
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import triton; print('triton', triton.__version__)" || true
  git rev-parse HEAD 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
"$PY" -c "import pytest" 2>/dev/null || "$PY" -m pip install -q --no-index --find-links .gpu_wheels pytest \
  || echo "pytest missing: tests will not run" | tee -a "$OUT/env.txt"
echo "== build"
if ! LSAP_REQUIRE_EXT=1 MAX_JOBS=16 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; exit 1
fi
"$PY" -c "import lsap_kernels as L; print('backends', L.available_backends())" | tee -a "$OUT/env.txt"
echo "== tests"
"$PY" -m pytest -q -rs tests > "$OUT/tests.log" 2>&1
echo "pytest exit $?"; tail -25 "$OUT/tests.log"
echo "== benchmarks"
"$PY" bench/bench_style.py --out "$OUT" 2>&1 | tee "$OUT/bench_style.log" | tail -40
