// Fused decode kernel (M <= 16 rows): y = x Wᵀ + b + s · Se Bᵀ with W read exactly once.
//
// At small M the base layer is bound by reading W; the unfused LoRA path pays in launches, not bytes.  Each warp
// owns kNPW output features n, streams their rows of W with 16-byte loads, multiplies them with all M rows of x
// (x is tiny and stays in L1/L2), and adds the bias and the LoRA term (Se is computed beforehand by the shrink).
#include <stdint.h>

#include "common/dtype.cuh"
#include "common/launch.h"

namespace fastpeft {
namespace {

constexpr int kDecodeWarps = 4;
constexpr int kNPW = 4;  // output features per warp: x loads are reused kNPW times

template <typename T, int VEC>
struct alignas(16) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = ld_f(p);
  } else {
    const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = Cvt<T>::to_f(pk.v[i]);
  }
}

// grid: ceil(N / (kDecodeWarps * kNPW)); block: 32 * kDecodeWarps.  MT >= M is the compile-time row capacity.
template <typename TX, int MT, int VEC>
__global__ void __launch_bounds__(32 * kDecodeWarps) decode_kernel(const TX* __restrict__ X, int M, int64_t K,
                                                                   const TX* __restrict__ W, int64_t ldw,
                                                                   int64_t N, const TX* __restrict__ bias,
                                                                   const float* __restrict__ P, int r,
                                                                   const float* __restrict__ B, float alpha,
                                                                   TX* __restrict__ Y) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kDecodeWarps + warp) * kNPW;
  if (n0 >= N) return;  // whole warp leaves together

  float acc[kNPW][MT];
#pragma unroll
  for (int i = 0; i < kNPW; ++i)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[i][m] = 0.f;

  for (int64_t k = static_cast<int64_t>(lane) * VEC; k < K; k += 32 * VEC) {
    float w[kNPW][VEC];
#pragma unroll
    for (int i = 0; i < kNPW; ++i) {
      if (n0 + i < N) {
        load_vec<TX, VEC>(W + (n0 + i) * ldw + k, w[i]);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) w[i][v] = 0.f;
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {
        float xv[VEC];
        load_vec<TX, VEC>(X + static_cast<int64_t>(m) * K + k, xv);
#pragma unroll
        for (int i = 0; i < kNPW; ++i)
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[i][m] = fmaf(xv[v], w[i][v], acc[i][m]);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kNPW; ++i)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[i][m] = warp_sum(acc[i][m]);

  // Spread the epilogues (bias + rank-r dot) over the lanes; indices stay compile-time constants.
#pragma unroll
  for (int i = 0; i < kNPW; ++i) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const int64_t n = n0 + i;
      if (lane == ((i * MT + m) & 31) && m < M && n < N) {
        float lora = 0.f;
        for (int j = 0; j < r; ++j)
          lora = fmaf(__ldg(P + static_cast<int64_t>(m) * r + j), __ldg(B + n * r + j), lora);
        const float b = bias != nullptr ? ld_f(bias + n) : 0.f;
        st_f(Y + static_cast<int64_t>(m) * N + n, acc[i][m] + b + alpha * lora);
      }
    }
  }
}

template <typename TX, int MT>
void launch_mt(bool vec, const void* X, int M, int64_t K, const void* W, int64_t ldw, int64_t N, const void* bias,
               const float* P, int r, const float* B, float alpha, void* Y, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(ceil_div(N, kDecodeWarps * kNPW));
  constexpr int kVec = 16 / static_cast<int>(sizeof(TX));
  if (vec) {
    decode_kernel<TX, MT, kVec><<<grid, 32 * kDecodeWarps, 0, stream>>>(
        static_cast<const TX*>(X), M, K, static_cast<const TX*>(W), ldw, N, static_cast<const TX*>(bias), P, r,
        B, alpha, static_cast<TX*>(Y));
  } else {
    decode_kernel<TX, MT, 1><<<grid, 32 * kDecodeWarps, 0, stream>>>(
        static_cast<const TX*>(X), M, K, static_cast<const TX*>(W), ldw, N, static_cast<const TX*>(bias), P, r,
        B, alpha, static_cast<TX*>(Y));
  }
}

}  // namespace

bool launch_decode_gemv(DType xt, const void* X, int64_t M, int64_t K, const void* W, int64_t ldw,
                        int64_t N, const void* bias, const float* P, int r, const float* B, float alpha, void* Y,
                        cudaStream_t stream) {
  if (M > 16) return false;
  if (M <= 0 || N <= 0) return true;
  const int elem = xt == DType::kFloat32 ? 4 : 2;
  // 16-byte loads need both bases and every row start 16-byte aligned (X's rows are K long); the k loop has no
  // scalar tail, so K a multiple of the vector width, which X's check implies.
  const bool aligned = plan::vec16(X, K, elem) && plan::vec16(W, ldw, elem);
  const int m = static_cast<int>(M);
  FASTPEFT_DISPATCH_DTYPE(xt, TX, {
    // Three row capacities keep the number of instantiations (and the compile time) down; rows beyond M are
    // skipped by a warp-uniform branch.
    if (m <= 1) {
      launch_mt<TX, 1>(aligned, X, m, K, W, ldw, N, bias, P, r, B, alpha, Y, stream);
    } else if (m <= 4) {
      launch_mt<TX, 4>(aligned, X, m, K, W, ldw, N, bias, P, r, B, alpha, Y, stream);
    } else {
      launch_mt<TX, 16>(aligned, X, m, K, W, ldw, N, bias, P, r, B, alpha, Y, stream);
    }
  });
  return true;
}

}  // namespace fastpeft
