// Element conversions through fp32 for the three activation / adapter types.  Uses the explicit intrinsics only, so
// it compiles under torch's -D__CUDA_NO_HALF_CONVERSIONS__ / -D__CUDA_NO_BFLOAT16_CONVERSIONS__ flags.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/launch.h"

namespace fastpeft {

template <typename T>
struct Cvt;

template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
  // fp32 value of v rounded to this type (identity for fp32).
  static __device__ __forceinline__ float round(float v) { return v; }
};

template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float round(float v) { return __half2float(__float2half_rn(v)); }
};

template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
};

template <typename T>
__device__ __forceinline__ float ld_f(const T* p) {
  return Cvt<T>::to_f(*p);
}

template <typename T>
__device__ __forceinline__ void st_f(T* p, float v) {
  *p = Cvt<T>::from_f(v);
}

// 16 bytes of T, for the vector path.
template <typename T>
struct alignas(16) Vec16 {
  T v[16 / sizeof(T)];
};

// Elements p[0..7] as fp32.  vec (p 16-byte aligned, all 8 in bounds): 16-byte loads; otherwise scalar loads of the
// first n (n < 8 at the end of a row), the rest 0.
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ p, bool vec, int n, float (&out)[8]) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  if (vec && n >= 8) {
#pragma unroll
    for (int h = 0; h < 8 / kPer; ++h) {
      const Vec16<T> pk = reinterpret_cast<const Vec16<T>*>(p)[h];
#pragma unroll
      for (int i = 0; i < kPer; ++i) out[h * kPer + i] = Cvt<T>::to_f(pk.v[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = i < n ? ld_f(p + i) : 0.f;
  }
}

// Stores v[0..n-1] to p[0..n-1] (rounded to T); 16-byte stores when vec and n >= 8.
template <typename T>
__device__ __forceinline__ void store8(T* __restrict__ p, bool vec, int n, const float (&v)[8]) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  if (vec && n >= 8) {
#pragma unroll
    for (int h = 0; h < 8 / kPer; ++h) {
      Vec16<T> pk;
#pragma unroll
      for (int i = 0; i < kPer; ++i) pk.v[i] = Cvt<T>::from_f(v[h * kPer + i]);
      reinterpret_cast<Vec16<T>*>(p)[h] = pk;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < n) st_f(p + i, v[i]);
  }
}

// Shared-memory tiles of 256 columns x 16 ranks (fp32), read by each lane as two float4 at its 8 columns: 4 floats
// of padding after every 32 make those reads conflict-free (a quarter warp's 8 float4 land on 32 distinct banks),
// and the row length kPadRow = 292 (= 4 mod 32) spreads a column's 16 ranks over 8 banks for the loads that fill a
// tile rank-fastest.
constexpr int kPadRow = plan::kTileK + plan::kTileK / 32 * 4 + 4;
__device__ __forceinline__ int padk(int cc) { return cc + (cc >> 5) * 4; }

// The 8 values of a padded tile row at columns cc .. cc + 7 (cc a multiple of 8).
__device__ __forceinline__ void lds8(const float* row, int cc, float (&out)[8]) {
  const float4 lo = *reinterpret_cast<const float4*>(row + padk(cc));
  const float4 hi = *reinterpret_cast<const float4*>(row + padk(cc + 4));
  out[0] = lo.x; out[1] = lo.y; out[2] = lo.z; out[3] = lo.w;
  out[4] = hi.x; out[5] = hi.y; out[6] = hi.z; out[7] = hi.w;
}

// Calls f.template operator()<T>() with T the C++ type of `dt`.
#define FASTPEFT_DISPATCH_DTYPE(dt, TYPE, ...)                                 \
  do {                                                                         \
    switch (dt) {                                                              \
      case ::fastpeft::DType::kFloat32: {                                      \
        using TYPE = float;                                                    \
        __VA_ARGS__;                                                           \
        break;                                                                 \
      }                                                                        \
      case ::fastpeft::DType::kFloat16: {                                      \
        using TYPE = __half;                                                   \
        __VA_ARGS__;                                                           \
        break;                                                                 \
      }                                                                        \
      case ::fastpeft::DType::kBFloat16: {                                     \
        using TYPE = __nv_bfloat16;                                            \
        __VA_ARGS__;                                                           \
        break;                                                                 \
      }                                                                        \
    }                                                                          \
  } while (0)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return plan::cdiv(a, b); }

}  // namespace fastpeft
