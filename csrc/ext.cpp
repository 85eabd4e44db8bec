// fastpeft._C: the cuBLASLt-anchored LoRA / AdaLoRA / (IA)³ ops and the fused decode op.
//
// Schemas live in the `fastpeft` namespace (a FRAGMENT: the Python side defines other fastpeft ops through
// torch.library.custom_op); CUDA implementations below; fake (meta) kernels are registered in fastpeft/_cuda.py.
// Every op runs under a CUDAGuard for x's device, on the current stream, and allocates through the caching
// allocator.  Conventions (shapes, dtypes, what is returned empty) are exactly those of fastpeft/ops/{lora,ia3}.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <tuple>

#include "common/checks.h"
#include "common/cublaslt.h"
#include "common/launch.h"

namespace fastpeft {
namespace {

constexpr size_t kWorkspaceBytes = 32u << 20;  // cuBLASLt workspace per GEMM call (caching allocator, reused)

int num_sms(int device) {
  static std::mutex mu;
  static int cache[64] = {};
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0 || device >= 64) return 132;
  if (cache[device] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
      (void)cudaGetLastError();
      n = 132;
    }
    cache[device] = n;
  }
  return cache[device];
}

// fp32 scratch for the split reductions' partials (common/plan.h says how many elements; the caching allocator
// makes this cheap).  Never zero-filled: every element a kernel reads was written by the first stage.
at::Tensor workspace(const at::Tensor& like, int64_t elems) {
  return at::empty({std::max<int64_t>(elems, 1)}, like.options().dtype(at::kFloat));
}

void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "fastpeft::", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// A weight (N, K) as cuBLASLt sees it: row-major (stride (ld, 1)) or a transposed view of a row-major (K, N)
// buffer (stride (1, ld)), e.g. Conv1D's weight.t().  Anything else is made contiguous.
struct WeightView {
  at::Tensor t;
  bool rowmajor;
  int64_t ld;
};

WeightView weight_view(const at::Tensor& w) {
  const int64_t n = w.size(0), k = w.size(1);
  if (w.stride(1) == 1 && w.stride(0) >= std::max<int64_t>(1, k)) return {w, true, std::max<int64_t>(1, w.stride(0))};
  if (w.stride(0) == 1 && w.stride(1) >= std::max<int64_t>(1, n)) return {w, false, std::max<int64_t>(1, w.stride(1))};
  at::Tensor c = w.contiguous();
  return {c, true, std::max<int64_t>(1, k)};
}

// Runs the GEMM; returns cuBLASLt's status, `*what` naming the failing step ("cublasLtMatmul" only when the launch
// itself failed: any other step fails before anything ran).
cublasStatus_t try_gemm(const LtGemm& g, const at::Tensor& like, const char** what) {
  at::Tensor ws = at::empty({static_cast<int64_t>(kWorkspaceBytes)}, like.options().dtype(at::kByte));
  const int dev = like.get_device();
  return lt_matmul(g, ws.data_ptr(), kWorkspaceBytes, dev, c10::cuda::getCurrentCUDAStream(dev).stream(), what);
}

void run_gemm(const char* op, const LtGemm& g, const at::Tensor& like) {
  const char* what = "";
  const cublasStatus_t st = try_gemm(g, like, &what);
  TORCH_CHECK(st == CUBLAS_STATUS_SUCCESS, "fastpeft::", op, ": cuBLASLt failed in ", what, " (status ",
              static_cast<int>(st), ")");
}

