// (IA)³ elementwise kernels around the cuBLASLt GEMMs: the column scale (feed-forward input scaling, output-mode
// y = z ⊙ l) and the one-pass backward that produces dl (and dz / dx, dbias) from dy (or dy W).
//
// Access pattern (csrc/README.md): a lane owns 8 consecutive columns of a row (16-byte accesses when plan::vec16
// allows), so a warp moves 256 consecutive elements per row.  Inputs and outputs never overlap (`__restrict__`;
// ext.cpp checks), so loads need not wait behind stores.  The backward's column sums are two-stage: per-block
// partials combined across warps in shared memory in a fixed order, then summed over the row splits by
// launch_sum_splits.  No atomics.
#include "common/dtype.cuh"
#include "common/launch.h"

namespace fastpeft {
namespace {

using plan::kG;
using plan::kTileK;

constexpr int kThreads = 256;
constexpr int kScaleCols = kThreads * kG;  // columns per block of the scale kernel

// grid: (ceil(M / kScaleRows), ceil(C / kScaleCols)): rows on grid.x, whose limit is 2^31 - 1.
template <typename TX, typename TL>
__global__ void __launch_bounds__(kThreads) ia3_scale_kernel(const TX* __restrict__ X, int64_t M, int64_t C,
                                                             int64_t ldx, bool xvec, const TL* __restrict__ l,
                                                             bool lvec, bool round_to_l, TX* __restrict__ out,
                                                             int64_t ldo, bool ovec) {
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x) * kG;
  if (c >= C) return;
  const int n = C - c < kG ? static_cast<int>(C - c) : kG;
  float lc[kG];
  load8(l + c, lvec, n, lc);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * plan::kScaleRows;
#pragma unroll
  for (int i = 0; i < plan::kScaleRows; ++i) {
    const int64_t m = m0 + i;
    if (m >= M) break;
    float v[kG];
    load8(X + m * ldx + c, xvec, n, v);
#pragma unroll
    for (int e = 0; e < kG; ++e) v[e] = round_to_l ? Cvt<TL>::round(Cvt<TL>::round(v[e]) * lc[e]) : v[e] * lc[e];
    store8(out + m * ldo + c, ovec, n, v);
  }
}

// grid: (ceil(C / kTileK), splits); block: kThreads.  The block owns 256 columns (lane L: c0 + 8L .. + 7) and a
// chunk of rows, which its 8 warps take in turn (warp w: rows mb + w, mb + w + 8, ...).
template <typename TX, typename TL>
__global__ void __launch_bounds__(kThreads) ia3_bwd_kernel(const TX* __restrict__ G, const TX* __restrict__ V,
                                                           int64_t M, int64_t C, bool vec, const TL* __restrict__ l,
                                                           TX* __restrict__ out, float* __restrict__ dl_dst,
                                                           float* __restrict__ db_dst, int64_t mchunk) {
  constexpr int kWarps = plan::kIa3Warps;
  static_assert(kWarps * 32 == kThreads, "one block = kIa3Warps warps");
  __shared__ float red[2][kWarps][kG][33];  // [dl | db][warp][column within the lane's 8][lane]
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTileK;
  const int64_t c = c0 + lane * kG;
  const int n = C - c < kG ? static_cast<int>(C - c) : kG;
  const int64_t mb = static_cast<int64_t>(blockIdx.y) * mchunk;
  const int64_t me = mb + mchunk < M ? mb + mchunk : M;
  float dl[kG], db[kG];
#pragma unroll
  for (int e = 0; e < kG; ++e) dl[e] = db[e] = 0.f;
  if (n > 0) {
    float lc[kG];
#pragma unroll
    for (int e = 0; e < kG; ++e) lc[e] = e < n ? ld_f(l + c + e) : 0.f;
    for (int64_t m = mb + warp; m < me; m += kWarps) {
      float g[kG], v[kG];
      load8(G + m * C + c, vec, n, g);
      load8(V + m * C + c, vec, n, v);
#pragma unroll
      for (int e = 0; e < kG; ++e) {
        g[e] = Cvt<TL>::round(g[e]);
        dl[e] = fmaf(g[e], Cvt<TL>::round(v[e]), dl[e]);
      }
      if (out != nullptr) {
#pragma unroll
        for (int e = 0; e < kG; ++e) {
          g[e] = Cvt<TX>::round(Cvt<TL>::round(g[e] * lc[e]));
          db[e] += g[e];
        }
        store8(out + m * C + c, vec, n, g);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < kG; ++e) {
    red[0][warp][e][lane] = dl[e];
    red[1][warp][e][lane] = db[e];
  }
  __syncthreads();
  // Thread t sums column c0 + t over the warps in order and writes it: consecutive threads, consecutive columns.
  const int64_t cg = c0 + threadIdx.x;
  if (cg >= C) return;
  const int e = threadIdx.x % kG, ln = threadIdx.x / kG;
  float sdl = 0.f, sdb = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    sdl += red[0][w][e][ln];
    sdb += red[1][w][e][ln];
  }
  const int64_t off = static_cast<int64_t>(blockIdx.y) * C;
  dl_dst[off + cg] = sdl;
  if (db_dst != nullptr) db_dst[off + cg] = sdb;
}

}  // namespace

void launch_ia3_scale(DType xt, DType lt, const void* X, int64_t M, int64_t C, int64_t ldx, const void* l,
                      bool round_to_l, void* out, int64_t ldo, cudaStream_t stream) {
  if (M <= 0 || C <= 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(M, plan::kScaleRows)), static_cast<unsigned>(ceil_div(C, kScaleCols)));
  FASTPEFT_DISPATCH_DTYPE(xt, TX, FASTPEFT_DISPATCH_DTYPE(lt, TL, {
    const int es = static_cast<int>(sizeof(TX));
    ia3_scale_kernel<TX, TL><<<grid, kThreads, 0, stream>>>(
        static_cast<const TX*>(X), M, C, ldx, plan::vec16(X, ldx, es), static_cast<const TL*>(l),
        plan::vec16(l, 0, static_cast<int>(sizeof(TL))), round_to_l, static_cast<TX*>(out), ldo,
        plan::vec16(out, ldo, es));
  }));
}

