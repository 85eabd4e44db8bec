"""Base-weight gradients (issue 11): when the frozen layer's weight (or bias) requires grad, every backend returns its
gradient - LoRA dW = dyᵀ x, IA3 output mode dW = (dy ⊙ l)ᵀ x, input mode dW = dyᵀ (x ⊙ l) - and computes it only
then.  Checked on the torch backend's composite path, its seeded-op path, the custom-op path, and the Triton
variants (interpreter on CPU; CUDA tensors on a GPU machine, where the interpreter is off), against an fp64 autograd
reference of the formula and against HF PEFT's layer.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastpeft.functional as FN
from fastpeft.ops import ia3 as OI
from fastpeft.ops import lora as OL
from fastpeft.ops.dropout import dropout_keep_mask, dropout_scale

from testing_utils import GRAD_FACTOR, assert_fa_rule, rel_err  # noqa: F401

F32, F64 = torch.float32, torch.float64
HAS_TRITON = True
try:
    import triton  # noqa: F401
except Exception:  # noqa: BLE001
    HAS_TRITON = False

# The dW GEMM sits in the op's backward, shared by every backend and variant; the fused variant is covered once.
LORA_BACKENDS = ["torch", "triton"] if HAS_TRITON else ["torch"]
HAS_CUDA = torch.cuda.is_available()


def _dev(backend: str) -> str:
    """Where a backend's operands live: the triton variants on CUDA when there is a GPU (Triton's interpreter, which
    takes CPU tensors, is on only without one - conftest.py; the first GPU run failed every triton case here on CPU
    tensors), everything else on CPU.  References are computed on CPU; results are compared there."""
    return "cuda" if HAS_CUDA and backend.startswith("triton") else "cpu"


def _masters(m, k, n, r, seed=3):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(m, k, generator=g, dtype=F64), w=torch.randn(n, k, generator=g, dtype=F64) / math.sqrt(k),
                b=torch.randn(n, generator=g, dtype=F64), a=torch.randn(r, k, generator=g, dtype=F64) / math.sqrt(k),
                bb=torch.randn(n, r, generator=g, dtype=F64), dy=torch.randn(m, n, generator=g, dtype=F64),
                lo=1.0 + 0.5 * torch.randn(n, generator=g, dtype=F64), li=1.0 + 0.5 * torch.randn(k, generator=g,
                                                                                                  dtype=F64))


def _lora_ref64(t, p, seed, scaling, w_t, dtype=F64):
    """Plain-torch autograd (in ``dtype``; fp64 by default) of y = x Wᵀ + b + s (drop(x) Aᵀ) Bᵀ with the shared
    mask stream: (dW, db)."""
    t = {k: v.to(dtype) for k, v in t.items()}
    w = t["w"].clone().requires_grad_(True)
    b = t["b"].clone().requires_grad_(True)
    x = t["x"]
    xd = x
    if p > 0:
        keep = dropout_keep_mask(seed, tuple(x.shape), p)
        xd = torch.where(keep, x * dropout_scale(p), torch.zeros((), dtype=dtype))
    y = x @ w.t() + b + scaling * (xd @ t["a"].t()) @ t["bb"].t()
    y.backward(t["dy"])
    return w.grad, b.grad


@pytest.mark.parametrize("backend", LORA_BACKENDS)
@pytest.mark.parametrize("p,seed", [(0.0, None), (0.2, 11)], ids=["no_dropout", "seeded_dropout"])
@pytest.mark.parametrize("w_t", [False, True], ids=["rowmajor", "conv1d_view"])
def test_lora_base_weight_and_bias_grads(backend, p, seed, w_t):
    """torch + p=0: the composite path; torch + seed: the op path (explicit backward); triton: both variants."""
    t = _masters(19, 24, 21, 3)
    scaling = 0.5
    dev = _dev(backend)
    wp = (t["w"].t().contiguous() if w_t else t["w"]).to(dev, F32).requires_grad_(True)  # the parameter
    w = wp.t() if w_t else wp
    b, a, bb, x = (t[k].to(dev, F32).requires_grad_(True) for k in ("b", "a", "bb", "x"))
    y = FN.lora_linear(x, w, b, a, bb, scaling, p, seed, backend=backend)
    y.backward(t["dy"].to(dev, F32))
    dw_ref, db_ref = _lora_ref64(t, p, seed, scaling, w_t)
    dw = (wp.grad.t() if w_t else wp.grad).cpu()
    assert dw is not None and dw.shape == dw_ref.shape
    dw_same, db_same = _lora_ref64(t, p, seed, scaling, w_t, F32)
    assert_fa_rule(dw, dw_ref, dw_same, GRAD_FACTOR, "dW")
    assert_fa_rule(b.grad.cpu(), db_ref, db_same, GRAD_FACTOR, "dbias")


@pytest.mark.parametrize("backend", LORA_BACKENDS + (["triton:fused"] if HAS_TRITON else []))
def test_lora_weight_grad_only_when_required(backend, monkeypatch):
    """A frozen weight gets no gradient and the dW GEMM does not run; a trainable one gets exactly one."""
    calls = []
    real = OL.base_weight_grad
    monkeypatch.setattr(OL, "base_weight_grad", lambda *a: calls.append(1) or real(*a))
    t = _masters(9, 16, 12, 2)
    dev = _dev(backend)
    w = t["w"].to(dev, F32)
    x, a, bb = (t[k].to(dev, F32).requires_grad_(True) for k in ("x", "a", "bb"))
    FN.lora_linear(x, w, None, a, bb, 1.0, 0.1, 5, backend=backend).sum().backward()
    assert w.grad is None and calls == []
    w.requires_grad_(True)
    FN.lora_linear(x, w, None, a, bb, 1.0, 0.1, 5, backend=backend).sum().backward()
    assert w.grad is not None and len(calls) == 1


def test_lora_weight_grad_matches_hf_peft():
    """HF PEFT's lora.Linear with a trainable base weight: the same dW and db (fp32, no dropout)."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(24, 20)

        def forward(self, x):
            return self.q(x)

    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q"]))
    layer = model.base_model.model.q
    base = layer.base_layer
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    base.weight.requires_grad_(True)
    base.bias.requires_grad_(True)
    x = torch.randn(7, 24)
    dy = torch.randn(7, 20)
    model(x).backward(dy)
    want_w, want_b = base.weight.grad.clone(), base.bias.grad.clone()
    for backend in LORA_BACKENDS:
        dev = _dev(backend)
        w = base.weight.detach().to(dev, copy=True).requires_grad_(True)
        b = base.bias.detach().to(dev, copy=True).requires_grad_(True)
        y = FN.lora_linear(x.to(dev), w, b, layer.lora_A["default"].weight.detach().to(dev),
                           layer.lora_B["default"].weight.detach().to(dev), 2.0, 0.0, None, backend=backend)
        y.backward(dy.to(dev))
        assert rel_err(w.grad.cpu(), want_w) <= 1e-5, backend
        assert rel_err(b.grad.cpu(), want_b) <= 1e-5, backend