// y (M, N) [+]= x (M, K) · Wᵀ (+ bias) ; alpha_vec scales each output feature n.
LtGemm linear_gemm(const at::Tensor& x, const WeightView& w, const at::Tensor* bias, at::Tensor& y, float beta,
                   const float* alpha_vec) {
  LtGemm g;
  g.m = w.t.size(0);
  g.n = x.size(0);
  g.k = x.size(1);
  g.transa = w.rowmajor;
  g.A = w.t.data_ptr();
  g.lda = w.ld;
  g.transb = false;
  g.B = x.data_ptr();
  g.ldb = std::max<int64_t>(x.stride(0), std::max<int64_t>(1, g.k));
  g.D = y.data_ptr();
  g.ldd = std::max<int64_t>(1, g.m);
  g.dtype = to_dtype(x.scalar_type());
  g.beta = beta;
  g.alpha_vec = alpha_vec;
  g.bias = bias != nullptr ? bias->data_ptr() : nullptr;
  return g;
}

void linear_into(const char* op, const at::Tensor& x, const WeightView& w, const at::Tensor* bias, at::Tensor& y,
                 float beta) {
  run_gemm(op, linear_gemm(x, w, bias, y, beta, nullptr), x);
}

// dx (M, K) [+]= dy (M, N) · W (N, K).
void input_grad_into(const char* op, const at::Tensor& dy, const WeightView& w, at::Tensor& dx, float beta) {
  LtGemm g;
  g.m = w.t.size(1);
  g.n = dy.size(0);
  g.k = dy.size(1);
  g.transa = !w.rowmajor;
  g.A = w.t.data_ptr();
  g.lda = w.ld;
  g.transb = false;
  g.B = dy.data_ptr();
  g.ldb = std::max<int64_t>(1, g.k);
  g.D = dx.data_ptr();
  g.ldd = std::max<int64_t>(1, g.m);
  g.dtype = to_dtype(dy.scalar_type());
  g.beta = beta;
  run_gemm(op, g, dy);
}

// Shared validation of the LoRA ops' base and adapter tensors; returns (B, E) converted to A's dtype.
std::tuple<at::Tensor, c10::optional<at::Tensor>> check_lora(const char* op, const at::Tensor& x,
                                                             const at::Tensor& weight,
                                                             const c10::optional<at::Tensor>& bias,
                                                             const at::Tensor& A, const c10::optional<at::Tensor>& E,
                                                             const at::Tensor& B) {
  check_dim(op, "x", x, 2);
  TORCH_CHECK(x.is_cuda(), "fastpeft::", op, ": x must be a CUDA tensor, got device ", x.device());
  const at::Device dev = x.device();
  check_float_dtype(op, "x", x);
  check_contiguous(op, "x", x);
  check_dim(op, "weight", weight, 2);
  check_cuda(op, "weight", weight, dev);
  check_same_dtype(op, "weight", weight, x.scalar_type(), "x");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(1) == K, "fastpeft::", op, ": x has ", x.size(1), " features but weight expects ", K,
              " (weight shape ", weight.sizes(), ")");
  TORCH_CHECK(N > 0 && K > 0, "fastpeft::", op, ": weight must be non-empty, got shape ", weight.sizes());
  if (bias.has_value()) {
    check_cuda(op, "bias", *bias, dev);
    check_shape(op, "bias", *bias, {N});
    check_same_dtype(op, "bias", *bias, x.scalar_type(), "x");
  }
  check_dim(op, "lora_A", A, 2);
  check_cuda(op, "lora_A", A, dev);
  check_float_dtype(op, "lora_A", A);
  const int64_t r = A.size(0);
  TORCH_CHECK(r > 0, "fastpeft::", op, ": lora_A must have rank r >= 1, got shape ", A.sizes());
  check_shape(op, "lora_A", A, {r, K});
  check_cuda(op, "lora_B", B, dev);
  check_float_dtype(op, "lora_B", B);
  check_shape(op, "lora_B", B, {N, r});
  at::Tensor Bc = B.to(A.scalar_type()).contiguous();
  c10::optional<at::Tensor> Ec;
  if (E.has_value()) {
    check_cuda(op, "lora_E", *E, dev);
    check_float_dtype(op, "lora_E", *E);
    check_shape(op, "lora_E", *E, {r});
    Ec = E->to(A.scalar_type()).contiguous();
  }
  return {Bc, Ec};
}

