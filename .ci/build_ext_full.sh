#!/usr/bin/env bash
# Build, link and load the C++/CUDA extension fastpeft._C for real, WITHOUT a GPU, then check it against the Python
# side.  A MANUAL check, NOT run by CI: it needs a CUDA build of torch in its own virtual environment (~5.5 GB with
# the nvidia-* wheels) and a few minutes of compiling.  .ci/compile_csrc.sh is the cheap per-commit check (compile
# only); this one also links the .so against libtorch / libcudart / libcublasLt, resolves every symbol, imports it
# (running the TORCH_LIBRARY registrations, which is where a C++ signature that does not match its schema fails)
# and runs .ci/check_ext_loaded.py (schemas, kernels, fake kernels, the wrappers on fake CUDA tensors).
#
#   bash .ci/build_ext_full.sh [VENV]
#
# Steps:
#   1. VENV (argument, else $FASTPEFT_CUDA_VENV, else ~/.cache/fastpeft-cudavenv): created when missing, with
#      $TORCH_SPEC (default torch==2.14.1) and fastpeft's runtime requirements; an existing one is used as is.
#   2. nvcc must have torch.version.cuda's major version (torch's cpp_extension refuses a major mismatch).
#   3. The working tree (tracked + untracked, not ignored files) is copied to a temporary folder and built there
#      with `setup.py build_ext --inplace` (FASTPEFT_BUILD_CUDA=1): the repository never gets a build/ or a _C*.so
#      that another venv's editable install would pick up.
#   4. ldd -r: every NEEDED library found, no undefined symbol except the Python C API's.
#   5. python .ci/check_ext_loaded.py with the copy on PYTHONPATH.
#
# Environment (all optional):
#   FASTPEFT_CUDA_VENV     the venv (when no argument is given)
#   TORCH_SPEC             what a new venv installs (default torch==2.14.1)
#   PYTHON_BIN             python that creates a new venv (default python3)
#   CUDA_HOME              the toolkit (default: from nvcc; a wrapper script on PATH is not a toolkit root)
#   TORCH_CUDA_ARCH_LIST   default 9.0        MAX_JOBS   default 2
#   KEEP_BUILD=1           keep the temporary copy (its path is printed)
# The toolkit may lack cuBLAS (a bare nvcc install): setup.py then takes cublasLt from the venv's nvidia wheel (a
# dependency of CUDA torch) itself, so this script sets nothing up for it.
# Exit status: 0 built, linked, loaded and every check passed; 1 any of those failed; 2 a tool is missing or the
# CUDA versions do not match.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${FASTPEFT_CUDA_VENV:-$HOME/.cache/fastpeft-cudavenv}}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
ARCHS="${TORCH_CUDA_ARCH_LIST:-9.0}"
JOBS="${MAX_JOBS:-2}"
say() { echo "build_ext_full: $*"; }
die() { say "$2" >&2; exit "$1"; }

# ---- 1. the venv ---------------------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV and installing $TORCH_SPEC (large: the CUDA wheels)"
  "${PYTHON_BIN:-python3}" -m venv "$VENV" || die 2 "cannot create the venv $VENV"
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" numpy safetensors packaging || die 2 "pip install failed"
fi
PY="$VENV/bin/python"
read -r TORCH_VERSION TORCH_CUDA TORCH_LIB < <("$PY" -c "
import os, torch
print(torch.__version__, torch.version.cuda, os.path.join(os.path.dirname(torch.__file__), 'lib'))" 2>/dev/null) \
  || die 2 "torch is not importable in $VENV"
[ "$TORCH_CUDA" != "None" ] || die 2 "torch $TORCH_VERSION in $VENV is a CPU build: the extension needs a CUDA build"
say "venv $VENV: torch $TORCH_VERSION, CUDA $TORCH_CUDA"

# ---- 2. the toolkit ------------------------------------------------------------------------------------------
NVCC="$(command -v nvcc || true)"
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC="$CUDA_HOME/bin/nvcc"; fi
[ -n "$NVCC" ] || die 2 "nvcc not found (PATH or CUDA_HOME)"
NVCC_VERSION="$("$NVCC" --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -1)"
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_root="$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)"
  for cand in "$nvcc_root" /usr/local/cuda "/usr/local/cuda-$NVCC_VERSION"; do
    if [ -f "$cand/include/cuda_runtime.h" ] && [ -x "$cand/bin/nvcc" ]; then CUDA_HOME="$cand"; break; fi
  done
fi
[ -n "${CUDA_HOME:-}" ] && [ -f "$CUDA_HOME/include/cuda_runtime.h" ] \
  || die 2 "no CUDA toolkit root with include/cuda_runtime.h found for $NVCC: set CUDA_HOME"
export CUDA_HOME
say "nvcc $NVCC_VERSION, CUDA_HOME=$CUDA_HOME"
if [ "${NVCC_VERSION%%.*}" != "${TORCH_CUDA%%.*}" ]; then
  die 2 "nvcc is CUDA $NVCC_VERSION but torch was built with CUDA $TORCH_CUDA: the major versions must match"
fi
[ "$NVCC_VERSION" = "$TORCH_CUDA" ] || say "note: nvcc $NVCC_VERSION vs torch's CUDA $TORCH_CUDA (same major: allowed)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastpeft-extbuild.XXXXXX")"
if [ "${KEEP_BUILD:-0}" = "1" ]; then say "keeping $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi

