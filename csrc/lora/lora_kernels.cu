// LoRA / AdaLoRA kernels around the cuBLASLt GEMMs: the shrink S = drop(x) Aᵀ (also dSe = s · dy B), the column
// reductions dB = s · dyᵀ Se and dAᵀ = drop(x)ᵀ dS, and the expand T = b + s · Se Bᵀ (also mask ⊙ dS A · scale).
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

// The dropout mask, warp-cooperatively: one Philox call yields the keep bits of 8 consecutive columns of a row
// (common/philox.cuh), so a warp tile of (32 / kG) rows x (8 kG) columns costs exactly one call per lane.  Lane L
// generates row m_base + L / kG, columns c_base + 8 (L % kG) .. + 7 (c_base a multiple of 8); the lane that
// needs element (i, c) of the tile fetches its owner's bits with a shuffle.
template <int kG>
__device__ __forceinline__ uint32_t tile_bits(const DropoutParams& d, int64_t m_base, int64_t c_base, int lane) {
  static_assert(32 % kG == 0, "a warp tile has a whole number of rows");
  return philox::keep_bits8(d.seed, static_cast<uint64_t>(m_base + lane / kG),
                            static_cast<uint64_t>(c_base >> 3) + static_cast<uint64_t>(lane % kG), d.p16);
}

// Keep flag of element (row i, column c) of the tile whose bits this warp made with tile_bits<kG>.  A shuffle:
// every lane of the warp must call it, with warp-uniform control flow.
template <int kG>
__device__ __forceinline__ bool tile_keep(uint32_t bits, int i, int c) {
  const uint32_t owner = __shfl_sync(0xffffffffu, bits, i * kG + (c >> 3));
  return ((owner >> (c & 7)) & 1u) != 0u;
}

// Dropped and converted value of X[m, k] as the torch reference computes it:
//   xd = x * scale rounded to x's dtype (or 0 where the mask drops), then cast to the adapter dtype.
template <typename TX, typename TA>
__device__ __forceinline__ float dropped(float v, const DropoutParams& d, bool keep) {
  if (d.on) v = keep ? Cvt<TX>::round(v * d.scale) : 0.f;
  return Cvt<TA>::round(v);
}

// grid: (ceil(M / (kWarps * kRPW)), ceil(r / kRT), k_splits); block: kThreads.
// Each warp owns kRPW rows; its lanes stride over k; partial sums meet in a warp reduction and one atomic per
// (row, rank column) per block.  The k loop goes in warp tiles of kRPW rows x 64 columns (one Philox call per lane
// for the tile's mask), so its bounds are warp-uniform and the mask shuffles see every lane.
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

  static_assert(kRPW * 8 == 32, "the rowdot mask tile is kRPW rows x 8 groups of 8 columns");
  for (int64_t kt = kb; kt < ke; kt += 64) {  // kb is a multiple of 32 (kchunk is), so of the Philox group 8
    const uint32_t bits = drop.on ? tile_bits<8>(drop, m0, kt, lane) : 0u;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int cl = h * 32 + lane;  // column within the tile
      const int64_t k = kt + cl;
      bool kp[kRPW];
#pragma unroll
      for (int i = 0; i < kRPW; ++i) kp[i] = drop.on ? tile_keep<8>(bits, i, cl) : true;
      if (k < ke) {
        float a[kRT];
#pragma unroll
        for (int j = 0; j < kRT; ++j)
          a[j] = (j0 + j < r) ? ld_f(A + static_cast<int64_t>(j0 + j) * a_sj + k * a_sk) : 0.f;
#pragma unroll
        for (int i = 0; i < kRPW; ++i) {
          const int64_t m = m0 + i;
          if (m < M) {
            const float v = dropped<TX, TA>(ld_f(X + m * ldx + k), drop, kp[i]);
#pragma unroll
            for (int j = 0; j < kRT; ++j) acc[i][j] = fmaf(v, a[j], acc[i][j]);
          }
        }
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

// grid: (ceil(C / kThreads), ceil(r / kRT), m_splits); one thread per column c, looping over its rows in steps of
// 8 (a warp's 32 columns x 8 rows is one mask tile: one Philox call per lane).
template <typename TX, typename TA>
__global__ void __launch_bounds__(kThreads) coldot_kernel(const TX* __restrict__ X, int64_t M, int64_t C,
                                                          int64_t ldx, const float* __restrict__ P, int64_t ldp,
                                                          int r, float alpha, DropoutParams drop,
                                                          float* __restrict__ out, int64_t mchunk) {
  const int lane = threadIdx.x % 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t cw = c - lane;  // the warp's first column: a multiple of 32
  const int j0 = blockIdx.y * kRT;
  const int64_t mb = static_cast<int64_t>(blockIdx.z) * mchunk;
  const int64_t me = mb + mchunk < M ? mb + mchunk : M;
  const bool active = c < C;  // inactive lanes still take part in the mask shuffles
  float acc[kRT];
#pragma unroll
  for (int j = 0; j < kRT; ++j) acc[j] = 0.f;
  for (int64_t mt = mb; mt < me; mt += 8) {  // block-uniform bounds
    const uint32_t bits = drop.on ? tile_bits<4>(drop, mt, cw, lane) : 0u;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t m = mt + i;
      const bool kp = drop.on ? tile_keep<4>(bits, i, lane) : true;
      if (active && m < me) {
        const float v = dropped<TX, TA>(ld_f(X + m * ldx + c), drop, kp);
        const float* p = P + m * ldp + j0;
#pragma unroll
        for (int j = 0; j < kRT; ++j)
          if (j0 + j < r) acc[j] = fmaf(__ldg(p + j), v, acc[j]);
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int j = 0; j < kRT; ++j)
    if (j0 + j < r) atomicAdd(out + c * r + j0 + j, alpha * acc[j]);
}

// grid: (ceil(M / kExpandRows), ceil(C / kThreads)); one thread per column, kExpandRows rows.  Rows go on grid.x
// (limit 2^31 - 1): grid.y is limited to 65535.  A warp's 32 columns x kExpandRows rows are one mask tile.
template <typename TY, typename TQ>
__global__ void __launch_bounds__(kThreads) expand_kernel(TY* __restrict__ Y, int64_t M, int64_t C, int64_t ldy,
                                                          const TY* __restrict__ bias, const float* __restrict__ P,
                                                          int64_t ldp, int r, const TQ* __restrict__ Q,
                                                          int64_t q_sc, int64_t q_sj, float alpha,
                                                          DropoutParams drop) {
  const int lane = threadIdx.x % 32;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kExpandRows;
  // The mask first, while every lane of the warp is present (shuffles): bit i = keep(m0 + i, c).
  static_assert(kExpandRows == 8, "the expand mask tile is 8 rows x 4 groups of 8 columns");
  uint32_t kp = 0xffu;
  if (drop.on) {
    const uint32_t bits = tile_bits<4>(drop, m0, c - lane, lane);
    kp = 0u;
#pragma unroll
    for (int i = 0; i < kExpandRows; ++i) kp |= (tile_keep<4>(bits, i, lane) ? 1u : 0u) << i;
  }
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
      if (drop.on) v = ((kp >> i) & 1u) ? v * drop.scale : 0.f;
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
