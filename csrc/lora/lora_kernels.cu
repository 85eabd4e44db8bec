// LoRA / AdaLoRA kernels around the cuBLASLt GEMMs: the shrink S = drop(x) Aᵀ (also dSe = s · dy B), the column
// reductions dB = s · dyᵀ Se and dAᵀ = drop(x)ᵀ dS, and the expand T = b + s · Se Bᵀ (also mask ⊙ dS A / (1-p)).
//
// Deliberately simple: scalar loads, fp32 accumulation in registers, warp shuffles and fp32 atomics for the
// split reductions.  Correctness first; the dispatch table measures them against the Triton path.
#include <algorithm>

#include "common/dtype.cuh"
#include "common/launch.h"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRT = 16;   // adapter columns (rank) handled per block; more ranks -> more blocks along grid.y
constexpr int kRPW = 4;   // rows per warp in the shrink
constexpr int kExpandRows = 8;

// Dropped and converted value of X[m, k] as the torch reference computes it:
//   xd = x * fp32(1/(1-p)) rounded to x's dtype (or 0), then cast to the adapter dtype.
template <typename TX, typename TA>
__device__ __forceinline__ float dropped(float v, const DropoutParams& d, int64_t m, int64_t k, int64_t K) {
  if (d.on) {
    const uint64_t idx = static_cast<uint64_t>(m) * static_cast<uint64_t>(K) + static_cast<uint64_t>(k);
    v = philox::keep(d.seed, idx, d.p) ? Cvt<TX>::round(v * d.scale) : 0.f;
  }
  return Cvt<TA>::round(v);
}

// grid: (ceil(M / (kWarps * kRPW)), ceil(r / kRT), k_splits); block: kThreads.
// Each warp owns kRPW rows; its lanes stride over k; partial sums meet in a warp reduction and one atomic per
// (row, rank column) per block.
template <typename TX, typename TA>
__global__ void __launch_bounds__(kThreads) rowdot_kernel(const TX* __restrict__ X, int64_t M, int64_t K,
                                                          int64_t ldx, const TA* __restrict__ A, int64_t a_sj,
                                                          int64_t a_sk, int r, float alpha, DropoutParams drop,
                                                          float* __restrict__ out, int64_t ldo, int64_t kchunk) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * (kWarps * kRPW) + warp * kRPW;
  const int j0 = blockIdx.y * kRT;
  const int64_t kb = static_cast<int64_t>(blockIdx.z) * kchunk;
  const int64_t ke = kb + kchunk < K ? kb + kchunk : K;

  float acc[kRPW][kRT];
#pragma unroll
  for (int i = 0; i < kRPW; ++i)
#pragma unroll
    for (int j = 0; j < kRT; ++j) acc[i][j] = 0.f;

  for (int64_t k = kb + lane; k < ke; k += 32) {
    float a[kRT];
#pragma unroll
    for (int j = 0; j < kRT; ++j)
      a[j] = (j0 + j < r) ? ld_f(A + static_cast<int64_t>(j0 + j) * a_sj + k * a_sk) : 0.f;
#pragma unroll
    for (int i = 0; i < kRPW; ++i) {
      const int64_t m = m0 + i;
      if (m < M) {
        const float v = dropped<TX, TA>(ld_f(X + m * ldx + k), drop, m, k, K);
#pragma unroll
        for (int j = 0; j < kRT; ++j) acc[i][j] = fmaf(v, a[j], acc[i][j]);
      }
    }
  }
  // Every lane of the warp takes part in the shuffles (the loop bounds above are warp-uniform).
#pragma unroll
  for (int i = 0; i < kRPW; ++i) {
#pragma unroll
    for (int j = 0; j < kRT; ++j) {
      const float s = warp_sum(acc[i][j]);
      const int64_t m = m0 + i;
      if (lane == 0 && m < M && j0 + j < r) atomicAdd(out + m * ldo + j0 + j, alpha * s);
    }
  }
}

// grid: (ceil(C / kThreads), ceil(r / kRT), m_splits); one thread per column c, looping over its rows.
template <typename TX, typename TA>
__global__ void __launch_bounds__(kThreads) coldot_kernel(const TX* __restrict__ X, int64_t M, int64_t C,
                                                          int64_t ldx, const float* __restrict__ P, int64_t ldp,
                                                          int r, float alpha, DropoutParams drop,
                                                          float* __restrict__ out, int64_t mchunk) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int j0 = blockIdx.y * kRT;
  const int64_t mb = static_cast<int64_t>(blockIdx.z) * mchunk;
  const int64_t me = mb + mchunk < M ? mb + mchunk : M;
  if (c >= C) return;  // no collectives below
  float acc[kRT];
#pragma unroll
  for (int j = 0; j < kRT; ++j) acc[j] = 0.f;
  for (int64_t m = mb; m < me; ++m) {
    const float v = dropped<TX, TA>(ld_f(X + m * ldx + c), drop, m, c, C);
    const float* p = P + m * ldp + j0;
#pragma unroll
    for (int j = 0; j < kRT; ++j)
      if (j0 + j < r) acc[j] = fmaf(__ldg(p + j), v, acc[j]);
  }
#pragma unroll
  for (int j = 0; j < kRT; ++j)
    if (j0 + j < r) atomicAdd(out + c * r + j0 + j, alpha * acc[j]);
}

