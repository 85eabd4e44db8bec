"""``torch.compile`` (fullgraph=True) of the modules on the torch backend equals eager, and the modules work under
``torch.autocast("cpu", dtype=torch.bfloat16)`` (alone and compiled)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._inductor.config

import fastpeft.functional as FP
from fastpeft.modules import AdaLoRALinear, IA3Linear, LoRALinear

from testing_utils import AUTOCAST_BF16, SMALL_FP32, inductor_cpu_problem

MODULES = {
    "lora": lambda: LoRALinear(24, 10, r=3, lora_alpha=6, backend="torch"),
    "adalora": lambda: AdaLoRALinear(24, 10, r=4, backend="torch"),
    "ia3": lambda: IA3Linear(24, 10, backend="torch"),
    "ia3_ff": lambda: IA3Linear(24, 10, feedforward=True, backend="torch"),
}


def _make(name):
    torch.manual_seed(0)
    m = MODULES[name]()
    with torch.no_grad():  # non-trivial adapters, so the adapter path really contributes
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.normal_(mean=1.0 if n == "ia3_l" else 0.0, std=0.5)
    return m


def _close(a, b, tol=SMALL_FP32, what=""):
    torch.testing.assert_close(a.float(), b.float(), atol=tol[0], rtol=tol[1], msg=lambda m: f"{what}: {m}")


def _trainable(m):
    return [p for p in m.parameters() if p.requires_grad]


def _fwd_bwd(m, x):
    for p in _trainable(m):
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = m(x)
    y.float().square().sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in _trainable(m)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def inductor():
    """For the tests that compile with inductor: skip, saying why, where it cannot build a CPU kernel at all."""
    if inductor_cpu_problem():
        pytest.skip(inductor_cpu_problem())


@pytest.mark.parametrize("name", list(MODULES))
def test_compile_fullgraph_equals_eager(name, inductor):
    m = _make(name)
    cm = torch.compile(m, backend="inductor", fullgraph=True)
    for shape in ((5, 24), (2, 7, 24)):  # a second shape: recompiles (or runs dynamic) without a graph break
        x = torch.randn(*shape)
        y0, dx0, g0 = _fwd_bwd(m, x)
        y1, dx1, g1 = _fwd_bwd(cm, x)
        _close(y1, y0, what=f"{name} y")
        _close(dx1, dx0, what=f"{name} dx")
        for a, b in zip(g1, g0):
            _close(a, b, what=f"{name} grad")


@pytest.mark.parametrize("name", ["lora", "ia3"])
def test_compile_merged_module(name, inductor):
    m = _make(name).eval()
    x = torch.randn(4, 24)
    y = m(x)
    m.merge()
    cm = torch.compile(m, backend="inductor", fullgraph=True)
    _close(cm(x), y, what="merged compiled")


def test_compile_lora_dropout_matches_eager_rng(inductor):
    """Unseeded dropout (F.dropout's stream): aot_eager keeps eager's RNG; inductor does with fallback_random."""
    m = _make("lora").train()
    m.lora_dropout = 0.3
    x = torch.randn(6, 24)
    torch.manual_seed(5)
    y_eager = m(x)
    cm = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.manual_seed(5)
    assert torch.equal(cm(x), y_eager)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        ci = torch.compile(m, backend="inductor", fullgraph=True)
        torch.manual_seed(5)
        _close(ci(x), y_eager, what="inductor fallback_random")


def test_compile_seeded_functional_equals_eager(inductor):
    """Seeded dropout runs inside the custom op (counter-based mask), so compiled == eager bit for bit."""
    x, W, b = torch.randn(7, 24), torch.randn(10, 24), torch.randn(10)
    A, B = torch.randn(3, 24, requires_grad=True), torch.randn(10, 3, requires_grad=True)

    def f(x, A, B):
        return FP.lora_linear(x, W, b, A, B, 2.0, 0.4, seed=1234, backend="torch")

    y0 = f(x, A, B)
    (gA0, gB0) = torch.autograd.grad(y0.sum(), (A, B))
    cf = torch.compile(f, backend="inductor", fullgraph=True)
    y1 = cf(x, A, B)
    (gA1, gB1) = torch.autograd.grad(y1.sum(), (A, B))
    _close(y1, y0, what="y")
    _close(gA1, gA0, what="dA")
    _close(gB1, gB0, what="dB")


# ---------------------------------------------------------------------------------------------------------------
# autocast
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODULES))
def test_autocast_bf16(name):
    m = _make(name)
    x = torch.randn(3, 5, 24)
    y32, _, g32 = _fwd_bwd(m, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, dx16, g16 = _fwd_bwd(m, x)
    assert y16.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in _trainable(m))
    _close(y16, y32, AUTOCAST_BF16, f"{name} autocast y")
    for a, b in zip(g16, g32):
        assert a.dtype == torch.float32
        # gradients are sums over 15 rows of bf16-rounded products: compare relative to their scale
        _close(a / b.abs().max(), b / b.abs().max(), AUTOCAST_BF16, f"{name} autocast grad")
    # and the bf16 result is not just the fp32 one re-rounded by accident of a disabled autocast: the base matmul
    # ran in bf16, so it differs from the fp32 output by more than fp32 rounding
    assert (y16.float() - y32).abs().max() > SMALL_FP32[0]


@pytest.mark.parametrize("name", ["lora", "ia3_ff"])
def test_autocast_and_compile(name, inductor):
    m = _make(name)
    x = torch.randn(4, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y0 = m(x)
        y1 = torch.compile(m, backend="inductor", fullgraph=True)(x)
    assert y1.dtype == torch.bfloat16
    _close(y1, y0, AUTOCAST_BF16, "autocast compiled vs eager")


@pytest.fixture
def keep_adapter_dtype():
    prev = FP.set_adapter_autocast("keep")
    yield
    FP.set_adapter_autocast(prev)


def test_autocast_lora_branch_runs_in_adapter_dtype(keep_adapter_dtype):
    """With ``set_adapter_autocast("keep")`` the LoRA branch runs in the adapter dtype, here fp32, also under
    autocast, as the fused backends do.  Regression: autocast used to re-cast the branch's matmuls to bf16 inside the
    torch implementation, so the torch backend disagreed with the fused ones.  (The default, "peft", casts the
    branch like HF PEFT: tests/test_hf_stack.py.)"""
    torch.manual_seed(0)
    m = LoRALinear(64, 32, r=8, bias=False, backend="torch")
    with torch.no_grad():
        m.weight.zero_()  # isolate the LoRA branch
        m.lora_B.normal_()
    x = torch.randn(16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    branch_fp32 = ((x.bfloat16().float() @ m.lora_A.detach().t()) @ m.lora_B.detach().t() * m.scaling).bfloat16()
    assert torch.equal(y, branch_fp32), f"max diff {(y.float() - branch_fp32.float()).abs().max().item()}"
    # the same through the unseeded-dropout path (F.dropout's stream) in train mode
    m.lora_dropout = 0.25
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(4)
        y = m(x)
    torch.manual_seed(4)
    xd = torch.nn.functional.dropout(x.bfloat16(), 0.25, training=True).float()  # dropped in bf16, then cast
    branch_fp32 = ((xd @ m.lora_A.detach().t()) @ m.lora_B.detach().t() * m.scaling).bfloat16()
    assert torch.equal(y, branch_fp32), f"dropout path: max diff {(y.float() - branch_fp32.float()).abs().max()}"


def test_traced_forwards_return_fresh_tensors(monkeypatch):
    """What the torch path's autograd.Functions return while torch.compile traces them is a fresh tensor: not written
    in place (mul_ / add_ / out=, which bump ``_version``) and not the very object an earlier op returned (a no-op
    ``.to()``).  Dynamo in torch 2.11 - the GPU machine's version - silently gave zero gradients through such outputs
    (every compiled LoRA / IA3 gradient here was 0 there); 2.13, CI's, is right either way, so the property itself
    is checked, with ``torch.compiler.is_compiling`` patched on."""
    from fastpeft.ops import _chunks
    from fastpeft.ops import ia3 as OI
    from fastpeft.ops import lora as OL

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    g = torch.Generator().manual_seed(0)
    base, se, b = (torch.randn(*s, generator=g) for s in ((5, 10), (5, 3), (10, 3)))
    y = OL._ScaledDeltaAdd.apply(base, se, b, 2.0, torch.float32)
    assert y._version == 0 and torch.equal(y, (se @ b.t()).mul_(2.0).add_(base))
    t, lv = torch.randn(5, 10, generator=g), torch.randn(10, generator=g)
    y = OI._ScaleByVector.apply(t, lv, torch.float32)
    assert y._version == 0 and torch.equal(y, t * lv)
    out = torch.empty(6, 4)
    made = []

    def fn(rows):  # ends in an in-place op; and when the dtype already matches, .to() would return it as it is
        r = torch.ones(6, 4)[rows].mul_(3.0)
        made.append(r)
        return r
    res = _chunks.fill_rows(out, fn)
    assert res is not made[0] and res._version == 0 and torch.equal(res, torch.full((6, 4), 3.0))
