"""Triton (IA)³ kernels (``fastpeft.kernels.ia3``) against the fp64 torch reference, both modes.

Runs in Triton's interpreter on CPU when there is no GPU (``tests/conftest.py``); shapes are small but span several
tiles with masked tails, M = 0 and 1, 3-D and non-contiguous x, a transposed-view weight, fp32, fp16 and bf16 (the
interpreter's bf16 ``tl.dot`` is broken, so there the kernels upcast bf16 dot operands to fp32), an fp32 scale
vector on a 16-bit base, and the TMA path.
Accuracy rule (FA's, tests/testing_utils.py: assert_fa_rule): err(triton, fp64 ref) <= MATMUL_FACTOR (grads
GRAD_FACTOR) * err(torch same dtype) + a rounding-level floor.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastpeft.functional as FN

from testing_utils import GRAD_FACTOR, LaunchSpy, MATMUL_FACTOR, PLAIN_MATMUL_TOL, assert_fa_rule, rel_err  # noqa: F401

pytest.importorskip("triton")
from fastpeft.kernels import _target as KT  # noqa: E402
from fastpeft.kernels import ia3 as KI  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
F64, F32, F16 = torch.float64, torch.float32, torch.float16
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


class Case:
    """One IA3 problem: fp64 masters cast per run to (dtype, l dtype) in the requested layouts."""

    def __init__(self, lead, k, n, ff, dtype, ldt=None, with_bias=True, w_t=False, x_noncontig=False, l_zero=(),
                 l_tiny=()):
        self.lead, self.k, self.n, self.ff = tuple(lead), k, n, ff
        self.dtype, self.ldt = dtype, ldt or dtype
        self.with_bias, self.w_t, self.x_noncontig = with_bias, w_t, x_noncontig
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(*self.lead, k, generator=g, dtype=F64)
        self.w = torch.randn(n, k, generator=g, dtype=F64) / math.sqrt(k)
        self.b = torch.randn(n, generator=g, dtype=F64)
        self.l = 1.0 + 0.5 * torch.randn(k if ff else n, generator=g, dtype=F64)
        # entries where y / l cannot give back the unscaled values: exactly 0, or below the dtype's tiny_l
        self.l[list(l_zero)] = 0.0
        self.l[list(l_tiny)] = 2.0 ** -12
        self.dy = torch.randn(*self.lead, n, generator=g, dtype=F64)

    def run(self, backend, dtype=None, ldt=None):
        dtype, ldt = dtype or self.dtype, ldt or self.ldt
        if self.x_noncontig:
            xl = self.x.reshape(-1, self.k).t().contiguous().to(DEV, dtype).requires_grad_(True)
            x = xl.t().reshape(*self.lead, self.k)
        else:
            xl = x = self.x.to(DEV, dtype).requires_grad_(True)
        w = self.w.t().contiguous().to(DEV, dtype).t() if self.w_t else self.w.to(DEV, dtype)
        b = self.b.to(DEV, dtype).requires_grad_(True) if self.with_bias else None
        lv = self.l.to(DEV, ldt).requires_grad_(True)
        y = FN.ia3_linear(x, w, b, lv, self.ff, backend=backend)
        y.backward(self.dy.to(DEV, y.dtype))
        out = {"y": y, "dx": xl.grad.t() if self.x_noncontig else xl.grad, "dl": lv.grad}
        if self.with_bias:
            out["dbias"] = b.grad
        return {kk: v.detach().double().cpu() for kk, v in out.items()}


def check_fa_rule(case: Case, backend: str = "triton"):
    tri, same, ref64 = case.run(backend), case.run("torch"), case.run("torch", F64, F64)
    for name, want in ref64.items():
        factor = MATMUL_FACTOR if name == "y" else GRAD_FACTOR
        assert_fa_rule(tri[name], want, same[name], factor, name, dtype=case.ldt if name == "dl" else case.dtype)


CASES = {
    "out_fp32_tails": dict(lead=(37,), k=50, n=75, ff=False, dtype=F32),
    "in_fp32_tails_wT": dict(lead=(37,), k=75, n=45, ff=True, dtype=F32, w_t=True),
    "out_fp16_fp32l_3d_wT_nobias": dict(lead=(2, 9), k=33, n=40, ff=False, dtype=F16, ldt=F32, with_bias=False,
                                        w_t=True),
    "in_fp16_fp32l_m1": dict(lead=(1,), k=33, n=20, ff=True, dtype=F16, ldt=F32),
    "in_fp32_noncontig_nobias": dict(lead=(19,), k=24, n=30, ff=True, dtype=F32, with_bias=False,
                                     x_noncontig=True),
    "out_fp16_noncontig": dict(lead=(19,), k=24, n=30, ff=False, dtype=F16, x_noncontig=True),
    # bf16 (the interpreter upcasts bf16 dot operands to fp32: kernels._tl.dot_prec), fp32 l
    "out_bf16_fp32l": dict(lead=(13,), k=20, n=35, ff=False, dtype=torch.bfloat16, ldt=F32),
    "in_bf16": dict(lead=(13,), k=35, n=20, ff=True, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("name", ["out_fp32_tails", "in_fp32_tails_wT", "out_bf16_fp32l", "in_fp16_fp32l_m1"])
def test_ia3_triton_fused_variant_matches_fp64_reference(name):
    """The fused variant (l in the Triton GEMM's prologue / epilogue), chosen explicitly."""
    check_fa_rule(Case(**CASES[name]), "triton:fused")


@pytest.mark.parametrize("activations", [True, False], ids=["fold_activations", "fold_w"])
@pytest.mark.parametrize("ff", [False, True], ids=["output", "input"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_ia3_zero_and_tiny_scale_entries_are_exact(monkeypatch, ff, dtype, activations):
    """l entries of 0 (and, in fp16, below tiny_l) where y / l or G' / l cannot recover the unscaled values: output
    mode recomputes z for those column blocks only, input mode runs the backward GEMM with l' = 1 there (folding l
    into W), or never divides by l (folding it into x / dX).  Every gradient still matches the fp64 reference,
    and dl of a zero entry is Σ_m dy ⊙ z (not 0, not NaN)."""
    monkeypatch.setattr(KI, "scales_activations", lambda m, other, backward=False: activations)
    n_feat = 40 if ff else 45
    tiny = (3, 17) if dtype == F16 else ()
    def case():
        return Case((21,), 40, 45, ff, dtype, ldt=F32, l_zero=(0, 5, n_feat - 1), l_tiny=tiny)
    check_fa_rule(case())
    assert case().run("triton")["dl"][0].abs() > 0


@pytest.mark.parametrize("name", list(CASES))
def test_ia3_triton_matches_fp64_reference(name):
    check_fa_rule(Case(**CASES[name]))


@pytest.mark.parametrize("ff", [False, True], ids=["output", "input"])
def test_ia3_triton_tma_path(monkeypatch, ff):
    monkeypatch.setenv("FASTPEFT_TRITON_TMA", "1")
    if not KT.use_tma(torch.randn(20, 48, device=DEV, dtype=F16), torch.randn(40, 48, device=DEV, dtype=F16)):
        pytest.skip("this Triton has no tensor descriptors (or this GPU cannot use them)")
    check_fa_rule(Case((20,), 48, 40, ff, F16, ldt=F32), "triton:fused")


@pytest.mark.parametrize("ff", [False, True], ids=["output", "input"])
def test_ia3_triton_empty_batch(ff):
    k, n = 12, 7
    x = torch.randn(0, k, device=DEV, requires_grad=True)
    w, b = torch.randn(n, k, device=DEV), torch.randn(n, device=DEV, requires_grad=True)
    lv = torch.randn(k if ff else n, device=DEV, requires_grad=True)
    y = FN.ia3_linear(x, w, b, lv, ff, backend="triton")
    assert y.shape == (0, n)
    y.sum().backward()
    assert x.grad.shape == (0, k)
    assert torch.equal(lv.grad, torch.zeros_like(lv)) and torch.equal(b.grad, torch.zeros_like(b))


def test_ia3_input_mode_dl_without_dx():
    """needs_dx=False still runs the G = dY W GEMM for dl, but stores no dx; dl is identical to the dx run's."""
    c = Case((23,), 30, 18, True, F32)
    x, w, lv, dy = (t.to(DEV, F32) for t in (c.x, c.w, c.l, c.dy))
    for variant in KT.VARIANTS:
        y, saved = KI.ia3_fwd_triton(x, w, None, lv, True, variant=variant)
        with_dx = KI.ia3_bwd_triton(dy, x, w, lv, saved, True, True, True, variant=variant)
        no_dx = KI.ia3_bwd_triton(dy, x, w, lv, saved, True, False, False, variant=variant)
        assert no_dx[0].numel() == 0 and no_dx[2].numel() == 0
        assert torch.equal(with_dx[1], no_dx[1])


def test_ia3_output_mode_saves_z_fused_and_y_cublas():
    """Output mode: the fused variant returns z = x Wᵀ + b (the unscaled base output) as the saved tensor; the
    cublas variant returns an empty one (the op keeps y, x and the bias instead, and its backward needs y=)."""
    c = Case((9,), 20, 14, False, F32)
    x, w, b, lv = (t.to(DEV, F32) for t in (c.x, c.w, c.b, c.l))
    y1, s1 = KI.ia3_fwd_triton(x, w, b, lv, False)
    assert s1.shape == (0,)
    with pytest.raises(ValueError, match="needs the forward's output y="):
        KI.ia3_bwd_triton(torch.ones_like(y1), x, w, lv, s1, False, True, True)
    y, z = KI.ia3_fwd_triton(x, w, b, lv, False, variant="fused")
    want = x.double() @ w.double().t() + b.double()
    assert rel_err(z, want) <= PLAIN_MATMUL_TOL[F32]
    assert rel_err(y, want * lv.double()) <= PLAIN_MATMUL_TOL[F32]


@pytest.mark.parametrize("ff", [False, True], ids=["output", "input"])
def test_opcheck_ia3_triton(ff):
    g = torch.Generator().manual_seed(1)

    def rnd(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(DEV).requires_grad_(grad)

    m, k, n = 5, 18, 11
    for backend in ("triton", "triton:fused"):
        args = (rnd(m, k, grad=True), rnd(n, k), rnd(n, grad=True), rnd(k if ff else n, grad=True), ff, backend)
        torch.library.opcheck(torch.ops.fastpeft.ia3_fwd.default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))
        x, w, b, lv = (t.detach() for t in args[:4])
        y, saved = KI.ia3_fwd_triton(x, w, b, lv, ff, variant=backend.partition(":")[2] or None)
        keep_y = not ff and saved.dim() == 1
        bwd_args = (rnd(m, n), x if (ff or keep_y) else x.new_empty(0), w, lv, saved, ff, True, True, backend)
        if keep_y:
            bwd_args = bwd_args + (y, b)
        torch.library.opcheck(torch.ops.fastpeft.ia3_bwd.default, bwd_args,
                              test_utils=("test_schema", "test_faketensor"))


@cuda_only
@pytest.mark.parametrize("ff", [False, True], ids=["output", "input"])
@pytest.mark.parametrize("ldt", [torch.bfloat16, torch.float32], ids=["bf16_l", "fp32_l"])
def test_ia3_bf16_parity_gpu(ff, ldt):
    check_fa_rule(Case((4, 96), 512, 384, ff, torch.bfloat16, ldt=ldt))
    check_fa_rule(Case((3,), 1024, 2048, ff, torch.bfloat16, ldt=ldt, w_t=True))


def test_ia3_launchers_report_kernels_and_skip_fake_tensors():
    """Cost model: with fake tensors at an H200 shape the launchers report their kernels (one pass over W per call,
    one column reduction in the backward; dl's and dbias's partials summed into their dtypes by one launch in input
    mode, by spare programs of the backward's W scaling in output mode) and return correctly shaped outputs without
    launching."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastpeft import _cost
    m, k, n = 8192, 4096, 4096
    for ff in (False, True):
        with FakeTensorMode(), _cost.recording() as rec:
            x = torch.empty(m, k, dtype=torch.bfloat16)
            w = torch.empty(n, k, dtype=torch.bfloat16)
            b = torch.empty(n, dtype=torch.bfloat16)
            lv = torch.empty(k if ff else n, dtype=torch.float32)
            y, saved = KI.ia3_fwd_triton(x, w, b, lv, ff)
            dx, dl, db = KI.ia3_bwd_triton(torch.empty_like(y), x, w, lv, saved, ff, True, True, y=y, bias=b)
        assert y.shape == (m, n) and dx.shape == (m, k) and dl.shape == lv.shape and db.shape == (n,)
        names = [c.name for c in rec]
        want = (["ia3_scale_w", "ia3_scale_w", "ia3_dl_in", "ia3_colsum", "sum_partials"] if ff
                else ["ia3_scale_w", "ia3_dl_out", "ia3_scale_w"])
        assert names == want, names
        assert rec[0].bytes_read >= n * k * 2 and rec[0].bytes_written == n * k * 2  # one pass over W
        if not ff:  # the backward's W scaling also sums dbias's partials (fp32) into W's dtype (dl: one split here)
            assert rec[2].bytes_written == n * k * 2 + n * 2 and rec[2].bytes_read >= n * k * 2 + n * 4, rec[2]


@pytest.mark.parametrize("ldt", [F32, F16], ids=["fp32l", "fp16l"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_ia3_output_mode_w_scaling_finishes_dl_and_dbias(monkeypatch, ldt, with_bias):
    """Output mode: the backward's W scaling sums dl's and dbias's split partials in spare rows of its grid.  With
    the production block-count structure forced at a small size (several M splits, so several partials; several
    finishing tiles), dl and dbias still meet the accuracy rule, and the finishing rows really ran."""
    spy = LaunchSpy(KI._ia3_scale_w_kernel)
    monkeypatch.setattr(KI, "_ia3_scale_w_kernel", spy)
    with KT.forced_launch_shape(blocks=(16, 16, 4), programs=1024):
        # N = 2100 columns: 3 finishing tiles of 1024 for dl alone; M = 70: 5 M blocks, each its own split
        check_fa_rule(Case((70,), 24, 2100, False, F16, ldt=ldt, with_bias=with_bias))
    finishing = [(grid, kw) for grid, kw, _ in spy.launches if kw["FINISH"]]
    assert finishing, "no W scaling ran finishing rows"
    for grid, kw in finishing:
        n_blocks = -(-2100 // 16)
        assert grid[0] > n_blocks


@pytest.mark.parametrize("activations", [True, False], ids=["fold_activations", "fold_w"])
@pytest.mark.parametrize("name", list(CASES))
def test_ia3_both_foldings_match_fp64_reference(monkeypatch, name, activations):
    """l is folded into the activations (output mode: y *= l, dY ⊙ l written by the dl pass; input mode: x ⊙ l,
    and G = dY W turned into dX by the dl pass) where that moves fewer bytes than scaling W
    (``kernels.ia3.scales_activations``), else into W; each way, on every case, the output and every gradient meet
    the accuracy rule."""
    monkeypatch.setattr(KI, "scales_activations", lambda m, other, backward=False: activations)
    check_fa_rule(Case(**CASES[name]))


def _folding_inputs(m, k, n, n_l, dtype, ldt, seed):
    """x (M, K), W (N, K), b (N,), dY (M, N) in `dtype`; l (n_l,) near 1 in `ldt`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    l = (1 + 0.5 * torch.randn(n_l, generator=g)).to(ldt)
    return x, w, b, l, torch.randn(m, n, generator=g).to(dtype)


def _kernel_rounded(t: torch.Tensor, l: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """round(t ⊙ l) into `dtype` as a Triton kernel rounds it: to nearest even on a GPU; toward zero for bf16 in
    the CPU interpreter (its fp32 -> bf16 cast truncates)."""
    prod = t.to(torch.float32) * l.to(torch.float32)
    if dtype == torch.bfloat16 and KT.interpret_mode():
        prod = (prod.view(torch.int32) & -65536).view(torch.float32)  # toward zero: exact in bf16
    return prod.to(dtype)


@pytest.mark.parametrize("dtype, ldt", [(F16, F32), (torch.bfloat16, torch.bfloat16)], ids=["fp16_fp32l", "bf16"])
def test_ia3_input_mode_activation_folding_is_peft_exact(monkeypatch, dtype, ldt):
    """Where M < N the cublas forward is round(x ⊙ l) then F.linear (HF PEFT's operand), and the backward (M < 2N)
    is G = dY W, then one pass over (G, x) giving dl = Σ_m G ⊙ x (no division by l) and dX = round(G ⊙ l) in place;
    no launch over W.  (In the interpreter the kernel's fp32 -> bf16 rounding is toward zero; see below.)"""
    spy = LaunchSpy(KI._ia3_scale_w_kernel)
    monkeypatch.setattr(KI, "_ia3_scale_w_kernel", spy)
    m, k, n = 21, 45, 40
    assert KI.scales_activations(m, n) and KI.scales_activations(m, n, backward=True)
    x, w, b, l, dy = _folding_inputs(m, k, n, k, dtype, ldt, seed=4)
    l[3] = 0.0
    y, saved = KI.ia3_fwd_triton(x, w, b, l, True)
    xs = (x.to(torch.float32) * l.to(torch.float32)).to(dtype)
    assert torch.equal(y, torch.nn.functional.linear(xs, w, b))
    dx, dl, db = KI.ia3_bwd_triton(dy, x, w, l, saved, True, True, True)
    gm = torch.mm(dy, w)
    assert torch.equal(dx, _kernel_rounded(gm, l, dtype)) and not spy.launches
    ref_dl = (gm.double() * x.double()).sum(0)
    assert rel_err(dl.double(), ref_dl) <= (1e-5 if ldt == F32 else 1e-2) and dl[3] != 0  # dl in l's dtype


@pytest.mark.parametrize("dtype, ldt", [(F16, F32), (torch.bfloat16, torch.bfloat16)], ids=["fp16_fp32l", "bf16"])
def test_ia3_output_mode_activation_folding_is_peft_exact(monkeypatch, dtype, ldt):
    """Where M < K the cublas forward is F.linear then y *= l (HF PEFT's own rounding: round(z · l)), and the backward
    (M < 2K) is one pass over (dY, y) that also writes round(dY ⊙ l), then dX = that @ W: bit for bit the operands
    PEFT's layer rounds, with no launch over W (``scale_w`` never runs).  (Triton's CPU interpreter rounds fp32 ->
    bf16 toward zero, where a GPU rounds to nearest even: there the bf16 reference operand is truncated too.)"""
    spy = LaunchSpy(KI._ia3_scale_w_kernel)
    monkeypatch.setattr(KI, "_ia3_scale_w_kernel", spy)
    dl_spy = LaunchSpy(KI._ia3_dl_out_kernel)
    monkeypatch.setattr(KI, "_ia3_dl_out_kernel", dl_spy)
    m, k, n = 21, 40, 45
    assert KI.scales_activations(m, k) and KI.scales_activations(m, k, backward=True)
    x, w, b, l, dy = _folding_inputs(m, k, n, n, dtype, ldt, seed=3)
    y, saved = KI.ia3_fwd_triton(x, w, b, l, False)
    z = torch.nn.functional.linear(x, w, b)
    assert torch.equal(y, (z.to(torch.float32) * l.to(torch.float32)).to(dtype))
    dx, dl, db = KI.ia3_bwd_triton(dy, x, w, l, saved, False, True, True, y=y, bias=b)
    assert torch.equal(dx, torch.mm(_kernel_rounded(dy, l, dtype), w))
    assert not spy.launches
    (grid, kw, _), = dl_spy.launches
    assert kw["WRITE_DYS"]
    ref_dl = (dy.double() * z.double()).sum(0)
    assert rel_err(dl.double(), ref_dl) <= 1e-2 and rel_err(db.double(), (dy.double() * l.double()).sum(0)) <= 1e-2


def test_ia3_activation_folding_launchers_outside_autograd_function():
    """The launchers are called below autograd (the op's Function, the custom op); called directly in grad mode on
    inputs that require grad (the compile check, a user's own Function) the activation folding still runs."""
    x = torch.randn(5, 12, requires_grad=True)
    w = torch.randn(8, 12)
    for ff, n_l in ((True, 12), (False, 8)):
        l = torch.randn(n_l, requires_grad=True)
        y, _ = KI.ia3_fwd_triton(x, w, None, l, ff)
        want = torch.nn.functional.linear(x * l, w) if ff else torch.nn.functional.linear(x, w) * l
        assert y.shape == (5, 8) and rel_err(y.detach(), want.detach()) <= 1e-6
