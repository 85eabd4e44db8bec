#!/usr/bin/env bash
# Compile-only check of every C++/CUDA source in csrc/ (no link, no GPU needed), so that a syntax or type error in
# the optional extension fastpeft._C cannot land on machines that never build it.
#
#   *.cu   -> nvcc -c for sm_90 (device code goes through ptxas too); they include no torch headers.
#   *.cpp  -> g++ -fsyntax-only against torch's headers (a CPU build of torch ships ATen/cuda and c10/cuda), the CUDA
#             toolkit's headers, and Python's (module.cpp).
# cuBLAS(Lt) headers are not part of the bare toolkit here: they are taken from NVIDIA's PyPI wheel nvidia-cublas
# (the release matching nvcc's major.minor), downloaded once with pip, only include/ unpacked into a cache folder,
# the wheel deleted.  Only done when some source includes cuBLAS.
#
# Environment (all optional):
#   PYTHON                python with torch (default: python, else python3)
#   NVCC                  nvcc (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc)
#   CSRC_DIR              folder to check (default: csrc/ next to this script's parent)
#   FASTPEFT_CI_ARCH      nvcc -gencode target (default arch=compute_90,code=sm_90)
#   FASTPEFT_CI_CACHE     where the cuBLAS headers are kept (default ~/.cache/fastpeft-ci)
#   CUBLAS_INCLUDE        a folder that already holds cublasLt.h (skips the download)
# Exit status: 0 when every file compiled, 1 when any failed, 2 when a tool is missing.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CSRC="${CSRC_DIR:-$ROOT/csrc}"
ARCH="${FASTPEFT_CI_ARCH:-arch=compute_90,code=sm_90}"
CACHE="${FASTPEFT_CI_CACHE:-$HOME/.cache/fastpeft-ci}"
STD="-std=c++20"   # torch >= 2.10 builds extensions as C++20

if [ -z "${PYTHON:-}" ]; then
  if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
