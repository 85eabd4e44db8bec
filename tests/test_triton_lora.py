"""Triton LoRA / AdaLoRA kernels (``fastpeft.kernels.lora``) against the fp64 torch reference.

Without a GPU, ``tests/conftest.py`` sets TRITON_INTERPRET=1 and the kernels run on CPU tensors in Triton's
interpreter: shapes are small (the interpreter is slow) but cover several tiles, masked tails, r = 1, 3, 16, 128,
M = 0 and 1, 3-D and non-contiguous x, a transposed-view weight, fp32, fp16 and bf16 (the interpreter's bf16
``tl.dot`` is broken, so in the interpreter the kernels upcast bf16 dot operands to fp32 - see
``kernels._tl.dot_prec``; the native bf16 dots run in the GPU tests), fp32 adapters on a 16-bit base, and the
tensor-descriptor (TMA) path.

Accuracy rule (FA's, tests/testing_utils.py: assert_fa_rule): err(triton, fp64 ref) <= MATMUL_FACTOR * err(torch same
dtype, fp64 ref) + a rounding-level floor (gradients GRAD_FACTOR), with err the relative Frobenius error.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastpeft.functional as FN
from fastpeft.ops.dropout import dropout_keep_mask, dropout_scale

from testing_utils import (GRAD_FACTOR, KEEP_FRACTION_SIGMAS, MATMUL_FACTOR, TRITON_DROPOUT_FD_RTOL, LaunchSpy,
                           assert_fa_rule, TRITON_TRAINING_LOSS_RTOL, TRITON_VS_TORCH_FP32_RTOL, rel_err)

pytest.importorskip("triton")
from fastpeft.kernels import _configs as KCF  # noqa: E402
from fastpeft.kernels import _gemm as KG  # noqa: E402
from fastpeft.kernels import _target as KT  # noqa: E402
from fastpeft.kernels import lora as KL  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
F64 = torch.float64
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


class Case:
    """One LoRA problem: fp64 master tensors, cast per run to (dtype, adapter dtype) in the requested layouts."""

    def __init__(self, lead, k, n, r, dtype, adt=None, p=0.0, with_e=False, with_bias=True, w_t=False,
                 x_noncontig=False, seed=1234, scaling=0.75):
        self.lead, self.k, self.n, self.r = tuple(lead), k, n, r
        self.dtype, self.adt = dtype, adt or dtype
        self.p, self.with_e, self.with_bias, self.w_t, self.x_noncontig = p, with_e, with_bias, w_t, x_noncontig
        self.seed, self.scaling = seed, scaling
        g = torch.Generator().manual_seed(42)
        self.x = torch.randn(*self.lead, k, generator=g, dtype=F64)
        self.w = torch.randn(n, k, generator=g, dtype=F64) / math.sqrt(k)
        self.b = torch.randn(n, generator=g, dtype=F64)
        self.a = torch.randn(r, k, generator=g, dtype=F64) / math.sqrt(k)
        self.bb = torch.randn(n, r, generator=g, dtype=F64) / math.sqrt(r)
        self.e = torch.randn(r, generator=g, dtype=F64)
        self.dy = torch.randn(*self.lead, n, generator=g, dtype=F64)

    def run(self, backend, dtype=None, adt=None):
        """Output and gradients (x, A, B, E, bias) as fp64, from the functional API on `backend`."""
        dtype, adt = dtype or self.dtype, adt or self.adt
        if self.x_noncontig:
            # same values, transposed storage: x is a non-contiguous view
            xl = self.x.reshape(-1, self.k).t().contiguous().to(DEV, dtype).requires_grad_(True)
            x = xl.t().reshape(*self.lead, self.k)
        else:
            xl = self.x.to(DEV, dtype).requires_grad_(True)
            x = xl
        w = self.w.t().contiguous().to(DEV, dtype).t() if self.w_t else self.w.to(DEV, dtype)
        b = self.b.to(DEV, dtype).requires_grad_(True) if self.with_bias else None
        a = self.a.to(DEV, adt).requires_grad_(True)
        bb = self.bb.to(DEV, adt).requires_grad_(True)
        e = self.e.to(DEV, adt).requires_grad_(True) if self.with_e else None
        if self.with_e:
            y = FN.adalora_linear(x, w, b, a, e, bb, self.scaling, 2.0, self.p, self.seed, backend=backend)
        else:
            y = FN.lora_linear(x, w, b, a, bb, self.scaling, self.p, self.seed, backend=backend)
        y.backward(self.dy.to(DEV, y.dtype))
        out = {"y": y, "dx": xl.grad.t() if self.x_noncontig else xl.grad, "dA": a.grad, "dB": bb.grad}
        if self.with_e:
            out["dE"] = e.grad
        if self.with_bias:
            out["dbias"] = b.grad
        return {kk: v.detach().double().cpu() for kk, v in out.items()}


def check_fa_rule(case: Case, backend: str = "triton"):
    tri = case.run(backend)
    ref_same = case.run("torch")
    ref64 = case.run("torch", F64, F64)
    for name, want in ref64.items():
        factor = MATMUL_FACTOR if name == "y" else GRAD_FACTOR
        dtype = case.adt if name in ("dA", "dB", "dE") else case.dtype
        assert_fa_rule(tri[name], want, ref_same[name], factor, name, dtype=dtype)
    return tri


# ---------------------------------------------------------------------------------------------------------------
# accuracy against the fp64 reference, forward and every gradient
# ---------------------------------------------------------------------------------------------------------------

F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16
CASES = {
    # several tiles in every dimension, masked tails (K, N not multiples of 16), r = 3
    "fp32_tails_r3": dict(lead=(37,), k=50, n=75, r=3, dtype=F32),
    # the same with dropout: the dX epilogue's mask on every column sub-tile of two column tiles
    "fp32_tails_dropout": dict(lead=(21,), k=70, n=75, r=5, dtype=F32, p=0.2),
    # 3-D x, fp16, AdaLoRA (E), dropout, a transposed-view weight (Conv1D passes weight.t())
    "fp16_3d_adalora_dropout_wT": dict(lead=(2, 9), k=50, n=45, r=3, dtype=F16, p=0.25, with_e=True, w_t=True),
    # M = 1 (decoding), r = 1, fp32 adapters on an fp16 base (HF PEFT's default precision), dropout
    "fp16_fp32adapters_m1_r1": dict(lead=(1,), k=33, n=20, r=1, dtype=F16, adt=F32, p=0.1),
    # non-contiguous x, r = 16 (no padding), dropout 0.5, no bias, AdaLoRA
    "fp32_noncontig_r16_nobias": dict(lead=(21,), k=40, n=24, r=16, dtype=F32, p=0.5, with_e=True,
                                      with_bias=False, x_noncontig=True),
    # bf16 (the interpreter runs its dots in fp32, see kernels._tl.dot_prec), fp32 adapters, dropout
    "bf16_fp32adapters_dropout": dict(lead=(3, 6), k=36, n=20, r=4, dtype=torch.bfloat16, adt=F32, p=0.2),
    "bf16_adalora": dict(lead=(17,), k=20, n=33, r=2, dtype=torch.bfloat16, with_e=True, w_t=True),
    # tall (M >> N): the one-pass dY kernel splits M into chunks whose dB / dbias partials are summed
    "fp32_tall_adalora": dict(lead=(70,), k=24, n=20, r=4, dtype=F32, with_e=True),
    # the largest rank, r = 128, with a strided weight, a seed above 2**32 (both key words)
    "fp32_r128_wT": dict(lead=(5,), k=19, n=7, r=128, dtype=F32, p=0.3, w_t=True, seed=2 ** 40 + 17),
}


@pytest.mark.parametrize("name", list(CASES))
def test_lora_triton_matches_fp64_reference(name):
    """The default variant (cuBLAS GEMMs + skinny Triton kernels)."""
    check_fa_rule(Case(**CASES[name]))


@pytest.mark.parametrize("name", ["fp32_tails_dropout", "fp16_3d_adalora_dropout_wT", "bf16_fp32adapters_dropout",
                                  "fp32_noncontig_r16_nobias"])
def test_lora_triton_fused_variant_matches_fp64_reference(name):
    """The fused variant (Triton GEMM with the rank-r term in its epilogue), chosen explicitly."""
    check_fa_rule(Case(**CASES[name]), "triton:fused")


def test_lora_triton_tma_path(monkeypatch):
    """The tensor-descriptor path (TMA on Hopper) on aligned shapes, forced on in the interpreter."""
    monkeypatch.setenv("FASTPEFT_TRITON_TMA", "1")
    x = torch.randn(20, 48, device=DEV, dtype=F16)
    w = torch.randn(40, 48, device=DEV, dtype=F16)
    if not KT.use_tma(x, w):
        pytest.skip("this Triton has no tensor descriptors (or this GPU cannot use them)")
    check_fa_rule(Case((20,), 48, 40, 8, F16, p=0.2, with_e=True), "triton:fused")
    check_fa_rule(Case((20,), 48, 40, 8, F32, w_t=True), "triton:fused")


def test_lora_triton_empty_batch():
    """M = 0: correctly shaped results, zero adapter gradients, no kernel launch needed."""
    k, n, r = 12, 7, 3
    x = torch.randn(0, k, device=DEV, requires_grad=True)
    w, b = torch.randn(n, k, device=DEV), torch.randn(n, device=DEV, requires_grad=True)
    a = torch.randn(r, k, device=DEV, requires_grad=True)
    bb = torch.randn(n, r, device=DEV, requires_grad=True)
    y = FN.lora_linear(x, w, b, a, bb, 0.5, 0.1, 3, backend="triton")
    assert y.shape == (0, n) and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == (0, k)
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(bb.grad, torch.zeros_like(bb))
    assert torch.equal(b.grad, torch.zeros_like(b))
    y2, s2 = KL.lora_fwd_triton(x.detach(), w, None, a.detach(), None, bb.detach(), 0.5, 0.0, 0)
    assert y2.shape == (0, n) and s2.shape == (0, r) and s2.dtype == torch.float32
    outs = KL.lora_bwd_triton(y2, x.detach(), w, a.detach(), None, bb.detach(), s2, 0.5, 0.0, 0, False, False)
    assert [tuple(o.shape) for o in outs] == [(0,), (r, k), (0,), (n, r), (0,)]


def test_lora_triton_no_dx_branch():
    """needs_dx=False skips the dX GEMM and returns the empty placeholder; the adapter gradients are unchanged."""
    c = Case((9,), 20, 18, 2, F32, p=0.2)
    x, w, a, bb = (t.to(DEV, F32) for t in (c.x, c.w, c.a, c.bb))
    y, s = KL.lora_fwd_triton(x, w, None, a, None, bb, 0.5, 0.2, 9)
    dy = c.dy.to(DEV, F32)
    with_dx = KL.lora_bwd_triton(dy, x, w, a, None, bb, s, 0.5, 0.2, 9, True, True)
    no_dx = KL.lora_bwd_triton(dy, x, w, a, None, bb, s, 0.5, 0.2, 9, False, False)
    assert no_dx[0].numel() == 0 and no_dx[4].numel() == 0
    assert torch.equal(with_dx[1], no_dx[1]) and torch.equal(with_dx[3], no_dx[3])


# ---------------------------------------------------------------------------------------------------------------
# dropout: the shared mask stream, masked dX, linearity, reproducibility
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [987654321, 3_000_000_000, 2 ** 62 + 5], ids=["i32", "u32", "i64"])
@pytest.mark.parametrize("m,k", [(48, 64), (5, 37)], ids=["aligned", "odd"])
def test_dropout_mask_bit_exact_and_keep_fraction(seed, m, k):
    """With x = 1 and A = I, S = drop(x) Aᵀ is the scaled keep-mask itself: it must equal the reference stream's
    mask bit for bit (the kernel's 8-lane interleave of each Philox call included), and keep about 1 - p of the
    elements.  Seeds of every integer width Triton passes; K a multiple of the blocks and K = 37 (partial groups
    of 8 and partial blocks)."""
    p = 0.3
    x = torch.ones(m, k, device=DEV)
    a = torch.eye(k, device=DEV)
    bb = torch.randn(5, k, device=DEV)
    w = torch.randn(5, k, device=DEV)
    _, s = KL.lora_fwd_triton(x, w, None, a, None, bb, 1.0, p, seed)
    keep = dropout_keep_mask(seed, (m, k), p, DEV)
    assert torch.equal(s, keep.float() * dropout_scale(p))
    frac = keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    assert abs(frac - (1 - p)) <= KEEP_FRACTION_SIGMAS * sigma


def test_dropout_dx_is_masked():
    """dX = dY W + mask ⊙ (dS A) · scale: with W = 0 and A = I, dx must be exactly 0 where the mask dropped (the
    GEMM epilogue's mask, on column sub-tiles, at K = 37: a partial group of 8)."""
    m, k, n, p, seed, s_ = 24, 37, 10, 0.4, 55, 0.5
    x = torch.randn(m, k, device=DEV, requires_grad=True)
    w = torch.zeros(n, k, device=DEV)
    a = torch.eye(k, device=DEV)
    bb = torch.randn(n, k, device=DEV)
    dy = torch.randn(m, n, device=DEV)
    FN.lora_linear(x, w, None, a, bb, s_, p, seed, backend="triton").backward(dy)
    keep = dropout_keep_mask(seed, (m, k), p, DEV)
    assert (~keep).any() and keep.any()
    assert torch.equal(x.grad[~keep], torch.zeros_like(x.grad[~keep]))
    expected = torch.where(keep, (s_ * dy.double() @ bb.double()) * dropout_scale(p), 0.0)
    assert rel_err(x.grad, expected) <= TRITON_VS_TORCH_FP32_RTOL


def test_dropout_da_mask_bit_exact():
    """The backward's own regeneration of the mask (the dA kernel's pass over x): with x = 1, B = I and dY = I,
    dS = I and dA = dSᵀ drop(x) is the scaled keep-mask itself, bit for bit.  K = 37: a partial group of 8."""
    r, k, p, seed = 12, 37, 0.3, 2 ** 40 + 3
    x = torch.ones(r, k, device=DEV)
    w = torch.zeros(r, k, device=DEV)
    a = torch.randn(r, k, device=DEV)
    bb = torch.eye(r, device=DEV)
    _, s = KL.lora_fwd_triton(x, w, None, a, None, bb, 1.0, p, seed)
    dy = torch.eye(r, device=DEV)
    dx, da, _, _, _ = KL.lora_bwd_triton(dy, x, w, a, None, bb, s, 1.0, p, seed, True, False)
    keep = dropout_keep_mask(seed, (r, k), p, DEV)
    assert (~keep).any() and keep.any()
    assert torch.equal(da, keep.float() * dropout_scale(p))
    # and dx's epilogue mask: W = 0, so dx = mask ⊙ (dS A) · scale is 0 exactly where dropped
    assert torch.equal(dx == 0, ~keep)


def test_dropout_linear_in_x_finite_difference():
    """With a fixed seed the op is affine in x, so f(x + v) - f(x) equals <grad f, v> (autograd) to rounding."""
    m, k, n, r, p, seed = 13, 30, 17, 4, 0.5, 2024
    g = torch.Generator().manual_seed(3)
    x, v = (torch.randn(m, k, generator=g).to(DEV) for _ in range(2))
    w = torch.randn(n, k, generator=g).to(DEV) / math.sqrt(k)
    b = torch.randn(n, generator=g).to(DEV)
    a, bb = torch.randn(r, k, generator=g).to(DEV), torch.randn(n, r, generator=g).to(DEV)
    dy = torch.randn(m, n, generator=g).to(DEV)

    def f(xx):
        return (FN.lora_linear(xx, w, b, a, bb, 1.5, p, seed, backend="triton") * dy).sum()

    xg = x.clone().requires_grad_(True)
    f(xg).backward()
    directional = (xg.grad * v).sum().item()
    fd = (f(x + v) - f(x)).item()
    assert abs(fd - directional) <= TRITON_DROPOUT_FD_RTOL * (abs(directional) + (xg.grad.abs() * v.abs()).sum())


def test_dropout_same_seed_reproduces():
    c = Case((11,), 26, 19, 3, F32, p=0.3, seed=77)
    first, again = c.run("triton"), c.run("triton")
    for name in first:
        assert torch.equal(first[name], again[name]), name
    c.seed = 78
    other = c.run("triton")
    assert not torch.equal(first["y"], other["y"])


def test_dropout_triton_equals_torch_backend():
    """Same seed, same mask stream: the Triton and torch backends agree to fp32 summation-order rounding."""
    c = Case((19,), 35, 22, 5, F32, p=0.35, with_e=True, seed=31337)
    tri, ref = c.run("triton"), c.run("torch")
    for name in ref:
        assert rel_err(tri[name], ref[name]) <= TRITON_VS_TORCH_FP32_RTOL, name


# ---------------------------------------------------------------------------------------------------------------
# the custom ops with backend="triton"
# ---------------------------------------------------------------------------------------------------------------


def test_opcheck_lora_triton():
    g = torch.Generator().manual_seed(5)

    def rnd(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(DEV).requires_grad_(grad)

    m, k, n, r = 6, 20, 9, 3
    args = (rnd(m, k, grad=True), rnd(n, k), rnd(n, grad=True), rnd(r, k, grad=True), rnd(r, grad=True),
            rnd(n, r, grad=True), 0.5, 0.2, 11, "triton")
    torch.library.opcheck(torch.ops.fastpeft.lora_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))
    x, w, _, a, e, bb = (t.detach() if isinstance(t, torch.Tensor) else t for t in args[:6])
    _, s = KL.lora_fwd_triton(x, w, None, a, e, bb, 0.5, 0.2, 11)
    for needs_dx in (True, False):
        torch.library.opcheck(torch.ops.fastpeft.lora_bwd.default,
                              (rnd(m, n), x, w, a, e, bb, s, 0.5, 0.2, 11, needs_dx, True, "triton"),
                              test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("adt", [torch.bfloat16, torch.float32], ids=["bf16_adapters", "fp32_adapters"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_bf16_parity_gpu(adt, p):
    """bf16 within 2x (grads 3x) the error of plain torch bf16, on a shape large enough for real tiles."""
    check_fa_rule(Case((4, 96), 512, 384, 16, torch.bfloat16, adt=adt, p=p, with_e=p > 0))


@cuda_only
def test_bf16_parity_decode_and_llama_like_gpu():
    check_fa_rule(Case((3,), 4096, 1024, 16, torch.bfloat16, adt=torch.float32, p=0.1))
    check_fa_rule(Case((1024,), 1024, 2048, 16, torch.bfloat16, adt=torch.float32, p=0.05, w_t=True))


@cuda_only
def test_training_loss_curve_matches_torch_gpu():
    """A short LoRA training run (2-layer MLP, AdamW, dropout with per-step seeds) follows the torch path."""

    def train(backend):
        torch.manual_seed(0)
        d, h, r = 256, 512, 8
        w1, w2 = torch.randn(h, d, device="cuda") / 16, torch.randn(d, h, device="cuda") / 22
        a1, a2 = torch.randn(r, d, device="cuda") / 16, torch.randn(r, h, device="cuda") / 22
        b1, b2 = torch.zeros(h, r, device="cuda"), torch.zeros(d, r, device="cuda")
        params = [t.requires_grad_(True) for t in (a1, b1, a2, b2)]
        opt = torch.optim.AdamW(params, lr=1e-2)
        data = torch.randn(512, d, device="cuda")
        target = torch.roll(data, 1, dims=1)
        losses = []
        for step in range(30):
            xb = data[(step * 64) % 512:(step * 64) % 512 + 64]
            tb = target[(step * 64) % 512:(step * 64) % 512 + 64]
            hid = torch.relu(FN.lora_linear(xb, w1, None, a1, b1, 2.0, 0.1, 1000 + step, backend=backend))
            out = FN.lora_linear(hid, w2, None, a2, b2, 2.0, 0.1, 5000 + step, backend=backend)
            loss = torch.nn.functional.mse_loss(out, tb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses, dtype=F64)

    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        tri, ref = train("triton"), train("torch")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert ref[-1] < ref[0]  # the run learns something, so matching curves means something
    assert rel_err(tri, ref) <= TRITON_TRAINING_LOSS_RTOL, (tri, ref)


@cuda_only
@pytest.mark.parametrize("idx", range(len(KG._gemm_autotuned.configs)))
@pytest.mark.parametrize("m", [8, 300])
def test_every_gemm_config_is_correct_gpu(monkeypatch, idx, m):
    """Each GEMM configuration on its own (the other tests run the first fitting one, FASTPEFT_TRITON_AUTOTUNE=0):
    bf16 base, fp32 adapters, dropout in the dX epilogue, M on both sides of the decode / training split."""
    cfg = KG._gemm_autotuned.configs[idx]
    monkeypatch.setattr(KG._gemm_autotuned, "configs", [cfg])  # one config: the autotuner runs it untimed
    monkeypatch.setattr(KG._gemm_autotuned, "cache", {})
    check_fa_rule(Case((m,), 520, 392, 16, torch.bfloat16, adt=torch.float32, p=0.1, with_e=True))


def test_autotune_switch(monkeypatch):
    configs = [KCF._cfg(128, 128, 64, 8, 3, 8), KCF._cfg(64, 128, 64, 8, 3, 4)]
    a = torch.empty(1, 1, dtype=torch.float16)
    monkeypatch.setenv("FASTPEFT_TRITON_AUTOTUNE", "1")
    assert len(KCF.prune_gemm_configs(configs, {"M": 4096, "a_ptr": a})) == 2
    monkeypatch.setenv("FASTPEFT_TRITON_AUTOTUNE", "0")
    assert KCF.prune_gemm_configs(configs, {"M": 4096, "a_ptr": a}) == configs[:1]
    monkeypatch.setenv("FASTPEFT_TRITON_AUTOTUNE", "fast")
    with pytest.raises(ValueError, match="FASTPEFT_TRITON_AUTOTUNE"):
        KCF.prune_gemm_configs(configs, {"M": 4096, "a_ptr": a})


# ---------------------------------------------------------------------------------------------------------------
# the TMA switch and its fallback
# ---------------------------------------------------------------------------------------------------------------


def test_tma_env_rejects_bad_value(monkeypatch):
    monkeypatch.setenv("FASTPEFT_TRITON_TMA", "yes")
    with pytest.raises(ValueError, match="FASTPEFT_TRITON_TMA"):
        KT.use_tma(torch.randn(4, 16), torch.randn(4, 16))


def test_tma_launch_failure_raises_with_the_way_out(monkeypatch):
    """A failed descriptor (TMA) launch raises with the reason and the switch that selects the pointer path; nothing
    below select_backend changes the path behind the caller's back, and no process-wide state is flipped."""
    monkeypatch.setenv("FASTPEFT_TRITON_TMA", "1")
    x = torch.randn(20, 48, device=DEV, dtype=F16)
    w = torch.randn(40, 48, device=DEV, dtype=F16)
    if not KT.use_tma(x, w):
        pytest.skip("this Triton has no tensor descriptors (or this GPU cannot use them)")
    real = KG._gemm_autotuned
    tma_calls, pointer_calls = [], []

    class FailingTMA:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if kwargs["USE_TMA"]:
                    tma_calls.append(1)
                    raise RuntimeError("simulated TMA compile failure")
                pointer_calls.append(1)
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(KG, "_gemm_autotuned", FailingTMA())
    case = Case((20,), 48, 40, 8, F16, p=0.2)
    with pytest.raises(RuntimeError, match="simulated TMA compile failure"):
        case.run("triton:fused", F16, F16)
    assert tma_calls == [1] and pointer_calls == []
    assert KT.use_tma(x, w)  # still on for later launches
    monkeypatch.setenv("FASTPEFT_TRITON_TMA", "0")  # the way out: the pointer path, and the result is right
    check_fa_rule(case, "triton:fused")
    assert pointer_calls and tma_calls == [1]


# ---- GEMM configuration pruning against the device's shared memory ------------------------------------------

@pytest.mark.parametrize("smem,dtype,m,expect", [
    # H100/H200 (227 KB): the portable tile is never picked when a real one fits
    (227 * 1024, torch.bfloat16, 8192, [(128, 256), (128, 128), (128, 128), (64, 128)]),
    (227 * 1024, torch.float32, 8192, [(64, 128)]),          # fp32 128-row tiles need 262-295 KB
    (227 * 1024, torch.bfloat16, 8, [(64, 128), (16, 64), (32, 32)]),
    # a 99 KB-per-block GPU (sm_86/89/120): fp32 at large M has no fitting tile but the portable one
    (99 * 1024, torch.float32, 8192, [(64, 64)]),
    (99 * 1024, torch.bfloat16, 8192, [(64, 128)]),
])
def test_prune_gemm_configs_fits_shared_memory(monkeypatch, smem, dtype, m, expect):
    """The GPU configuration list itself (``gemm_configs(interpreter=False)``; the interpreter's is one small tile)
    pruned for a target's shared memory."""
    monkeypatch.setenv("FASTPEFT_TRITON_AUTOTUNE", "1")
    a = torch.empty(1, 1, dtype=dtype)
    target = KT.LaunchTarget(num_sms=132, smem_per_block=smem, capability_major=9, compile_only=True)
    kept = KCF.prune_gemm_configs(KCF.gemm_configs(interpreter=False), {"M": m, "a_ptr": a}, target=target)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept] == expect
    es = a.element_size()
    assert all(KCF._smem_estimate(c, es) <= smem - 1024 for c in kept)


# ---------------------------------------------------------------------------------------------------------------
# production block-count structure at small sizes (kernels._target.forced_launch_shape)
# ---------------------------------------------------------------------------------------------------------------


def test_multi_block_paths_of_production_shapes(monkeypatch):
    """At M = 8192, N = 4096 on an H200 the one-pass dY kernel gives each program 6 M blocks x 3 N blocks (its dSe
    partial rows are accumulated across N blocks through global memory), the dA kernel splits its reduction over M
    with several blocks per split (and adds the rank-r term into dX in the same pass), and the forward's single
    launch walks several N blocks per program (N split where rows are too few).  Small blocks and a small program
    target give the same structure here (M = 96: 6 M blocks; N = 144: 9 N blocks), and the results still match the
    fp64 reference."""
    spies = {name: LaunchSpy(getattr(KL, name)) for name in ("_lora_shrink_kernel", "_lora_dy_kernel",
                                                            "_lora_da_kernel", "_lora_expand_kernel",
                                                            "_lora_shrink_expand_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(KL, name, spy)
    with KT.forced_launch_shape(blocks=(16, 16, 4), programs=8):
        check_fa_rule(Case((96,), 80, 144, 4, F32, p=0.1, with_e=True))
    (grid, kw, args), = spies["_lora_dy_kernel"].launches
    mb_per, nb_per = args[22], args[23]
    assert grid[0] > 1 and grid[1] > 1 and mb_per > 1 and nb_per > 1, (grid, mb_per, nb_per)
    assert not spies["_lora_shrink_kernel"].launches  # the default forward's shrink runs inside its one launch
    (grid, kw, args), = spies["_lora_shrink_expand_kernel"].launches
    assert grid == (2, 6) and args[20] == 5, (grid, args[20])  # 2 N splits of 5 (and 4) N blocks, 6 row blocks
    (grid, kw, args), = spies["_lora_da_kernel"].launches
    assert grid[1] > 1 and args[21] > 1, (grid, args[21])  # M splits, several M blocks per split
    assert args[12] > 1, args[12]  # dSe arrives as several partial sums, summed on load
    assert kw["WITH_DX"] and not kw["STORE_SUM"]  # ... and the same pass adds the rank-r term into dX
    assert not spies["_lora_expand_kernel"].launches  # no dX expand of its own


@pytest.mark.parametrize("blocks", [(16, 16, 4), (32, 16, 4), (64, 32, 8)], ids=["rows16", "rows32", "rows64"])
def test_forward_single_launch_matches_the_two_launch_path(monkeypatch, blocks):
    """The default forward's one launch (``_lora_shrink_expand_kernel``) against the shrink + expand it replaces
    (which sibling groups and M <= TWO_LAUNCH_MAX_ROWS still run): S and y bit-equal with one K split, on every grid
    shape the block chooser gives (one row block with N split across programs; many row blocks, no split; a ragged
    last row block), with dropout, e, a bias, fp32 adapters on fp16 activations and non-contiguous x / B; with the 16-, 32-
    and 64-row blocks a GPU takes (M < 16·SMs, M = 8192, M > 8448 on an H200)."""
    torch.manual_seed(0)
    for m, k, n, r, programs in ((1, 40, 100, 1, 8), (16, 72, 48, 4, 1), (37, 24, 130, 3, 4), (0, 8, 8, 2, 4),
                                 (70, 40, 20, 2, 2)):
        x = torch.randn(k, m, dtype=F16).t()  # non-contiguous
        w = (torch.randn(n, k) / k ** 0.5).to(F16)
        a = torch.randn(r, k) / k ** 0.5
        bb = torch.randn(r, n).t()  # (N, r), non-contiguous
        e = torch.randn(r)
        bias = torch.randn(n, dtype=F16)
        for p, lora_e in ((0.0, None), (0.25, e)):
            with KT.forced_launch_shape(blocks=blocks, programs=programs):
                y1, s1 = KL.lora_fwd_triton(x, w, bias, a, lora_e, bb, 0.7, p, 11)
            with KT.forced_launch_shape(blocks=blocks, programs=1):  # one K split
                y2 = torch.nn.functional.linear(x, w, bias)
                s_part = KL.shrink(x, a, p, 11, None, partials=True)
                assert s_part.shape[0] == 1
                KL._expand(y2, s_part, 0.7, lora_e, bb.t(), None)
            assert y1.shape == (m, n) and s1.shape == (m, r)
            assert torch.equal(s1, s_part[0]) and torch.equal(y1, y2), (m, k, n, r, p)


def test_decode_forward_is_two_launches_and_stores_s(monkeypatch):
    """At M <= TWO_LAUNCH_MAX_ROWS the forward is the split-K shrink and one expand that sums the shrink's partials
    and stores S (no torch reduction between them: on a GPU that was a third launch and ~10 µs of host time); S is
    the same bits as one K split gives and owns its storage (not a view of the partials)."""
    launches = []
    spies = {}
    for name in ("_lora_shrink_kernel", "_lora_expand_kernel", "_lora_shrink_expand_kernel"):
        spies[name] = LaunchSpy(getattr(KL, name), launches, name)
        monkeypatch.setattr(KL, name, spies[name])
    reductions = []
    real_sum = torch.Tensor.sum
    monkeypatch.setattr(torch.Tensor, "sum", lambda *a, **k: reductions.append(1) or real_sum(*a, **k))
    torch.manual_seed(0)
    k, n, r = 72, 40, 3
    w = (torch.randn(n, k) / k ** 0.5).to(F16)
    a, bb, e = torch.randn(r, k) / k ** 0.5, torch.randn(n, r), torch.randn(r)
    for m in (1, KL.TWO_LAUNCH_MAX_ROWS):
        x = torch.randn(m, k, dtype=F16)
        for programs in (8, 1):  # several K splits (the expand stores S), one (S is the only partial)
            launches.clear()
            with KT.forced_launch_shape(blocks=(16, 16, 4), programs=programs):
                y, s = KL.lora_fwd_triton(x, w, None, a, e, bb, 0.7, 0.0, 0)
            names = [nm for nm, _ in launches]
            assert names == ["_lora_shrink_kernel", "_lora_expand_kernel"], names
            splits = spies["_lora_shrink_kernel"].launches[-1][0][1]
            assert (splits > 1) == (programs > 1)
            assert spies["_lora_expand_kernel"].launches[-1][1]["STORE_SUM"] == (splits > 1)
            if programs > 1:
                assert s.is_contiguous() and s.untyped_storage().nbytes() == m * r * 4
                s_multi = s
            else:
                assert torch.equal(s, s_multi), m
            ref = x.double() @ a.double().t()
            assert torch.allclose(s.double(), ref, rtol=1e-5, atol=1e-6)
    assert not reductions


def test_launch_plans_are_memoised_per_shape_and_cleared_with_forced_shapes():
    """A launcher's arithmetic (grid, block sizes, constexprs, the cost report) is computed once per shape key; a
    forced test shape (which changes the heuristics) starts from empty caches, and leaving it does too."""
    KT.clear_launch_plans()
    p1 = KL._shrink_expand_plan(4096, 4096, 4096, 16, 16, BF16, F32, BF16, F32, 0.0, False, None)
    p2 = KL._shrink_expand_plan(4096, 4096, 4096, 16, 16, BF16, F32, BF16, F32, 0.0, False, None)
    assert p1 is p2
    assert KL._shrink_expand_plan(4096, 4096, 4096, 16, 16, BF16, F32, BF16, F32, 0.1, False, None) is not p1
    with KT.forced_launch_shape(blocks=(32, 16, 4), programs=2):
        p3 = KL._shrink_expand_plan(4096, 4096, 4096, 16, 16, BF16, F32, BF16, F32, 0.0, False, None)
        assert p3 is not p1 and p3.meta["BLOCK_M"] == 32
    p4 = KL._shrink_expand_plan(4096, 4096, 4096, 16, 16, BF16, F32, BF16, F32, 0.0, False, None)
    assert p4 is not p3 and p4.meta == p1.meta and p4.grid == p1.grid


def test_dx_term_rides_the_da_pass(monkeypatch):
    """The default backward adds dX's rank-r term in the pass over x that forms dA (one read + write of dX beside
    the read of x, the dropout mask regenerated once for both): no expand launch, one launch summing dB, dbias, dA
    and dE's split partials (dB is 300 x 4 = 1200 elements: two tiles), and with several M splits (each writes its
    rows of dX; every row once), dropout, e and a bias every gradient still matches the fp64 reference."""
    from fastpeft.kernels import _partials as KP

    launches = []
    spies = {}
    for mod, name in ((KL, "_lora_da_kernel"), (KL, "_lora_expand_kernel"), (KP, "_sum_partials_kernel")):
        spies[name] = LaunchSpy(getattr(mod, name), launches, name)
        monkeypatch.setattr(mod, name, spies[name])
    with KT.forced_launch_shape(blocks=(16, 16, 4), programs=8):
        check_fa_rule(Case((200,), 20, 300, 4, F32, p=0.1, with_e=True))
    assert not spies["_lora_expand_kernel"].launches
    # every backward (the check runs several) is one dA pass with dX's term, then one finishing launch
    names = [n for n, _ in launches]
    assert names == ["_lora_da_kernel", "_sum_partials_kernel"] * (len(names) // 2), names
    for grid, kw, args in spies["_lora_da_kernel"].launches:
        assert kw["WITH_DX"] and grid[1] > 1 and args[12] > 1, (grid, args[12])  # M splits; dSe in partials


def test_single_program_reductions(monkeypatch):
    """The other extreme: one program per reduction (every M and N block of dY in one program)."""
    spy = LaunchSpy(KL._lora_dy_kernel)
    monkeypatch.setattr(KL, "_lora_dy_kernel", spy)
    with KT.forced_launch_shape(blocks=(16, 16, 4), programs=1):
        check_fa_rule(Case((50,), 40, 70, 3, F16, p=0.2))
    (grid, kw, args), = spy.launches
    assert grid == (1, 1) and args[22] == 4 and args[23] == 5


def test_launchers_report_kernels_and_skip_fake_tensors():
    """Under the cost model (fastpeft._cost.recording) with fake tensors at production shapes, the launchers report
    each Triton kernel with its traffic and return correctly shaped outputs without launching; the default path's
    pass budget is visible: forward one shrink-expand launch, backward dY pass, dA pass with dX's term, one launch
    finishing the split reductions - and no torch op besides the two cuBLAS GEMMs (no separate sums or casts)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from torch.utils._python_dispatch import TorchDispatchMode

    from fastpeft import _cost

    class _Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    m, k, n, r = 8192, 4096, 4096, 16
    with FakeTensorMode():
        x = torch.empty(m, k, dtype=torch.bfloat16)
        w = torch.empty(n, k, dtype=torch.bfloat16)
        bias = torch.empty(n, dtype=torch.bfloat16)
        a = torch.empty(r, k, dtype=torch.float32)
        bb = torch.empty(n, r, dtype=torch.float32)
        e = torch.empty(r, dtype=torch.float32)
        for lora_e, b in ((None, None), (e, bias)):  # LoRA; AdaLoRA with a bias
            with _cost.recording() as rec, _Ops() as ops:
                y, s = KL.lora_fwd_triton(x, w, b, a, lora_e, bb, 2.0, 0.1, 7)
                outs = KL.lora_bwd_triton(torch.empty_like(y), x, w, a, lora_e, bb, s, 2.0, 0.1, 7, True,
                                          b is not None)
            assert y.shape == (m, n) and s.shape == (m, r) and outs[0].shape == (m, k) and outs[1].shape == (r, k)
            assert outs[3].shape == (n, r) and (b is None or outs[4].shape == (n,))
            assert lora_e is None or outs[2].shape == (r,)
            names = [c.name for c in rec]
            assert names == ["lora_shrink_expand", "lora_dy", "lora_da_dx", "sum_partials"], names
            compute = [o for o in ops.names if o not in ("empty", "select", "t", "transpose", "empty_like", "unsqueeze",
                                                         "new_empty", "view", "as_strided", "detach", "device")]
            assert compute == [("addmm" if b is not None else "mm"), "mm"], compute
    by = {c.name: c for c in rec}
    # the dA pass reads x and dX and writes dX: one pass over each
    assert by["lora_da_dx"].bytes_read >= 2 * m * k * 2 and by["lora_da_dx"].bytes_written >= m * k * 2
    assert by["lora_dy"].bytes_read >= m * n * 2
    # the forward's launch: x read once (rows fill the H200's SMs at M = 8192: no N split), y read + written once,
    # and S (M x r fp32) stored beside it
    fwd = by["lora_shrink_expand"]
    assert m * (k + n) * 2 <= fwd.bytes_read <= m * (k + n) * 2 + r * (k + n) * 4
    assert fwd.bytes_written == m * n * 2 + m * r * 4
    assert all(c.flops > 0 for c in rec)


# ---------------------------------------------------------------------------------------------------------------
# device-side dropout seed (graph-capture safe)
# ---------------------------------------------------------------------------------------------------------------


def test_device_seed_gives_the_int_seeds_mask_bit_for_bit():
    """A 1-element int64 seed tensor (read by the kernels on the device) gives exactly the mask of the same host int,
    in the forward and in every backward kernel (regenerated mask), on both variants."""
    c = Case((21,), 40, 30, 4, F32, p=0.3)
    x, w, a, bb, dy = (t.to(DEV, F32) for t in (c.x, c.w, c.a, c.bb, c.dy))
    seed = 2 ** 40 + 5
    for variant in KT.VARIANTS:
        y1, s1 = KL.lora_fwd_triton(x, w, None, a, None, bb, 0.5, 0.3, seed, variant=variant)
        y2, s2 = KL.lora_fwd_triton(x, w, None, a, None, bb, 0.5, 0.3, torch.tensor([seed], device=DEV),
                                    variant=variant)
        assert torch.equal(y1, y2) and torch.equal(s1, s2)
        g1 = KL.lora_bwd_triton(dy, x, w, a, None, bb, s1, 0.5, 0.3, seed, True, False, variant=variant)
        g2 = KL.lora_bwd_triton(dy, x, w, a, None, bb, s1, 0.5, 0.3, torch.tensor([seed], device=DEV), True, False,
                                variant=variant)
        assert all(torch.equal(p, q) for p, q in zip(g1, g2))


def test_device_seed_advances_and_reproduces():
    """The seed stream the fused backends draw when no seed is given: drawn on the device (torch's generator, whose
    Philox (seed, offset) state advances per draw, also inside a captured CUDA graph), a new seed per call, the same
    sequence after the same torch.manual_seed, and a repeated (seed) gives the same mask."""
    torch.manual_seed(123)
    s1, s2 = FN.draw_seed(device=DEV), FN.draw_seed(device=DEV)
    assert s1.shape == (1,) and s1.dtype == torch.int64 and s1.device.type == DEV and not torch.equal(s1, s2)
    torch.manual_seed(123)
    assert torch.equal(FN.draw_seed(device=DEV), s1) and torch.equal(FN.draw_seed(device=DEV), s2)
    # through the functional API: unseeded calls differ, re-seeding torch reproduces them, and the backward uses
    # the forward's mask (the gradient matches the torch reference run with the same seed value)
    c = Case((9,), 24, 16, 2, F32, p=0.5)
    x, w, a, bb = (t.to(DEV, F32) for t in (c.x, c.w, c.a, c.bb))
    torch.manual_seed(7)
    y1 = FN.lora_linear(x, w, None, a, bb, 1.0, 0.5, backend="triton")
    y2 = FN.lora_linear(x, w, None, a, bb, 1.0, 0.5, backend="triton")
    torch.manual_seed(7)
    seed_used = FN.draw_seed(device=DEV)
    torch.manual_seed(7)
    y1b = FN.lora_linear(x, w, None, a, bb, 1.0, 0.5, backend="triton")
    assert not torch.equal(y1, y2) and torch.equal(y1, y1b)
    xr = x.clone().requires_grad_(True)
    torch.manual_seed(7)
    FN.lora_linear(xr, w, None, a, bb, 1.0, 0.5, backend="triton").sum().backward()
    xt = x.clone().requires_grad_(True)
    FN.lora_linear(xt, w, None, a, bb, 1.0, 0.5, int(seed_used.item()), backend="torch").sum().backward()
    assert rel_err(xr.grad, xt.grad) <= TRITON_VS_TORCH_FP32_RTOL


# ---------------------------------------------------------------------------------------------------------------
# fp32 adapters on a bf16 base: products through the tensor cores, the fp32 operand split in three bf16 pieces
# ---------------------------------------------------------------------------------------------------------------

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastpeft.kernels._tl import split3  # noqa: E402


@triton.jit
def _pieces(v_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    hi, mid, lo = split3(tl.load(v_ptr + offs))
    tl.store(out_ptr + offs, hi.to(tl.float32))
    tl.store(out_ptr + N + offs, mid.to(tl.float32))
    tl.store(out_ptr + 2 * N + offs, lo.to(tl.float32))


def test_split3_pieces_sum_exactly_to_the_fp32_value():
    """``kernels._tl.split3``: hi + mid + lo == v for fp32 values over many magnitudes (tiny, huge, negative, zero),
    each piece a bf16 value - so every product of a piece with a bf16 activation is exact in fp32."""
    g = torch.Generator().manual_seed(0)
    n = 1024
    v = torch.randn(n, generator=g) * torch.pow(2.0, torch.randint(-100, 100, (n,), generator=g).float())
    v[:4] = torch.tensor([0.0, -1.0, 1.0 + 2.0 ** -23, -(2.0 ** -100) * (1 + 2.0 ** -20)])
    v = v.to(DEV)
    out = torch.empty(3 * n, device=DEV)
    _pieces[(1,)](v, out, N=n)
    hi, mid, lo = out.view(3, n).double()
    for piece in (hi, mid, lo):  # each a bf16 value
        assert torch.equal(piece, piece.to(torch.bfloat16).double())
    assert torch.equal(hi + mid + lo, v.double())


def test_bf16_base_fp32_adapters_take_the_split_products(monkeypatch):
    """The default precision of a bf16 base with fp32 adapters (PEFT's default) is the three-piece split in the
    forward's shrink, dY and dA kernels (the CPU interpreter runs the same pieces, upcast), with the production
    block-count structure; output and every gradient within the accuracy rule, dropout and AdaLoRA included."""
    from fastpeft.kernels import _tl

    spies = {name: LaunchSpy(getattr(KL, name)) for name in ("_lora_shrink_expand_kernel", "_lora_dy_kernel",
                                                            "_lora_da_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(KL, name, spy)
    with KT.forced_launch_shape(blocks=(16, 16, 4), programs=8):
        check_fa_rule(Case((96,), 80, 144, 4, torch.bfloat16, adt=F32, p=0.1, with_e=True))
        check_fa_rule(Case((40,), 48, 33, 1, torch.bfloat16, adt=F32))
    want = _tl.SPLIT3_UPCAST if KT.interpret_mode() else _tl.SPLIT3  # the interpreter upcasts the pieces' products
    for name, spy in spies.items():
        key = "PREC_S" if name == "_lora_shrink_expand_kernel" else "PREC"
        assert spy.launches and all(kw[key] == want for _, kw, _ in spy.launches), name
    assert _tl.skinny_precision(F32, torch.bfloat16) == _tl.SPLIT3
    assert _tl.skinny_precision(F32, F16) == "ieee" and _tl.skinny_precision(torch.bfloat16, torch.bfloat16) == \
        "default"


def test_da_pass_tiles():
    """The dA pass's tiles (``kernels._target.da_blocks``): 256 columns wide on a GPU target (its re-reads of the dY
    pass's partials scale with K / BLOCK_K), 8 warps with dropout; the interpreter and forced test shapes keep the
    skinny kernels' blocks, so the CPU tests drive the same code paths."""
    h200 = KT.LaunchTarget(num_sms=132, smem_per_block=227 * 1024, capability_major=9)
    assert KT.da_blocks(h200) == (64, 256, 4) and KT.da_blocks(h200, dropout=True) == (64, 256, 8)
    assert KT.da_blocks(None) == KT.skinny_blocks(None)
    with KT.forced_launch_shape(blocks=(16, 16, 4), programs=8):
        assert KT.da_blocks(h200, dropout=True) == (16, 16, 4)
    bm, bk, _ = KT.da_blocks(h200, dropout=True)
    assert bk % 8 == 0 and bk >= KT.skinny_blocks(h200, True)[1]  # the mask's Philox groups; never narrower


def test_shrink_expand_blocks():
    """The forward's single launch (``kernels._target.shrink_expand_blocks``) on an H200: row blocks as large as
    still cover the 132 SMs (64 -> 32 -> 16), the N range split only where 16-row blocks are too few (then each
    split re-reads its rows of x); with dropout the skinny kernels' narrower x tile."""
    h200 = KT.LaunchTarget(num_sms=132, smem_per_block=227 * 1024, capability_major=9)
    assert KT.shrink_expand_blocks(h200, 8192 * 2, 4096) == (64, 128, 128, 4, 1)
    assert KT.shrink_expand_blocks(h200, 8192, 4096) == (32, 128, 128, 4, 1)
    assert KT.shrink_expand_blocks(h200, 2048, 4096) == (16, 128, 128, 4, 2)
    assert KT.shrink_expand_blocks(h200, 16, 4096) == (16, 128, 128, 4, 32)  # decode: one row block, 32 splits
    assert KT.shrink_expand_blocks(h200, 1, 14336) == (16, 128, 128, 4, 112)
    # with dropout the narrower x tile, and 4 warps for a 16-row one (below)
    assert KT.shrink_expand_blocks(h200, 2048, 4096, dropout=True) == (16, 64, 128, 4, 2)
    assert KT.shrink_expand_blocks(h200, 8192, 4096, dropout=True) == (32, 64, 128, 8, 1)
    assert KT.shrink_expand_blocks(h200, 0, 4096)[4] >= 1
    with KT.forced_launch_shape(blocks=(16, 16, 4), programs=8):
        assert KT.shrink_expand_blocks(h200, 96, 144) == (16, 16, 16, 4, 2)


def test_dropout_tiles_give_every_thread_a_philox_group():
    """Every GPU tile that regenerates the dropout mask has at least one Philox group (8 elements of a row) per
    thread: with fewer, each call is computed by several threads (a 16 x 64 tile over 8 warps: 48 integer
    instructions per element in the sm_90 SASS instead of 22, ``.ci/dropout_sass.py``).  The shrink / dX expand
    (``skinny_blocks``), the dA pass (``da_blocks``) and the forward's single launch at every M from decode to
    past 64-row blocks, on an H200 and on smaller GPUs."""
    for sms in (132, 108, 84):
        tgt = KT.LaunchTarget(num_sms=sms, smem_per_block=227 * 1024, capability_major=9)
        tiles = [KT.skinny_blocks(tgt, True), KT.da_blocks(tgt, True)]
        for m in (1, 16, 100, 1024, 2048, 2112, 3000, 4224, 8192, 8448, 16384, 65536):
            bm, bk, _, warps, _ = KT.shrink_expand_blocks(tgt, m, 4096, True)
            tiles.append((bm, bk, warps))
        for bm, bk, warps in tiles:
            assert bm * bk // 8 >= 32 * warps, (sms, bm, bk, warps)


def test_host_grid_arithmetic_matches_triton():
    """The launchers' host integer helpers (``kernels._target.cdiv``, ``kernels._tl.pad_rank``) agree with
    ``triton.cdiv`` / ``triton.next_power_of_2``, which they replace on the host because both are constexpr
    functions there (each call unwraps its arguments: ~1.5 µs, ~30 calls per LoRA step)."""
    from fastpeft.kernels._tl import pad_rank
    for a in (0, 1, 2, 15, 16, 17, 8191, 8192, 8193, 2 ** 40 + 3):
        for b in (1, 3, 16, 64, 128, 256):
            assert KT.cdiv(a, b) == triton.cdiv(a, b) == -(-a // b)
    assert all(pad_rank(r) == max(16, triton.next_power_of_2(r)) for r in range(1, 600))


def test_dy_pass_column_sums_of_dy_times_u():
    """``lora_bwd_triton(dy_u=u)`` (DoRA's dm): the pass over dY also sums dY ⊙ u per column, as a sixth output of
    unsummed partials (several M chunks here) equal to Σ_m dY ⊙ u in fp32; the five usual outputs are bit-equal to
    the call without it; M = 0 gives one zero partial row."""
    c = Case((70,), 24, 50, 4, F16, adt=F32)
    x, w, dy = (t.to(DEV, F16) for t in (c.x, c.w, c.dy))
    a, bb = c.a.to(DEV, F32), c.bb.to(DEV, F32)
    u = torch.randn(70, 50, generator=torch.Generator().manual_seed(1)).to(DEV, F16)
    with KT.forced_launch_shape(blocks=(16, 16, 4), programs=8):
        y, s = KL.lora_fwd_triton(x, w, None, a, None, bb, 0.5, 0.0, 0)
        plain = KL.lora_bwd_triton(dy, x, w, a, None, bb, s, 0.5, 0.0, 0, True, False)
        *five, part = KL.lora_bwd_triton(dy, x, w, a, None, bb, s, 0.5, 0.0, 0, True, False, dy_u=u)
    assert all(torch.equal(p, q) for p, q in zip(plain, five))
    assert part.dtype == F32 and part.shape[0] > 1 and part.shape[1] == 50
    want = (dy.double() * u.double()).sum(0)
    assert rel_err(part.double().sum(0), want) <= 1e-6
    empty = KL.lora_bwd_triton(dy[:0], x[:0], w, a, None, bb, s[:0], 0.5, 0.0, 0, True, False, dy_u=u[:0])
    assert len(empty) == 6 and torch.equal(empty[5], torch.zeros(1, 50, device=DEV))


def test_tma_allocator_is_installed_unless_the_user_set_one():
    """Device-side TMA descriptors need a workspace at launch (the first GPU run's fused launches all failed with
    "no allocator was set"): the GEMM launcher gives Triton torch's allocator when none is set, and leaves a user's."""
    import contextvars

    from fastpeft.kernels import _gemm as KG
    from triton.runtime import _allocation

    def run(fn):
        return contextvars.copy_context().run(fn)  # the allocator is a context variable: keep the test's own

    def fresh():
        _allocation._allocator.set(_allocation._NULL_ALLOCATOR)
        KG._ensure_allocator()
        return _allocation._allocator.get()

    def user():
        mine = lambda size, alignment, stream: None  # noqa: E731
        triton.set_allocator(mine)
        KG._ensure_allocator()
        return _allocation._allocator.get() is mine

    assert run(fresh) is KG._torch_alloc
    assert run(user)


# ---------------------------------------------------------------------------------------------------------------
# the dropout stream's Philox: fastpeft's wide-multiply rounds give tl.philox's values
# ---------------------------------------------------------------------------------------------------------------

from fastpeft.kernels._philox import philox4x32_10  # noqa: E402


@triton.jit
def _both_philox(c_ptr, out_ptr, k0, k1, N: tl.constexpr):
    offs = tl.arange(0, N)
    c0 = tl.load(c_ptr + offs).to(tl.uint32)
    c1 = tl.load(c_ptr + N + offs).to(tl.uint32)
    c2 = tl.load(c_ptr + 2 * N + offs).to(tl.uint32)
    c3 = tl.load(c_ptr + 3 * N + offs).to(tl.uint32)
    mine = philox4x32_10(k0.to(tl.uint32), k1.to(tl.uint32), c0, c1, c2, c3)
    theirs = tl.philox((k1.to(tl.uint64) << 32) | k0.to(tl.uint64), c0, c1, c2, c3)
    for j in tl.static_range(4):
        tl.store(out_ptr + j * N + offs, mine[j].to(tl.int64))
        tl.store(out_ptr + (4 + j) * N + offs, theirs[j].to(tl.int64))


@pytest.mark.interpreter
def test_wide_multiply_philox_gives_tl_philox_values():
    """``kernels._philox.philox4x32_10`` (each round's two products as 64-bit multiplies: one IMAD.WIDE.U32 each
    in the sm_90 SASS) returns ``tl.philox``'s four words for random counters and keys, top bits set included."""
    n = 256
    g = torch.Generator().manual_seed(3)
    c = torch.randint(0, 2 ** 32, (4 * n,), generator=g, dtype=torch.int64)
    c[:4] = torch.tensor([0, 2 ** 32 - 1, 2 ** 31, 1])
    out = torch.empty(8 * n, dtype=torch.int64)
    for k0, k1 in ((0, 0), (2 ** 32 - 1, 2 ** 32 - 1), (123456789, 987654321), (2 ** 31 + 7, 5)):
        _both_philox[(1,)](c, out, k0, k1, N=n)
        assert torch.equal(out[:4 * n], out[4 * n:]), (k0, k1)
        assert out.min() >= 0 and out.max() < 2 ** 32 and len(out[:4 * n].unique()) > 4 * n - 4
