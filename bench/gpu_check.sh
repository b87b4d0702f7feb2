#!/usr/bin/env bash
# The one command for a session that has a GPU, in a few calls (a lease is 15 minutes of device time in all, the
# machine start included; one call may run 10 minutes; the machine stays warm 30 s after a call, so issue the next
# at once and it reuses the build; each call gets a fresh copy of the tree, so files written into it do not carry
# over: see TABLE_KEPT). Order used so far: tests, then tune or tune_ab, then bench or tables.
#   run(command="bash bench/gpu_check.sh next", timeout_s=600)   a session's first call: tests, tune, ncu, bench (below)
#   run(command="bash bench/gpu_check.sh tests", timeout_s=450)  build, gpu-marked tests, every cuda/triton case
#   run(command="bash bench/gpu_check.sh bench", timeout_s=400)  host time per call and where it goes, the suite
#   run(command="bash bench/gpu_check.sh tune", timeout_s=500)   Triton block configs per layer shape (commit the
#                                   archive's tune/triton_tuned.json to lsap_kernels/ops/modconv/), then a profile
#                                   of the large layers and of one whole LSAP_O step
#   run(command="bash bench/gpu_check.sh tables", timeout_s=450) the per-layer tables the suite's headline run leaves
#                                   out: bf16 at batch 1 and 64, then tf32 and fp32 at 16, 1, 64 (TABLES_ARGS to change)
#   run(command="bash bench/gpu_check.sh ab", timeout_s=240)     kernel times of the large layers under each
#                                   experiment switch (LSAP_TRITON_PRESCALE_MIN_COUT; AB_SETTINGS adds more), to decide
#                                   their defaults (LSAP_TRITON_DGRAD_TX: tune_ab, which retunes each side)
#   run(command="bash bench/gpu_check.sh tune_ab", timeout_s=300) the few-channel 1024²/512² layers retuned twice,
#                                   flat and 16-wide 2-D data-gradient tiles (LSAP_TRITON_DGRAD_TX), every wide config
#                                   (the forward's 2-D ones too): tx0/ and tx16/, tune_modconv.md each
#   run(command="bash bench/gpu_check.sh ncu", timeout_s=200)    Nsight Compute counters of our kernels in the largest
#                                   layers (bench/ncu_layers.py: DRAM/SM throughput, hit rates, occupancy, stalls)
#   run(command="bash bench/gpu_check.sh full", timeout_s=300)   the whole test suite, if device time is left
# (BENCH_ARGS="--sections modconv" bash bench/gpu_check.sh bench: the per-layer tables alone, every batch/precision)
# Several modes in one call: "bash bench/gpu_check.sh tests tune bench" runs them in order and packs their folders
# into $OUT/gpu_check.tgz after each (the sixth session's first call: 418 s with GPU_TESTS_TIMEOUT=100
# CASES_TIMEOUT=65 TUNE_TIMEOUT=130 BENCH_TIMEOUT=135 SNCD_TIMEOUT=0). SNCD_TIMEOUT=0, HOST_TIMEOUT=0 and
# PROFILE_TIMEOUT=0 leave out the SNCD bench, the host-time bench and the profiles.
# Logs and results come back in $OUT/gpu_check.tgz, a folder per mode.
# Phases are time-boxed and ordered by what only a GPU can check. The GPU hosts have torch+CUDA, triton and pytest
# but no network: build in place with the machine's python.
set -uo pipefail
cd "$(dirname "$0")/.."
# "next": the first call of a session that gets a GPU, as one ≤ 600 s call (run(..., timeout_s=600)): the tests,
# a retuning of the three largest layers (the CA configs are new since the committed table), Nsight Compute counters
# of the two largest, and the bf16 batch-16 suite (end to end first, then the layers while its box lasts; the tuning
# gets the longer box: ~18 forward configs fit convs.15 alone). Time boxes sum to ~510 s, ~550 s with four builds
# (~9 s a mode); any variable set in the environment wins.
if [ "${1:-}" = next ]; then
  export GPU_TESTS_TIMEOUT=${GPU_TESTS_TIMEOUT:-100} CASES_TIMEOUT=${CASES_TIMEOUT:-60} SNCD_TIMEOUT=${SNCD_TIMEOUT:-0} \
    TUNE_TIMEOUT=${TUNE_TIMEOUT:-150} TUNE_BUDGET_S=${TUNE_BUDGET_S:-120} PROFILE_TIMEOUT=${PROFILE_TIMEOUT:-0} \
    TUNE_ARGS=${TUNE_ARGS:-"--retune --layers convs.15 convs.13 convs.14"} HOST_TIMEOUT=${HOST_TIMEOUT:-0} \
    NCU_TIMEOUT=${NCU_TIMEOUT:-100} NCU_ARGS=${NCU_ARGS:-"--layers convs.15 convs.14 --timeout 48"} \
    BENCH_TIMEOUT=${BENCH_TIMEOUT:-100} BENCH_BUDGET_S=${BENCH_BUDGET_S:-75} \
    BENCH_ARGS=${BENCH_ARGS:-"--sections e2e modconv --op-batches 16 --precisions bf16"}
  set -- tests tune ncu bench
