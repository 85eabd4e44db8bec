"""The two autograd paths of one op agree: the eager ``*Function`` (used outside torch.compile, no custom-op
dispatcher overhead) and the custom op ``torch.ops.fastpeft.*_fwd`` with its registered autograd (traced by
torch.compile).  Both call the same backend implementations, so outputs and every gradient must be bit-identical."""

import pytest
import torch

from fastpeft.ops import ia3 as I
from fastpeft.ops import lora as L


def _grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in tensors]
    y = fn(*leaves)
    y = y[0] if isinstance(y, tuple) else y  # the custom op returns (y, saved); the eager Function y alone
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    y.backward(dy)
    return y.detach(), [t.grad if (t is not None and t.requires_grad) else None for t in leaves]


@pytest.mark.parametrize("with_e,with_bias,p", [(False, True, 0.0), (True, True, 0.3), (True, False, 0.5)])
def test_lora_function_equals_custom_op(with_e, with_bias, p):
    m, k, n, r = 7, 13, 9, 3
    x = torch.randn(m, k, requires_grad=True)
    w = torch.randn(n, k)
    b = torch.randn(n, requires_grad=True) if with_bias else None
    a = torch.randn(r, k, requires_grad=True)
    e = torch.randn(r, requires_grad=True) if with_e else None
    bb = torch.randn(n, r, requires_grad=True)
    tensors = (x, w, b, a, e, bb)
    torch.manual_seed(1)
    y1, g1 = _grads(lambda *t: L.LoRALinearFunction.apply(*t, 0.7, p, 123, "torch"), tensors)
    torch.manual_seed(1)
    y2, g2 = _grads(lambda *t: torch.ops.fastpeft.lora_fwd(*t, 0.7, p, 123, "torch"), tensors)
    assert torch.equal(y1, y2)
    for i, (u, v) in enumerate(zip(g1, g2)):
        assert (u is None) == (v is None), i
        if u is not None:
            assert torch.equal(u, v), f"gradient {i} differs"
    assert g1[1] is None  # the frozen weight never gets a gradient


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_function_equals_custom_op(feedforward):
    m, k, n = 6, 11, 5
    x = torch.randn(m, k, requires_grad=True)
    w = torch.randn(n, k)
    b = torch.randn(n, requires_grad=True)
    ia3_l = torch.randn(k if feedforward else n, requires_grad=True)
    tensors = (x, w, b, ia3_l)
    y1, g1 = _grads(lambda *t: I.IA3LinearFunction.apply(*t, feedforward, "torch"), tensors)
    y2, g2 = _grads(lambda *t: torch.ops.fastpeft.ia3_fwd(*t, feedforward, "torch"), tensors)
    assert torch.equal(y1, y2)
    for i, (u, v) in enumerate(zip(g1, g2)):
        assert (u is None) == (v is None), i
        if u is not None:
            assert torch.equal(u, v), f"gradient {i} differs"


def test_apply_uses_function_in_eager(monkeypatch):
    """Eager with a gradient to build: the autograd Function; nothing requiring grad, or no_grad: the implementation
    itself (the same outputs, no Function), for LoRA and IA3."""
    calls = []
    for fn in (L.LoRALinearFunction, I.IA3LinearFunction):
        real = fn.apply
        monkeypatch.setattr(fn, "apply", lambda *a, real=real: calls.append(1) or real(*a))
    x, w, a, bb = torch.randn(2, 4), torch.randn(3, 4), torch.randn(1, 4), torch.randn(3, 1)
    y_plain = L.lora_apply(x, w, None, a, None, bb, 1.0, 0.0, 0, "torch")
    assert calls == [] and not y_plain.requires_grad
    a.requires_grad_(True)
    y = L.lora_apply(x, w, None, a, None, bb, 1.0, 0.0, 0, "torch")
    assert calls == [1] and y.requires_grad and torch.equal(y.detach(), y_plain)
    with torch.no_grad():
        y_ng = L.lora_apply(x, w, None, a, None, bb, 1.0, 0.0, 0, "torch")
    assert calls == [1] and not y_ng.requires_grad and torch.equal(y_ng, y_plain)
    lv = torch.randn(3, requires_grad=True)
    I.ia3_apply(x, w, None, lv, False, "torch")
    with torch.no_grad():
        y3 = I.ia3_apply(x, w, None, lv, False, "torch")
    assert calls == [1, 1] and not y3.requires_grad
