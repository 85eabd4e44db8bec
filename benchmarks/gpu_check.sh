#!/usr/bin/env bash
# The GPU check: returns data in 8 minutes on an H200, whatever happens.  Run from anywhere:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh          # default OUT: ./gpu_check_out
#
# Phases run in the order of what they decide, each under its own `timeout`; every result row is appended to
# $OUT/<phase>.csv and flushed the moment it is measured (benchmarks/gpu_phases.py), so whatever finished is under
# $OUT even when a later phase is killed.  $OUT/summary.txt gets one line per phase as it ends; $OUT/phases.log
# holds every phase's output.  At the end gemm.csv, launch.csv, host.csv, host_profile.csv, tiles.csv and
# dispatch_table.json go into tables.tgz: eight files in all, what the device machine returns.
#   a build        the C++/CUDA extension, in the background (setup.py build_ext --inplace, FASTPEFT_BUILD_CUDA=1, then
#                  an editable install of the rest), and
#                  Triton's kernel cache warmed beside it (.ci/compile_triton.py --ci: the first configuration of
#                  each kernel, which is what FASTPEFT_TRITON_AUTOTUNE=0 runs)
#                  -> its log appended to phases.log when it ends, errors and tail in summary.txt
#   b gemm         plain Triton GEMM vs torch.mm, M=2048/8192, q/up/down, fixed configuration        -> gemm.csv
#   b2 launch      host µs per launch (eager), GPU µs per kernel (CUDA graph): the model's gap  -> launch.csv
#   b3 host        host µs per layer call (frozen, default, HF PEFT; q_proj M=2048/16), cProfile of
#                  a q_proj 2048 LoRA step, synchronising calls per step       -> host.csv, host_profile.csv
#   c correctness  every backend vs an fp32 reference at the production shapes (waits for a)         -> correctness.csv
#   d ratios       default, fused and (when built) cuda paths vs the frozen layer and HF PEFT,
#                  M=1/16/2048/8192, LoRA p=0/0.1, IA3, AdaLoRA      -> ratios.csv, dispatch_table.json
#   d2 decode      LoRA forward at M=1/16, eager and under a CUDA graph (the decode target)         -> decode.csv
#   e profile      torch.profiler kernel table, one fwd+bwd per path                                 -> profile.csv
#   e2 tiles       the skinny LoRA kernels under candidate tiles, q_proj M=8192 (µs, of the ceiling)  -> tiles.csv
#   f e2e          end-to-end training step time and memory                                          -> e2e.csv
#   g tests        the GPU test suite (g2 tests_ext: the extension's tests, in a process of their own) -> phases.log
# Without a GPU (or with GPU_CHECK_DRY_RUN=1) every phase that needs one reports "skipped: no GPU" and the script
# exits 0: tests/test_gpu_check.py runs it that way.
# Knobs: GPU_CHECK_BUDGET (total seconds, default 480), GPU_CHECK_LIMIT_<PHASE> (one phase's seconds),
# GPU_CHECK_TESTS (pytest arguments of phase g), PYTHON.
# Exit status: 0 when no phase failed (skipped and timed-out phases do not fail the script), 1 otherwise.
set -u -o pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$(pwd)/gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUDGET="${GPU_CHECK_BUDGET:-480}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 FASTPEFT_TRITON_AUTOTUNE=0
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

say() { echo "[$(date -u +%T) +${SECONDS}s] $*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET - SECONDS )); }
limit_for() {  # limit_for PHASE DEFAULT: min(GPU_CHECK_LIMIT_<PHASE> or DEFAULT, time left)
  local var="GPU_CHECK_LIMIT_$(echo "$1" | tr '[:lower:]' '[:upper:]')" lim
  lim="${!var:-$2}"
  [ "$lim" -gt "$(left)" ] && lim="$(left)"
  echo "$lim"
}
# phase NAME DEFAULT_LIMIT CMD...: run CMD under its time limit (output appended to $OUT/phases.log), one line to
# the summary.  rc 3 from gpu_phases.py means "skipped: no GPU".
phase() {
  local name="$1" lim t0 rc st
  lim="$(limit_for "$1" "$2")"; shift 2
  if [ "$lim" -lt 1 ]; then say "$name: skipped: out of time"; return; fi
  t0=$SECONDS
  if [ "${GPU_CHECK_SELFTEST_SLEEP:-}" = "$name" ]; then set -- sleep 60; fi
  timeout --kill-after=5 "$lim" "$@" >> "$OUT/phases.log" 2>&1
  rc=$?
  case "$rc" in
    0) st="ok" ;;
    3) st="skipped: no GPU" ;;
    124|137) st="timed out after $lim s (rows measured so far are kept)" ;;
    *) st="failed (rc=$rc, see phases.log)"; FAILED=1 ;;
  esac
  say "$name: $st in $(( SECONDS - t0 )) s"
}