if [ -z "${NVCC:-}" ]; then
  if command -v nvcc >/dev/null 2>&1; then NVCC=nvcc; elif [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"; else echo "compile_csrc: nvcc not found" >&2; exit 2; fi
fi
CXX="${CXX:-g++}"
command -v "$CXX" >/dev/null 2>&1 || { echo "compile_csrc: $CXX not found" >&2; exit 2; }

NVCC_VERSION="$("$NVCC" --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -1)"
CUDA_ROOT="$(cd "$(dirname "$(readlink -f "$(command -v "$NVCC")")")/.." && pwd)"
# nvcc may be a wrapper script; take the toolkit root from its own report when it has one.
if [ ! -f "$CUDA_ROOT/include/cuda_runtime.h" ]; then
  for cand in "${CUDA_HOME:-}" /usr/local/cuda "/usr/local/cuda-$NVCC_VERSION"; do
    if [ -n "$cand" ] && [ -f "$cand/include/cuda_runtime.h" ]; then CUDA_ROOT="$cand"; break; fi
  done
fi
CUDA_INC="$CUDA_ROOT/include"
[ -f "$CUDA_INC/cuda_runtime.h" ] || { echo "compile_csrc: no cuda_runtime.h under $CUDA_INC" >&2; exit 2; }

echo "compile_csrc: nvcc $NVCC_VERSION ($NVCC), CUDA headers $CUDA_INC, $($CXX --version | head -1)"

shopt -s globstar nullglob
CU_FILES=("$CSRC"/**/*.cu)
CPP_FILES=("$CSRC"/**/*.cpp)
HDR_FILES=("$CSRC"/**/*.h "$CSRC"/**/*.cuh)
if [ ${#CU_FILES[@]} -eq 0 ] && [ ${#CPP_FILES[@]} -eq 0 ]; then
  echo "compile_csrc: no sources under $CSRC" >&2
  exit 1
fi

# ---- cuBLAS headers ------------------------------------------------------------------------------------------
CUBLAS_FLAGS=()
if grep -rqE '#include *[<"](cublas|common/cublaslt)' "$CSRC"; then
  if [ -n "${CUBLAS_INCLUDE:-}" ] && [ -f "$CUBLAS_INCLUDE/cublasLt.h" ]; then
    CUBLAS_DIR="$CUBLAS_INCLUDE"
  elif [ -f "$CUDA_INC/cublasLt.h" ]; then
    CUBLAS_DIR="$CUDA_INC"
  else
    CUBLAS_DIR="$CACHE/cublas-$NVCC_VERSION/include"
    if [ ! -f "$CUBLAS_DIR/cublasLt.h" ]; then
      major="${NVCC_VERSION%%.*}"; minor="${NVCC_VERSION#*.}"
      tmp="$(mktemp -d)"
      trap 'rm -rf "$tmp"' EXIT
      echo "compile_csrc: fetching cuBLAS headers: pip download nvidia-cublas>=$major.$minor,<$major.$((minor + 1))"
      if ! "$PYTHON" -m pip download -q --no-deps --no-cache-dir --only-binary=:all: -d "$tmp" \
          "nvidia-cublas>=$major.$minor,<$major.$((minor + 1))"; then
        echo "compile_csrc: no nvidia-cublas $major.$minor wheel; trying the newest $major.x" >&2
        "$PYTHON" -m pip download -q --no-deps --no-cache-dir --only-binary=:all: -d "$tmp" \
          "nvidia-cublas>=$major,<$((major + 1))" || { echo "compile_csrc: cannot get cuBLAS headers" >&2; exit 2; }
      fi
      whl="$(ls "$tmp"/nvidia_cublas-*.whl | head -1)"
      mkdir -p "$tmp/x" "$CUBLAS_DIR"
      # Only the headers: a few hundred KB out of a ~400 MB wheel (unzip reads the central directory).
      "$PYTHON" - "$whl" "$CUBLAS_DIR" <<'PY'
import sys, zipfile, os
whl, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if "/include/" in n and n.endswith(".h")]
    for n in names:
        with open(os.path.join(dest, os.path.basename(n)), "wb") as f:
            f.write(z.read(n))
print(f"compile_csrc: unpacked {len(names)} headers from {os.path.basename(whl)}")
PY
      rm -f "$whl"
    fi
  fi
  [ -f "$CUBLAS_DIR/cublasLt.h" ] || { echo "compile_csrc: cublasLt.h missing in $CUBLAS_DIR" >&2; exit 2; }
  echo "compile_csrc: cuBLAS headers from $CUBLAS_DIR"
  CUBLAS_FLAGS=(-I"$CUBLAS_DIR")
fi

# ---- torch / Python include paths (only needed by the .cpp files) ----------------------------------------------
TORCH_FLAGS=()
PY_INC=""
if [ ${#CPP_FILES[@]} -gt 0 ]; then
  mapfile -t TORCH_INCS < <("$PYTHON" -c "import torch.utils.cpp_extension as c; print('\n'.join(c.include_paths()))") \
    || { echo "compile_csrc: cannot import torch with $PYTHON" >&2; exit 2; }
  for d in "${TORCH_INCS[@]}"; do TORCH_FLAGS+=(-I"$d"); done
  PY_INC="$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
  ABI="$("$PYTHON" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")"
  echo "compile_csrc: torch $("$PYTHON" -c 'import torch; print(torch.__version__)') headers, Python headers $PY_INC"
fi

# The flags torch.utils.cpp_extension adds for every CUDA extension (COMMON_NVCC_FLAGS) plus setup.py's.
NVCC_FLAGS=($STD -O3 -I"$CSRC" -I"$CUDA_INC" "${CUBLAS_FLAGS[@]}" -D__CUDA_NO_HALF_OPERATORS__
            -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
            --expt-relaxed-constexpr --use_fast_math -lineinfo -Xcompiler -fPIC -gencode "$ARCH")
# A CPU build of torch lacks c10/cuda/impl/cuda_cmake_macros.h (its only content is the shared-library macro).
CXX_FLAGS=($STD -fsyntax-only -Wall -Wno-unused-function -I"$CSRC" -I"$CUDA_INC" "${CUBLAS_FLAGS[@]}"
           "${TORCH_FLAGS[@]}" ${PY_INC:+-I"$PY_INC"} -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
           -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C ${ABI:+-D_GLIBCXX_USE_CXX11_ABI=$ABI})

OUTDIR="$(mktemp -d)"
failed=()
compiled=0
start=$(date +%s)
for f in "${CU_FILES[@]}"; do
  rel="${f#"$ROOT"/}"
  t0=$(date +%s)
  if "$NVCC" -c "$f" -o "$OUTDIR/$(basename "$f").o" "${NVCC_FLAGS[@]}"; then
    echo "compile_csrc: OK   nvcc -c        $rel ($(( $(date +%s) - t0 )) s)"
    compiled=$((compiled + 1))
  else
    echo "compile_csrc: FAIL nvcc -c        $rel" >&2
    failed+=("$rel")
  fi
done
for f in "${CPP_FILES[@]}"; do
  rel="${f#"$ROOT"/}"
  t0=$(date +%s)
  if "$CXX" "${CXX_FLAGS[@]}" "$f"; then
    echo "compile_csrc: OK   g++ -fsyntax-only $rel ($(( $(date +%s) - t0 )) s)"
    compiled=$((compiled + 1))
  else
    echo "compile_csrc: FAIL g++ -fsyntax-only $rel" >&2
    failed+=("$rel")
  fi
done
# Headers are checked through the sources that include them; list any that none includes.
for h in "${HDR_FILES[@]}"; do
  base="${h#"$CSRC"/}"
  if ! grep -rqF "\"$base\"" "$CSRC" --include=*.cu --include=*.cpp --include=*.h --include=*.cuh; then
    echo "compile_csrc: note: header $base is included by no source (not compiled)"
  fi
done
rm -rf "$OUTDIR"
echo "compile_csrc: $compiled compiled, ${#failed[@]} failed in $(( $(date +%s) - start )) s"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'compile_csrc: failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
exit 0
