// Philox-4x32-10 dropout stream shared with fastpeft/ops/dropout.py (the definition) and the Triton kernels.
//
//   element (m, k) of the logical (M, K) input; one Philox call serves the 8 elements k = 8g .. 8g + 7 of row m:
//   (r0, r1, r2, r3) = philox4x32_10(counter = (k >> 3, m & 0xffffffff, m >> 32, 0),
//                                    key = (seed & 0xffffffff, seed >> 32))
//   u16  = (r[(k & 7) >> 1] >> (16 * (k & 1))) & 0xffff
//   keep = u16 >= p16;   kept values are multiplied by scale
//   p16 = min(round_half_even(p * 65536), 65535), scale = fp32(65536 / (65536 - p16))   (see `threshold`)
//
// Header-only and usable from host code (plain C++, g++) as well as device code (nvcc), so that CI can compile the
// very same rounds on the CPU and compare them bit for bit with the torch reference (tests/test_cuda_ext.py).
#pragma once

#include <stdint.h>

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

#if defined(__CUDACC__)
#define FASTPEFT_HD __host__ __device__ __forceinline__
#else
#define FASTPEFT_HD inline
#endif

namespace fastpeft {
namespace philox {

constexpr uint32_t kRoundA = 0xD2511F53u;  // multiplies counter word 0
constexpr uint32_t kRoundB = 0xCD9E8D57u;  // multiplies counter word 2
constexpr uint32_t kKeyA = 0x9E3779B9u;    // Weyl increment of key word 0
constexpr uint32_t kKeyB = 0xBB67AE85u;    // Weyl increment of key word 1
constexpr int kRounds = 10;
constexpr int kGroup = 8;  // elements of a row per Philox call

FASTPEFT_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
#endif
}

// All four output words of Philox-4x32-10 for counter (c0, c1, c2, c3) and the key taken from `seed`.
FASTPEFT_HD void philox4x32_10(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t out[4]) {
  uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffull);
  uint32_t k1 = static_cast<uint32_t>((seed >> 32) & 0xffffffffull);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kRounds; ++round) {
    const uint32_t hi_b = mulhi32(c2, kRoundB);
    const uint32_t lo_b = c2 * kRoundB;
    const uint32_t hi_a = mulhi32(c0, kRoundA);
    const uint32_t lo_a = c0 * kRoundA;
    const uint32_t n0 = hi_b ^ c1 ^ k0;
    const uint32_t n2 = hi_a ^ c3 ^ k1;
    c0 = n0;
    c1 = lo_b;
    c2 = n2;
    c3 = lo_a;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// First output word for counter (lo, hi, 0, 0): the known-answer check against Random123's vectors.
FASTPEFT_HD uint32_t philox_c0(uint64_t seed, uint32_t lo, uint32_t hi) {
  uint32_t r[4];
  philox4x32_10(seed, lo, hi, 0u, 0u, r);
  return r[0];
}

// The 8 16-bit uniforms of row `m`, group `g` (columns 8g .. 8g + 7), u[j] for column 8g + j.
FASTPEFT_HD void uniforms16(uint64_t seed, uint64_t m, uint64_t g, uint32_t u[kGroup]) {
  uint32_t r[4];
  philox4x32_10(seed, static_cast<uint32_t>(g & 0xffffffffull), static_cast<uint32_t>(m & 0xffffffffull),
                static_cast<uint32_t>(m >> 32), 0u, r);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int w = 0; w < 4; ++w) {
    u[2 * w] = r[w] & 0xffffu;
    u[2 * w + 1] = r[w] >> 16;
  }
}

// Keep bits of row `m`, group `g`: bit j set when column 8g + j is kept (u16 >= p16).  One Philox call.
FASTPEFT_HD uint32_t keep_bits8(uint64_t seed, uint64_t m, uint64_t g, uint32_t p16) {
  uint32_t u[kGroup];
  uniforms16(seed, m, g, u);
  uint32_t bits = 0u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < kGroup; ++j) bits |= (u[j] >= p16 ? 1u : 0u) << j;
  return bits;
}

// Single-element form (one full Philox call per element: for tests and scalar code paths only).
FASTPEFT_HD uint32_t uniform16(uint64_t seed, uint64_t m, uint64_t k) {
  uint32_t u[kGroup];
  uniforms16(seed, m, k >> 3, u);
  return u[k & 7];
}

FASTPEFT_HD bool keep(uint64_t seed, uint64_t m, uint64_t k, uint32_t p16) { return uniform16(seed, m, k) >= p16; }

#if !defined(__CUDA_ARCH__)
// p16 = min(round_half_even(p * 65536), 65535) and scale = fp32(65536 / (65536 - p16)): the same two correctly
// rounded IEEE double operations (then one rounding to fp32) as fastpeft.ops.dropout.dropout_threshold, whose
// values the Python side also passes to the Triton kernels.  p * 65536 is exact (a power of two); nearbyint rounds
// half to even in the default rounding mode, like Python's round.  Host only; requires 0 <= p < 1.
inline void threshold(double p, uint32_t* p16, float* scale) {
  double t = std::nearbyint(p * 65536.0);
  if (t > 65535.0) t = 65535.0;
  if (t < 0.0) t = 0.0;
  *p16 = static_cast<uint32_t>(t);
  *scale = static_cast<float>(65536.0 / static_cast<double>(65536u - *p16));
}
#endif

}  // namespace philox

// Dropout parameters as every kernel receives them (built on the host by make_dropout, see philox::threshold).
struct DropoutParams {
  bool on;         // p16 > 0 (p below 2^-17 rounds to no dropout at all, exactly as in the torch reference)
  uint32_t p16;    // keep when the 16-bit uniform is >= p16
  float scale;     // fp32(65536 / (65536 - p16))
  uint64_t seed;   // Philox key
};

}  // namespace fastpeft