HAVE_GPU="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
[ "${GPU_CHECK_DRY_RUN:-0}" = 1 ] && HAVE_GPU=0
# gpu_phase NAME DEFAULT_LIMIT ARGS...: a phase of benchmarks/gpu_phases.py (not even started without a GPU).
gpu_phase() {
  local name="$1" lim="$2"; shift 2
  if [ "$HAVE_GPU" != 1 ] && [ "${GPU_CHECK_SELFTEST_SLEEP:-}" != "$name" ]; then
    say "$name: skipped: no GPU"; return
  fi
  phase "$name" "$lim" "$PY" -m benchmarks.gpu_phases "$name" --out "$OUT" "$@"
}
say "gpu_check: commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${BUDGET} s, gpu=$HAVE_GPU"
if [ "$HAVE_GPU" = 1 ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /' \
    | tee -a "$SUMMARY"
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton",
triton.__version__)' 2>&1 | tee -a "$SUMMARY"
fi

# ---- a. build the extension in the background (rc in $OUT/build.rc when it ends) ------------------------------
BUILD_PID=""
BUILD_RC="$(mktemp)"; rm -f "$BUILD_RC"
BUILD_LOG="$(mktemp)"
if [ "$HAVE_GPU" = 1 ]; then
  ( export FASTPEFT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-8}"
    lim="$(limit_for build 300)"
    # The extension in place (what built on the first GPU machine), then fastpeft installed editable without it, so
    # it imports from any directory: --use-pep517 with --no-build-isolation needs no network (plain `pip install -e`
    # ran setuptools' `develop`, which re-ran pip with build isolation, fetched setuptools and failed there).
    { timeout "$lim" "$PY" setup.py build_ext --inplace \
        && { FASTPEFT_BUILD_CUDA=0 timeout 120 "$PY" -m pip install -e . --no-build-isolation --use-pep517 --no-deps \
             || echo "gpu_check: the editable install failed; fastpeft imports from the repository root only"; }
    } > "$BUILD_LOG" 2>&1 \
      && "$PY" -c "import fastpeft._C" >> "$BUILD_LOG" 2>&1
    rc=$?
    # the first run's extension segfaulted where a C++ check throws: the compiler's default string ABI beside torch's
    { echo "---- toolchain: the compiler's default libstdc++ string ABI, and torch's ----"
      "${CXX:-c++}" --version 2>&1 | head -1
      echo '#include <string>' | "${CXX:-c++}" -x c++ -dM -E - 2>&1 | grep -E '_GLIBCXX_USE_CXX11_ABI|__GNUC__ '
      "$PY" -c "import torch; print('torch._C._GLIBCXX_USE_CXX11_ABI =', torch._C._GLIBCXX_USE_CXX11_ABI)"
    } >> "$BUILD_LOG" 2>&1
    echo $rc > "$BUILD_RC" ) > /dev/null 2>&1 &
  BUILD_PID=$!
  say "build: started in the background"
else
  say "build: skipped: no GPU"
fi
# Triton's kernel cache warmed in the background too: .ci/compile_triton.py compiles the bf16 kernels for sm_90 with
# the H200's SM count ahead of time (no launches) into the cache the phases then hit, instead of compiling each
# variant on first use inside a timed phase.
if [ "$HAVE_GPU" = 1 ] && [ -f .ci/compile_triton.py ]; then
  ( lim="$(limit_for precompile 240)"
    timeout "$lim" "$PY" .ci/compile_triton.py --ci > "$BUILD_LOG.triton" 2>&1
    echo "[+${SECONDS}s] triton precompile: rc=$? $(tail -1 "$BUILD_LOG.triton")" >> "$SUMMARY"
    rm -f "$BUILD_LOG.triton" ) > /dev/null 2>&1 &
