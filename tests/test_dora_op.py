"""DoRA's linear op on the fused path (``fastpeft.ops.dora``: the LoRA op on k-scaled operands plus one column
reduction), run on the triton backend - in Triton's interpreter without a GPU (``tests/conftest.py``).

Every output and gradient (x, A, B, magnitude, bias) against an fp64 reference, bounded by the torch backend's same-dtype
error (2x for outputs, 3x for gradients, ``testing_utils.assert_fa_rule``), on odd shapes (M = 0 and 1, sizes not
multiples of 16, r = 1), a transposed-view weight (Conv1D), a non-contiguous x, and k with a zero entry; the layer
against HF PEFT's DoRA in fp32 (Llama and GPT-2), and in bf16 against PEFT's own bf16 error; the kernels each
direction launches (the pass budget)."""

from __future__ import annotations

import math

import pytest
import torch

import fastpeft.functional as FN
from fastpeft.ops import dora as D

from testing_utils import GRAD_FACTOR, MATMUL_FACTOR, assert_fa_rule

pytest.importorskip("triton")

F64 = torch.float64
DEV = "cuda" if torch.cuda.is_available() else "cpu"


class Case:
    def __init__(self, m, k, n, r, bias=True, w_t=False, x_noncontig=False, zero_k=False, scaling=0.75):
        g = torch.Generator().manual_seed(7)
        self.m, self.k, self.n, self.r = m, k, n, r
        self.bias, self.w_t, self.x_noncontig, self.scaling = bias, w_t, x_noncontig, scaling
        self.x = torch.randn(m, k, generator=g, dtype=F64)
        self.w = torch.randn(n, k, generator=g, dtype=F64) / math.sqrt(k)
        self.b = torch.randn(n, generator=g, dtype=F64)
        self.a = torch.randn(r, k, generator=g, dtype=F64) / math.sqrt(k)
        self.bb = torch.randn(n, r, generator=g, dtype=F64) / math.sqrt(r)
        self.kv = torch.rand(n, generator=g, dtype=F64) + 0.5
        if zero_k:
            self.kv[n // 2] = 0.0
        self.dy = torch.randn(m, n, generator=g, dtype=F64)

    def run(self, backend, dtype, adt=torch.float32):
        """Output and the gradients of x, A, B, k (and bias) as fp64."""
        if self.x_noncontig:
            xl = self.x.t().contiguous().to(DEV, dtype).detach().requires_grad_(True)
            x = xl.t()
        else:
            xl = x = self.x.to(DEV, dtype, copy=True).requires_grad_(True)
        w = self.w.t().contiguous().to(DEV, dtype).t() if self.w_t else self.w.to(DEV, dtype)
        b = self.b.to(DEV, dtype, copy=True).requires_grad_(True) if self.bias else None
        adt = F64 if dtype == F64 else adt
        a, bb, kv = (t.to(DEV, adt, copy=True).requires_grad_(True) for t in (self.a, self.bb, self.kv))
        y = FN.dora_linear(x, w, b, a, bb, kv, self.scaling, backend=backend)
        y.backward(self.dy.to(DEV, dtype))
        outs = [y, xl.grad, a.grad, bb.grad, kv.grad] + ([b.grad] if self.bias else [])
        return [o.detach().double().cpu() for o in outs]


NAMES = ("y", "dx", "dA", "dB", "dm", "dbias")

CASES = [
    Case(37, 48, 40, 3),
    Case(1, 24, 17, 1),
    Case(70, 33, 130, 16, bias=False),
    Case(45, 40, 56, 4, w_t=True, x_noncontig=True),
    Case(29, 32, 24, 2, zero_k=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c.m}K{c.k}N{c.n}r{c.r}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dora_op_triton_vs_fp64(case, dtype):
    ref = case.run("torch", F64)
    same = case.run("torch", dtype)
    got = case.run("triton", dtype)
    for name, g, s, r in zip(NAMES, got, same, ref):
        factor = MATMUL_FACTOR if name == "y" else GRAD_FACTOR
        assert_fa_rule(g, r, s, factor=factor, what=f"{name} {dtype}", dtype=dtype)


def test_dora_op_zero_rows():
    case = Case(0, 24, 17, 2)
    for name, g in zip(NAMES, case.run("triton", torch.float32)):
        if name in ("y", "dx"):
            assert g.numel() == 0, name
        else:
            assert torch.equal(g, torch.zeros_like(g)), name


def test_dora_op_zero_magnitude_column():
    """m = 0 in a column: the output there is (numerically) the bias, and dm is still Σ dY ⊙ z / n (the op runs the
    column at k = ±tiny so that u / k recovers z)."""
    case = Case(29, 32, 24, 2, zero_k=True)
    ref = case.run("torch", F64)
    got = case.run("triton", torch.float32)
    col = case.n // 2
    assert (got[0][:, col] - case.b[col]).abs().max() <= 1e-6
    assert abs(got[4][col] - ref[4][col]) <= 1e-5 * ref[4].abs().max()


def test_dora_op_kernels_per_direction():
    """The pass budget, with fake tensors at a Llama-8B q_proj shape: forward = the prep (one launch: one pass over W
    for W Aᵀ and A Aᵀ, then the per-row norm and k ⊙ W written), the LoRA op's kernels; backward = W rebuilt,
    the LoRA backward's kernels (whose pass over dY also reads u for dm's column sums) and one small kernel
    finishing dm and dB."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastpeft import _cost
    m, k, n, r = 8192, 4096, 4096, 16
    with FakeTensorMode(), _cost.recording() as rec:
        x = torch.empty(m, k, dtype=torch.bfloat16, requires_grad=True)
        w = torch.empty(n, k, dtype=torch.bfloat16)
        a = torch.empty(r, k, requires_grad=True)
        b = torch.empty(n, r, requires_grad=True)
        mag = torch.empty(n, requires_grad=True)
        y = D.dora_apply(x, w, None, a, b, mag, torch.empty(n), 2.0, "triton")
        n_fwd = len(rec)
        y.backward(torch.empty_like(y))
    names = [c.name for c in rec]
    assert names[:n_fwd] == ["dora_prep", "lora_shrink_expand"], names
    # W read (twice: the second right after the first, for k ⊙ W) and k ⊙ W written, in bf16
    assert 2 * n * k * 2 + r * k * 4 <= rec[0].bytes_read <= 2 * n * k * 2 + r * k * 4 + n * (r * 4 + 8)
    assert n * k * 2 <= rec[0].bytes_written <= n * k * 2 + n * (r * 4 + 8)
    assert names[n_fwd:] == ["ia3_scale_w", "lora_dy", "lora_da_dx", "sum_partials", "dora_grads"], names
    # dY and u read once each, in LoRA's pass over dY (dm's column sums ride along); the finishing kernel reads
    # only (P, N) partials and (N, r) vectors
    assert rec[n_fwd + 1].bytes_read >= 2 * m * n * 2 and rec[-1].bytes_read < m * n


def test_dora_linear_kernels_include_one_pass_over_w_for_the_norm():
    """The whole layer on triton: the row norm is one prep launch streaming W in its own dtype (W Aᵀ, A Aᵀ; no fp32
    copy of W) and giving n, k = m / n, k ⊙ B and k ⊙ W, then the op's kernels; ‖W‖² comes from the caller's
    cache."""
    from fastpeft import _cost
    case = Case(21, 40, 24, 4)
    x = case.x.to(torch.bfloat16).requires_grad_(True)
    w = case.w.to(torch.bfloat16)
    a, b, m = (t.float().requires_grad_(True) for t in (case.a, case.bb, case.kv))
    w_sq = w.float().square().sum(1)
    with _cost.recording() as rec:
        y = FN.dora_linear(x, w, None, a, b, m, 0.5, weight_sq=w_sq, backend="triton")
        n_fwd = len(rec)
        y.backward(torch.ones_like(y))
    names = [c.name for c in rec]
    assert names[:n_fwd] == ["dora_prep", "lora_shrink_expand"], names
    n, r = w.shape[0], a.shape[0]
    assert 2 * w.numel() * 2 + a.numel() * 4 <= rec[0].bytes_read <= 2 * w.numel() * 2 + a.numel() * 4 + n * (r * 4 + 8)
    assert names[n_fwd:] == ["ia3_scale_w", "lora_dy", "lora_da_dx", "sum_partials", "dora_grads"], names


def test_dora_linear_validates_arguments():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    a, b = torch.randn(2, 8), torch.randn(5, 2)
    with pytest.raises(ValueError, match="magnitude must have shape"):
        FN.dora_linear(x, w, None, a, b, torch.ones(4), 1.0)
    with pytest.raises(TypeError, match="magnitude must be a floating-point"):
        FN.dora_linear(x, w, None, a, b, torch.ones(5, dtype=torch.int64), 1.0)
    with pytest.raises(TypeError, match="magnitude"):
        FN.dora_linear(x, w, None, a, b, [1.0] * 5, 1.0)
    with pytest.raises(ValueError, match="weight_sq must have shape"):
        FN.dora_linear(x, w, None, a, b, torch.ones(5), 1.0, weight_sq=torch.ones(3))
    with pytest.raises(ValueError, match="lora_B must have shape"):
        FN.dora_linear(x, w, None, a, torch.randn(4, 2), torch.ones(5), 1.0)


# ---------------------------------------------------------------------------------------------------------------
# the layer (fastpeft.tuners.lora) on the triton backend against HF PEFT
# ---------------------------------------------------------------------------------------------------------------


def _count_dora_calls(monkeypatch) -> list:
    calls = []
    apply = D.DoraLinearFunction.apply

    def counted(*args):
        calls.append(args[8])   # the backend
        return apply(*args)
    monkeypatch.setattr(D.DoraLinearFunction, "apply", counted)
    return calls


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_layer_on_triton_matches_peft(arch, monkeypatch):
    """fp32, no dropout: logits, loss and every gradient (magnitude included) equal PEFT's to 1e-5 in train and
    eval, with every DoRA layer on the fused op (GPT-2: Conv1D's transposed weight)."""
    pytest.importorskip("peft")
    from testing_utils import assert_lm_parity, dora_pair

    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    calls = _count_dora_calls(monkeypatch)
    p, f = dora_pair(arch)
    assert_lm_parity(p, f, train=True)
    assert_lm_parity(p, f, train=False)
    assert calls and set(calls) == {"triton"}


def test_dora_layer_bf16_on_triton_within_peft_error(monkeypatch):
    """bf16 base, fp32 adapters (PEFT's default), training step on the triton backend: output within 2x and every
    gradient (x, A, B, magnitude, bias) within 3x of HF PEFT's own bf16 error, both against an fp64 copy of PEFT's
    layer."""
    peft = pytest.importorskip("peft")
    import copy

    import fastpeft
    from testing_utils import OneLinear, randomize_trainable, rel_err, wrap_pair

    torch.manual_seed(0)
    base = OneLinear(96, 80)
    kw = dict(r=8, lora_alpha=16, target_modules=["proj"], use_dora=True)
    p, f = wrap_pair(base.to(torch.bfloat16), peft.LoraConfig(**kw), fastpeft.LoraConfig(**kw))
    randomize_trainable(p, f, scale=0.3)
    ref = copy.deepcopy(p).double()
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    calls = _count_dora_calls(monkeypatch)
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(33, 96, generator=g, dtype=F64)
    dy64 = torch.randn(33, 80, generator=g, dtype=F64)
    results = {}
    for name, model, dt in (("ref", ref, F64), ("peft", p, torch.bfloat16), ("fast", f, torch.bfloat16)):
        model.train()
        x = x64.to(dt, copy=True).requires_grad_(True)
        layer = model.base_model.model.proj
        layer.base_layer.bias.requires_grad_(True)
        y = layer(x)
        y.backward(dy64.to(dt))
        results[name] = {"y": y, "dx": x.grad, "dA": layer.lora_A["default"].weight.grad,
                         "dB": layer.lora_B["default"].weight.grad,
                         "dm": layer.lora_magnitude_vector["default"].weight.grad,
                         "dbias": layer.base_layer.bias.grad}
    assert calls == ["triton"]
    for key, want in results["ref"].items():
        err_f, err_p = rel_err(results["fast"][key], want), rel_err(results["peft"][key], want)
        factor = 2 if key == "y" else 3
        assert err_f <= factor * err_p, (key, err_f, err_p)


@pytest.mark.parametrize("blocks", [None, (32, 64, 4)], ids=["tiles16", "tiles16x64"])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
@pytest.mark.parametrize("w_t", [False, True], ids=["W", "Wt_view"])
def test_dora_prep_triton_vs_fp64_with_many_cancelling_rows(scale, w_t, blocks):
    """The Triton prep (``kernels/dora.py``, one launch): its row norm n = kn / kk within 2x the direct fp32 norm's
    error (PEFT's) against fp64, with 40 cancelling rows (more than the torch path's sync-free
    DORA_SYNC_FREE_FALLBACK_ROWS): the kernel recomputes every one of them, in whichever program they fall; a bf16 W
    with the same bound against its own direct norm; kk = m / n and B_k = kk ⊙ B to fp32 rounding.  Each program
    streams its rows of W over several K tiles (13 of 16 columns; 4 of 64, the last ragged) forming W Aᵀ and A Aᵀ."""
    from fastpeft.kernels._target import forced_launch_shape
    from fastpeft.kernels.dora import dora_prep_triton, prep_blocks
    g = torch.Generator().manual_seed(0)
    out, inn, r, s = 150, 200, 3, 2.0
    W = torch.randn(out, inn, generator=g, dtype=F64) * 0.05
    A = torch.randn(r, inn, generator=g, dtype=F64) * 0.1
    B = torch.randn(out, r, generator=g, dtype=F64) * 0.1 * scale
    m = torch.rand(out, generator=g, dtype=F64) + 0.5
    bad = torch.arange(0, 120, 3)  # 40 rows, spread over many programs
    W[bad] = -s * (B[bad] @ A) + 1e-4 * W[bad]
    eps = torch.finfo(torch.float32).eps
    for wdt in (torch.float32, torch.bfloat16):
        Wd = W.to(wdt)
        ref = torch.linalg.norm(Wd.double() + s * (B @ A), dim=1)
        direct = torch.linalg.norm(Wd.float() + s * (B.float() @ A.float()), dim=1).double()
        w_in = Wd.t().contiguous().t() if w_t else Wd
        with forced_launch_shape(blocks=blocks):
            bn, bk, _ = prep_blocks(None)
            kk, kn, b_k = dora_prep_triton(w_in, A.float(), B.float(), m.float(), s, Wd.float().square().sum(1),
                                           D.DORA_CANCELLATION_LIMIT, D.tiny_scale(wdt))
        assert bn == 16 and bk == (16 if blocks is None else 64) and -(-inn // bk) > 1, (bn, bk)
        assert kk.dtype == kn.dtype == torch.float32 and b_k.dtype == torch.float32 and b_k.shape == (out, r)
        ours = kn.double() / kk.double()
        err_direct = ((direct - ref).abs() / ref).max().item()
        err_ours = ((ours - ref).abs() / ref).max().item()
        assert err_ours <= 2 * max(err_direct, eps), (wdt, err_ours, err_direct)
        k_ref = m / ref
        assert ((kk.double() - k_ref).abs() / k_ref).max() <= 2 * max(err_direct, eps) + 2 * eps
        assert torch.equal(b_k, (B.float() * kk[:, None]))


def test_dora_prep_blocks():
    """The prep's tiles (``kernels.dora.prep_blocks``): on an H200 32 rows x 128 columns of W per load, so N / 32
    programs (128 at N = 4096); the interpreter keeps small tiles so tests cross several K tiles."""
    from fastpeft.kernels._target import LaunchTarget
    from fastpeft.kernels.dora import prep_blocks
    h200 = LaunchTarget(num_sms=132, smem_per_block=227 * 1024, capability_major=9)
    assert prep_blocks(h200) == (32, 128, 4)
    assert prep_blocks(None) == (16, 16, 4)


@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16, torch.float16])
def test_dora_prep_writes_the_row_scaled_weight(wdt):
    """``dora_prep_triton(want_wk=True)``: the prep's launch also writes k ⊙ W, bit for bit what the row-scale piece
    (``dora_rowscale_triton``) gives from the same kk, for a transposed-view W too; kk, kn, B_k unchanged."""
    from fastpeft.kernels._target import forced_launch_shape
    from fastpeft.kernels.dora import dora_prep_triton, dora_rowscale_triton
    g = torch.Generator().manual_seed(5)
    n, k, r = 37, 70, 3
    w = (torch.randn(k, n, generator=g) * 0.1).to(wdt).t()
    a, b = torch.randn(r, k, generator=g) * 0.1, torch.randn(n, r, generator=g) * 0.1
    m = torch.rand(n, generator=g) + 0.5
    args = (w, a, b, m, 2.0, w.float().square().sum(1), D.DORA_CANCELLATION_LIMIT, D.tiny_scale(wdt))
    with forced_launch_shape(blocks=(32, 16, 4)):
        plain = dora_prep_triton(*args)
        kk, kn, b_k, w_k = dora_prep_triton(*args, want_wk=True)
    assert all(torch.equal(p, q) for p, q in zip(plain, (kk, kn, b_k)))
    assert w_k.dtype == wdt and w_k.is_contiguous() and torch.equal(w_k, dora_rowscale_triton(w, kk))
