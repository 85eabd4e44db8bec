// cuBLASLt wrapper: one handle per device (created on first use), and one cached plan per problem signature
// (plan::gemm_key: shapes, leading dimensions, transposes, type, operand alignments, epilogue, pointer mode,
// workspace size, device) holding the matmul descriptor, the three layouts and the heuristic's algorithm, so a call
// after the first rebuilds nothing and only sets the bias pointer.  Bias and per-row alpha-vector epilogues,
// in-place beta = 1 accumulation.
#include "common/cublaslt.h"

#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "common/plan.h"

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

// A cached plan: descriptors and algorithm for one key.  Host objects only; they live until the process exits.
// `status` / `what` record a setup the heuristic refused (no algorithm for this type / epilogue / GPU), so that
// later calls report it at once instead of asking again.
struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo = {};
  bool has_bias = false;
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
  const char* what = "";
  // The bias pointer is an attribute of the shared descriptor: setting it and enqueueing the matmul (which reads
  // the descriptor on the host, during the call) happen under this lock.
  std::mutex mu;
  ~Plan() {
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

struct PrefHolder {
  cublasLtMatmulPreference_t pref = nullptr;
  ~PrefHolder() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
  }
};

std::mutex plans_mu;
std::unordered_map<std::string, std::unique_ptr<Plan>>& plans() {
  static auto* cache = new std::unordered_map<std::string, std::unique_ptr<Plan>>();
  return *cache;
}

#define FASTPEFT_LT(call, step)                 \
  do {                                          \
    const cublasStatus_t st_ = (call);          \
    if (st_ != CUBLAS_STATUS_SUCCESS) {         \
      *what = step;                             \
      return st_;                               \
    }                                           \
  } while (0)

