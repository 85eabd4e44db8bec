// Second stage of the split reductions (common/launch.h): out = alpha * sum over the splits of the partials, in
// split order, one thread per output element with consecutive threads on consecutive elements.
#include "common/dtype.cuh"
#include "common/launch.h"

namespace fastpeft {
namespace {

constexpr int kSumThreads = 256;

__global__ void __launch_bounds__(kSumThreads) sum_splits_kernel(const float* __restrict__ part, int64_t splits,
                                                                 int64_t rows, int64_t cols, float alpha,
                                                                 float* __restrict__ out, int64_t ldo) {
  const int64_t n = rows * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kSumThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kSumThreads) {
    float s = 0.f;
    for (int64_t k = 0; k < splits; ++k) s += part[k * n + i];
    out[(i / cols) * ldo + i % cols] = alpha * s;
  }
}

}  // namespace

void launch_sum_splits(const float* part, int64_t splits, int64_t rows, int64_t cols, float alpha, float* out,
                       int64_t ldo, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return;
  const int64_t blocks = plan::imin(ceil_div(rows * cols, kSumThreads), 65535);
  sum_splits_kernel<<<static_cast<unsigned>(blocks), kSumThreads, 0, stream>>>(part, splits, rows, cols, alpha,
                                                                               out, ldo);
}

}  // namespace fastpeft
