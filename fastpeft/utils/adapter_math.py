"""Weight-side arithmetic of the adapters, shared by the tuner layers (``fastpeft.tuners.<method>.layer``) and the
drop-in modules (``fastpeft.modules``), so both merge, unmerge and regularise with the same numbers.

Merging is computed in at least fp32 and rounded to the base weight's dtype once: ``round(W + Δ)``, never
``W + round(Δ)``.  With fp32 adapter weights (HF PEFT's default, ``autocast_adapter_dtype=True``) that is exactly
what PEFT's ``weight.data += delta`` computes (PyTorch's in-place add promotes and rounds once).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["merge_dtype", "add_delta", "lora_delta", "adalora_delta", "ia3_scale", "IA3_UNMERGE_EPS",
           "orth_reg_term"]

# HF PEFT divides by l + 1e-8 to unmerge IA3 (inexact where l is ~0).
IA3_UNMERGE_EPS = 1e-8


def merge_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype merges are computed in: at least fp32 (fp16/bf16 weights merge in fp32, then round once)."""
    dt = torch.float32
    for d in dtypes:
        dt = torch.promote_types(dt, d)
    return dt


def add_delta(weight: torch.Tensor, delta: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """``weight + sign * delta`` as a new tensor in ``weight``'s dtype, computed in ``merge_dtype`` and rounded once.

    Args:
        weight: the base weight, any layout.
        delta: the same shape as ``weight`` (the caller transposes for a Conv1D layout).
    """
    ct = merge_dtype(weight.dtype, delta.dtype)
    return (weight.detach().to(ct) + sign * delta.detach().to(ct)).to(weight.dtype)


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling · B A`` as (out_features, in_features) in at least fp32, without gradient.

    A: (r, in_features), B: (out_features, r)."""
    with torch.no_grad():
        ct = merge_dtype(A.dtype, B.dtype)
        return (B.to(ct) @ A.to(ct)) * scaling


def adalora_delta(A: torch.Tensor, E: torch.Tensor, B: torch.Tensor, effective_scaling: float) -> torch.Tensor:
    """``B (A ⊙ E) · effective_scaling`` (= scaling / (ranknum + 1e-5)) as (out_features, in_features) in at least
    fp32, without gradient.  A: (r, in_features), E: (r, 1), B: (out_features, r)."""
    with torch.no_grad():
        ct = merge_dtype(A.dtype, E.dtype, B.dtype)
        return (B.to(ct) @ (A.to(ct) * E.to(ct))) * effective_scaling


def ia3_scale(weight: torch.Tensor, bias: Optional[torch.Tensor], l: torch.Tensor, feedforward: bool,
              fan_in_fan_out: bool, divide: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight, bias) with the IA3 vector folded in (``divide=False``) or out again (``divide=True``, by
    ``l + IA3_UNMERGE_EPS`` as HF PEFT), computed in at least fp32 and rounded once; new tensors.

    Output mode (``feedforward=False``) scales the rows of the (out, in) weight and the bias; input mode
    (``feedforward=True``) scales its columns and leaves the bias.  ``weight`` is stored (out, in), or (in, out) when
    ``fan_in_fan_out`` (a transformers Conv1D).  l: (out, 1) or (1, in) as stored by the layer, or flat.
    """
    with torch.no_grad():
        ct = merge_dtype(weight.dtype, l.dtype)
        lv = l.detach().to(ct).reshape(-1)
        if divide:
            lv = lv + IA3_UNMERGE_EPS
        scale_rows_of_nk = not feedforward
        if fan_in_fan_out:
            col = lv[None, :] if scale_rows_of_nk else lv[:, None]
        else:
            col = lv[:, None] if scale_rows_of_nk else lv[None, :]
        w = weight.detach().to(ct)
        new_w = (w / col if divide else w * col).to(weight.dtype)
        new_b = None
        if bias is not None and not feedforward:
            b = bias.detach().to(ct)
            new_b = (b / lv if divide else b * lv).to(bias.dtype)
    return new_w, new_b


def orth_reg_term(p: torch.Tensor, is_a: bool) -> torch.Tensor:
    """AdaLoRA's orthogonality penalty of one factor: ``||A Aᵀ - I||_F`` for lora_A (r, in), ``||Bᵀ B - I||_F`` for
    lora_B (out, r); not squared (HF PEFT).  0-d and differentiable."""
    cov = p @ p.T if is_a else p.T @ p
    eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
    return torch.linalg.matrix_norm(cov - eye, ord="fro")
