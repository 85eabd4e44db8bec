// cuBLASLt wrapper: one handle per device (created on first use), heuristics queried per call with the real
// pointer alignments, the bias and per-row alpha-vector epilogues, in-place beta = 1 accumulation.
#include "common/cublaslt.h"

#include <cstdio>
#include <mutex>
#include <string>
#include <unordered_map>

namespace fastpeft {
namespace {

constexpr int kMaxDevices = 64;

cublasLtHandle_t handle_for(int device, cublasStatus_t* status) {
  static std::mutex mu;
  static cublasLtHandle_t handles[kMaxDevices] = {};
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0 || device >= kMaxDevices) {
    *status = CUBLAS_STATUS_INVALID_VALUE;
    return nullptr;
  }
  if (handles[device] == nullptr) {
    *status = cublasLtCreate(&handles[device]);
    if (*status != CUBLAS_STATUS_SUCCESS) {
      handles[device] = nullptr;
      return nullptr;
    }
  }
  *status = CUBLAS_STATUS_SUCCESS;
  return handles[device];
}

cudaDataType_t to_cuda(DType t) {
  switch (t) {
    case DType::kFloat16:
      return CUDA_R_16F;
    case DType::kBFloat16:
      return CUDA_R_16BF;
    case DType::kFloat32:
    default:
      return CUDA_R_32F;
  }
}

uint32_t alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && (a % al) != 0) al >>= 1;
  return al;
}

// RAII holders so every early return releases the descriptors.
struct Desc {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~Desc() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

// Heuristic results per problem signature: the heuristic query costs tens of microseconds of CPU per call, which
// matters at small M.  The key holds everything the choice depends on (shapes, leading dimensions, transposes,
// type, alignments, epilogue, pointer mode, workspace size, device).
std::mutex algo_mu;
std::unordered_map<std::string, cublasLtMatmulAlgo_t>& algo_cache() {
  static std::unordered_map<std::string, cublasLtMatmulAlgo_t> cache;
  return cache;
}

std::string algo_key(const LtGemm& g, int device, size_t ws, uint32_t al_a, uint32_t al_b, uint32_t al_d,
                     uint32_t al_bias) {
  char buf[320];
  std::snprintf(buf, sizeof(buf), "%d|%d%d|%lld,%lld,%lld|%lld,%lld,%lld|%d|%u,%u,%u,%u|%d%d|%d|%zu", device,
                g.transa ? 1 : 0, g.transb ? 1 : 0, static_cast<long long>(g.m), static_cast<long long>(g.n),
                static_cast<long long>(g.k), static_cast<long long>(g.lda), static_cast<long long>(g.ldb),
                static_cast<long long>(g.ldd), static_cast<int>(g.dtype), al_a, al_b, al_d, al_bias,
                g.alpha_vec != nullptr ? 1 : 0, g.bias != nullptr ? 1 : 0, g.beta != 0.f ? 1 : 0, ws);
  return std::string(buf);
}

}  // namespace

#define FASTPEFT_LT(call, step)                 \
  do {                                          \
    const cublasStatus_t st_ = (call);          \
    if (st_ != CUBLAS_STATUS_SUCCESS) {         \
      *what = step;                             \
      return st_;                               \
    }                                           \
  } while (0)