# ---- 3. build in a copy ----------------------------------------------------------------------------------------
mkdir -p "$WORK/src"
(cd "$ROOT" && git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) \
  | tar -xf - -C "$WORK/src" || die 1 "cannot copy the working tree"
say "building in $WORK/src (TORCH_CUDA_ARCH_LIST=$ARCHS, MAX_JOBS=$JOBS)"
t0=$(date +%s)
(cd "$WORK/src" && FASTPEFT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS" MAX_JOBS="$JOBS" \
  nice "$PY" setup.py build_ext --inplace) > "$WORK/build.log" 2>&1
rc=$?
t1=$(date +%s)
if [ $rc -ne 0 ]; then
  grep -nE "error|Error|undefined reference|cannot find" "$WORK/build.log" | head -40 >&2
  tail -20 "$WORK/build.log" >&2
  trap - EXIT
  die 1 "build FAILED after $((t1 - t0)) s (log kept: $WORK/build.log)"
fi
SO="$(ls "$WORK"/src/fastpeft/_C*.so 2>/dev/null | head -1)"
[ -n "$SO" ] || die 1 "the build left no fastpeft/_C*.so"
say "built $(basename "$SO") ($(du -h "$SO" | cut -f1)) in $((t1 - t0)) s"
if grep -qiE "warning" "$WORK/build.log"; then
  say "compiler warnings:"
  grep -iE "warning" "$WORK/build.log" | sort -u | head -30
else
  say "no compiler warnings"
fi

# ---- 4. link: every library and symbol resolves ----------------------------------------------------------------
say "NEEDED: $(readelf -d "$SO" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
NV_ALL="$("$PY" -c "
import glob, os, site
print(':'.join(sorted({os.path.dirname(p) for sp in site.getsitepackages()
                       for p in glob.glob(os.path.join(sp, 'nvidia', '**', 'lib', '*.so*'), recursive=True)})))")"
LDD="$(LD_LIBRARY_PATH="$TORCH_LIB:$NV_ALL" ldd -r "$SO" 2>&1)"
missing="$(echo "$LDD" | grep "not found")"
undefined="$(echo "$LDD" | grep "undefined symbol" | grep -vE "undefined symbol: _?Py" )"
[ -z "$missing" ] || { echo "$missing" >&2; die 1 "libraries not found"; }
[ -z "$undefined" ] || { echo "$undefined" | head -20 >&2; die 1 "undefined symbols (beyond the Python C API)"; }
n_py="$(echo "$LDD" | grep -c "undefined symbol: _\?Py")"
say "ldd -r: every library found, no undefined symbol but the Python C API's ($n_py)"

# ---- 5. load and check ----------------------------------------------------------------------------------------
say "loading and checking (python .ci/check_ext_loaded.py)"
(cd "$WORK" && PYTHONPATH="$WORK/src" "$PY" "$WORK/src/.ci/check_ext_loaded.py")
rc=$?
if [ $rc -eq 0 ]; then
  say "OK: built in $((t1 - t0)) s, linked, loaded, every check passed"
else
  say "FAILED checks (above)"
fi
exit $rc