fi
OUT=${OUT:-bench/results/gpu-check}
mkdir -p "$OUT"
# Each mode writes into its own folder, and all of them are packed into $OUT/gpu_check.tgz after every mode: one
# file comes back however many a mode writes, and a call cut short still brings back the modes that ended. Several
# modes may run in one call (no idle device time between calls).
if [ -z "${GPU_CHECK_MODE_RUN:-}" ]; then
  parts=/tmp/gpu_check_parts; rm -rf "$parts"
  for mode in "${@:-tests}"; do
    mkdir -p "$parts/$mode"; OUT=$parts/$mode GPU_CHECK_MODE_RUN=1 bash "$0" "$mode"
    tar czf "$OUT/gpu_check.tgz.part" -C "$parts" . && mv "$OUT/gpu_check.tgz.part" "$OUT/gpu_check.tgz"
  done
  exit 0
fi
MODE=$1
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import triton; print('triton', triton.__version__)" || true
  # Triton's cache key of this install (its sources and libtriton) and its ptxas: where both equal a CPU machine's
  # (Python 3.12, PyPI's triton 3.6.0 there: bd4757a49ddb4e61, ptxas 12.8), sm_90 kernels compiled there are cache hits
  "$PY" -c "import hashlib; from triton.runtime.cache import triton_key; from triton import knobs
t = knobs.nvidia.ptxas
print('triton key', hashlib.sha256(triton_key().encode()).hexdigest()[:16], 'ptxas', t.path, t.version)" || true
  # the compiler that builds _C against the one that built torch (a mismatch is the suspect of a past C++-error crash)
  echo "extension c++: $(command -v "${CXX:-c++}") $("${CXX:-c++}" --version 2>&1 | head -1)"
  "$PY" -c "import torch; print('torch built with', torch.__config__.show().splitlines()[1].strip())" || true
  git rev-parse HEAD 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
echo "== build"
# the build log is kept only when the build fails
if ! timeout 240 env LSAP_REQUIRE_EXT=1 MAX_JOBS=16 "$PY" setup.py build_ext --inplace > /tmp/lsap_build.log 2>&1; then
  cp /tmp/lsap_build.log "$OUT/build.log"; tail -60 "$OUT/build.log"; exit 1
fi
"$PY" -c "import lsap_kernels as L; print('backends', L.available_backends())" | tee -a "$OUT/env.txt"
# Each call gets a fresh copy of the working tree, which drops a table that an earlier call of this session wrote on
# this machine (seen: a later process autotuned the 32-channel data gradients over the short list, 1.7-3x slower).
TABLE_KEPT=/tmp/lsap_triton_tuned.json
[ "$MODE" != tune ] && [ -f "$TABLE_KEPT" ] && cp "$TABLE_KEPT" lsap_kernels/ops/modconv/triton_tuned.json \
  && echo "block configs: this session's tuned table ($TABLE_KEPT)"
# Test phases: SIGINT at the time box (pytest then still reports what ran; a SIGTERM'd run left no output), -v so a
# cut-short log names each test, one Triton block config per shape (LSAP_TRITON_AUTOTUNE=0: each autotuned config
# is one more compilation, the tests are about values, and the benchmark checks every config it times), and
# pytest-xdist workers: Triton compilation (~15 s per config-f test) is CPU work, the host has 16 cores.
run_tests() {  # run_tests SECONDS LOG PYTEST-ARGS...
  local secs=$1 log=$2; shift 2
  LSAP_TRITON_AUTOTUNE=0 timeout -s INT -k 20 "$secs" "$PY" -m pytest -v -rfs -p no:cacheprovider --durations=10 "$@" \
    >> "$log" 2>&1
  echo "exit $?: $(grep -E "^(=+ )?[0-9]+ (passed|failed)|[0-9]+ (passed|failed|error)" "$log" | tail -1)"
}
workers() { "$PY" -c "import xdist" 2> /dev/null && echo "-n $1"; }  # none where pytest-xdist is missing
if [ "$MODE" = tests ]; then
echo "== GPU tests (cuda/triton cases and gpu-marked)"
: > "$OUT/tests_gpu.log"
# 4 workers for the batch-16 config-f tests (their float64 references take GPU memory; 3 left three fp32 cases
# unreached in a 130 s box on an H200), 6 for the small cases
echo -n "gpu-marked "; run_tests "${GPU_TESTS_TIMEOUT:-200}" "$OUT/tests_gpu.log" $(workers 4) -m gpu tests
echo -n "cuda/triton cases "; run_tests "${CASES_TIMEOUT:-150}" "$OUT/tests_gpu.log" $(workers 6) -k "cuda or triton" \
  -m "not gpu" tests --ignore tests/test_build.py
