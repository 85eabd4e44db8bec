// Argument checks of the extension's ops.  Every message names the op, the argument and the offending value, so a
// bad call that slipped past the Python-side validation still says what is wrong.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

#include "common/launch.h"

namespace fastpeft {

inline void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), "fastpeft::", op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, "fastpeft::", op, ": ", name, " is on ", t.device(), " but x is on ", device);
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "fastpeft::", op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, "fastpeft::", op, ": ", name, " must have shape ", want, ", got ", t.sizes());
}

inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "fastpeft::", op, ": ", name,
              " must be float32, float16 or bfloat16, got ", st);
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want,
                             const char* as) {
  TORCH_CHECK(t.scalar_type() == want, "fastpeft::", op, ": ", name, " must have the dtype of ", as, " (", want,
              "), got ", t.scalar_type());
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), "fastpeft::", op, ": ", name, " must be contiguous, got strides ", t.strides());
}

inline void check_dropout(const char* op, double p, int64_t seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fastpeft::", op, ": dropout_p must be in [0, 1), got ", p);
  TORCH_CHECK(seed >= 0, "fastpeft::", op, ": seed must be in [0, 2**63), got ", seed);
}

inline DType to_dtype(at::ScalarType st) {
  switch (st) {
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      return DType::kFloat32;
  }
}

// p16 and scale exactly as fastpeft.ops.dropout.dropout_threshold computes them (philox::threshold; the host test
// in tests/test_cuda_ext.py checks the two agree bit for bit over many p).
inline DropoutParams make_dropout(double p, int64_t seed) {
  DropoutParams d;
  philox::threshold(p, &d.p16, &d.scale);
  d.on = d.p16 > 0u;
  d.seed = static_cast<uint64_t>(seed);
  return d;
}

inline DropoutParams no_dropout() { return make_dropout(0.0, 0); }

}  // namespace fastpeft
