// LoRA / AdaLoRA kernels around the cuBLASLt GEMMs: the shrink S = drop(x) Aᵀ (also dSe = s · dy B), the column
// reductions dB = s · dyᵀ Se and dAᵀ = drop(x)ᵀ dS, and the expand T = b + s · Se Bᵀ (also mask ⊙ dS A · scale).
//
// Access pattern (csrc/README.md): a lane owns 8 consecutive columns of a row, so a warp reads or writes 256
// consecutive elements (16-byte accesses when plan::vec16 allows, scalar otherwise) and makes one Philox call per
// row for its dropout bits.  The adapter operand (A, B) is staged through shared memory in a tile filled with
// coalesced loads whatever its layout.  Reductions split across blocks write per-block partials that a second
// kernel sums in a fixed order: no atomics, no zero-fill, deterministic.
#include "common/dtype.cuh"
#include "common/launch.h"

namespace fastpeft {
namespace {

using plan::kG;
using plan::kRT;
using plan::kTileK;

// Dropped and converted value of X[m, k] as the torch reference computes it:
//   xd = x * scale rounded to x's dtype (or 0 where the mask drops), then cast to the adapter dtype.
template <typename TX, typename TA>
__device__ __forceinline__ float dropped(float v, const DropoutParams& d, bool keep) {
  if (d.on) v = keep ? Cvt<TX>::round(v * d.scale) : 0.f;
  return Cvt<TA>::round(v);
}

// Loads X[m, c .. c + 7] (n of them in bounds) and applies dropped(): one Philox call for the 8 keep bits.
template <typename TX, typename TA>
__device__ __forceinline__ void load8_dropped(const TX* __restrict__ p, bool vec, int n, const DropoutParams& d,
                                              int64_t m, int64_t c, float (&v)[8]) {
  load8(p, vec, n, v);
  const uint32_t bits = d.on ? philox::keep_bits8(d.seed, static_cast<uint64_t>(m), static_cast<uint64_t>(c >> 3),
                                                  d.p16)
                             : 0xffu;
#pragma unroll
  for (int e = 0; e < kG; ++e) v[e] = dropped<TX, TA>(v[e], d, ((bits >> e) & 1u) != 0u);
}

// Fills tile[j][padk(cc)] = Q(c0 + cc, j0 + j) for j < kRT, cc < kTileK (0 outside c < C, j < r), where
// Q(c, j) = Q[c * q_sc + j * q_sj].  Consecutive threads take consecutive addresses: along c when q_sc == 1,
// along j otherwise (then a row of Q's kRT ranks is contiguous when q_sj == 1).
template <typename TQ, int kThreads>
__device__ __forceinline__ void fill_tile(float (*tile)[kPadRow], const TQ* __restrict__ Q, int64_t q_sc,
                                          int64_t q_sj, int64_t c0, int64_t C, int j0, int r) {
  static_assert((kRT * kTileK) % kThreads == 0, "whole tile per pass");
#pragma unroll 4
  for (int i = 0; i < kRT * kTileK / kThreads; ++i) {
    const int idx = static_cast<int>(threadIdx.x) + i * kThreads;
    int j, cc;
    if (q_sc == 1) {
      j = idx / kTileK;
      cc = idx % kTileK;
    } else {
      j = idx % kRT;
      cc = idx / kRT;
    }
    const int64_t c = c0 + cc;
    tile[j][padk(cc)] = (j0 + j < r && c < C) ? ld_f(Q + c * q_sc + static_cast<int64_t>(j0 + j) * q_sj) : 0.f;
  }
}

constexpr int kRowdotThreads = 32 * plan::kRowdotWarps;

// grid: (ceil(M / kRowdotRows), ceil(r / kRT), splits); block: kRowdotThreads.
// Warp w owns rows m0 + 4w .. + 3; per 256-column step its lanes load 8 consecutive x values of each row and the
// matching A values from the shared tile.  The k loop bounds are block-uniform (the __syncthreads); partial sums
// meet in one warp reduction per (row, rank) at the end, written to part[split] (or, one split, scaled into out).
template <typename TX, typename TA>
__global__ void __launch_bounds__(kRowdotThreads) rowdot_kernel(
    const TX* __restrict__ X, int64_t M, int64_t K, int64_t ldx, bool xvec, const TA* __restrict__ A, int64_t a_sj,
    int64_t a_sk, int r, float alpha, DropoutParams drop, float* __restrict__ out, int64_t ldo, int64_t kchunk) {
  __shared__ __align__(16) float As[kRT][kPadRow];
  constexpr int kRPW = plan::kRowdotRPW;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * plan::kRowdotRows + warp * kRPW;
  const int j0 = blockIdx.y * kRT;
  const int64_t kb = static_cast<int64_t>(blockIdx.z) * kchunk;
  const int64_t ke = kb + kchunk < K ? kb + kchunk : K;

  float acc[kRPW][kRT];
#pragma unroll
  for (int i = 0; i < kRPW; ++i)
#pragma unroll
    for (int j = 0; j < kRT; ++j) acc[i][j] = 0.f;

  for (int64_t kt = kb; kt < ke; kt += kTileK) {  // kb is a multiple of kTileK, so k below of the Philox group 8
    __syncthreads();  // the previous tile is consumed
    // A(j, k) = A[j * a_sj + k * a_sk]: the tile indexes columns by k, ranks by j.
    fill_tile<TA, kRowdotThreads>(As, A, a_sk, a_sj, kt, ke, j0, r);
    __syncthreads();
    const int cl = lane * kG;
    const int64_t k = kt + cl;
    const int n = ke - k < kG ? static_cast<int>(ke - k) : kG;  // <= 0: this lane is past the end
    if (n > 0) {
      float xv[kRPW][kG];
#pragma unroll
      for (int i = 0; i < kRPW; ++i) {
        const int64_t m = m0 + i;
        if (m < M) {
          load8_dropped<TX, TA>(X + m * ldx + k, xvec, n, drop, m, k, xv[i]);
        } else {
#pragma unroll
          for (int e = 0; e < kG; ++e) xv[i][e] = 0.f;
        }
      }
#pragma unroll
      for (int j = 0; j < kRT; ++j) {
        float a[kG];
        lds8(As[j], cl, a);
#pragma unroll
        for (int i = 0; i < kRPW; ++i)
#pragma unroll
          for (int e = 0; e < kG; ++e) acc[i][j] = fmaf(xv[i][e], a[e], acc[i][j]);
      }
    }
  }
  // Every lane of the warp takes part in the shuffles (no lane has returned).
  float* dst = gridDim.z > 1 ? out + static_cast<int64_t>(blockIdx.z) * M * r : out;
  const int64_t ld = gridDim.z > 1 ? r : ldo;
  const float scale = gridDim.z > 1 ? 1.f : alpha;
#pragma unroll
  for (int i = 0; i < kRPW; ++i) {
#pragma unroll
    for (int j = 0; j < kRT; ++j) {
      const float s = warp_sum(acc[i][j]);
      const int64_t m = m0 + i;
      if (lane == 0 && m < M && j0 + j < r) dst[m * ld + j0 + j] = scale * s;
    }
  }
}

constexpr int kColThreads = 32 * plan::kColWarps;

// grid: (ceil(C / kTileK), ceil(r / kRT), splits); block: kColThreads.
// The block owns 256 columns; lane L of every warp owns columns c0 + 8L .. + 7, and the warps take the rows of each
// staged step of kColRows rows in turn.  P's rows are staged in shared memory and read as broadcast float4.  The
// warps' sums are combined in shared memory in warp order, then the block writes its (256 x kRT) tile coalesced.
template <typename TX, typename TA>
__global__ void __launch_bounds__(kColThreads) coldot_kernel(const TX* __restrict__ X, int64_t M, int64_t C,
                                                             int64_t ldx, bool xvec, const float* __restrict__ P,
                                                             int64_t ldp, int r, float alpha, DropoutParams drop,
                                                             float* __restrict__ out, int64_t mchunk) {
  constexpr int kRows = plan::kColRows;
  __shared__ __align__(16) float Ps[kRows][kRT];
  __shared__ float red[kRT][kG][33];  // [rank][column within the lane's 8][lane], padded against bank conflicts
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTileK;
  const int64_t c = c0 + lane * kG;
  const int n = C - c < kG ? static_cast<int>(C - c) : kG;
  const int j0 = blockIdx.y * kRT;
  const int64_t mb = static_cast<int64_t>(blockIdx.z) * mchunk;
  const int64_t me = mb + mchunk < M ? mb + mchunk : M;

  float acc[kG][kRT];
#pragma unroll
  for (int e = 0; e < kG; ++e)
#pragma unroll
    for (int j = 0; j < kRT; ++j) acc[e][j] = 0.f;

  for (int64_t mt = mb; mt < me; mt += kRows) {  // block-uniform bounds
    __syncthreads();
    for (int idx = threadIdx.x; idx < kRows * kRT; idx += kColThreads) {
      const int i = idx / kRT, j = idx % kRT;
      const int64_t m = mt + i;
      Ps[i][j] = (m < me && j0 + j < r) ? P[m * ldp + j0 + j] : 0.f;
    }
    __syncthreads();
    if (n > 0) {
      // Two rows per iteration: two 16-byte loads in flight per lane before the FMAs need them.
#pragma unroll 2
      for (int i = warp; i < kRows && mt + i < me; i += plan::kColWarps) {
        const int64_t m = mt + i;
        float xv[kG];
        load8_dropped<TX, TA>(X + m * ldx + c, xvec, n, drop, m, c, xv);
#pragma unroll
        for (int jq = 0; jq < kRT / 4; ++jq) {
          const float4 p = reinterpret_cast<const float4*>(Ps[i])[jq];
#pragma unroll
          for (int e = 0; e < kG; ++e) {
            acc[e][4 * jq + 0] = fmaf(p.x, xv[e], acc[e][4 * jq + 0]);
            acc[e][4 * jq + 1] = fmaf(p.y, xv[e], acc[e][4 * jq + 1]);
            acc[e][4 * jq + 2] = fmaf(p.z, xv[e], acc[e][4 * jq + 2]);
            acc[e][4 * jq + 3] = fmaf(p.w, xv[e], acc[e][4 * jq + 3]);
          }
        }
      }
    }
  }
  // Combine the warps' sums in a fixed order: warp 0 writes, warps 1, 2, ... add.
  for (int w = 0; w < plan::kColWarps; ++w) {
    __syncthreads();
    if (warp == w) {
#pragma unroll
      for (int j = 0; j < kRT; ++j)
#pragma unroll
        for (int e = 0; e < kG; ++e) red[j][e][lane] = w == 0 ? acc[e][j] : red[j][e][lane] + acc[e][j];
    }
  }
  __syncthreads();
  float* dst = gridDim.z > 1 ? out + static_cast<int64_t>(blockIdx.z) * C * r : out;
  const float scale = gridDim.z > 1 ? 1.f : alpha;
  for (int idx = threadIdx.x; idx < kTileK * kRT; idx += kColThreads) {
    const int cc = idx / kRT, j = idx % kRT;
    const int64_t cg = c0 + cc;
    if (cg < C && j0 + j < r) dst[cg * r + j0 + j] = scale * red[j][cc % kG][cc / kG];
  }
}

constexpr int kExpThreads = 32 * plan::kExpWarps;

// grid: (ceil(M / kExpRows), ceil(C / kTileK)); block: kExpThreads.  Rows go on grid.x (limit 2^31 - 1).
// Per rank tile of 16, Q's tile (256 columns x 16 ranks) and P's (kExpRows rows x 16) are staged in shared memory;
// warp w owns rows m0 + 8w .. + 7, lane L columns c0 + 8L .. + 7, written with one 16-byte store per row.  Two
// blocks per SM (<= 128 registers): a store-bound kernel wants the warps.
template <typename TY, typename TQ>
__global__ void __launch_bounds__(kExpThreads, 2) expand_kernel(TY* __restrict__ Y, int64_t M, int64_t C, int64_t ldy,
                                                             bool yvec, const TY* __restrict__ bias, bool bvec,
                                                             const float* __restrict__ P, int64_t ldp, int r,
                                                             const TQ* __restrict__ Q, int64_t q_sc, int64_t q_sj,
                                                             float alpha, DropoutParams drop) {
  constexpr int kRows = plan::kExpRows;
  constexpr int kRPW = plan::kExpRPW;
  __shared__ __align__(16) float Qs[kRT][kPadRow];
  __shared__ float Ps[kRows][kRT];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTileK;
  const int64_t c = c0 + lane * kG;
  const int n = C - c < kG ? static_cast<int>(C - c) : kG;

  float acc[kRPW][kG];
#pragma unroll
  for (int i = 0; i < kRPW; ++i)
#pragma unroll
    for (int e = 0; e < kG; ++e) acc[i][e] = 0.f;

  for (int jt = 0; jt < r; jt += kRT) {
    __syncthreads();
    fill_tile<TQ, kExpThreads>(Qs, Q, q_sc, q_sj, c0, C, jt, r);
    for (int idx = threadIdx.x; idx < kRows * kRT; idx += kExpThreads) {
      const int i = idx / kRT, j = idx % kRT;
      Ps[i][j] = (m0 + i < M && jt + j < r) ? P[(m0 + i) * ldp + jt + j] : 0.f;
    }
    __syncthreads();
#pragma unroll 1
    for (int j = 0; j < kRT; ++j) {
      float q[kG];
      lds8(Qs[j], lane * kG, q);
#pragma unroll
      for (int i = 0; i < kRPW; ++i) {
        const float p = Ps[warp * kRPW + i][j];  // broadcast
#pragma unroll
        for (int e = 0; e < kG; ++e) acc[i][e] = fmaf(p, q[e], acc[i][e]);
      }
    }
  }
  if (n <= 0) return;  // after the last __syncthreads
  float b[kG];
  if (bias != nullptr) {
    load8(bias + c, bvec, n, b);
  } else {
#pragma unroll
    for (int e = 0; e < kG; ++e) b[e] = 0.f;
  }
#pragma unroll
  for (int i = 0; i < kRPW; ++i) {
    const int64_t m = m0 + warp * kRPW + i;
    if (m >= M) break;
    const uint32_t bits = drop.on ? philox::keep_bits8(drop.seed, static_cast<uint64_t>(m),
                                                       static_cast<uint64_t>(c >> 3), drop.p16)
                                  : 0xffu;
    float v[kG];
#pragma unroll
    for (int e = 0; e < kG; ++e) {
      float t = alpha * acc[i][e];
      if (drop.on) t = ((bits >> e) & 1u) ? t * drop.scale : 0.f;
      v[e] = b[e] + t;
    }
    store8(Y + m * ldy + c, yvec, n, v);
  }
}

template <typename T>
constexpr int esize() {
  return static_cast<int>(sizeof(T));
}

}  // namespace

void launch_rowdot(DType xt, DType at, const void* X, int64_t M, int64_t K, int64_t ldx, const void* A,
                   int64_t a_sj, int64_t a_sk, int r, float alpha, DropoutParams drop, float* out, int64_t ldo,
                   float* workspace, int num_sms, cudaStream_t stream) {
  if (M <= 0 || r <= 0) return;
  if (K <= 0) {
    launch_sum_splits(nullptr, 0, M, r, alpha, out, ldo, stream);  // out = 0
    return;
  }
  const plan::Split sp = plan::rowdot_split(M, K, r, num_sms);
  const dim3 grid(static_cast<unsigned>(ceil_div(M, plan::kRowdotRows)), static_cast<unsigned>(ceil_div(r, kRT)),
                  static_cast<unsigned>(sp.splits));
  float* dst = sp.splits > 1 ? workspace : out;
  FASTPEFT_DISPATCH_DTYPE(xt, TX, FASTPEFT_DISPATCH_DTYPE(at, TA, {
    const bool xvec = plan::vec16(X, ldx, esize<TX>());
    rowdot_kernel<TX, TA><<<grid, kRowdotThreads, 0, stream>>>(static_cast<const TX*>(X), M, K, ldx, xvec,
                                                                static_cast<const TA*>(A), a_sj, a_sk, r, alpha,
                                                                drop, dst, ldo, sp.chunk);
  }));
  if (sp.splits > 1) launch_sum_splits(workspace, sp.splits, M, r, alpha, out, ldo, stream);
}

void launch_coldot(DType xt, DType at, const void* X, int64_t M, int64_t C, int64_t ldx, const float* P,
                   int64_t ldp, int r, float alpha, DropoutParams drop, float* out, float* workspace, int num_sms,
                   cudaStream_t stream) {
  if (C <= 0 || r <= 0) return;
  if (M <= 0) {
    launch_sum_splits(nullptr, 0, C, r, alpha, out, r, stream);  // out = 0
    return;
  }
  const plan::Split sp = plan::coldot_split(M, C, r, num_sms);
  const dim3 grid(static_cast<unsigned>(ceil_div(C, kTileK)), static_cast<unsigned>(ceil_div(r, kRT)),
                  static_cast<unsigned>(sp.splits));
  float* dst = sp.splits > 1 ? workspace : out;
  FASTPEFT_DISPATCH_DTYPE(xt, TX, FASTPEFT_DISPATCH_DTYPE(at, TA, {
    const bool xvec = plan::vec16(X, ldx, esize<TX>());
    coldot_kernel<TX, TA><<<grid, kColThreads, 0, stream>>>(static_cast<const TX*>(X), M, C, ldx, xvec, P, ldp, r,
                                                             alpha, drop, dst, sp.chunk);
  }));
  if (sp.splits > 1) launch_sum_splits(workspace, sp.splits, C, r, alpha, out, r, stream);
}

void launch_expand(DType yt, DType qt, void* Y, int64_t M, int64_t C, int64_t ldy, const void* bias,
                   const float* P, int64_t ldp, int r, const void* Q, int64_t q_sc, int64_t q_sj, float alpha,
                   DropoutParams drop, cudaStream_t stream) {
  if (M <= 0 || C <= 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(M, plan::kExpRows)), static_cast<unsigned>(ceil_div(C, kTileK)));
  FASTPEFT_DISPATCH_DTYPE(yt, TY, FASTPEFT_DISPATCH_DTYPE(qt, TQ, {
    const bool yvec = plan::vec16(Y, ldy, esize<TY>());
    const bool bvec = plan::vec16(bias, 0, esize<TY>());
    expand_kernel<TY, TQ><<<grid, kExpThreads, 0, stream>>>(static_cast<TY*>(Y), M, C, ldy, yvec,
                                                             static_cast<const TY*>(bias), bvec, P, ldp, r,
                                                             static_cast<const TQ*>(Q), q_sc, q_sj, alpha, drop);
  }));
}

}  // namespace fastpeft
