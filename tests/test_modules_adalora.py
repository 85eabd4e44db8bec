"""``fastpeft.AdaLoRALinear`` against fp64 math and HF PEFT's ``SVDLinear``: init, forward/backward, orth_reg,
merge/unmerge, from_linear, Conv1D, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastpeft
from fastpeft.modules import AdaLoRALinear

from testing_utils import ELEMENTWISE, PEFT_PARITY_RTOL, SMALL_FP32, assert_close_rel
from testing_utils import close_small as _close, randomize_module as _randomize

F64 = torch.float64


def test_parameters_and_init():
    assert fastpeft.AdaLoRALinear is AdaLoRALinear
    torch.manual_seed(0)
    m = AdaLoRALinear(300, 200, r=12, lora_alpha=8)
    assert m.lora_A.shape == (12, 300) and m.lora_E.shape == (12, 1) and m.lora_B.shape == (200, 12)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"lora_A", "lora_E", "lora_B"}
    assert not m.weight.requires_grad
    assert m.ranknum == 12.0 and m.scaling == 8
    assert m.effective_scaling == 8 / (12 + 1e-5)
    assert torch.count_nonzero(m.lora_E) == 0
    for p in (m.lora_A, m.lora_B):  # N(0, 0.02) on 3600 / 2400 samples
        assert abs(p.std().item() - 0.02) < 0.002 and abs(p.mean().item()) < 0.002
    assert AdaLoRALinear(4, 3, r=2, lora_alpha=0).scaling == 2.0  # PEFT: alpha <= 0 falls back to r
    nz = AdaLoRALinear(4, 3, r=2, init_lora_weights=False)
    assert torch.count_nonzero(nz.lora_E) == 2
    x = torch.randn(2, 4)
    assert not torch.allclose(nz(x), F.linear(x, nz.weight, nz.bias))


@pytest.mark.parametrize("lead,k,n,r", [((1,), 5, 7, 1), ((0,), 6, 4, 2), ((3, 4), 17, 33, 3), ((13,), 31, 19, 12)])
def test_forward_backward_vs_fp64(lead, k, n, r):
    m = _randomize(AdaLoRALinear(k, n, r=r, lora_alpha=8))
    x = torch.randn(*lead, k, requires_grad=True)
    y = m(x)
    x64 = x.detach().double().requires_grad_(True)
    A, E, B = (p.detach().double().requires_grad_(True) for p in (m.lora_A, m.lora_E, m.lora_B))
    y64 = x64 @ m.weight.double().t() + m.bias.double() + (x64 @ (A * E).t()) @ B.t() * 8 / (r + 1e-5)
    _close(y, y64, what="y")
    dy = torch.randn(*lead, n, dtype=F64)
    y.backward(dy.float())
    y64.backward(dy)
    for got, want, what in ((x.grad, x64.grad, "dx"), (m.lora_A.grad, A.grad, "dA"), (m.lora_E.grad, E.grad, "dE"),
                            (m.lora_B.grad, B.grad, "dB")):
        _close(got, want, what=what)


def test_dropout_matches_f_dropout_stream():
    m = _randomize(AdaLoRALinear(10, 6, r=3, lora_dropout=0.5))
    x = torch.randn(4, 10)
    torch.manual_seed(3)
    y = m(x)
    torch.manual_seed(3)
    xd = F.dropout(x, 0.5, True).double()
    want = F.linear(x, m.weight, m.bias).double() + (xd @ (m.lora_A * m.lora_E).double().t()) @ \
        m.lora_B.double().t() * m.effective_scaling
    _close(y, want, what="train")
    m.eval()
    assert torch.equal(m(x), m(x))


def test_orth_reg_value_and_gradient():
    m = AdaLoRALinear(7, 5, r=3)
    A64, B64 = m.lora_A.detach().double(), m.lora_B.detach().double()
    eye = torch.eye(3, dtype=F64)
    want = ((A64 @ A64.t() - eye) ** 2).sum().sqrt() + ((B64.t() @ B64 - eye) ** 2).sum().sqrt()
    reg = m.orth_reg()
    assert reg.dim() == 0
    _close(reg, want, what="orth_reg (non-squared Frobenius)")
    reg.backward()
    assert m.lora_A.grad is not None and m.lora_B.grad is not None and m.lora_E.grad is None
    # an orthonormal A and B give zero
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(7, 3))
        m.lora_A.copy_(q.t())
        q, _ = torch.linalg.qr(torch.randn(5, 3))
        m.lora_B.copy_(q)
    assert m.orth_reg().item() < 1e-5


@pytest.mark.parametrize("conv1d", [False, True])
def test_from_linear_merge_unmerge(conv1d):
    if conv1d:
        base = pytest.importorskip("transformers.pytorch_utils").Conv1D(6, 9)  # in 9, out 6
    else:
        base = nn.Linear(9, 6)
    m = AdaLoRALinear.from_linear(base, r=4, lora_alpha=8)
    assert m.weight is base.weight and m.bias is base.bias and not base.weight.requires_grad
    assert m.fan_in_fan_out == conv1d and m.in_features == 9 and m.out_features == 6
    x = torch.randn(5, 9)
    assert torch.equal(m(x), base(x))  # E = 0
    _randomize(m)
    y = m(x)
    w0 = base.weight.clone()
    m.merge()
    delta = (m.lora_B.double() @ (m.lora_A * m.lora_E).double()) * m.effective_scaling
    _close(base.weight, w0.double() + (delta.t() if conv1d else delta), what="merged W")
    _close(m(x), y, what="merged forward")
    with pytest.raises(ValueError, match="already merged"):
        m.merge()
    m.unmerge()
    _close(base.weight, w0, what="unmerged W")
    with pytest.raises(ValueError, match="not merged"):
        m.unmerge()
    _close(m.to_linear()(x), y, what="to_linear")


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(r=0), ValueError, "r must be a positive int"),
    (dict(r=-1), ValueError, "r must be a positive int"),
    (dict(lora_dropout=1.5), ValueError, r"lora_dropout must be in \[0, 1\)"),
    (dict(init_lora_weights="gaussian"), ValueError, "init_lora_weights must be True or False"),
])
def test_bad_args(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        AdaLoRALinear(4, 3, **kwargs)
    lin = nn.Linear(4, 3)
    with pytest.raises(exc, match=msg):
        AdaLoRALinear.from_linear(lin, **kwargs)
    assert lin.weight.requires_grad


def test_bad_module_type_and_repr():
    with pytest.raises(TypeError, match="Conv1d"):
        AdaLoRALinear.from_linear(nn.Conv1d(3, 3, 1))
    r = repr(AdaLoRALinear(4, 3, r=2, lora_alpha=5, lora_dropout=0.1))
    assert "r=2" in r and "lora_alpha=5" in r and "lora_dropout=0.1" in r


@pytest.mark.parametrize("conv1d", [False, True])
def test_matches_hf_peft_svdlinear(conv1d):
    peft = pytest.importorskip("peft")
    from peft.tuners.adalora.layer import SVDLinear

    torch.manual_seed(4)
    if conv1d:
        base = pytest.importorskip("transformers.pytorch_utils").Conv1D(8, 10)
    else:
        base = nn.Linear(10, 8)
    cfg = peft.AdaLoraConfig(init_r=5, lora_alpha=8, lora_dropout=0.2, target_modules=["x"], total_step=10,
                             fan_in_fan_out=conv1d)
    ref = SVDLinear(copy.deepcopy(base), "default", cfg, r=5, lora_alpha=8)
    m = AdaLoRALinear.from_linear(copy.deepcopy(base), r=5, lora_alpha=8, lora_dropout=0.2)
    with torch.no_grad():
        ref.lora_E["default"].normal_()
        for name in ("lora_A", "lora_E", "lora_B"):
            getattr(m, name).copy_(getattr(ref, name)["default"])
    x = torch.randn(2, 3, 10)
    for mode in ("eval", "train"):
        m.train(mode == "train")
        ref.train(mode == "train")
        torch.manual_seed(9)
        y_ref = ref(x)
        torch.manual_seed(9)
        y = m(x)
        assert_close_rel(y, y_ref, PEFT_PARITY_RTOL, f"forward ({mode})")
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    for name in ("lora_A", "lora_E", "lora_B"):
        assert_close_rel(getattr(m, name).grad, getattr(ref, name)["default"].grad, PEFT_PARITY_RTOL, f"d{name}")
    m.merge()
    ref.merge()
    assert_close_rel(m.weight, ref.base_layer.weight, PEFT_PARITY_RTOL, "merged weight")