// Builds the descriptors, layouts and preference for `g` and asks the heuristic for one algorithm.
cublasStatus_t build_plan(const LtGemm& g, cublasLtHandle_t handle, size_t ws_bytes, const plan::GemmKey& key,
                          Plan* p, const char** what) {
  const cudaDataType_t dt = to_cuda(g.dtype);
  FASTPEFT_LT(cublasLtMatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  const cublasOperation_t ta = g.transa ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t tb = g.transb ? CUBLAS_OP_T : CUBLAS_OP_N;
  FASTPEFT_LT(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), "TRANSA");
  FASTPEFT_LT(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), "TRANSB");
  if (g.alpha_vec != nullptr) {
    const cublasLtPointerMode_t pm = g.beta == 0.f ? CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_ZERO
                                                   : CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST;
    FASTPEFT_LT(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_POINTER_MODE, &pm, sizeof(pm)),
                "POINTER_MODE");
  }
  if (g.bias != nullptr) {
    const cublasLtEpilogue_t ep = CUBLASLT_EPILOGUE_BIAS;
    FASTPEFT_LT(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof(ep)), "EPILOGUE");
    FASTPEFT_LT(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)),
                "BIAS_POINTER");
    p->has_bias = true;
  }
  // Stored shapes: A is m × k (k × m when transposed), B is k × n (n × k when transposed), D is m × n.
  FASTPEFT_LT(cublasLtMatrixLayoutCreate(&p->a, dt, g.transa ? g.k : g.m, g.transa ? g.m : g.k, g.lda), "layout A");
  FASTPEFT_LT(cublasLtMatrixLayoutCreate(&p->b, dt, g.transb ? g.n : g.k, g.transb ? g.k : g.n, g.ldb), "layout B");
  FASTPEFT_LT(cublasLtMatrixLayoutCreate(&p->d, dt, g.m, g.n, g.ldd), "layout D");

  PrefHolder pref;
  FASTPEFT_LT(cublasLtMatmulPreferenceCreate(&pref.pref), "cublasLtMatmulPreferenceCreate");
  const uint64_t ws = ws_bytes;
  FASTPEFT_LT(
      cublasLtMatmulPreferenceSetAttribute(pref.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
      "PREF_MAX_WORKSPACE_BYTES");
  // The heuristic assumes 256-byte aligned operands unless told otherwise.
  FASTPEFT_LT(cublasLtMatmulPreferenceSetAttribute(pref.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &key.al_a,
                                                   sizeof(key.al_a)),
              "PREF_MIN_ALIGNMENT_A");
  FASTPEFT_LT(cublasLtMatmulPreferenceSetAttribute(pref.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &key.al_b,
                                                   sizeof(key.al_b)),
              "PREF_MIN_ALIGNMENT_B");
  FASTPEFT_LT(cublasLtMatmulPreferenceSetAttribute(pref.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &key.al_d,
                                                   sizeof(key.al_d)),
              "PREF_MIN_ALIGNMENT_C");
  FASTPEFT_LT(cublasLtMatmulPreferenceSetAttribute(pref.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &key.al_d,
                                                   sizeof(key.al_d)),
              "PREF_MIN_ALIGNMENT_D");
  cublasLtMatmulHeuristicResult_t result = {};
  int found = 0;
  FASTPEFT_LT(cublasLtMatmulAlgoGetHeuristic(handle, p->op, p->a, p->b, p->d, p->d, pref.pref, 1, &result, &found),
              "cublasLtMatmulAlgoGetHeuristic");
  if (found == 0) {
    *what = "cublasLtMatmulAlgoGetHeuristic found no algorithm";
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  p->algo = result.algo;
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

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
  plan::GemmKey key{};
  key.device = device;
  key.transa = g.transa;
  key.transb = g.transb;
  key.m = g.m;
  key.n = g.n;
  key.k = g.k;
  key.lda = g.lda;
  key.ldb = g.ldb;
  key.ldd = g.ldd;
  key.dtype = static_cast<int>(g.dtype);
  key.al_a = plan::ptr_alignment(g.A);
  key.al_b = plan::ptr_alignment(g.B);
  key.al_d = plan::ptr_alignment(g.D);
  key.al_bias = g.bias != nullptr ? plan::ptr_alignment(g.bias) : 0u;
  key.alpha_vec = g.alpha_vec != nullptr;
  key.beta_nonzero = g.beta != 0.f;
  key.workspace = ws_bytes;
  const std::string k = plan::gemm_key(key);

  Plan* p = nullptr;
  {
    std::lock_guard<std::mutex> lock(plans_mu);
    auto it = plans().find(k);
    if (it != plans().end()) {
      p = it->second.get();
    } else {
      auto fresh = std::make_unique<Plan>();
      const char* step = kNone;
      const cublasStatus_t st = build_plan(g, handle, ws_bytes, key, fresh.get(), &step);
      if (st != CUBLAS_STATUS_SUCCESS) {
        // Only the heuristic's "nothing fits" is a property of the key; other failures (allocation) may pass.
        if (st != CUBLAS_STATUS_NOT_SUPPORTED) {
          *what = step;
          return st;
        }
        fresh->status = st;
        fresh->what = step;
      }
      p = fresh.get();
      plans()[k] = std::move(fresh);
    }
  }
  if (p->status != CUBLAS_STATUS_SUCCESS) {
    *what = p->what;
    return p->status;
  }
  const void* alpha_ptr = g.alpha_vec != nullptr ? static_cast<const void*>(g.alpha_vec)
                                                 : static_cast<const void*>(&g.alpha);
  std::lock_guard<std::mutex> lock(p->mu);
  if (p->has_bias) {
    FASTPEFT_LT(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)),
                "BIAS_POINTER");
  }
  FASTPEFT_LT(cublasLtMatmul(handle, p->op, alpha_ptr, g.A, p->a, g.B, p->b, &g.beta, g.D, p->d, g.D, p->d, &p->algo,
                             workspace, ws_bytes, stream),
              "cublasLtMatmul");
  return CUBLAS_STATUS_SUCCESS;
}

#undef FASTPEFT_LT

}  // namespace fastpeft
