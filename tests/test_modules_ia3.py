"""``fastpeft.IA3Linear`` against fp64 math and HF PEFT's ``ia3.Linear``: both modes, init, forward/backward,
merge/unmerge (bias included), from_linear, Conv1D, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fastpeft
from fastpeft.modules import IA3Linear

from testing_utils import ELEMENTWISE, PEFT_PARITY_RTOL, SMALL_FP32, assert_close_rel
from testing_utils import close_small as _close, randomize_module as _randomize

F64 = torch.float64


def _math(m, x64, l64):
    W, b = m.weight_nk.detach().double(), m.bias.detach().double() if m.bias is not None else 0.0
    if m.feedforward:
        return (x64 * l64.reshape(-1)) @ W.t() + b
    return (x64 @ W.t() + b) * l64.reshape(-1)


def test_parameters_and_init():
    assert fastpeft.IA3Linear is IA3Linear
    a = IA3Linear(6, 4)
    f = IA3Linear(6, 4, feedforward=True)
    assert a.ia3_l.shape == (4, 1) and f.ia3_l.shape == (1, 6)  # HF PEFT's shapes
    assert torch.equal(a.ia3_l, torch.ones(4, 1)) and torch.equal(f.ia3_l, torch.ones(1, 6))
    assert {n for n, p in a.named_parameters() if p.requires_grad} == {"ia3_l"}
    x = torch.randn(3, 6)
    assert torch.equal(a(x), nn.functional.linear(x, a.weight, a.bias))
    assert torch.equal(f(x), nn.functional.linear(x, f.weight, f.bias))
    assert not torch.equal(IA3Linear(6, 4, init_ia3_weights=False).ia3_l, torch.ones(4, 1))
    assert "feedforward=True" in repr(f) and "in_features=6" in repr(f)


@pytest.mark.parametrize("lead,k,n", [((1,), 5, 7), ((0,), 4, 3), ((3, 4), 17, 33), ((13,), 31, 19)])
@pytest.mark.parametrize("ff", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_vs_fp64(lead, k, n, ff, bias):
    m = _randomize(IA3Linear(k, n, bias=bias, feedforward=ff))
    x = torch.randn(*lead, k, requires_grad=True)
    y = m(x)
    assert y.shape == (*lead, n)
    x64, l64 = x.detach().double().requires_grad_(True), m.ia3_l.detach().double().requires_grad_(True)
    y64 = _math(m, x64, l64)
    _close(y, y64, what="y")
    dy = torch.randn(*lead, n, dtype=F64)
    y.backward(dy.float())
    y64.backward(dy)
    _close(x.grad, x64.grad, what="dx")
    _close(m.ia3_l.grad, l64.grad, what="dl")


@pytest.mark.parametrize("ff", [False, True])
@pytest.mark.parametrize("conv1d", [False, True])
def test_from_linear_merge_unmerge(ff, conv1d):
    if conv1d:
        base = pytest.importorskip("transformers.pytorch_utils").Conv1D(6, 9)  # in 9, out 6
        with torch.no_grad():
            base.bias.normal_()
    else:
        base = nn.Linear(9, 6)
    m = IA3Linear.from_linear(base, feedforward=ff)
    assert m.weight is base.weight and m.bias is base.bias and not base.bias.requires_grad
    x = torch.randn(4, 9)
    assert torch.equal(m(x), base(x))
    _randomize(m)
    y = m(x)
    _close(y, _math(m, x.double(), m.ia3_l.detach().double()), what="forward")
    w0, b0 = base.weight.clone(), base.bias.clone()
    m.merge()
    lv = m.ia3_l.detach().double().reshape(-1)
    w_nk = (w0.t() if conv1d else w0).double()
    want_nk = w_nk * lv[None, :] if ff else w_nk * lv[:, None]
    _close(m.weight_nk, want_nk, what="merged W")
    _close(base.bias, b0.double() if ff else b0.double() * lv, what="merged bias (scaled in output mode only)")
    _close(m(x), y, what="merged forward")
    _close(m.to_linear()(x), y, what="to_linear while merged")
    with pytest.raises(ValueError, match="already merged"):
        m.merge()
    m.unmerge()
    _close(base.weight, w0, what="unmerged W")
    _close(base.bias, b0, what="unmerged bias")
    with pytest.raises(ValueError, match="not merged"):
        m.unmerge()
    exported = m.to_linear()
    assert type(exported) is nn.Linear and exported.weight.shape == (6, 9)
    _close(exported(x), y, what="to_linear")
    assert torch.equal(base.weight, m.weight)  # to_linear left the module unmerged and unchanged


def test_unmerge_divides_by_l_plus_eps():
    m = IA3Linear(3, 2, bias=False)
    with torch.no_grad():
        m.ia3_l.copy_(torch.tensor([[0.0], [2.0]], dtype=torch.float32))
    w0 = m.weight.clone()
    m.merge()
    assert torch.equal(m.weight[0], torch.zeros(3))
    m.unmerge()
    assert torch.isfinite(m.weight).all()  # no inf from a zero scale (HF PEFT's + 1e-8)
    _close(m.weight[1], w0[1], what="row with l=2")


def test_bad_args():
    with pytest.raises(TypeError, match="feedforward must be a bool"):
        IA3Linear(3, 2, feedforward="yes")
    with pytest.raises(TypeError, match="GRU"):
        IA3Linear.from_linear(nn.GRU(2, 2))
    lin = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="feedforward must be a bool"):
        IA3Linear.from_linear(lin, feedforward=1)
    assert lin.weight.requires_grad
    with pytest.raises(ValueError, match="in_features must be >= 1"):
        IA3Linear(0, 2)


@pytest.mark.parametrize("ff", [False, True])
@pytest.mark.parametrize("conv1d", [False, True])
def test_matches_hf_peft_ia3_linear(ff, conv1d):
    peft = pytest.importorskip("peft")
    from peft.tuners.ia3.layer import Linear as PeftIA3Linear

    torch.manual_seed(8)
    if conv1d:
        base = pytest.importorskip("transformers.pytorch_utils").Conv1D(7, 10)
        with torch.no_grad():
            base.bias.normal_()
    else:
        base = nn.Linear(10, 7)
    cfg = peft.IA3Config(target_modules=["x"], feedforward_modules=["x"] if ff else [], fan_in_fan_out=conv1d)
    ref = PeftIA3Linear(copy.deepcopy(base), "default", cfg, is_feedforward=ff, is_target_conv_1d_layer=conv1d)
    m = IA3Linear.from_linear(copy.deepcopy(base), feedforward=ff)
    assert m.ia3_l.shape == ref.ia3_l["default"].shape
    with torch.no_grad():
        ref.ia3_l["default"].uniform_(0.5, 1.5)
        m.ia3_l.copy_(ref.ia3_l["default"])
    x = torch.randn(2, 3, 10)
    y, y_ref = m(x), ref(x)
    assert_close_rel(y, y_ref, PEFT_PARITY_RTOL, "forward")
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert_close_rel(m.ia3_l.grad, ref.ia3_l["default"].grad, PEFT_PARITY_RTOL, "dl")
    m.merge()
    ref.merge()
    assert_close_rel(m.weight, ref.base_layer.weight, PEFT_PARITY_RTOL, "merged weight")
    assert_close_rel(m.bias, ref.base_layer.bias, PEFT_PARITY_RTOL, "merged bias")
