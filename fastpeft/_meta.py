"""Fake (meta) kernels of the ops: the outputs' shapes and dtypes without computing them, with the argument shapes
checked by ``torch._check`` (so torch.compile / export report a bad shape at trace time).

One function per op direction, registered for fastpeft's custom ops (``fastpeft.ops.lora`` / ``fastpeft.ops.ia3``) and
for the compiled extension's ops (``fastpeft._cuda``).  It sits below both, so neither imports the other for it.
"""

from __future__ import annotations

from typing import Optional

import torch


def _check_lora_shapes(x, weight, lora_A, lora_E, lora_B) -> None:
    m, k = x.shape
    n = weight.shape[0]
    r = lora_A.shape[0]
    torch._check(weight.dim() == 2 and weight.shape[1] == k, lambda: f"weight must be (N, {k}), got {weight.shape}")
    torch._check(lora_A.dim() == 2 and lora_A.shape[1] == k, lambda: f"lora_A must be (r, {k}), got {lora_A.shape}")
    torch._check(lora_B.dim() == 2 and lora_B.shape[0] == n and lora_B.shape[1] == r,
                 lambda: f"lora_B must be ({n}, {r}), got {lora_B.shape}")
    if lora_E is not None:
        torch._check(lora_E.dim() == 1 and lora_E.shape[0] == r, lambda: f"lora_E must be ({r},), got {lora_E.shape}")


def lora_fwd_meta(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                  lora_E: Optional[torch.Tensor], lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of the forward without computing them: y (M, N) in x's dtype, S (M, r) in fp32 (fp64 adapters:
    fp64).  Checks the shapes with ``torch._check`` (x: (M, K), weight: (N, K), bias: (N,), lora_A: (r, K),
    lora_E: (r,), lora_B: (N, r))."""
    _check_lora_shapes(x, weight, lora_A, lora_E, lora_B)
    if bias is not None:
        torch._check(bias.shape == (weight.shape[0],), lambda: f"bias must be ({weight.shape[0]},), got {bias.shape}")
    m = x.shape[0]
    s_dtype = torch.promote_types(lora_A.dtype, torch.float32)
    return x.new_empty(m, weight.shape[0]), x.new_empty(m, lora_A.shape[0], dtype=s_dtype)


def lora_bwd_meta(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                  lora_E: Optional[torch.Tensor], lora_B: torch.Tensor, S: torch.Tensor, needs_dx: bool,
                  has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Outputs of the backward without computing them (see ``lora_bwd_ref``); checks dy: (M, N), S: (M, r)."""
    _check_lora_shapes(x, weight, lora_A, lora_E, lora_B)
    torch._check(dy.shape == (x.shape[0], weight.shape[0]), lambda: f"dy must be (M, N), got {dy.shape}")
    torch._check(S.shape == (x.shape[0], lora_A.shape[0]), lambda: f"S must be (M, r), got {S.shape}")
    dx = x.new_empty(x.shape) if needs_dx else x.new_empty(0)
    dE = lora_E.new_empty(lora_E.shape) if lora_E is not None else dy.new_empty(0, dtype=lora_A.dtype)
    dbias = dy.new_empty(weight.shape[0], dtype=weight.dtype) if has_bias else dy.new_empty(0, dtype=weight.dtype)
    return dx, lora_A.new_empty(lora_A.shape), dE, lora_B.new_empty(lora_B.shape), dbias


def _check_ia3_shapes(x_features: int, weight: torch.Tensor, ia3_l: torch.Tensor, feedforward: bool) -> None:
    n, k = weight.shape
    torch._check(x_features == k, lambda: f"x has {x_features} features but weight is {tuple(weight.shape)}")
    want = k if feedforward else n
    torch._check(ia3_l.dim() == 1 and ia3_l.shape[0] == want, lambda: f"ia3_l must be ({want},), got {ia3_l.shape}")


def ia3_fwd_meta(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ia3_l: torch.Tensor,
                 feedforward: bool, save_z: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of the forward without computing them: y (M, N) in x's dtype and saved (z (M, N) in output mode
    when `save_z`, else empty (0,)).  Checks x: (M, K), weight: (N, K), bias: (N,), ia3_l: (N,) or (K,)."""
    _check_ia3_shapes(x.shape[1], weight, ia3_l, feedforward)
    if bias is not None:
        torch._check(bias.shape == (weight.shape[0],), lambda: f"bias must be ({weight.shape[0]},), got {bias.shape}")
    m, n = x.shape[0], weight.shape[0]
    saved = x.new_empty(m, n) if (save_z and not feedforward) else x.new_empty(0)
    return x.new_empty(m, n), saved


def ia3_bwd_meta(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ia3_l: torch.Tensor, feedforward: bool,
                 needs_dx: bool, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Outputs of the backward without computing them (see ``ia3_bwd_ref``): dx (M, K) in x's dtype (input mode) or
    dy's (output mode), dl like ia3_l, dbias (N,).  Checks dy: (M, N)."""
    n, k = weight.shape
    torch._check(dy.dim() == 2 and dy.shape[1] == n, lambda: f"dy must be (M, {n}), got {dy.shape}")
    _check_ia3_shapes(x.shape[1] if feedforward else k, weight, ia3_l, feedforward)
    dx_like = x if feedforward else dy
    dx = dx_like.new_empty(dy.shape[0], k) if needs_dx else dx_like.new_empty(0)
    dbias = dy.new_empty(n, dtype=weight.dtype) if has_bias else dy.new_empty(0, dtype=weight.dtype)
    return dx, ia3_l.new_empty(ia3_l.shape), dbias