grep -E "^(FAILED|ERROR)" "$OUT/tests_gpu.log" | head -20
if [ "${SNCD_TIMEOUT:-90}" != 0 ]; then  # 0: left out
echo "== SNCD kernel launches by name (the op's own kernels vs PyTorch's), 2 batch sizes"
timeout "${SNCD_TIMEOUT:-90}" "$PY" bench/bench_style.py --batches 1 256 --no-compile --out "$OUT" > /dev/null 2>&1
echo "style bench exit $?"; grep -E "ours" "$OUT/style.md" | head -8
fi
fi
if [ "$MODE" = bench ]; then
if [ "${HOST_TIMEOUT:-60}" != 0 ]; then  # 0: left out
echo "== host time per call (bench/bench_host_overhead.py: our call path vs the registered op, tiny shapes)"
# ~2 ms per call on these hosts: 100 calls × 5 rounds per row fits the box (400 × 7 did not)
timeout "${HOST_TIMEOUT:-60}" "$PY" bench/bench_host_overhead.py --calls 100 --repeats 5 --out "$OUT" 2>&1 \
  | grep -v "^wrote"
echo "== where a small layer's host time goes (bench/profile_host.py: cProfile, Triton launches per call)"
timeout "${HOST_TIMEOUT:-60}" "$PY" bench/profile_host.py --calls 100 --out "$OUT" 2>&1 | grep -v "^wrote"
fi
if [ "${PROFILE_TIMEOUT:-50}" != 0 ]; then  # 0: left out
echo "== where the layers' time goes (bench/profile_layers.py: kernel times of the largest and the losing layers)"
timeout "${PROFILE_TIMEOUT:-50}" "$PY" bench/profile_layers.py --out "$OUT" > /dev/null 2>&1; echo "profile exit $?"
fi
echo "== benchmark suite (bench/suite.py: end to end, every layer, SNCD; writes suite.json/.md/.png into \$OUT)"
# --budget-s: no new work after that; the suite rewrites its results after every task and on SIGTERM, so the
# hard timeout still leaves what was measured. The suite covers bench_style.py's SNCD rows.
# BENCH_ARGS: more suite arguments, e.g. "--sections modconv --op-batches 16 1 64" for the layer tables alone
timeout "${BENCH_TIMEOUT:-300}" "$PY" bench/suite.py --out "$OUT" --budget-s "${BENCH_BUDGET_S:-240}" ${BENCH_ARGS:-} \
  > "$OUT/suite.log" 2>&1
echo "bench exit $?"; grep -A12 "^## Headline" "$OUT/suite.md" 2>/dev/null; tail -5 "$OUT/suite.log"
fi
if [ "$MODE" = tune ]; then
echo "== block-config tuning (bench/tune_modconv.py: largest layers first, resumes from the committed table)"
# TUNE_ARGS: e.g. "--retune --layers convs.15 convs.13" to time the configs added since the committed table
timeout "${TUNE_TIMEOUT:-260}" "$PY" bench/tune_modconv.py --out "$OUT" --budget-s "${TUNE_BUDGET_S:-200}" \
  ${TUNE_ARGS:-} > "$OUT/tune.log" 2>&1