// grid: (ceil(M / kExpandRows), ceil(C / kThreads)); one thread per column, kExpandRows rows.  Rows go on grid.x
// (limit 2^31 - 1): grid.y is limited to 65535.
template <typename TY, typename TQ>
__global__ void __launch_bounds__(kThreads) expand_kernel(TY* __restrict__ Y, int64_t M, int64_t C, int64_t ldy,
                                                          const TY* __restrict__ bias, const float* __restrict__ P,
                                                          int64_t ldp, int r, const TQ* __restrict__ Q,
                                                          int64_t q_sc, int64_t q_sj, float alpha,
                                                          DropoutParams drop) {
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kExpandRows;
  if (c >= C) return;
  float acc[kExpandRows];
#pragma unroll
  for (int i = 0; i < kExpandRows; ++i) acc[i] = 0.f;
  for (int j = 0; j < r; ++j) {
    const float q = ld_f(Q + c * q_sc + static_cast<int64_t>(j) * q_sj);
#pragma unroll
    for (int i = 0; i < kExpandRows; ++i)
      if (m0 + i < M) acc[i] = fmaf(__ldg(P + (m0 + i) * ldp + j), q, acc[i]);
  }
  const float b = bias != nullptr ? ld_f(bias + c) : 0.f;
#pragma unroll
  for (int i = 0; i < kExpandRows; ++i) {
    const int64_t m = m0 + i;
    if (m < M) {
      float v = alpha * acc[i];
      if (drop.on) {
        const uint64_t idx = static_cast<uint64_t>(m) * static_cast<uint64_t>(C) + static_cast<uint64_t>(c);
        v = philox::keep(drop.seed, idx, drop.p) ? v * drop.scale : 0.f;
      }
      st_f(Y + m * ldy + c, b + v);
    }
  }
}

}  // namespace

void launch_rowdot(DType xt, DType at, const void* X, int64_t M, int64_t K, int64_t ldx, const void* A,
                   int64_t a_sj, int64_t a_sk, int r, float alpha, DropoutParams drop, float* out, int64_t ldo,
                   int num_sms, cudaStream_t stream) {
  if (M <= 0 || K <= 0 || r <= 0) return;
  const int64_t row_blocks = ceil_div(M, kWarps * kRPW);
  const int64_t rank_blocks = ceil_div(r, kRT);
  // Split K so that there are about four blocks per SM, but give each block at least 256 columns.
  const int64_t want = std::max<int64_t>(1, ceil_div(4LL * std::max(num_sms, 1), row_blocks * rank_blocks));
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(want, ceil_div(K, 256)));
  const int64_t kchunk = ceil_div(ceil_div(K, splits), 32) * 32;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(rank_blocks),
                  static_cast<unsigned>(ceil_div(K, kchunk)));
  FASTPEFT_DISPATCH_DTYPE(xt, TX, FASTPEFT_DISPATCH_DTYPE(at, TA, {
    rowdot_kernel<TX, TA><<<grid, kThreads, 0, stream>>>(static_cast<const TX*>(X), M, K, ldx,
                                                          static_cast<const TA*>(A), a_sj, a_sk, r, alpha, drop,
                                                          out, ldo, kchunk);
  }));
}

void launch_coldot(DType xt, DType at, const void* X, int64_t M, int64_t C, int64_t ldx, const float* P,
                   int64_t ldp, int r, float alpha, DropoutParams drop, float* out, int num_sms,
                   cudaStream_t stream) {
  if (M <= 0 || C <= 0 || r <= 0) return;
  const int64_t col_blocks = ceil_div(C, kThreads);
  const int64_t rank_blocks = ceil_div(r, kRT);
  const int64_t want = std::max<int64_t>(1, ceil_div(4LL * std::max(num_sms, 1), col_blocks * rank_blocks));
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(want, ceil_div(M, 64)));
  const int64_t mchunk = ceil_div(M, splits);
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(rank_blocks),
                  static_cast<unsigned>(ceil_div(M, mchunk)));
  FASTPEFT_DISPATCH_DTYPE(xt, TX, FASTPEFT_DISPATCH_DTYPE(at, TA, {
    coldot_kernel<TX, TA><<<grid, kThreads, 0, stream>>>(static_cast<const TX*>(X), M, C, ldx, P, ldp, r, alpha,
                                                          drop, out, mchunk);
  }));
}

void launch_expand(DType yt, DType qt, void* Y, int64_t M, int64_t C, int64_t ldy, const void* bias,
                   const float* P, int64_t ldp, int r, const void* Q, int64_t q_sc, int64_t q_sj, float alpha,
                   DropoutParams drop, cudaStream_t stream) {
  if (M <= 0 || C <= 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(M, kExpandRows)), static_cast<unsigned>(ceil_div(C, kThreads)));
  FASTPEFT_DISPATCH_DTYPE(yt, TY, FASTPEFT_DISPATCH_DTYPE(qt, TQ, {
    expand_kernel<TY, TQ><<<grid, kThreads, 0, stream>>>(static_cast<TY*>(Y), M, C, ldy,
                                                          static_cast<const TY*>(bias), P, ldp, r,
                                                          static_cast<const TQ*>(Q), q_sc, q_sj, alpha, drop);
  }));
}

}  // namespace fastpeft