IA3_BACKENDS = ["torch", "torch-op", "triton", "triton:fused"] if HAS_TRITON else ["torch", "torch-op"]


@pytest.mark.parametrize("backend", IA3_BACKENDS)
@pytest.mark.parametrize("ff", [False, True], ids=["output", "input"])
def test_ia3_base_weight_and_bias_grads(backend, ff):
    t = _masters(17, 20, 18, 1)
    lv64 = t["li"] if ff else t["lo"]
    dev = _dev(backend)
    w, b, x = (t[k].to(dev, F32).requires_grad_(True) for k in ("w", "b", "x"))
    lv = lv64.to(dev, F32).requires_grad_(True)
    if backend == "torch-op":  # the custom op / autograd Function with the reference implementation
        y = OI.ia3_apply(x, w, b, lv, ff, "torch")
    else:
        y = FN.ia3_linear(x, w, b, lv, ff, backend=backend)
    y.backward(t["dy"].to(dev, F32))
    w64 = t["w"].clone().requires_grad_(True)
    b64 = t["b"].clone().requires_grad_(True)
    y64 = (t["x"] * lv64) @ w64.t() + b64 if ff else (t["x"] @ w64.t() + b64) * lv64
    y64.backward(t["dy"])
    w32, b32, l32 = (t[k].to(F32).requires_grad_(True) for k in ("w", "b", "li" if ff else "lo"))
    x32 = t["x"].to(F32)
    y32 = (x32 * l32) @ w32.t() + b32 if ff else (x32 @ w32.t() + b32) * l32
    y32.backward(t["dy"].to(F32))
    assert_fa_rule(w.grad.cpu(), w64.grad, w32.grad, GRAD_FACTOR, f"dW {backend}")
    assert_fa_rule(b.grad.cpu(), b64.grad, b32.grad, GRAD_FACTOR, f"dbias {backend}")
    # and without a trainable weight: no gradient
    w2 = t["w"].to(dev, F32)
    FN.ia3_linear(t["x"].to(dev, F32), w2, None, lv.detach(), ff, backend=backend.replace("torch-op", "torch")).sum()
    assert w2.grad is None


def test_ia3_weight_grad_matches_hf_peft():
    pytest.importorskip("peft")
    from peft import IA3Config, get_peft_model

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(16, 12)
            self.ff = torch.nn.Linear(12, 10)

        def forward(self, x):
            return self.ff(self.q(x))

    torch.manual_seed(1)
    base = Tiny()
    model = get_peft_model(base, IA3Config(target_modules=["q", "ff"], feedforward_modules=["ff"]))
    for layer in (model.base_model.model.q, model.base_model.model.ff):
        with torch.no_grad():
            layer.ia3_l["default"].uniform_(0.5, 1.5)
        layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(6, 16)
    dy = torch.randn(6, 10)
    model(x).backward(dy)
    q, f = model.base_model.model.q, model.base_model.model.ff
    for backend in ("torch",) + (("triton",) if HAS_TRITON else ()):
        dev = _dev(backend)
        wq = q.base_layer.weight.detach().to(dev, copy=True).requires_grad_(True)
        wf = f.base_layer.weight.detach().to(dev, copy=True).requires_grad_(True)
        h = FN.ia3_linear(x.to(dev), wq, q.base_layer.bias.detach().to(dev), q.ia3_l["default"].detach().to(dev),
                          False, backend=backend)
        out = FN.ia3_linear(h, wf, f.base_layer.bias.detach().to(dev), f.ia3_l["default"].detach().to(dev), True,
                            backend=backend)
        out.backward(dy.to(dev))
        assert rel_err(wq.grad.cpu(), q.base_layer.weight.grad) <= 1e-5, backend
        assert rel_err(wf.grad.cpu(), f.base_layer.weight.grad) <= 1e-5, backend
