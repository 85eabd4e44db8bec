"""``fastpeft.LoRALinear`` against fp64 math and HF PEFT's ``lora.Linear``: init, forward/backward, dropout, from_linear
(sharing), merge/unmerge, export, transformers Conv1D, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastpeft
from fastpeft.modules import LoRALinear

from testing_utils import ELEMENTWISE, PEFT_PARITY_RTOL, SMALL_FP32, assert_close_rel
from testing_utils import close_small as _close, randomize_module as _randomize

F64 = torch.float64


def _math(m: LoRALinear, x, dscale=None):
    """fp64 y = x Wᵀ + b + s (drop(x) Aᵀ) Bᵀ from the module's current parameters."""
    W = m.weight_nk.detach().double()
    b = m.bias.detach().double() if m.bias is not None else 0.0
    xd = x.double() if dscale is None else x.double() * dscale
    return x.double() @ W.t() + b + m.scaling * (xd @ m.lora_A.detach().double().t()) @ m.lora_B.detach().double().t()


def test_public_export_and_parameters():
    assert fastpeft.LoRALinear is LoRALinear
    m = LoRALinear(10, 7, r=4, lora_alpha=16)
    assert m.weight.shape == (7, 10) and m.bias.shape == (7,)
    assert m.lora_A.shape == (4, 10) and m.lora_B.shape == (7, 4)
    assert not m.weight.requires_grad and not m.bias.requires_grad
    assert m.lora_A.requires_grad and m.lora_B.requires_grad
    assert type(m.lora_A) is nn.Parameter
    assert m.scaling == 4.0
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert set(m.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert LoRALinear(10, 7, r=4, lora_alpha=16, use_rslora=True).scaling == 8.0
    assert LoRALinear(3, 2, bias=False).bias is None
    m64 = LoRALinear(3, 2, r=1, dtype=F64)
    assert all(p.dtype == F64 for p in m64.parameters())
    assert LoRALinear(4, 4, device="meta").lora_A.device.type == "meta"


def test_drop_in_for_nn_linear():
    """Same seed -> same base weights as nn.Linear; an nn.Linear state dict loads; starts equal to the linear."""
    for cls in (LoRALinear, fastpeft.AdaLoRALinear, fastpeft.IA3Linear):
        torch.manual_seed(3)
        lin = nn.Linear(10, 6)
        torch.manual_seed(3)
        m = cls(10, 6)
        assert torch.equal(m.weight, lin.weight) and torch.equal(m.bias, lin.bias), cls.__name__
        m2 = cls(10, 6)
        missing, unexpected = m2.load_state_dict(lin.state_dict(), strict=False)
        assert not unexpected and set(missing) <= {"lora_A", "lora_B", "lora_E", "ia3_l"}
        x = torch.randn(4, 10)
        assert torch.equal(m2(x), lin(x)), cls.__name__


def test_inits():
    torch.manual_seed(0)
    m = LoRALinear(400, 30, r=8)
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(in), 1/sqrt(in))
    assert torch.count_nonzero(m.lora_B) == 0
    assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.9 * bound
    g = LoRALinear(2000, 10, r=4, init_lora_weights="gaussian")
    assert torch.count_nonzero(g.lora_B) == 0
    assert abs(g.lora_A.std().item() - 0.25) < 0.01  # std 1/r over 8000 samples
    f = LoRALinear(50, 10, r=4, init_lora_weights=False)
    assert torch.count_nonzero(f.lora_B) == f.lora_B.numel()
    assert f.lora_B.abs().max() <= 1 / math.sqrt(4)
    x = torch.randn(3, 50)
    assert not torch.allclose(f(x), F.linear(x, f.weight, f.bias))
    # reset_lora_parameters re-draws A and zeroes B but never touches the base
    w = f.weight.clone()
    f.init_lora_weights = True
    f.reset_lora_parameters()
    assert torch.equal(f.weight, w) and torch.count_nonzero(f.lora_B) == 0