fi
wait_build() {  # wait_build LIMIT: until the background build ends or LIMIT seconds pass
  [ -n "$BUILD_PID" ] || return 0
  local t0=$SECONDS lim
  lim="$(limit_for build_wait "$1")"
  while [ ! -f "$BUILD_RC" ] && [ $(( SECONDS - t0 )) -lt "$lim" ]; do sleep 2; done
  if [ -f "$BUILD_RC" ]; then
    { echo "---- build log ----"; cat "$BUILD_LOG"; echo "---- end of build log ----"; } >> "$OUT/phases.log"
    grep -iE "error|warning" "$BUILD_LOG" | head -20 >> "$SUMMARY"
    if [ "$(cat "$BUILD_RC")" = 0 ]; then say "build: ok"
    else tail -20 "$BUILD_LOG" >> "$SUMMARY"; say "build: failed (log in phases.log)"; FAILED=1; fi
  else
    say "build: not finished after waiting $lim s; the next phases run without the extension"
  fi
  BUILD_PID=""
}

# ---- b. Triton GEMM vs cuBLAS (runs while the extension builds) ----------------------------------------------
gpu_phase gemm 60 --budget 50
# ---- b2. what a launch costs (a few seconds; pins the cost model's least determined constant) ------------------
gpu_phase launch 30 --budget 20
# ---- b3. where an eager layer call's host time goes (the first run's M = 2048 rows were host-bound) ------------
gpu_phase host 45 --budget 35
# ---- c. correctness of every backend (needs the extension: waits for the build) -------------------------------
wait_build 240
gpu_phase correctness 80 --budget 70
# ---- d. layer ratios ------------------------------------------------------------------------------------------
gpu_phase ratios 120 --budget 105
# ---- d2. decode under a CUDA graph ----------------------------------------------------------------------------
gpu_phase decode 40 --budget 30
# ---- e. profiler kernel table ---------------------------------------------------------------------------------
gpu_phase profile 40 --budget 30
# ---- e2. the skinny kernels' tiles by measurement ----------------------------------------------------------------
gpu_phase tiles 60 --budget 50
# ---- f. end to end --------------------------------------------------------------------------------------------
gpu_phase e2e 60 --budget 50
# ---- g. the GPU test suite, last ------------------------------------------------------------------------------
# The extension's tests run in a process of their own (g2): on the first GPU run one of them segfaulted, which ended
# the phase before pytest printed why the others failed.  --tb=short -rfE: every failure's reason in phases.log;
# --timeout (pytest-timeout, when installed) keeps one hanging test from eating the phase.
TESTS="${GPU_CHECK_TESTS:-tests/test_build.py tests/test_triton_lora.py tests/test_triton_ia3.py tests/test_op_paths.py
tests/test_base_weight_grad.py tests/test_backend.py}"
TESTS_EXT="${GPU_CHECK_TESTS_EXT:-tests/test_cuda_ext.py}"
if [ "$HAVE_GPU" = 1 ]; then
  TIMEOUT_ARG=""
  "$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARG="--timeout=60"
  # shellcheck disable=SC2086
  phase tests 150 "$PY" -m pytest $TESTS -q -rfE --tb=short $TIMEOUT_ARG -p no:cacheprovider
  grep -E "passed|failed|error" "$OUT/phases.log" | tail -1 >> "$SUMMARY"
  # shellcheck disable=SC2086
  phase tests_ext 60 "$PY" -X faulthandler -m pytest $TESTS_EXT -v -rfE --tb=short $TIMEOUT_ARG -p no:cacheprovider
  grep -E "passed|failed|error|Fatal Python error" "$OUT/phases.log" | tail -1 >> "$SUMMARY"
else
  say "tests: skipped: no GPU"
  say "tests_ext: skipped: no GPU"
fi
[ -n "$BUILD_PID" ] && kill "$BUILD_PID" 2>/dev/null
if [ -s "$BUILD_LOG" ] && [ ! -f "$BUILD_RC" ]; then
  { echo "---- unfinished build log ----"; cat "$BUILD_LOG"; } >> "$OUT/phases.log"
fi
rm -f "$BUILD_RC" "$BUILD_LOG"
# The device machine returns at most 8 files (the first run lost ratios.csv and summary.txt, the last two by name):
# the small tables decided early and the measured dispatch table go into one archive.
TABLES="$(cd "$OUT" && ls gemm.csv launch.csv host.csv host_profile.csv tiles.csv dispatch_table.json 2>/dev/null \
  | tr '\n' ' ')"
if [ -n "$TABLES" ]; then
  # shellcheck disable=SC2086
  (cd "$OUT" && tar czf tables.tgz $TABLES && rm -f $TABLES)
fi
say "gpu_check: done in $SECONDS s, failed=$FAILED"
exit "$FAILED"
