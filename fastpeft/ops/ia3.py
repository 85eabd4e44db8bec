"""(IA)³ linear: reference, backend dispatch, custom ops and autograd.

The op, one name through every layer (W, b frozen; l trainable)::

    attention / output mode  (feedforward=False):  y = (x Wᵀ + b) ⊙ l        l: (N,)
    feed-forward / input mode (feedforward=True):  y = (x ⊙ l) Wᵀ + b        l: (K,)

as HF PEFT's ``ia3.Linear`` computes it (the bias is scaled too in output mode; in input mode x is scaled in l's
dtype, then cast back to x's dtype before the matmul).

Saved for backward: output mode saves the unscaled base output z = x Wᵀ + b (M×N, as PEFT's multiply does) so
that dl = Σ_m dy ⊙ z; input mode saves x (dl = Σ_m (dy W) ⊙ x).  The ``saved`` tensor the forward returns is z
in output mode and an empty tensor in input mode.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
import torch.nn.functional as F


def ia3_fwd_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ia3_l: torch.Tensor,
                feedforward: bool, upcast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference forward.

    Args:
        x: (M, K).  weight: (N, K).  bias: (N,) or None.  ia3_l: (N,) when not `feedforward`, else (K,).
        feedforward: input-scaling mode.  upcast: compute in fp64 (ground truth).
    Returns:
        y: (M, N) in x's dtype (fp64 if `upcast`); saved: z = x Wᵀ + b (M, N) in output mode, (0,) in input mode.
    """
    if upcast:
        x, weight, ia3_l = x.double(), weight.double(), ia3_l.double()
        bias = bias.double() if bias is not None else None
    if feedforward:
        xs = (x.to(ia3_l.dtype) * ia3_l).to(x.dtype)
        return F.linear(xs, weight, bias), x.new_empty(0)
    z = F.linear(x, weight, bias)
    y = (z * ia3_l).to(x.dtype)
    return y, z