echo "tune exit $?"; tail -4 "$OUT/tune.log"; cat "$OUT/tune_modconv.md" 2>/dev/null | tail -30
# this call's profile and this machine's later calls (through $TABLE_KEPT) use the new table; the session commits it
# from $OUT
cp "$OUT/triton_tuned.json" lsap_kernels/ops/modconv/ 2>/dev/null && cp "$OUT/triton_tuned.json" "$TABLE_KEPT"
if [ "${PROFILE_TIMEOUT:-150}" != 0 ]; then  # 0: left out
echo "== where the time goes, tuned (bench/profile_layers.py: the large layers, then one whole LSAP_O step)"
# the step's first calls autotune every layer shape the table lacks (~90 s at 1024² without a table)
timeout "${PROFILE_TIMEOUT:-150}" "$PY" bench/profile_layers.py --step --out "$OUT" > /dev/null 2>&1
echo "profile exit $?"; grep -A3 "^## One LSAP_O step" "$OUT/profile_layers.md" 2>/dev/null
fi
fi
if [ "$MODE" = tables ]; then
echo "== per-layer tables (bench/suite.py --sections modconv: batches 1 and 64 in bf16, then tf32 and fp32)"
# tf32/fp32 shapes autotune at their first call (no committed configs): several minutes of Triton compilation for
# 26 layers, hence bf16 first. The suite writes its results after every task; the hard timeout keeps them.
timeout "${BENCH_TIMEOUT:-380}" "$PY" bench/suite.py --out "$OUT" --budget-s "${BENCH_BUDGET_S:-330}" \
  ${TABLES_ARGS:---sections modconv --no-compile --precisions bf16 tf32 fp32 --op-batches 1 64 16} \
  > "$OUT/suite.log" 2>&1
echo "tables exit $?"; grep -A8 "^## Modulated convolution layers" "$OUT/suite.md" 2>/dev/null; tail -5 "$OUT/suite.log"
fi
if [ "$MODE" = ab ]; then
echo "== A/B of the experiment switches (bench/profile_layers.py per setting, one process each)"
# the first setting's process also autotunes the shapes the committed table lacks; the others reuse Triton's
# on-disk autotuning cache where the kernel and key are the same
for setting in default LSAP_TRITON_PRESCALE_MIN_COUT=128 ${AB_SETTINGS:-}; do
  name=${setting//=/_}; mkdir -p "$OUT/ab/$name"
  env $([ "$setting" = default ] || echo "$setting") timeout "${AB_TIMEOUT:-70}" "$PY" bench/profile_layers.py \
    --layers convs.14 convs.15 to_rgbs.7 convs.13 convs.12 convs.11 convs.7 --out "$OUT/ab/$name" > /dev/null 2>&1
  echo "$setting: exit $?"
  grep -E "^## |^- call" "$OUT/ab/$name/profile_layers.md" 2>/dev/null | paste -d" " - - | cut -c1-110
done
fi
if [ "$MODE" = tune_ab ]; then
echo "== data-gradient pixel tiles, flat vs 2-D, each with its best config (bench/tune_modconv.py --retune)"
# a Triton cache per run: its on-disk autotuning results are keyed by kernel and configs, not by this switch
for tx in 0 16; do
  mkdir -p "$OUT/tx$tx"
  LSAP_TRITON_DGRAD_TX=$tx TRITON_CACHE_DIR=/tmp/triton_cache_tx$tx timeout "${TUNE_AB_TIMEOUT:-130}" "$PY" \
    bench/tune_modconv.py --retune --layers ${TUNE_AB_LAYERS:-convs.15 to_rgbs.7 convs.13} --out "$OUT/tx$tx" \
    --budget-s 100 > "$OUT/tx$tx/tune.log" 2>&1
  echo "DGRAD_TX=$tx: exit $?"; rm -f "$OUT/tx$tx/triton_tuned.json"  # not for committing
  grep -E "_dgrad_kernel|_modconv_fwd_kernel" "$OUT/tx$tx/tune_modconv.md" | cut -c1-120
done
fi
if [ "$MODE" = ncu ]; then
echo "== hardware counters of our kernels in the largest layers (bench/ncu_layers.py: Nsight Compute, one process each)"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2> /dev/null | tail -1)
if [ -n "$NCU" ]; then
  timeout "${NCU_TIMEOUT:-150}" "$PY" bench/ncu_layers.py --ncu "$NCU" --out "$OUT" ${NCU_ARGS:-} > /dev/null 2>&1
  echo "ncu exit $?"; grep -E "^## |^- |^\| " "$OUT/ncu_layers.md" 2>/dev/null | cut -c1-160
else
  echo "no ncu on this machine"
fi
fi
if [ "$MODE" = full ]; then
echo "== whole suite (CPU tests already run in CI; here for CUDA-side effects)"
# -v: with xdist the failures are named as they happen, so a time-boxed run still says which ones failed
: > "$OUT/tests_all.log"
echo -n "suite "; run_tests "${SUITE_TIMEOUT:-240}" "$OUT/tests_all.log" $(workers 12) tests --ignore tests/test_build.py
grep -E "FAILED|ERROR" "$OUT/tests_all.log" | head -20
fi
