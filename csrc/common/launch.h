// Launchers of the extension's CUDA kernels.  Plain C++ over raw pointers (no torch headers), so the .cu files
// compile quickly and the kernels can be reused from any host code.  Every launcher enqueues on `stream` and
// returns immediately; it does nothing when the problem is empty.
//
// Memory contract: every pointer is `__restrict__` in the kernels, so no output may overlap any input (the caller
// checks this, ext.cpp with at::assert_no_overlap).  Outputs are written, never accumulated into: reductions are
// two-stage (per-block partials in `workspace`, then a second kernel sums them in a fixed order), so there are no
// atomics, no zero-fill, and the result is deterministic.  A launcher with a `workspace` needs
// plan::workspace_elems(plan::<kernel>_split(...), outputs) fp32 elements there (common/plan.h); none when that is 0.
// 16-byte vector loads / stores are chosen on the host (plan::vec16) per operand; otherwise scalar accesses.
//
// Element types: x / y / weight / bias / dy share one type (`DType` of the activations); the LoRA adapters A, B, E
// share a second one (the adapter dtype), IA3's l a third.  Values are converted through fp32, rounding to the
// types in between exactly where fastpeft/ops/*.py's torch reference rounds.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "common/philox.cuh"
#include "common/plan.h"

namespace fastpeft {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// out[m, j] = alpha * sum_k cvt_a(drop(X)[m, k]) * A(j, k)        j < r, k < K, m < M
//   X: (M, K) with row stride ldx (unit column stride), type xt.  A(j, k) = A[j * a_sj + k * a_sk], type at.
//   drop(): the shared Philox stream (common/philox.cuh) over the logical (M, K) input; values are rounded to
//   xt after scaling and then to at (as `_dropped(x).to(adt)` does).  out: (M, r) fp32 with row stride ldo.
// Forward shrink S = drop(x) Aᵀ and backward dSe = s · dy B both use it (split-K over blocks, partials in
// `workspace`: plan::rowdot_split(M, K, r, num_sms) x M x r elements).
void launch_rowdot(DType xt, DType at, const void* X, int64_t M, int64_t K, int64_t ldx, const void* A,
                   int64_t a_sj, int64_t a_sk, int r, float alpha, DropoutParams drop, float* out, int64_t ldo,
                   float* workspace, int num_sms, cudaStream_t stream);

// out[c, j] = alpha * sum_m P[m, j] * cvt_a(drop(X)[m, c])          c < C, j < r
//   X: (M, C) row stride ldx, type xt; P: (M, r) fp32 row stride ldp; out: (C, r) fp32, contiguous.
// Backward dB = s · dyᵀ Se (reduction over rows of dy) and dAᵀ = drop(x)ᵀ dS (reduction over rows of x); split-M
// partials in `workspace` (plan::coldot_split(M, C, r, num_sms) x C x r elements).
void launch_coldot(DType xt, DType at, const void* X, int64_t M, int64_t C, int64_t ldx, const float* P,
                   int64_t ldp, int r, float alpha, DropoutParams drop, float* out, float* workspace, int num_sms,
                   cudaStream_t stream);

// Y[m, c] = yt( bias[c] + alpha * keep(m, c) * scale * sum_j P[m, j] * Q(c, j) )    (no bias: 0; no dropout: 1)
//   Y: (M, C) row stride ldy, type yt; bias: (C,) type yt or nullptr; P: (M, r) fp32 row stride ldp;
//   Q(c, j) = Q[c * q_sc + j * q_sj], type qt.
// Forward: T = b + s · Se Bᵀ written into y before the cuBLASLt GEMM adds x Wᵀ (beta = 1).
// Backward: mask ⊙ (dS A) · scale written into dx before the GEMM adds dy W.
void launch_expand(DType yt, DType qt, void* Y, int64_t M, int64_t C, int64_t ldy, const void* bias,
                   const float* P, int64_t ldp, int r, const void* Q, int64_t q_sc, int64_t q_sj, float alpha,
                   DropoutParams drop, cudaStream_t stream);

// Fused decode (M <= 16): Y[m, n] = xt( sum_k X[m, k] W[n, k] + bias[n] + alpha * sum_j P[m, j] * B[n, j] )
//   X: (M, K) contiguous; W: (N, K) row stride ldw, unit column stride; bias (N,) or nullptr (type xt);
//   P: (M, r) fp32 contiguous (S ⊙ e); B: (N, r) contiguous fp32 (converted by the caller: it is tiny).  One warp per output feature n reads its row
//   of W once for all M rows.  Returns false (launching nothing) when M > 16.
bool launch_decode_gemv(DType xt, const void* X, int64_t M, int64_t K, const void* W, int64_t ldw, int64_t N,
                        const void* bias, const float* P, int r, const float* B, float alpha, void* Y,
                        cudaStream_t stream);

// IA3 column scale: out[m, c] = xt( lt( lt(X[m, c]) * l[c] ) )   (the lt roundings only when `round_to_l`).
//   Feed-forward forward: xs = (x.to(l.dtype) * l).to(x.dtype)  (round_to_l = true).
//   Output-mode forward:  y = (z * l).to(x.dtype)               (round_to_l = false: promoted product).
// X and out (M, C) with row strides ldx / ldo; out must not overlap X.
void launch_ia3_scale(DType xt, DType lt, const void* X, int64_t M, int64_t C, int64_t ldx, const void* l,
                      bool round_to_l, void* out, int64_t ldo, cudaStream_t stream);

// IA3 backward, one pass over the rows (G, V, out: (M, C) contiguous; out overlaps neither G nor V):
//   dl[c]     = sum_m lt(G[m, c]) * lt(V[m, c])               (fp32 accumulation)
//   out[m, c] = xt( lt( lt(G[m, c]) * l[c] ) )                 (when out != nullptr)
//   dbias[c]  = sum_m out[m, c] (as written)                   (when dbias != nullptr; requires out)
// Output mode: G = dy, V = z (saved), out = dz, dbias from dz.  Feed-forward mode: G = dy W, V = x, out = dx.
// Split-M partials in `workspace`: plan::ia3_bwd_split(M, C, num_sms) x 2C elements.
void launch_ia3_bwd(DType xt, DType lt, const void* G, const void* V, int64_t M, int64_t C, const void* l,
                    void* out, float* dl, float* dbias, float* workspace, int num_sms, cudaStream_t stream);

// out[i, j] = alpha * sum_s part[s, i, j]  (part: (splits, rows, cols) contiguous; out row stride ldo), summing the
// splits in order s = 0, 1, ...: the second stage of every split reduction.
void launch_sum_splits(const float* part, int64_t splits, int64_t rows, int64_t cols, float alpha, float* out,
                       int64_t ldo, cudaStream_t stream);

}  // namespace fastpeft