void launch_ia3_bwd(DType xt, DType lt, const void* G, const void* V, int64_t M, int64_t C, const void* l,
                    void* out, float* dl, float* dbias, float* workspace, int num_sms, cudaStream_t stream) {
  if (C <= 0) return;
  if (M <= 0) {
    launch_sum_splits(nullptr, 0, 1, C, 1.f, dl, C, stream);  // sums over no rows: 0
    if (dbias != nullptr) launch_sum_splits(nullptr, 0, 1, C, 1.f, dbias, C, stream);
    return;
  }
  const plan::Split sp = plan::ia3_bwd_split(M, C, num_sms);
  const dim3 grid(static_cast<unsigned>(ceil_div(C, kTileK)), static_cast<unsigned>(sp.splits));
  float* dl_dst = sp.splits > 1 ? workspace : dl;
  float* db_dst = dbias == nullptr ? nullptr : (sp.splits > 1 ? workspace + sp.splits * C : dbias);
  FASTPEFT_DISPATCH_DTYPE(xt, TX, FASTPEFT_DISPATCH_DTYPE(lt, TL, {
    const int es = static_cast<int>(sizeof(TX));
    // G, V and out are contiguous (M, C): one check of each base and of the row length decides the vector path.
    const bool vec = plan::vec16(G, C, es) && plan::vec16(V, C, es) && (out == nullptr || plan::vec16(out, C, es));
    ia3_bwd_kernel<TX, TL><<<grid, kThreads, 0, stream>>>(static_cast<const TX*>(G), static_cast<const TX*>(V), M, C,
                                                           vec, static_cast<const TL*>(l), static_cast<TX*>(out),
                                                           dl_dst, db_dst, sp.chunk);
  }));
  if (sp.splits > 1) {
    launch_sum_splits(workspace, sp.splits, 1, C, 1.f, dl, C, stream);
    if (dbias != nullptr) launch_sum_splits(workspace + sp.splits * C, sp.splits, 1, C, 1.f, dbias, C, stream);
  }
}

}  // namespace fastpeft
