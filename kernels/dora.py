"""Triton pieces of DoRA's linear layer (``fastpeft/ops/dora.py``): the cross term W·Aᵀ of the row norm, the row
scale of W and the magnitude's column sums.  They are the LoRA shrink kernel (with W in place of x) and IA3's
kernels (``fastpeft.kernels.ia3``): DoRA's k is an output-feature scale like IA3's l.

Same contracts as ``fastpeft.ops.dora.dora_cross_ref`` / ``dora_rowscale_ref`` / ``dora_colsum_ref``; every launch
is reported to ``fastpeft._cost`` when the cost model records.
"""

from __future__ import annotations

import torch

from ._target import launch_target, on_input_device
from .ia3 import colsum, scale_weight
from .lora import shrink

__all__ = ["dora_cross_triton", "dora_rowscale_triton", "dora_colsum_triton"]


@on_input_device
def dora_cross_triton(weight: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """W Aᵀ: (N, r) fp32, W read once in its own dtype (no fp32 copy of W), products in A's dtype.
    weight: (N, K), any strides; lora_A: (r, K)."""
    return shrink(weight, lora_A, 0.0, 0, launch_target(weight.device))


@on_input_device
def dora_rowscale_triton(weight: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """W_k[n, :] = W[n, :] · k[n] rounded once to W's dtype.  weight: (N, K), any strides; k: (N,).
    One read and one write of W.  Returns (N, K) row-major."""
    return scale_weight(weight, k, True, launch_target(weight.device))


@on_input_device
def dora_colsum_triton(dy: torch.Tensor, u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """dk[n] = Σ_m dY[m, n] · u[m, n] / k[n], products in k's dtype, fp32 sums.  dy, u: (M, N); k: (N,), no 0.
    One pass over dY and u.  Returns (N,) in k's dtype."""
    if dy.shape[0] == 0:
        return torch.zeros_like(k)
    dl, _ = colsum(dy, u, k, False, launch_target(dy.device))
    return (dl / k.float()).to(k.dtype)