// S (M, r) fp32 = drop(x) Aᵀ, one pass over x.
at::Tensor shrink(const at::Tensor& x, const at::Tensor& Ac, double p, int64_t seed) {
  const int64_t M = x.size(0), K = x.size(1), r = Ac.size(0);
  at::Tensor S = at::empty({M, r}, x.options().dtype(at::kFloat));
  const int sms = num_sms(x.get_device());
  at::Tensor ws = workspace(x, plan::workspace_elems(plan::rowdot_split(M, K, static_cast<int>(r), sms), M * r));
  launch_rowdot(to_dtype(x.scalar_type()), to_dtype(Ac.scalar_type()), x.data_ptr(), M, K, x.stride(0),
                Ac.data_ptr(), Ac.stride(0), 1, static_cast<int>(r), 1.f, make_dropout(p, seed),
                S.data_ptr<float>(), r, ws.data_ptr<float>(), sms, c10::cuda::getCurrentCUDAStream().stream());
  check_launch("lora shrink");
  return S;
}

at::Tensor times_e(const at::Tensor& S, const c10::optional<at::Tensor>& E) {
  return E.has_value() ? S * E->to(at::kFloat) : S;
}

std::tuple<at::Tensor, at::Tensor> lora_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                 const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                 const c10::optional<at::Tensor>& lora_E, const at::Tensor& lora_B,
                                                 double scaling, double dropout_p, int64_t seed, int64_t fold) {
  const char* op = "lora_fwd_cuda";
  check_dropout(op, dropout_p, seed);
  TORCH_CHECK(fold == 0 || fold == 1, "fastpeft::", op, ": fold must be 0 (accumulate) or 1 (K-augment), got ",
              fold);
  auto [Bc, Ec] = check_lora(op, x, weight, bias, lora_A, lora_E, lora_B);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return {y, at::empty({0, r}, x.options().dtype(at::kFloat))};
  at::Tensor Ac = lora_A.contiguous();
  at::Tensor S = shrink(x, Ac, dropout_p, seed);
  at::Tensor Se = times_e(S, Ec).contiguous();
  const WeightView w = weight_view(weight);
  at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (fold == 0) {
    // y = b + s · Se Bᵀ, then cuBLASLt accumulates x Wᵀ into it in place (C = D, beta = 1).
    launch_expand(to_dtype(x.scalar_type()), to_dtype(Bc.scalar_type()), y.data_ptr(), M, N, N,
                  bias.has_value() ? bias_c.data_ptr() : nullptr, Se.data_ptr<float>(), r, static_cast<int>(r),
                  Bc.data_ptr(), r, 1, static_cast<float>(scaling), no_dropout(),
                  c10::cuda::getCurrentCUDAStream().stream());
    check_launch(op);
    linear_into(op, x, w, nullptr, y, 1.f);
  } else {
    // K-augmentation: one GEMM of depth K + r over [x | s·Se] and [W | B] (padded to a multiple of 8 columns).
    const int64_t Kp = (K + r + 7) / 8 * 8;
    at::Tensor xa = at::zeros({M, Kp}, x.options());
    xa.narrow(1, 0, K).copy_(x);
    xa.narrow(1, K, r).copy_(Se * scaling);
    at::Tensor wa = at::zeros({N, Kp}, x.options());
    wa.narrow(1, 0, K).copy_(w.t);
    wa.narrow(1, K, r).copy_(Bc);
    const WeightView wav{wa, true, Kp};
    linear_into(op, xa, wav, bias.has_value() ? &bias_c : nullptr, y, 0.f);
  }
  return {y, S};
}