def ia3_bwd_ref(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ia3_l: torch.Tensor, saved: torch.Tensor,
                feedforward: bool, needs_dx: bool, has_bias: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference backward.

    In output mode `x` is an empty placeholder (only z = `saved` is needed).
    Returns:
        dx (M, K) (empty if not `needs_dx`), dl shaped like ia3_l in its dtype, dbias (N,) (empty if not `has_bias`).
    """
    ldt = ia3_l.dtype
    if feedforward:
        g = dy @ weight.to(dy.dtype)  # d(x ⊙ l): (M, K)
        dl = (g.to(ldt) * x.to(ldt)).sum(0)
        dx = (g.to(ldt) * ia3_l).to(x.dtype) if needs_dx else x.new_empty(0)
        dbias = dy.sum(0).to(weight.dtype) if has_bias else dy.new_empty(0, dtype=weight.dtype)
        return dx, dl, dbias
    dl = (dy.to(ldt) * saved.to(ldt)).sum(0)
    dz = (dy.to(ldt) * ia3_l).to(dy.dtype)
    # x is not saved in output mode (an empty placeholder arrives); dx has dy's dtype, like y had x's.
    dx = dz @ weight.to(dz.dtype) if needs_dx else dy.new_empty(0)
    dbias = dz.sum(0).to(weight.dtype) if has_bias else dy.new_empty(0, dtype=weight.dtype)
    return dx, dl, dbias


_IMPL_MODULES = {"triton": "fastpeft.kernels.ia3", "cuda": "fastpeft._cuda"}


def _impl(name: str, backend: str):
    if backend == "torch":
        return globals()[f"{name}_ref"]
    return getattr(importlib.import_module(_IMPL_MODULES[backend]), f"{name}_{backend}")


@torch.library.custom_op("fastpeft::ia3_fwd", mutates_args=())
def ia3_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ia3_l: torch.Tensor,
            feedforward: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Custom op: (y, saved) = IA3 forward on `backend`.  Shapes as in ``ia3_fwd_ref``."""
    y, saved = _impl("ia3_fwd", backend)(x, weight, bias, ia3_l, feedforward)
    return y, saved.contiguous()


@ia3_fwd.register_fake
def _(x, weight, bias, ia3_l, feedforward, backend):
    m, n = x.shape[0], weight.shape[0]
    saved = x.new_empty(0) if feedforward else x.new_empty(m, n)
    return x.new_empty(m, n), saved


@torch.library.custom_op("fastpeft::ia3_bwd", mutates_args=())
def ia3_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ia3_l: torch.Tensor, saved: torch.Tensor,
            feedforward: bool, needs_dx: bool, has_bias: bool, backend: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Custom op: (dx, dl, dbias) = IA3 backward on `backend`.  See ``ia3_bwd_ref``."""
    outs = _impl("ia3_bwd", backend)(dy, x, weight, ia3_l, saved, feedforward, needs_dx, has_bias)
    return tuple(o.contiguous() for o in outs)


@ia3_bwd.register_fake
def _(dy, x, weight, ia3_l, saved, feedforward, needs_dx, has_bias, backend):
    dx = dy.new_empty(dy.shape[0], weight.shape[1]) if needs_dx else dy.new_empty(0)
    dbias = dy.new_empty(weight.shape[0], dtype=weight.dtype) if has_bias else dy.new_empty(0, dtype=weight.dtype)
    return dx, ia3_l.new_empty(ia3_l.shape), dbias


def _ia3_save(ctx, inputs, saved):
    x, weight, bias, ia3_l, feedforward, backend = inputs
    # Output mode needs z, not x; input mode needs x.
    ctx.save_for_backward(x if feedforward else x.new_empty(0), weight, ia3_l, saved)
    ctx.feedforward, ctx.backend = feedforward, backend
    ctx.has_bias = bias is not None


def _ia3_grads(ctx, dy, bwd):
    x, weight, ia3_l, saved = ctx.saved_tensors
    needs_dx = ctx.needs_input_grad[0]
    bias_grad = ctx.has_bias and ctx.needs_input_grad[2]
    dx, dl, dbias = bwd(dy.contiguous(), x, weight, ia3_l, saved, ctx.feedforward, needs_dx, bias_grad, ctx.backend)
    return dx if needs_dx else None, None, dbias if bias_grad else None, dl, None, None


def _ia3_setup_context(ctx, inputs, output):
    _ia3_save(ctx, inputs, output[1])


def _ia3_backward(ctx, dy, _dsaved):
    return _ia3_grads(ctx, dy, ia3_bwd)


ia3_fwd.register_autograd(_ia3_backward, setup_context=_ia3_setup_context)


def _ia3_bwd_direct(*args):
    *rest, backend = args
    return _impl("ia3_bwd", backend)(*rest)


class IA3LinearFunction(torch.autograd.Function):
    """The eager autograd path of ``fastpeft::ia3_fwd`` (see ``fastpeft.ops.lora.LoRALinearFunction``: same
    implementations, called without the custom-op dispatcher's overhead).  Arguments and outputs as in ``ia3_fwd``."""

    @staticmethod
    def forward(ctx, x, weight, bias, ia3_l, feedforward, backend):
        y, saved = _impl("ia3_fwd", backend)(x, weight, bias, ia3_l, feedforward)
        saved = saved.contiguous()
        _ia3_save(ctx, (x, weight, bias, ia3_l, feedforward, backend), saved)
        ctx.mark_non_differentiable(saved)
        return y, saved

    @staticmethod
    def backward(ctx, dy, _dsaved):
        return _ia3_grads(ctx, dy, _ia3_bwd_direct)


def ia3_apply(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ia3_l: torch.Tensor,
              feedforward: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the IA3 op with autograd: the custom op under ``torch.compile``, ``IA3LinearFunction`` in eager mode."""
    if torch.compiler.is_compiling():
        return ia3_fwd(x, weight, bias, ia3_l, feedforward, backend)
    return IA3LinearFunction.apply(x, weight, bias, ia3_l, feedforward, backend)