cublasStatus_t lt_matmul(const LtGemm& g, void* workspace, size_t ws_bytes, int device, cudaStream_t stream,
                         const char** what) {
  static const char* kNone = "";
  *what = kNone;
  cublasStatus_t hs = CUBLAS_STATUS_SUCCESS;
  cublasLtHandle_t handle = handle_for(device, &hs);
  if (handle == nullptr) {
    *what = "cublasLtCreate";
    return hs;
  }
  const cudaDataType_t dt = to_cuda(g.dtype);
  Desc desc;
  FASTPEFT_LT(cublasLtMatmulDescCreate(&desc.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  const cublasOperation_t ta = g.transa ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t tb = g.transb ? CUBLAS_OP_T : CUBLAS_OP_N;
  FASTPEFT_LT(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), "TRANSA");
  FASTPEFT_LT(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), "TRANSB");
  if (g.alpha_vec != nullptr) {
    const cublasLtPointerMode_t pm = g.beta == 0.f ? CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_ZERO
                                                   : CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST;
    FASTPEFT_LT(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_POINTER_MODE, &pm, sizeof(pm)),
                "POINTER_MODE");
  }
  if (g.bias != nullptr) {
    const cublasLtEpilogue_t ep = CUBLASLT_EPILOGUE_BIAS;
    FASTPEFT_LT(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof(ep)),
                "EPILOGUE");
    FASTPEFT_LT(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)),
                "BIAS_POINTER");
  }
  // Stored shapes: A is m × k (k × m when transposed), B is k × n (n × k when transposed), D is m × n.
  FASTPEFT_LT(cublasLtMatrixLayoutCreate(&desc.a, dt, g.transa ? g.k : g.m, g.transa ? g.m : g.k, g.lda),
              "layout A");
  FASTPEFT_LT(cublasLtMatrixLayoutCreate(&desc.b, dt, g.transb ? g.n : g.k, g.transb ? g.k : g.n, g.ldb),
              "layout B");
  FASTPEFT_LT(cublasLtMatrixLayoutCreate(&desc.d, dt, g.m, g.n, g.ldd), "layout D");

  FASTPEFT_LT(cublasLtMatmulPreferenceCreate(&desc.pref), "cublasLtMatmulPreferenceCreate");
  const uint64_t ws = ws_bytes;
  FASTPEFT_LT(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                                   sizeof(ws)),
              "PREF_MAX_WORKSPACE_BYTES");
  // The heuristic assumes 256-byte aligned operands unless told otherwise; views at an offset are not.
  const uint32_t al_a = alignment(g.A), al_b = alignment(g.B), al_d = alignment(g.D);
  FASTPEFT_LT(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a,
                                                   sizeof(al_a)),
              "PREF_MIN_ALIGNMENT_A");
  FASTPEFT_LT(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b,
                                                   sizeof(al_b)),
              "PREF_MIN_ALIGNMENT_B");
  FASTPEFT_LT(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_d,
                                                   sizeof(al_d)),
              "PREF_MIN_ALIGNMENT_C");
  FASTPEFT_LT(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d,
                                                   sizeof(al_d)),
              "PREF_MIN_ALIGNMENT_D");

  const std::string key = algo_key(g, device, ws_bytes, al_a, al_b, al_d, g.bias != nullptr ? alignment(g.bias) : 0);
  cublasLtMatmulAlgo_t algo;
  bool cached = false;
  {
    std::lock_guard<std::mutex> lock(algo_mu);
    auto it = algo_cache().find(key);
    if (it != algo_cache().end()) {
      algo = it->second;
      cached = true;
    }
  }
  if (!cached) {
    cublasLtMatmulHeuristicResult_t result = {};
    int found = 0;
    FASTPEFT_LT(cublasLtMatmulAlgoGetHeuristic(handle, desc.op, desc.a, desc.b, desc.d, desc.d, desc.pref, 1,
                                               &result, &found),
                "cublasLtMatmulAlgoGetHeuristic");
    if (found == 0) {
      *what = "cublasLtMatmulAlgoGetHeuristic found no algorithm";
      return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    algo = result.algo;
    std::lock_guard<std::mutex> lock(algo_mu);
    algo_cache()[key] = algo;
  }
  const void* alpha_ptr = g.alpha_vec != nullptr ? static_cast<const void*>(g.alpha_vec)
                                                 : static_cast<const void*>(&g.alpha);
  FASTPEFT_LT(cublasLtMatmul(handle, desc.op, alpha_ptr, g.A, desc.a, g.B, desc.b, &g.beta, g.D, desc.d, g.D, desc.d,
                             &algo, workspace, ws_bytes, stream),
              "cublasLtMatmul");
  return CUBLAS_STATUS_SUCCESS;
}

#undef FASTPEFT_LT

}  // namespace fastpeft