std::tuple<at::Tensor, at::Tensor> lora_decode_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                    const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                    const c10::optional<at::Tensor>& lora_E,
                                                    const at::Tensor& lora_B, double scaling, double dropout_p,
                                                    int64_t seed) {
  const char* op = "lora_decode_cuda";
  check_dropout(op, dropout_p, seed);
  auto [Bc, Ec] = check_lora(op, x, weight, bias, lora_A, lora_E, lora_B);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  TORCH_CHECK(M <= 16, "fastpeft::", op, ": the decode kernel takes at most 16 rows, got x of shape ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return {y, at::empty({0, r}, x.options().dtype(at::kFloat))};
  at::Tensor S = shrink(x, lora_A.contiguous(), dropout_p, seed);
  at::Tensor Se = times_e(S, Ec).contiguous();
  // The kernel streams rows of W; a transposed (Conv1D) view is made row-major first.
  at::Tensor w = weight.stride(1) == 1 && weight.stride(0) >= K ? weight : weight.contiguous();
  at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor Bf = Bc.to(at::kFloat).contiguous();
  launch_decode_gemv(to_dtype(x.scalar_type()), x.data_ptr(), M, K, w.data_ptr(), w.stride(0), N,
                     bias.has_value() ? bias_c.data_ptr() : nullptr, Se.data_ptr<float>(), static_cast<int>(r),
                     Bf.data_ptr<float>(), static_cast<float>(scaling), y.data_ptr(),
                     c10::cuda::getCurrentCUDAStream().stream());
  check_launch(op);
  return {y, S};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const c10::optional<at::Tensor>& lora_E, const at::Tensor& lora_B, const at::Tensor& S, double scaling,
    double dropout_p, int64_t seed, bool needs_dx, bool has_bias) {
  const char* op = "lora_bwd_cuda";
  check_dropout(op, dropout_p, seed);
  auto [Bc, Ec] = check_lora(op, x, weight, c10::nullopt, lora_A, lora_E, lora_B);
  const at::Device dev = x.device();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  check_cuda(op, "dy", dy, dev);
  check_same_dtype(op, "dy", dy, x.scalar_type(), "x");
  check_shape(op, "dy", dy, {M, N});
  check_cuda(op, "S", S, dev);
  check_shape(op, "S", S, {M, r});
  TORCH_CHECK(S.scalar_type() == at::kFloat, "fastpeft::", op, ": S must be float32, got ", S.scalar_type());
  const c10::cuda::CUDAGuard guard(dev);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int sms = num_sms(x.get_device());
  const auto adt = lora_A.scalar_type();
  const auto f32 = x.options().dtype(at::kFloat);

  at::Tensor dyc = dy.contiguous();
  at::Tensor Sc = S.contiguous();
  at::Tensor Ac = lora_A.contiguous();
  at::Tensor Se = times_e(Sc, Ec).contiguous();

  // dSe = s · dy B  (M, r) and dB = s · dyᵀ Se  (N, r): reductions over the columns / rows of dy.
  // One scratch buffer serves the three split reductions (stream-ordered, each finishes before the next starts).
  const int ri = static_cast<int>(r);
  const int64_t ws_elems =
      std::max({plan::workspace_elems(plan::rowdot_split(M, N, ri, sms), M * r),
                plan::workspace_elems(plan::coldot_split(M, N, ri, sms), N * r),
                plan::workspace_elems(plan::coldot_split(M, K, ri, sms), K * r)});
  at::Tensor ws = workspace(x, ws_elems);
  at::Tensor dSe = at::empty({M, r}, f32);
  at::Tensor dB = at::empty({N, r}, f32);
  const DType xt = to_dtype(x.scalar_type()), at_ = to_dtype(adt);
  launch_rowdot(xt, at_, dyc.data_ptr(), M, N, N, Bc.data_ptr(), 1, r, ri, static_cast<float>(scaling),
                no_dropout(), dSe.data_ptr<float>(), r, ws.data_ptr<float>(), sms, stream);
  check_launch(op);
  launch_coldot(xt, at_, dyc.data_ptr(), M, N, N, Se.data_ptr<float>(), r, ri, static_cast<float>(scaling),
                no_dropout(), dB.data_ptr<float>(), ws.data_ptr<float>(), sms, stream);
  check_launch(op);

  at::Tensor dS = times_e(dSe, Ec).contiguous();
  at::Tensor dE = Ec.has_value() ? (dSe * Sc).sum(0).to(lora_E->scalar_type())
                                 : at::empty({0}, dy.options().dtype(adt));

  // dAᵀ (K, r) = drop(x)ᵀ dS: one pass over x with the mask regenerated from the seed.
  at::Tensor dAt = at::empty({K, r}, f32);
  launch_coldot(xt, at_, x.data_ptr(), M, K, K, dS.data_ptr<float>(), r, ri, 1.f, make_dropout(dropout_p, seed),
                dAt.data_ptr<float>(), ws.data_ptr<float>(), sms, stream);
  check_launch(op);
  at::Tensor dA = dAt.t().contiguous().to(lora_A.scalar_type());

  at::Tensor dx;
  if (needs_dx && M > 0) {
    // dx = mask ⊙ (dS A) · scale, then cuBLASLt accumulates dy W into it (beta = 1).
    dx = at::empty({M, K}, x.options());
    launch_expand(xt, at_, dx.data_ptr(), M, K, K, nullptr, dS.data_ptr<float>(), r, static_cast<int>(r),
                  Ac.data_ptr(), 1, K, 1.f, make_dropout(dropout_p, seed), stream);
    check_launch(op);
    input_grad_into(op, dyc, weight_view(weight), dx, 1.f);
  } else if (needs_dx) {
    dx = at::empty({0, K}, x.options());
  } else {
    dx = at::empty({0}, x.options());
  }
  const auto wdt = weight.scalar_type();
  at::Tensor dbias = has_bias ? dyc.sum(0).to(wdt) : at::empty({0}, dy.options().dtype(wdt));
  return {dx, dA, dE, dB.to(lora_B.scalar_type()), dbias};
}

void check_ia3(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& l,
               bool feedforward) {
  const at::Device dev = x.device();
  check_cuda(op, "weight", weight, dev);
  check_dim(op, "weight", weight, 2);
  check_same_dtype(op, "weight", weight, x.scalar_type(), "x");
  check_cuda(op, "ia3_l", l, dev);
  check_float_dtype(op, "ia3_l", l);
  const int64_t want = feedforward ? weight.size(1) : weight.size(0);
  TORCH_CHECK(l.dim() == 1 && l.size(0) == want, "fastpeft::", op, ": ia3_l must have shape (", want, ",) in ",
              feedforward ? "feed-forward" : "output", " mode, got ", l.sizes());
  TORCH_CHECK(weight.size(0) > 0 && weight.size(1) > 0, "fastpeft::", op,
              ": weight must be non-empty, got shape ", weight.sizes());
}

std::tuple<at::Tensor, at::Tensor> ia3_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                const c10::optional<at::Tensor>& bias, const at::Tensor& ia3_l,
                                                bool feedforward, bool save_z) {
  const char* op = "ia3_fwd_cuda";
  check_dim(op, "x", x, 2);
  TORCH_CHECK(x.is_cuda(), "fastpeft::", op, ": x must be a CUDA tensor, got device ", x.device());
  check_float_dtype(op, "x", x);
  check_contiguous(op, "x", x);
  check_ia3(op, x, weight, ia3_l, feedforward);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(K == weight.size(1), "fastpeft::", op, ": x has ", K, " features but weight expects ", weight.size(1));
  if (bias.has_value()) {
    check_cuda(op, "bias", *bias, x.device());
    check_shape(op, "bias", *bias, {N});
    check_same_dtype(op, "bias", *bias, x.scalar_type(), "x");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor y = at::empty({M, N}, x.options());
  const bool save = !feedforward && save_z;
  if (M == 0) return {y, save ? at::empty({0, N}, x.options()) : at::empty({0}, x.options())};
  const WeightView w = weight_view(weight);
  at::Tensor lc = ia3_l.contiguous();
  at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const DType xt = to_dtype(x.scalar_type()), lt = to_dtype(ia3_l.scalar_type());
  if (feedforward) {
    // xs = (x.to(l.dtype) * l).to(x.dtype), then the base GEMM with the bias epilogue.
    at::Tensor xs = at::empty({M, K}, x.options());
    launch_ia3_scale(xt, lt, x.data_ptr(), M, K, K, lc.data_ptr(), true, xs.data_ptr(), K, stream);
    check_launch(op);
    linear_into(op, xs, w, bias.has_value() ? &bias_c : nullptr, y, 0.f);
    return {y, at::empty({0}, x.options())};
  }
  if (save) {
    // z = x Wᵀ + b is needed by the backward (dl = Σ dy ⊙ z); y = z ⊙ l.
    at::Tensor z = at::empty({M, N}, x.options());
    linear_into(op, x, w, bias.has_value() ? &bias_c : nullptr, z, 0.f);
    launch_ia3_scale(xt, lt, z.data_ptr(), M, N, N, lc.data_ptr(), false, y.data_ptr(), N, stream);
    check_launch(op);
    return {y, z};
  }
  // Inference: l is cuBLASLt's per-row alpha vector (free inside the GEMM); the bias is pre-scaled by l.
  at::Tensor lv = lc.to(at::kFloat).contiguous();
  at::Tensor bs = bias.has_value() ? (bias_c.to(at::kFloat) * lv).to(x.scalar_type()).contiguous() : at::Tensor();
  const char* what = "";
  const LtGemm scaled = linear_gemm(x, w, bias.has_value() ? &bs : nullptr, y, 0.f, lv.data_ptr<float>());
  const cublasStatus_t st = try_gemm(scaled, x, &what);
  if (st == CUBLAS_STATUS_SUCCESS) return {y, at::empty({0}, x.options())};
  // Setting up the alpha-vector mode failed (cuBLASLt may offer no algorithm for it with this type, epilogue or
  // GPU): the training path's two steps instead, z = x Wᵀ + b then y = z ⊙ l.  A failed launch is an error.
  TORCH_CHECK(std::string(what) != "cublasLtMatmul", "fastpeft::", op, ": cuBLASLt failed in ", what, " (status ",
              static_cast<int>(st), ")");
  at::Tensor z = at::empty({M, N}, x.options());
  linear_into(op, x, w, bias.has_value() ? &bias_c : nullptr, z, 0.f);
  launch_ia3_scale(xt, lt, z.data_ptr(), M, N, N, lc.data_ptr(), false, y.data_ptr(), N, stream);
  check_launch(op);
  return {y, at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ia3_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                            const at::Tensor& weight, const at::Tensor& ia3_l,
                                                            const at::Tensor& saved, bool feedforward,
                                                            bool needs_dx, bool has_bias) {
  const char* op = "ia3_bwd_cuda";
  check_dim(op, "dy", dy, 2);
  TORCH_CHECK(dy.is_cuda(), "fastpeft::", op, ": dy must be a CUDA tensor, got device ", dy.device());
  check_float_dtype(op, "dy", dy);
  check_ia3(op, dy, weight, ia3_l, feedforward);
  const int64_t M = dy.size(0), N = weight.size(0), K = weight.size(1);
  check_shape(op, "dy", dy, {M, N});
  const c10::cuda::CUDAGuard guard(dy.device());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int sms = num_sms(dy.get_device());
  const DType xt = to_dtype(dy.scalar_type()), lt = to_dtype(ia3_l.scalar_type());
  const auto wdt = weight.scalar_type();
  at::Tensor dyc = dy.contiguous();
  at::Tensor lc = ia3_l.contiguous();
  const WeightView w = weight_view(weight);
  at::Tensor dl_acc;
  at::Tensor dx, dbias;
  if (feedforward) {
    check_cuda(op, "x", x, dy.device());
    check_shape(op, "x", x, {M, K});
    check_same_dtype(op, "x", x, dy.scalar_type(), "dy");
    at::Tensor xc = x.contiguous();
    dl_acc = at::empty({K}, dy.options().dtype(at::kFloat));
    // dx gets its own buffer: the kernel's operands are __restrict__, so it may not write over g.
    dx = needs_dx ? at::empty({M, K}, dy.options()) : at::empty({0}, x.options());
    at::Tensor g = at::empty({M, K}, dy.options());
    if (M > 0) input_grad_into(op, dyc, w, g, 0.f);  // g = dy W = d(x ⊙ l)
    at::Tensor ws = workspace(dy, plan::workspace_elems(plan::ia3_bwd_split(M, K, sms), 2 * K));
    launch_ia3_bwd(xt, lt, g.data_ptr(), xc.data_ptr(), M, K, lc.data_ptr(), needs_dx ? dx.data_ptr() : nullptr,
                   dl_acc.data_ptr<float>(), nullptr, ws.data_ptr<float>(), sms, stream);
    check_launch(op);
    dbias = has_bias ? dyc.sum(0).to(wdt) : at::empty({0}, dy.options().dtype(wdt));
  } else {
    check_cuda(op, "saved", saved, dy.device());
    check_shape(op, "saved", saved, {M, N});
    check_same_dtype(op, "saved", saved, dy.scalar_type(), "dy");
    at::Tensor zc = saved.contiguous();
    dl_acc = at::empty({N}, dy.options().dtype(at::kFloat));
    at::Tensor db_acc = has_bias ? at::empty({N}, dy.options().dtype(at::kFloat)) : at::Tensor();
    const bool want_dz = needs_dx || has_bias;
    at::Tensor dz = want_dz ? at::empty({M, N}, dy.options()) : at::Tensor();
    at::Tensor ws = workspace(dy, plan::workspace_elems(plan::ia3_bwd_split(M, N, sms), 2 * N));
    launch_ia3_bwd(xt, lt, dyc.data_ptr(), zc.data_ptr(), M, N, lc.data_ptr(), want_dz ? dz.data_ptr() : nullptr,
                   dl_acc.data_ptr<float>(), has_bias ? db_acc.data_ptr<float>() : nullptr, ws.data_ptr<float>(), sms,
                   stream);
    check_launch(op);
    if (needs_dx) {
      dx = at::empty({M, K}, dy.options());
      if (M > 0) input_grad_into(op, dz, w, dx, 0.f);
    } else {
      dx = at::empty({0}, dy.options());
    }
    dbias = has_bias ? db_acc.to(wdt) : at::empty({0}, dy.options().dtype(wdt));
  }
  return {dx, dl_acc.to(ia3_l.scalar_type()), dbias};
}

}  // namespace
}  // namespace fastpeft