@pytest.mark.parametrize("lead,k,n,r", [((1,), 5, 7, 1), ((0,), 6, 4, 2), ((3, 4), 17, 33, 3), ((13,), 31, 19, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_vs_fp64(lead, k, n, r, bias):
    m = _randomize(LoRALinear(k, n, r=r, lora_alpha=2 * r + 1, bias=bias))
    x = torch.randn(*lead, k, requires_grad=True)
    y = m(x)
    assert y.shape == (*lead, n)
    x64 = x.detach().double().requires_grad_(True)
    A64, B64 = (p.detach().double().requires_grad_(True) for p in (m.lora_A, m.lora_B))
    y64 = x64 @ m.weight.double().t() + (m.bias.double() if bias else 0) + m.scaling * (x64 @ A64.t()) @ B64.t()
    _close(y, y64, what="y")
    dy = torch.randn(*lead, n, dtype=F64)
    y.backward(dy.float())
    y64.backward(dy)
    _close(x.grad, x64.grad, what="dx")
    _close(m.lora_A.grad, A64.grad, what="dA")
    _close(m.lora_B.grad, B64.grad, what="dB")
    assert m.weight.grad is None and (m.bias is None or m.bias.grad is None)


def test_dropout_train_vs_eval():
    torch.manual_seed(1)
    m = _randomize(LoRALinear(12, 6, r=3, lora_dropout=0.4))
    x = torch.randn(5, 12)
    m.train()
    torch.manual_seed(7)
    y = m(x)
    torch.manual_seed(7)
    xd = F.dropout(x, 0.4, training=True)  # HF PEFT's stream: the same mask under the same RNG state
    _close(y, _math(m, x, dscale=None) - m.scaling * (x.double() - xd.double()) @ m.lora_A.detach().double().t()
           @ m.lora_B.detach().double().t(), what="train")
    m.eval()
    _close(m(x), _math(m, x), what="eval has no dropout")
    torch.manual_seed(7)
    assert torch.equal(m(x), m(x))


def test_trainable_bias_gets_gradient():
    m = _randomize(LoRALinear(6, 4, r=2))
    m.bias.requires_grad_(True)
    x = torch.randn(3, 6)
    m(x).sum().backward()
    torch.testing.assert_close(m.bias.grad, torch.full((4,), 3.0))


def test_from_linear_shares_and_starts_equal():
    lin = nn.Linear(9, 5)
    m = LoRALinear.from_linear(lin, r=2, lora_alpha=4, lora_dropout=0.1)
    assert m.weight is lin.weight and m.bias is lin.bias
    assert m.weight.data_ptr() == lin.weight.data_ptr()
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    assert m.scaling == 2.0 and m.lora_dropout == 0.1
    assert m.lora_A.device == lin.weight.device and m.lora_A.dtype == lin.weight.dtype
    x = torch.randn(4, 3, 9)
    m.eval()
    assert torch.equal(m(x), lin(x))  # B = 0: exactly the base layer
    m.train()
    assert torch.equal(m(x), lin(x))  # dropout only touches the (zero) LoRA branch
    m32 = LoRALinear.from_linear(nn.Linear(4, 4).bfloat16(), r=2, dtype=torch.float32)
    assert m32.lora_A.dtype == torch.float32 and m32.weight.dtype == torch.bfloat16


def test_from_linear_without_bias():
    lin = nn.Linear(4, 3, bias=False)
    m = LoRALinear.from_linear(lin, r=1)
    assert m.bias is None
    x = torch.randn(2, 4)
    assert torch.equal(m(x), lin(x))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_merge_unmerge(dtype):
    m = _randomize(LoRALinear(16, 11, r=4, lora_alpha=8, dtype=dtype)).eval()
    x = torch.randn(7, 16, dtype=dtype)
    y = m(x)
    w0 = m.weight.clone()
    ptr = m.weight.data_ptr()
    assert not m.merged
    m.merge()
    assert m.merged and m.weight.data_ptr() == ptr  # in place: sharing with a wrapped layer survives
    _close(m.weight, w0.double() + m.scaling * m.lora_B.double() @ m.lora_A.double(), dtype, "merged W")
    _close(m(x), y, dtype, "merged forward")
    assert "merged=True" in repr(m)
    with pytest.raises(ValueError, match="already merged"):
        m.merge()
    m.unmerge()
    assert not m.merged
    _close(m.weight, w0, dtype, "unmerged W")
    _close(m(x), y, dtype, "unmerged forward")
    with pytest.raises(ValueError, match="not merged"):
        m.unmerge()


def test_merge_bf16_computes_in_fp32_and_rounds_once():
    m = _randomize(LoRALinear(32, 8, r=4, dtype=torch.bfloat16))
    w0 = m.weight.clone()
    want = (w0.float() + (m.lora_B.float() @ m.lora_A.float()) * m.scaling).bfloat16()
    m.merge()
    assert torch.equal(m.weight, want)


def test_merge_affects_shared_linear_and_to_linear():
    lin = nn.Linear(8, 6)
    m = _randomize(LoRALinear.from_linear(lin, r=2)).eval()
    x = torch.randn(3, 8)
    y = m(x)
    exported = m.to_linear()
    assert type(exported) is nn.Linear and not m.merged
    assert exported.weight.data_ptr() != m.weight.data_ptr()
    _close(exported(x), y, what="to_linear")
    assert m.merged_linear is not None
    m.merge()
    _close(lin(x), y, what="merge writes into the shared base layer")
    _close(m.to_linear()(x), y, what="to_linear while merged")


def test_conv1d_wrapping():
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(2)
    c = Conv1D(7, 5)  # nf=out=7, nx=in=5, weight (5, 7)
    with torch.no_grad():
        c.bias.normal_()
    m = LoRALinear.from_linear(c, r=3, lora_alpha=6)
    assert m.fan_in_fan_out and m.in_features == 5 and m.out_features == 7
    assert m.weight is c.weight and m.lora_A.shape == (3, 5) and m.lora_B.shape == (7, 3)
    x = torch.randn(2, 4, 5)
    assert torch.equal(m(x), c(x))
    _randomize(m)
    y = m(x)
    want = c(x).double() + 2.0 * (x.double() @ m.lora_A.double().t()) @ m.lora_B.double().t()
    _close(y, want, what="conv1d forward")
    y.sum().backward()
    assert m.lora_A.grad is not None and c.weight.grad is None
    w0 = c.weight.clone()
    m.merge()
    _close(c.weight, w0.double() + 2.0 * (m.lora_B.double() @ m.lora_A.double()).t(), what="conv1d merge")
    _close(m(x), y, what="conv1d merged forward")
    m.unmerge()
    _close(c.weight, w0, what="conv1d unmerge")
    lin = m.to_linear()
    assert lin.weight.shape == (7, 5)
    _close(lin(x), y, what="conv1d to_linear")
    assert "fan_in_fan_out=True" in repr(m)


def test_extra_repr():
    r = repr(LoRALinear(4, 3, r=2, lora_alpha=5, lora_dropout=0.1, use_rslora=True))
    for part in ("in_features=4", "out_features=3", "bias=True", "r=2", "lora_alpha=5", "lora_dropout=0.1",
                 "use_rslora=True"):
        assert part in r, r


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(r=0), ValueError, "r must be a positive int, got 0"),
    (dict(r=-2), ValueError, "r must be a positive int, got -2"),
    (dict(r=2.5), TypeError, "r must be an int"),
    (dict(lora_dropout=1.0), ValueError, r"lora_dropout must be in \[0, 1\), got 1.0"),
    (dict(lora_dropout=-0.1), ValueError, r"lora_dropout must be in \[0, 1\)"),
    (dict(lora_alpha="8"), TypeError, "lora_alpha must be a number"),
    (dict(init_lora_weights="pissa"), ValueError, "init_lora_weights must be"),
])
def test_bad_constructor_args(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        LoRALinear(4, 3, **kwargs)
    lin = nn.Linear(4, 3)
    with pytest.raises(exc, match=msg):
        LoRALinear.from_linear(lin, **kwargs)
    assert lin.weight.requires_grad and lin.bias.requires_grad  # a failed wrap leaves the layer unchanged


def test_bad_features_and_module_type():
    with pytest.raises(ValueError, match="in_features must be >= 1"):
        LoRALinear(0, 3)
    with pytest.raises(TypeError, match="out_features must be an int"):
        LoRALinear(3, 2.0)
    with pytest.raises(TypeError, match=r"nn.Linear or a transformers Conv1D, got torch.nn.modules.conv.Conv2d"):
        LoRALinear.from_linear(nn.Conv2d(2, 2, 1))
    with pytest.raises(TypeError, match="Embedding"):
        LoRALinear.from_linear(nn.Embedding(4, 3))
    m = LoRALinear(4, 3)
    with pytest.raises(ValueError, match="x has 5 input features"):
        m(torch.randn(2, 5))


# ---------------------------------------------------------------------------------------------------------------
# HF PEFT parity on the same weights
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("conv1d", [False, True])
def test_matches_hf_peft_lora_linear(use_rslora, dropout, conv1d):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    torch.manual_seed(5)
    if conv1d:
        base = pytest.importorskip("transformers.pytorch_utils").Conv1D(9, 12)
    else:
        base = nn.Linear(12, 9)
    cfg = peft.LoraConfig(r=4, lora_alpha=6, lora_dropout=dropout, use_rslora=use_rslora, target_modules=["x"],
                          fan_in_fan_out=conv1d)
    ref = PeftLoraLinear(copy.deepcopy(base), "default", cfg, r=4, lora_alpha=6, use_rslora=use_rslora,
                         lora_dropout=dropout, is_target_conv_1d_layer=conv1d)
    with torch.no_grad():
        ref.lora_B["default"].weight.normal_()
    m = LoRALinear.from_linear(copy.deepcopy(base), r=4, lora_alpha=6, lora_dropout=dropout, use_rslora=use_rslora)
    with torch.no_grad():
        m.lora_A.copy_(ref.lora_A["default"].weight)
        m.lora_B.copy_(ref.lora_B["default"].weight)
    assert m.scaling == ref.scaling["default"]
    x = torch.randn(3, 5, 12)
    for mode in ("train", "eval"):
        getattr(m, mode)()
        getattr(ref, mode)()
        torch.manual_seed(11)
        y_ref = ref(x)
        torch.manual_seed(11)
        y = m(x)
        assert_close_rel(y, y_ref, PEFT_PARITY_RTOL, f"forward ({mode})")
    m.train()
    ref.train()
    torch.manual_seed(12)
    y_ref = ref(x)
    torch.manual_seed(12)
    y = m(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert_close_rel(m.lora_A.grad, ref.lora_A["default"].weight.grad, PEFT_PARITY_RTOL, "dA")
    assert_close_rel(m.lora_B.grad, ref.lora_B["default"].weight.grad, PEFT_PARITY_RTOL, "dB")
    # merge gives the same weights as PEFT's merge
    m.merge()
    ref.merge()
    assert_close_rel(m.weight, ref.base_layer.weight, PEFT_PARITY_RTOL, "merged weight")


# ---------------------------------------------------------------------------------------------------------------
# All three modules on the fused backends (triton in the interpreter on CPU; auto on CUDA when a GPU is present):
# FA's rule against an fp64 copy of the module (tests/testing_utils.py: assert_fa_rule).
# ---------------------------------------------------------------------------------------------------------------

_MODULE_MAKERS = {
    "lora": lambda **kw: LoRALinear(20, 12, r=3, **kw),
    "lora_conv1d": None,  # built from a transformers Conv1D (strided weight view)
    "adalora": lambda **kw: fastpeft.AdaLoRALinear(20, 12, r=3, **kw),
    "ia3": lambda **kw: fastpeft.IA3Linear(20, 12, **kw),
    "ia3_ff": lambda **kw: fastpeft.IA3Linear(20, 12, feedforward=True, **kw),
}


def _make_module(name, backend):
    torch.manual_seed(0)
    if name == "lora_conv1d":
        Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
        m = LoRALinear.from_linear(Conv1D(12, 20), r=3, backend=backend)
    else:
        m = _MODULE_MAKERS[name](backend=backend)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.normal_(mean=1.0 if n == "ia3_l" else 0.0, std=0.5)
    return m


def _run_module(m, x, dy):
    for p in m.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = m(x)
    y.backward(dy.to(y.dtype))
    return [y.detach(), x.grad] + [p.grad for p in m.parameters() if p.requires_grad]


def _fused_targets():
    out = []
    if torch.cuda.is_available():
        out.append(("cuda", None))
    elif fastpeft.backend_info()["backends"]["triton"]["available"] and \
            fastpeft.backend_info()["triton_interpret"]:
        out.append(("cpu", "triton"))
    return out


@pytest.mark.parametrize("name", list(_MODULE_MAKERS))
@pytest.mark.parametrize("device,backend", _fused_targets() or [pytest.param("cpu", "triton", marks=pytest.mark.skip(
    reason="no CUDA and no triton interpreter"))])
def test_modules_on_fused_backend(name, device, backend):
    from testing_utils import GRAD_FACTOR, MATMUL_FACTOR, assert_fa_rule

    m_fused = _make_module(name, backend).to(device)
    m_torch = _make_module(name, "torch")
    m_ref = copy.deepcopy(m_torch).double()
    x = torch.randn(2, 5, 20)
    dy = torch.randn(2, 5, 12)
    got = _run_module(m_fused, x.to(device), dy.to(device))
    base = _run_module(m_torch, x, dy)
    ref = _run_module(m_ref, x.double(), dy.double())
    for i, (g, b, r) in enumerate(zip(got, base, ref)):
        factor = MATMUL_FACTOR if i == 0 else GRAD_FACTOR
        assert_fa_rule(g.cpu(), r, b, factor, f"{name} on {device}/{backend}: tensor {i}")
