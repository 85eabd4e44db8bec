"""Sibling-group LoRA: G LoRA layers that read the same input x (q/k/v; gate/up) computed by one op, so that x is
read once for all their shrinks forward and once for all their dA backward (``fastpeft/kernels/lora_group.py``).

The op, one name through every layer (``lora_group``; the ``lora`` op's math per member, no dropout, no e)::

    y_i = x W_iᵀ + b_i + s_i · (x A_iᵀ) B_iᵀ          x: (M, K), W_i: (N_i, K), A_i: (r_i, K), B_i: (N_i, r_i)

Pieces: ``lora_group_fwd_ref`` / ``lora_group_bwd_ref`` (torch: the members' ``lora`` references; the ground
truth), ``fastpeft.kernels.lora_group.lora_group_{fwd,bwd}_triton`` (found through ``fastpeft/ops/_registry.py``),
``LoRAGroupFunction`` (autograd), and ``fastpeft/tuners/lora/siblings.py``, which decides when layers form a group.
Saved for backward: x and S = x [A_1; ...; A_G]ᵀ (M, R) fp32 - what one member saves, once for the group.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._registry import impl as _impl
from .lora import base_weight_grad, lora_bwd_ref, lora_fwd_ref

__all__ = ["lora_group_fwd_ref", "lora_group_bwd_ref", "LoRAGroupFunction", "lora_group_apply"]


def lora_group_fwd_ref(x: torch.Tensor, weights: list[torch.Tensor], biases: list[Optional[torch.Tensor]],
                       lora_As: list[torch.Tensor], lora_Bs: list[torch.Tensor], scalings: list[float],
                       upcast: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Reference forward: each member's ``lora_fwd_ref`` (no dropout, no e).

    Args:
        x: (M, K).  weights[i]: (N_i, K).  biases[i]: (N_i,) or None.  lora_As[i]: (r_i, K).  lora_Bs[i]:
        (N_i, r_i).  scalings[i]: s_i.  upcast: compute in fp64 (ground truth).
    Returns:
        ys: [(M, N_i)] in x's dtype (fp64 with `upcast`); S: (M, Σ r_i) fp32 (fp64 for fp64 adapters or `upcast`),
        member i's S = x A_iᵀ in columns [Σ_{j<i} r_j, Σ_{j<=i} r_j).
    """
    ys, ss = [], []
    for w, b, a, bb, sc in zip(weights, biases, lora_As, lora_Bs, scalings):
        y, s = lora_fwd_ref(x, w, b, a, None, bb, sc, 0.0, None, upcast)
        ys.append(y)
        ss.append(s)
    return ys, torch.cat(ss, dim=1)


def lora_group_bwd_ref(x: torch.Tensor, dys: list[Optional[torch.Tensor]], weights: list[torch.Tensor],
                       lora_As: list[torch.Tensor], lora_Bs: list[torch.Tensor], S: torch.Tensor,
                       scalings: list[float], needs_dx: bool, has_bias: list[bool]
                       ) -> tuple[torch.Tensor, list, list, list]:
    """Reference backward: each member's ``lora_bwd_ref``, their dx summed.

    Args:
        x: (M, K).  dys[i]: (M, N_i), or None for a member whose output got no gradient.  S: (M, Σ r_i) from the
        forward.  needs_dx: compute dx.  has_bias[i]: compute member i's dbias.  Others as the forward.
    Returns:
        dx (M, K) in x's dtype (empty (0,) without `needs_dx`); dA_i (r_i, K), dB_i (N_i, r_i) in the adapter dtype
        and dbias_i (N_i,) in W_i's dtype, per member - None for a member without gradient (dbias_i: also without
        `has_bias[i]`).
    """
    g = len(dys)
    dA: list = [None] * g
    dB: list = [None] * g
    dbias: list = [None] * g
    dx = None
    o = 0
    for i in range(g):
        r = lora_As[i].shape[0]
        if dys[i] is not None:
            dxi, dA[i], _, dB[i], db = lora_bwd_ref(dys[i], x, weights[i], lora_As[i], None, lora_Bs[i],
                                                    S[:, o:o + r], scalings[i], 0.0, 0, needs_dx, has_bias[i])
            dbias[i] = db if has_bias[i] else None
            if needs_dx:
                dx = dxi if dx is None else dx + dxi
        o += r
    if dx is None:
        dx = x.new_zeros(x.shape) if needs_dx else x.new_empty(0)
    return dx, dA, dB, dbias


class LoRAGroupFunction(torch.autograd.Function):
    """Autograd of the ``lora_group`` op on `backend` (already resolved).

    ``apply(backend, g, scalings, x, *weights, *biases, *lora_As, *lora_Bs)`` -> ``(*ys, S)``; x: (M, K), lists as in
    ``lora_group_fwd_ref``.  Outputs that get no gradient arrive as None in backward (their member is skipped); the
    base weights' gradients are computed only when they require grad (``base_weight_grad``), as the ``lora`` op
    does."""

    @staticmethod
    def forward(ctx, backend, g, scalings, x, *flat):
        weights, biases, As, Bs = (list(flat[i * g:(i + 1) * g]) for i in range(4))
        ys, s = _impl("lora_group_fwd", backend)(x, weights, biases, As, Bs, list(scalings))
        ctx.save_for_backward(x, s, *weights, *As, *Bs)
        ctx.backend, ctx.g, ctx.scalings = backend, g, list(scalings)
        ctx.has_bias = [b is not None for b in biases]
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(s)
        return (*ys, s)

    @staticmethod
    def backward(ctx, *grads):
        g = ctx.g
        x, s, *rest = ctx.saved_tensors
        weights, As, Bs = rest[:g], rest[g:2 * g], rest[2 * g:]
        dys = [d.contiguous() if d is not None else None for d in grads[:g]]
        nig = ctx.needs_input_grad
        needs_dx = nig[3]
        w_grad = [nig[4 + i] for i in range(g)]
        b_grad = [ctx.has_bias[i] and nig[4 + g + i] for i in range(g)]
        dx, dA, dB, dbias = _impl("lora_group_bwd", ctx.backend)(x, dys, list(weights), list(As), list(Bs), s,
                                                                 ctx.scalings, needs_dx, b_grad)
        dW = [base_weight_grad(dys[i], x, weights[i]) if w_grad[i] and dys[i] is not None else None
              for i in range(g)]
        return (None, None, None, dx if needs_dx else None, *dW, *dbias, *dA, *dB)


def lora_group_apply(x: torch.Tensor, weights: list[torch.Tensor], biases: list[Optional[torch.Tensor]],
                     lora_As: list[torch.Tensor], lora_Bs: list[torch.Tensor], scalings: list[float],
                     backend: str) -> list[torch.Tensor]:
    """The group's outputs with autograd: ``[(M, N_i)]`` for x (M, K) (callers flatten and check; see
    ``fastpeft/tuners/lora/siblings.py``)."""
    g = len(weights)
    out = LoRAGroupFunction.apply(backend, g, tuple(float(sc) for sc in scalings), x, *weights, *biases, *lora_As,
                                  *lora_Bs)
    return list(out[:g])