TORCH_LIBRARY_FRAGMENT(fastpeft, m) {
  m.def(
      "lora_fwd_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor? lora_E, Tensor lora_B, "
      "float scaling, float dropout_p, int seed, int fold) -> (Tensor, Tensor)");
  m.def(
      "lora_decode_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor? lora_E, Tensor lora_B, "
      "float scaling, float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def(
      "lora_bwd_cuda(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, Tensor? lora_E, Tensor lora_B, Tensor S, "
      "float scaling, float dropout_p, int seed, bool needs_dx, bool has_bias) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ia3_fwd_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor ia3_l, bool feedforward, bool save_z) "
      "-> (Tensor, Tensor)");
  m.def(
      "ia3_bwd_cuda(Tensor dy, Tensor x, Tensor weight, Tensor ia3_l, Tensor saved, bool feedforward, "
      "bool needs_dx, bool has_bias) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("lora_fwd_cuda", &fastpeft::lora_fwd_cuda);
  m.impl("lora_decode_cuda", &fastpeft::lora_decode_cuda);
  m.impl("lora_bwd_cuda", &fastpeft::lora_bwd_cuda);
  m.impl("ia3_fwd_cuda", &fastpeft::ia3_fwd_cuda);
  m.impl("ia3_bwd_cuda", &fastpeft::ia3_bwd_cuda);
}
