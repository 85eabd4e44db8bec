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

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace fastpeft
