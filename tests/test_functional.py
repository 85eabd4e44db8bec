"""``fastpeft.functional`` on the torch backend against independent fp64 math: outputs, every gradient, gradcheck,
odd shapes, non-contiguous and 3-D inputs, seeded/unseeded dropout, mixed adapter dtype, and every bad-input error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastpeft.functional as FP
from fastpeft.ops.dropout import dropout_keep_mask

from testing_utils import ELEMENTWISE, PLAIN_MATMUL_TOL, SMALL_FP32
from testing_utils import close_small as _close

F64 = torch.float64


def drop_scale(seed, shape2d, p):
    """keep ⊙ fp32(65536 / (65536 - p16)) as fp64, p16 = min(round(p * 65536), 65535) (the stream's contract), or
    ones for p = 0."""
    if p == 0.0:
        return torch.ones(shape2d, dtype=F64)
    keep = dropout_keep_mask(seed, shape2d, p)
    p16 = min(round(p * 65536), 65535)
    return keep.to(F64) * float(torch.tensor(65536.0 / (65536 - p16), dtype=torch.float32))


def lora_math(x, W, b, A, e, B, s, dscale):
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    y = x2 @ W.t() + (b if b is not None else 0.0)
    t = (x2 * dscale) @ A.t()
    if e is not None:
        t = t * e.reshape(-1)
    return (y + s * (t @ B.t())).reshape(*x.shape[:-1], W.shape[0])


def ia3_math(x, W, b, lv, ff):
    lv = lv.reshape(-1)
    if ff:
        y = (x * lv) @ W.t()
        return y + b if b is not None else y
    z = x @ W.t() + (b if b is not None else 0.0)
    return z * lv


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


SHAPES = [  # (lead shape of x, K, N, r)
    ((1,), 5, 7, 1), ((0,), 6, 4, 2), ((9,), 17, 33, 3), ((2, 3), 16, 16, 8), ((4, 3), 31, 19, 4), ((2, 0), 5, 3, 2),
]


@pytest.mark.parametrize("lead,k,n,r", SHAPES)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("p,seed", [(0.0, None), (0.3, 1234)])
@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_lora_adalora_vs_fp64_math(lead, k, n, r, dtype, p, seed, method):
    g = torch.Generator().manual_seed(hash((lead, k, n, r)) % 2 ** 31)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    x64, W64, b64, A64, B64 = mk(*lead, k), mk(n, k), mk(n), mk(r, k), mk(n, r)
    E64 = mk(r, 1)
    alpha, ranknum = 3.0, float(r)
    x, W, b, A, B, E = (_leaf(t.to(dtype)) for t in (x64, W64, b64, A64, B64, E64))
    W.requires_grad_(False)
    m = x64.reshape(-1, k).shape[0]
    dscale = drop_scale(seed, (m, k), p) if p else torch.ones(m, k, dtype=F64)
    if method == "lora":
        y = FP.lora_linear(x, W, b, A, B, alpha, p, seed, backend="torch")
        e_ref, s = None, alpha
    else:
        y = FP.adalora_linear(x, W, b, A, E, B, alpha, ranknum, p, seed, backend="torch")
        e_ref, s = E64, alpha / (ranknum + 1e-5)
    assert y.shape == (*lead, n) and y.dtype == dtype
    xr, Ar, Br, Er, br = (_leaf(t) for t in (x64, A64, B64, E64, b64))
    y_ref = lora_math(xr, W64, br, Ar, Er if e_ref is not None else None, Br, s, dscale)
    _close(y, y_ref, dtype, "y")
    dy64 = mk(*lead, n)
    y.backward(dy64.to(dtype))
    y_ref.backward(dy64)
    assert W.grad is None
    for got, want, what in ((x.grad, xr.grad, "dx"), (A.grad, Ar.grad, "dA"), (B.grad, Br.grad, "dB"),
                            (b.grad, br.grad, "dbias")):
        assert got is not None, what
        _close(got, want, dtype, what)
    if method == "adalora":
        _close(E.grad, Er.grad, dtype, "dE")


@pytest.mark.parametrize("lead,k,n", [((1,), 5, 7), ((0,), 4, 3), ((2, 5), 17, 33), ((7,), 31, 19)])
@pytest.mark.parametrize("ff", [False, True])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("l_shape", ["flat", "peft"])
def test_ia3_vs_fp64_math(lead, k, n, ff, dtype, l_shape):
    x64, W64, b64 = torch.randn(*lead, k, dtype=F64), torch.randn(n, k, dtype=F64), torch.randn(n, dtype=F64)
    numel = k if ff else n
    l64 = torch.randn(numel, dtype=F64)
    if l_shape == "peft":  # HF PEFT stores (1, in) for feed-forward and (out, 1) otherwise
        l64 = l64.reshape(1, k) if ff else l64.reshape(n, 1)
    x, b, lv = (_leaf(t.to(dtype)) for t in (x64, b64, l64))
    W = W64.to(dtype)
    y = FP.ia3_linear(x, W, b, lv, ff, backend="torch")
    assert y.shape == (*lead, n) and y.dtype == dtype
    xr, br, lr = _leaf(x64), _leaf(b64), _leaf(l64)
    y_ref = ia3_math(xr, W64, br, lr, ff)
    _close(y, y_ref, dtype, "y")
    dy = torch.randn(*lead, n, dtype=F64)
    y.backward(dy.to(dtype))
    y_ref.backward(dy)
    _close(x.grad, xr.grad, dtype, "dx")
    _close(b.grad, br.grad, dtype, "dbias")
    assert lv.grad.shape == lv.shape
    _close(lv.grad, lr.grad, dtype, "dl")


def test_no_bias_and_frozen_bias():
    x, W, A, B = torch.randn(4, 6, requires_grad=True), torch.randn(5, 6), torch.randn(2, 6), torch.randn(5, 2)
    A.requires_grad_(True)
    B.requires_grad_(True)
    y = FP.lora_linear(x, W, None, A, B, 1.0)
    _close(y, lora_math(x.double(), W.double(), None, A.double(), None, B.double(), 1.0, torch.ones(4, 6, dtype=F64)),
           torch.float32, "y no bias")
    b = torch.randn(5)  # frozen bias: no gradient requested, none produced
    y = FP.lora_linear(x, W, b, A, B, 1.0)
    y.sum().backward()
    assert b.grad is None and A.grad is not None
    lv = torch.ones(5, requires_grad=True)
    FP.ia3_linear(x, W, b, lv).sum().backward()
    assert b.grad is None and lv.grad is not None


def test_non_contiguous_and_strided_weight():
    x_leaf = _leaf(torch.randn(6, 4, 10, dtype=F64))
    x = x_leaf.transpose(0, 1)  # (4, 6, 10), non-contiguous
    assert not x.is_contiguous()
    Wt = torch.randn(10, 7, dtype=F64)  # Conv1D layout; pass the transposed view
    W = Wt.t()
    A, B = _leaf(torch.randn(3, 10, dtype=F64)), _leaf(torch.randn(7, 3, dtype=F64))
    A_nc = _leaf(torch.randn(10, 3, dtype=F64))
    y = FP.lora_linear(x, W, None, A_nc.t(), B, 0.5)
    xr = _leaf(x.detach())
    y_ref = lora_math(xr, W, None, A_nc.detach().t(), None, B.detach(), 0.5, torch.ones(24, 10, dtype=F64))
    _close(y, y_ref, F64, "y")
    y.sum().backward()
    y_ref.sum().backward()
    _close(x_leaf.grad.transpose(0, 1), xr.grad, F64, "dx")
    del A
    lv = _leaf(torch.rand(7, dtype=F64))
    _close(FP.ia3_linear(x, W, None, lv), ia3_math(x.detach(), W, None, lv.detach(), False), F64, "ia3 strided")


def test_inputs_not_mutated():
    x, W, b, A, B = torch.randn(5, 8), torch.randn(6, 8), torch.randn(6), torch.randn(3, 8), torch.randn(6, 3)
    clones = [t.clone() for t in (x, W, b, A, B)]
    FP.lora_linear(x, W, b, A, B, 2.0, 0.5, seed=3)
    FP.ia3_linear(x, W, b, torch.randn(8), True)
    for t, c in zip((x, W, b, A, B), clones):
        assert torch.equal(t, c)


# ---------------------------------------------------------------------------------------------------------------
# gradcheck (fp64, small shapes), including seeded dropout: with a fixed seed the op is linear in x, so finite
# differences must equal autograd.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p,seed", [(0.0, None), (0.5, 7)])
def test_gradcheck_lora(p, seed):
    x, b = _leaf(torch.randn(2, 3, 5, dtype=F64)), _leaf(torch.randn(4, dtype=F64))
    W = torch.randn(4, 5, dtype=F64)
    A, B = _leaf(torch.randn(2, 5, dtype=F64)), _leaf(torch.randn(4, 2, dtype=F64))
    fn = lambda x, b, A, B: FP.lora_linear(x, W, b, A, B, 0.75, p, seed, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b, A, B))


@pytest.mark.parametrize("p,seed", [(0.0, None), (0.4, 11)])
def test_gradcheck_adalora(p, seed):
    x, b = _leaf(torch.randn(3, 6, dtype=F64)), _leaf(torch.randn(4, dtype=F64))
    W = torch.randn(4, 6, dtype=F64)
    A, E, B = _leaf(torch.randn(3, 6, dtype=F64)), _leaf(torch.randn(3, 1, dtype=F64)), _leaf(torch.randn(4, 3,
                                                                                                   dtype=F64))
    fn = lambda x, b, A, E, B: FP.adalora_linear(x, W, b, A, E, B, 8.0, 3.0, p, seed)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b, A, E, B))


@pytest.mark.parametrize("ff", [False, True])
def test_gradcheck_ia3(ff):
    x, b = _leaf(torch.randn(2, 3, 5, dtype=F64)), _leaf(torch.randn(4, dtype=F64))
    W = torch.randn(4, 5, dtype=F64)
    lv = _leaf(torch.randn(1, 5, dtype=F64) if ff else torch.randn(4, 1, dtype=F64))
    fn = lambda x, b, lv: FP.ia3_linear(x, W, b, lv, ff)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b, lv))


# ---------------------------------------------------------------------------------------------------------------
# Dropout semantics
# ---------------------------------------------------------------------------------------------------------------


def _lora_args(m=16, k=24, n=12, r=4, dtype=torch.float32):
    return (torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype),
            torch.randn(r, k, dtype=dtype), torch.randn(n, r, dtype=dtype))


def test_seeded_dropout_is_deterministic_and_seed_dependent():
    x, W, b, A, B = _lora_args()
    y1 = FP.lora_linear(x, W, b, A, B, 1.0, 0.5, seed=5)
    torch.manual_seed(999)  # the global RNG must not matter when a seed is given
    y2 = FP.lora_linear(x, W, b, A, B, 1.0, 0.5, seed=5)
    y3 = FP.lora_linear(x, W, b, A, B, 1.0, 0.5, seed=6)
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, y3)
    # and the mask is exactly the shared stream's
    ref = lora_math(x.double(), W.double(), b.double(), A.double(), None, B.double(), 1.0,
                    drop_scale(5, (16, 24), 0.5))
    _close(y1, ref, torch.float32, "seeded y")


def test_seeded_dropout_dx_is_masked():
    """dx of the LoRA branch must carry the same mask as the forward (fms-acceleration#97)."""
    x, W, b, A, B = _lora_args(m=8, k=20)
    x.requires_grad_(True)
    A.requires_grad_(True)
    y = FP.lora_linear(x, W, b, A, B, 2.0, 0.5, seed=21)
    dy = torch.randn_like(y)
    y.backward(dy)
    keep = dropout_keep_mask(21, (8, 20), 0.5)
    base_dx = dy @ W
    assert (~keep).any()
    torch.testing.assert_close(x.grad[~keep], base_dx[~keep], atol=SMALL_FP32[0], rtol=SMALL_FP32[1])
    full_lora_dx = (2.0 * dy @ B) @ A.detach()
    assert (x.grad[keep] - base_dx[keep]).abs().max() > 10 * SMALL_FP32[0]
    # p = 0.5: p16 = 32768 and the scale 65536 / 32768 = 2 exactly
    torch.testing.assert_close(x.grad[keep], base_dx[keep] + 2.0 * full_lora_dx[keep], atol=1e-4, rtol=1e-4)


def test_unseeded_torch_dropout_equals_F_dropout():
    """Without a seed the torch backend draws the mask like F.dropout (HF PEFT's RNG stream)."""
    x, W, b, A, B = _lora_args(m=10, k=16, n=8, r=3)
    torch.manual_seed(314)
    y = FP.lora_linear(x, W, b, A, B, 1.5, 0.25, backend="torch")
    torch.manual_seed(314)
    xd = F.dropout(x, 0.25, training=True)
    y_ref = F.linear(x, W, b) + (xd @ A.t()) @ B.t() * 1.5
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    torch.manual_seed(315)
    assert not torch.equal(FP.lora_linear(x, W, b, A, B, 1.5, 0.25, backend="torch"), y)


def test_dropout_zero_equals_no_dropout_and_ignores_seed():
    x, W, b, A, B = _lora_args()
    y0 = FP.lora_linear(x, W, b, A, B, 1.0)
    assert torch.equal(FP.lora_linear(x, W, b, A, B, 1.0, 0.0, seed=17), y0)


def test_mixed_adapter_dtype_bf16_base_fp32_adapter():
    """fp32 adapters on a bf16 base (HF PEFT's default): the LoRA branch runs in fp32, the output is bf16."""
    x, W, b = (t.bfloat16() for t in (torch.randn(6, 16), torch.randn(8, 16), torch.randn(8)))
    A, B = _leaf(torch.randn(4, 16)), _leaf(torch.randn(8, 4))
    y = FP.lora_linear(x, W, b, A, B, 0.5)
    assert y.dtype == torch.bfloat16
    # reference: base in bf16 as F.linear computes it, branch in fp32 from the bf16 x
    ref = (F.linear(x, W, b).float() + ((x.float() @ A.detach().t()) @ B.detach().t()) * 0.5).bfloat16()
    atol, rtol = ELEMENTWISE[torch.bfloat16]
    torch.testing.assert_close(y, ref, atol=atol, rtol=rtol)
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    g_ref = (torch.ones(6, 8) @ B.detach() * 0.5).t() @ x.float()
    torch.testing.assert_close(A.grad, g_ref, atol=PLAIN_MATMUL_TOL[torch.bfloat16], rtol=ELEMENTWISE[torch.bfloat16][1])


def test_draw_seed_follows_manual_seed():
    torch.manual_seed(3)
    a = FP.draw_seed()
    torch.manual_seed(3)
    assert FP.draw_seed() == a
    assert 0 <= a < 2 ** 62


# ---------------------------------------------------------------------------------------------------------------
# Bad input: every check of functional.py
# ---------------------------------------------------------------------------------------------------------------


def _good():
    return dict(x=torch.randn(3, 6), weight=torch.randn(5, 6), bias=torch.randn(5), lora_A=torch.randn(2, 6),
                lora_B=torch.randn(5, 2), scaling=1.0)


def _call_lora(**over):
    a = _good()
    a.update(over)
    extra = {k: a.pop(k) for k in ("dropout_p", "seed", "backend") if k in a}
    return FP.lora_linear(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["scaling"], **extra)


LORA_BAD = [
    (dict(x=[[1.0] * 6]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.ones(3, 6, dtype=torch.int64)), TypeError, "x must be a floating-point"),
    (dict(x=torch.tensor(1.0)), ValueError, "x must have at least 1 dimension"),
    (dict(weight=torch.randn(5, 6, 1)), ValueError, "weight must be 2-D"),
    (dict(weight=torch.randn(5, 7)), ValueError, "input features"),
    (dict(bias=torch.randn(4)), ValueError, "bias has shape"),
    (dict(bias=torch.randn(5, 1)), ValueError, "bias must be 1-D"),
    (dict(weight=torch.randn(5, 6, dtype=F64)), ValueError, "dtype"),
    (dict(bias=torch.randn(5, dtype=F64)), ValueError, "bias has dtype"),
    (dict(lora_A=torch.randn(2, 7)), ValueError, "lora_A must have shape"),
    (dict(lora_A=torch.randn(0, 6), lora_B=torch.randn(5, 0)), ValueError, "r >= 1"),
    (dict(lora_A=torch.randn(2, 6, 1)), ValueError, "lora_A must be 2-D"),
    (dict(lora_B=torch.randn(5, 3)), ValueError, "lora_B must have shape"),
    (dict(lora_B=torch.randn(4, 2)), ValueError, "lora_B must have shape"),
    (dict(lora_B=torch.randn(5, 2, dtype=F64)), ValueError, "lora_B has dtype"),
    (dict(lora_A="A"), TypeError, "lora_A must be a torch.Tensor"),
    (dict(scaling="1.0"), TypeError, "scaling must be a float"),
    (dict(scaling=True), TypeError, "scaling must be a float"),
    (dict(scaling=float("inf")), ValueError, "scaling must be finite"),
    (dict(scaling=torch.ones(2)), ValueError, "scaling must be a scalar"),
    (dict(dropout_p=1.0), ValueError, "dropout_p must be in [0, 1)"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p must be in [0, 1)"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p must be a float"),
    (dict(dropout_p=0.1, seed=1.5), TypeError, "seed must be an int"),
    (dict(dropout_p=0.1, seed=True), TypeError, "seed must be an int"),
    (dict(dropout_p=0.1, seed=-1), ValueError, "seed must be in"),
    (dict(dropout_p=0.1, seed=2 ** 63), ValueError, "seed must be in"),
    (dict(backend="tpu"), ValueError, "backend must be one of"),
    (dict(backend=3), TypeError, "backend must be a str"),
    (dict(weight=torch.randn(5, 6, device="meta")), ValueError, "weight is on meta"),
    (dict(lora_B=torch.randn(5, 2, device="meta")), ValueError, "lora_B is on meta"),
]


@pytest.mark.parametrize("over,exc,msg", LORA_BAD, ids=[f"{i}:{m[:20]}" for i, (_, _, m) in enumerate(LORA_BAD)])
def test_lora_linear_bad_input(over, exc, msg):
    with pytest.raises(exc, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        _call_lora(**over)


def test_adalora_linear_bad_input():
    g = _good()
    args = (g["x"], g["weight"], g["bias"], g["lora_A"])
    with pytest.raises(ValueError, match="lora_E must have r = 2"):
        FP.adalora_linear(*args, torch.randn(3, 1), g["lora_B"], 8.0, 2.0)
    with pytest.raises(ValueError, match="lora_E has dtype"):
        FP.adalora_linear(*args, torch.randn(2, 1, dtype=F64), g["lora_B"], 8.0, 2.0)
    with pytest.raises(TypeError, match="lora_E must be a torch.Tensor"):
        FP.adalora_linear(*args, None, g["lora_B"], 8.0, 2.0)
    with pytest.raises(TypeError, match="ranknum must be a float"):
        FP.adalora_linear(*args, torch.randn(2, 1), g["lora_B"], 8.0, "2")
    with pytest.raises(ValueError, match="ranknum must be finite"):
        FP.adalora_linear(*args, torch.randn(2, 1), g["lora_B"], 8.0, float("nan"))


def test_ia3_linear_bad_input():
    x, W, b = torch.randn(3, 6), torch.randn(5, 6), torch.randn(5)
    with pytest.raises(ValueError, match=r"ia3_l must have out_features = 5"):
        FP.ia3_linear(x, W, b, torch.ones(6))
    with pytest.raises(ValueError, match=r"ia3_l must have in_features \(feedforward\) = 6"):
        FP.ia3_linear(x, W, b, torch.ones(5), True)
    with pytest.raises(TypeError, match="feedforward must be a bool"):
        FP.ia3_linear(x, W, b, torch.ones(5), 1)
    with pytest.raises(TypeError, match="ia3_l must be a floating-point"):
        FP.ia3_linear(x, W, b, torch.ones(5, dtype=torch.int32))
    with pytest.raises(ValueError, match="x has 7 input features"):
        FP.ia3_linear(torch.randn(3, 7), W, b, torch.ones(5))
    with pytest.raises(ValueError, match="ia3_l is on meta"):
        FP.ia3_linear(x, W, b, torch.ones(5, device="meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        FP.ia3_linear(x, W, b, torch.ones(5), backend="nope")


def test_ia3_linear_non_tensor_x_is_a_type_error():
    """Regression: ia3_linear used to call _autocast before checking that x is a tensor (AttributeError)."""
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        FP.ia3_linear([[1.0] * 6], torch.randn(5, 6), None, torch.ones(5))


def test_explicit_unavailable_backend_raises_runtime_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = _good()
    with pytest.raises(RuntimeError, match="cuda"):
        FP.lora_linear(g["x"], g["weight"], g["bias"], g["lora_A"], g["lora_B"], 1.0, backend="cuda")


def test_torch_path_double_backward():
    """The torch path's autograd Functions (LoRA shrink and tail, IA3 scale) stay twice differentiable, as the plain
    ops they replace were (gradient penalties): torch's gradgradcheck in fp64, LoRA / AdaLoRA and both IA3 modes."""
    from torch.autograd import gradgradcheck
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 8, generator=g, dtype=torch.float64)
    a = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    e = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(lambda x, a, b: FP.lora_linear(x, w, None, a, b, 0.5, backend="torch"), (x, a, b))
    assert gradgradcheck(lambda x, a, e, b: FP.adalora_linear(x, w, None, a, e, b, 2.0, 3.0, backend="torch"),
                         (x, a, e, b))
    for ff, n in ((True, 8), (False, 6)):
        lv = torch.rand(n, generator=g, dtype=torch.float64).requires_grad_(True)
        assert gradgradcheck(lambda x, lv: FP.ia3_linear(x, w, None, lv, ff, backend="torch"), (x, lv))


@pytest.mark.parametrize("x_dtype,a_dtype,m", [(torch.float32, torch.float32, 5), (torch.bfloat16, torch.float32, 700),
                                               (torch.bfloat16, torch.float32, 3), (torch.float16, torch.float16, 9)])
def test_torch_backend_inference_forward_is_the_training_forward(x_dtype, a_dtype, m):
    """Without a gradient to build the torch backend computes its forward without its autograd Functions (their
    Python costs the host ~15 µs a call): the same values, bit for bit, as with autograd - chunked casts (700 rows:
    several row chunks), AdaLoRA's e, IA3 in both modes and DoRA's scaling included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, m, 48, generator=g).to(x_dtype)
    w = (torch.randn(40, 48, generator=g) * 0.1).to(x_dtype)
    b = torch.randn(40, generator=g).to(x_dtype)
    a = torch.randn(6, 48, generator=g).to(a_dtype)
    bb = torch.randn(40, 6, generator=g).to(a_dtype)
    e = torch.randn(6, 1, generator=g).to(a_dtype)
    ll = torch.randn(48, generator=g).to(a_dtype)
    lo = torch.randn(40, generator=g).to(a_dtype)
    mag = (torch.rand(40, generator=g) + 0.5).to(a_dtype)
    for call in (lambda xx, aa: FP.lora_linear(xx, w, b, aa, bb, 0.5, backend="torch"),
                 lambda xx, aa: FP.adalora_linear(xx, w, b, aa, e, bb, 2.0, 6.0, backend="torch"),
                 lambda xx, aa: FP.ia3_linear(xx, w, b, ll * aa[0, 0], True, backend="torch"),   # input scaling
                 lambda xx, aa: FP.ia3_linear(xx, w, b, lo * aa[0, 0], False, backend="torch"),  # output scaling
                 lambda xx, aa: FP.dora_linear(xx, w, b, aa, bb, mag, 0.5, backend="torch")):
        with torch.no_grad():
            y0 = call(x, a)
        y1 = call(x.clone().requires_grad_(True), a.clone().requires_grad_(True))
        assert y1.grad_fn is not None and y0.grad_fn is None
        assert y0.dtype == y1.dtype == x_dtype and torch.equal(y0, y1.detach())
