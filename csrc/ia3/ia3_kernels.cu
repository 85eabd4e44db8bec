// (IA)³ elementwise kernels around the cuBLASLt GEMMs: the column scale (feed-forward input scaling, output-mode
// y = z ⊙ l) and the one-pass backward that produces dl (and dz / dx, dbias) from dy (or dy W).
#include <algorithm>

#include "common/dtype.cuh"
#include "common/launch.h"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;
constexpr int kScaleRows = 8;

// grid: (ceil(M / kScaleRows), ceil(C / kThreads)): rows on grid.x, whose limit is 2^31 - 1.
template <typename TX, typename TL>
__global__ void __launch_bounds__(kThreads) ia3_scale_kernel(const TX* X, int64_t M, int64_t C, int64_t ldx,
                                                             const TL* __restrict__ l, bool round_to_l, TX* out,
                                                             int64_t ldo) {
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (c >= C) return;
  const float lc = ld_f(l + c);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kScaleRows;
#pragma unroll
  for (int i = 0; i < kScaleRows; ++i) {
    const int64_t m = m0 + i;
    if (m < M) {
      float v = ld_f(X + m * ldx + c);
      v = round_to_l ? Cvt<TL>::round(Cvt<TL>::round(v) * lc) : v * lc;
      st_f(out + m * ldo + c, v);
    }
  }
}

// grid: (ceil(C / kThreads), m_splits); one thread per column, looping over its chunk of rows.
template <typename TX, typename TL>
__global__ void __launch_bounds__(kThreads) ia3_bwd_kernel(const TX* G, const TX* __restrict__ V, int64_t M,
                                                           int64_t C, const TL* __restrict__ l, TX* out,
                                                           float* __restrict__ dl_acc, float* __restrict__ db_acc,
                                                           int64_t mchunk) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= C) return;
  const int64_t mb = static_cast<int64_t>(blockIdx.y) * mchunk;
  const int64_t me = mb + mchunk < M ? mb + mchunk : M;
  const float lc = ld_f(l + c);
  float dl = 0.f, db = 0.f;
  for (int64_t m = mb; m < me; ++m) {
    const float g = Cvt<TL>::round(ld_f(G + m * C + c));
    dl = fmaf(g, Cvt<TL>::round(ld_f(V + m * C + c)), dl);
    if (out != nullptr) {
      const float o = Cvt<TX>::round(Cvt<TL>::round(g * lc));
      st_f(out + m * C + c, o);  // may overwrite G[m, c], which this thread alone reads, already read above
      db += o;
    }
  }
  atomicAdd(dl_acc + c, dl);
  if (db_acc != nullptr) atomicAdd(db_acc + c, db);
}

}  // namespace

void launch_ia3_scale(DType xt, DType lt, const void* X, int64_t M, int64_t C, int64_t ldx, const void* l,
                      bool round_to_l, void* out, int64_t ldo, cudaStream_t stream) {
  if (M <= 0 || C <= 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(M, kScaleRows)), static_cast<unsigned>(ceil_div(C, kThreads)));
  FASTPEFT_DISPATCH_DTYPE(xt, TX, FASTPEFT_DISPATCH_DTYPE(lt, TL, {
    ia3_scale_kernel<TX, TL><<<grid, kThreads, 0, stream>>>(static_cast<const TX*>(X), M, C, ldx,
                                                             static_cast<const TL*>(l), round_to_l,
                                                             static_cast<TX*>(out), ldo);
  }));
}

void launch_ia3_bwd(DType xt, DType lt, const void* G, const void* V, int64_t M, int64_t C, const void* l,
                    void* out, float* dl_acc, float* dbias_acc, int num_sms, cudaStream_t stream) {
  if (M <= 0 || C <= 0) return;
  const int64_t col_blocks = ceil_div(C, kThreads);
  const int64_t want = std::max<int64_t>(1, ceil_div(4LL * std::max(num_sms, 1), col_blocks));
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(want, ceil_div(M, 64)));
  const int64_t mchunk = ceil_div(M, splits);
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(ceil_div(M, mchunk)));
  FASTPEFT_DISPATCH_DTYPE(xt, TX, FASTPEFT_DISPATCH_DTYPE(lt, TL, {
    ia3_bwd_kernel<TX, TL><<<grid, kThreads, 0, stream>>>(static_cast<const TX*>(G), static_cast<const TX*>(V), M,
                                                           C, static_cast<const TL*>(l), static_cast<TX*>(out),
                                                           dl_acc, dbias_acc, mchunk);
  }));
}

}  // namespace fastpeft
