// Philox-4x32-10 dropout stream shared with fastpeft/ops/dropout.py (the definition) and the Triton kernels.
//
//   element i = m*K + k of the logical (M, K) input
//   (c0, ..) = philox4x32_10(counter = (i & 0xffffffff, i >> 32, 0, 0), key = (seed & 0xffffffff, seed >> 32))
//   keep     = (c0 >> 8) * 2^-24 >= fp32(p);   kept values are multiplied by fp32(1 / (1 - p))
//
// Header-only and usable from host code (plain C++, g++) as well as device code (nvcc), so that CI can compile the
// very same rounds on the CPU and compare them bit for bit with the torch reference (tests/test_cuda_ext.py).
#pragma once

#include <stdint.h>

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

FASTPEFT_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
#endif
}

// First output word of Philox-4x32-10 for counter (lo, hi, 0, 0) and the key taken from `seed`.
FASTPEFT_HD uint32_t philox_c0(uint64_t seed, uint32_t lo, uint32_t hi) {
  uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffull);
  uint32_t k1 = static_cast<uint32_t>((seed >> 32) & 0xffffffffull);
  uint32_t c0 = lo, c1 = hi, c2 = 0u, c3 = 0u;
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
  return c0;
}

// The uniform in [0, 1) of element `index`: (c0 >> 8) * 2^-24, exact in fp32.
FASTPEFT_HD float uniform(uint64_t seed, uint64_t index) {
  const uint32_t c0 = philox_c0(seed, static_cast<uint32_t>(index & 0xffffffffull),
                                static_cast<uint32_t>(index >> 32));
  return static_cast<float>(c0 >> 8) * 5.9604644775390625e-08f;  // 2^-24
}

// True where element `index` is kept for drop probability `p_f32` (already rounded to fp32 by the caller).
FASTPEFT_HD bool keep(uint64_t seed, uint64_t index, float p_f32) { return uniform(seed, index) >= p_f32; }

}  // namespace philox

// Dropout parameters as every kernel receives them.  `p` and `scale` are the fp32 roundings of p and 1/(1-p),
// computed on the host in double precision exactly as fastpeft/ops/dropout.py does.
struct DropoutParams {
  bool on;         // p > 0
  float p;         // fp32(p)
  float scale;     // fp32(1 / (1 - p))
  uint64_t seed;   // Philox key
};

}  // namespace fastpeft
