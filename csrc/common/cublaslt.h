// A thin cuBLASLt wrapper for the extension's GEMMs (no torch headers).
//
// Column-major problem, as cuBLAS sees it:   D (m × n) = alpha ⊙ op(A) (m × k) · op(B) (k × n) + beta · D (+ bias)
// A row-major Y[M, N] = X[M, K] · W[N, K]ᵀ is D = Yᵀ with m = N, n = M, k = K, A = W (transa), B = X: the "rows of D"
// are the N output features, which is where the bias vector and the per-row alpha vector apply.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#include "common/launch.h"

namespace fastpeft {

struct LtGemm {
  bool transa = false;
  bool transb = false;
  int64_t m = 0, n = 0, k = 0;
  const void* A = nullptr;
  int64_t lda = 0;
  const void* B = nullptr;
  int64_t ldb = 0;
  void* D = nullptr;  // also C when beta != 0 (in place: C == D, same layout)
  int64_t ldd = 0;
  DType dtype = DType::kFloat32;  // A, B, C, D and bias share it; compute and scale type are fp32
  float alpha = 1.f;              // used when alpha_vec == nullptr
  float beta = 0.f;
  const float* alpha_vec = nullptr;  // device vector of length m (per-row alpha), or nullptr
  const void* bias = nullptr;        // device vector of length m, type dtype, or nullptr
};

// Runs the GEMM on `stream` with a workspace of `ws_bytes` at `workspace`.  Returns CUBLAS_STATUS_SUCCESS or the
// failing status, with `*what` naming the step that failed.
cublasStatus_t lt_matmul(const LtGemm& g, void* workspace, size_t ws_bytes, int device, cudaStream_t stream,
                         const char** what);

}  // namespace fastpeft
