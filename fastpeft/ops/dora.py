"""DoRA's linear layer (one adapter, no dropout) on the fused backends: the LoRA op on row-scaled operands plus one
column reduction, so DoRA costs what LoRA costs.

    y = k ⊙ (x Wᵀ + s · (x Aᵀ) Bᵀ) + b          k = m / ‖W + s·B·A‖ per output row: (N,), the norm detached
      = x (k ⊙ W)ᵀ + s · (x Aᵀ) (k ⊙ B)ᵀ + b     (k ⊙ W scales row n of W by k[n])

Forward: ``dora_rowscale`` forms W_k = k ⊙ W (one pass over W, N·K elements, not over activations) and B_k = k ⊙ B;
the LoRA op's forward on (W_k, B_k) gives u = k ⊙ z (z = x Wᵀ + s·S Bᵀ, S = x Aᵀ); b is added after (a column of u
must be k·z alone for the backward).  Saved: x, S (M×r), u (M×N) - u is the op's output when there is no bias.
Backward: W_k rebuilt (one pass over W); the LoRA op's backward on (W_k, B_k) gives dx = dY W_k + dS A, dA, and the
gradient of B_k (dB = k ⊙ that); ``dora_colsum`` gives dk = Σ_m dY ⊙ u / k (one pass over dY and u, tiled column
sums, no atomics), from which autograd takes dm = dk / n.

Where |k| < ``tiny_scale(dtype)`` the op uses ±tiny instead of k (the sign of k, + for 0), so that u / k recovers z;
the output then differs from k ⊙ z by at most tiny·|z| in those columns.  fp16 outputs (where tiny would be visible)
do not take this path (``fastpeft.functional.dora_linear`` decides).

The row norm n (``dora_row_norm``) is never formed from W + s·B·A: ``n² = ‖W‖² + 2s·⟨W, BA⟩ + s²·‖BA‖²`` per row, with
‖W‖² cached by the layer (W is frozen) and ⟨W, BA⟩ = rowsum(B ⊙ W Aᵀ) - one pass over W in its own dtype.

Backend pieces (looked up by name in ``fastpeft/ops/_registry.py``): ``dora_cross`` (W Aᵀ), ``dora_rowscale`` and
``dora_colsum`` - ``*_ref`` here (torch, also used with the ``cuda`` backend, which has no such kernels), ``*_triton``
in ``fastpeft.kernels.dora``.  The LoRA op's own ``lora_fwd`` / ``lora_bwd`` run on the chosen backend.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._registry import impl as _impl

__all__ = ["dora_row_norm", "dora_cross_ref", "dora_rowscale_ref", "dora_colsum_ref", "tiny_scale", "safe_scale",
           "DoraLinearFunction", "dora_apply", "dora_piece", "DORA_CANCELLATION_LIMIT", "DORA_SYNC_FREE_FALLBACK_ROWS"]

# n² is formed from terms whose sum of magnitudes is at most this many times n² before a row is recomputed directly:
# the expanded form's relative rounding error in n² grows with that ratio, the direct form's does not.
DORA_CANCELLATION_LIMIT = 4.0
# On an accelerator and under torch.compile the fallback looks at this many worst rows per layer (no host sync).
DORA_SYNC_FREE_FALLBACK_ROWS = 32


def dora_cross_ref(weight: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """W Aᵀ in fp32 (fp64 when either is fp64): (N, r).  weight: (N, K), lora_A: (r, K)."""
    ct = torch.promote_types(torch.promote_types(weight.dtype, lora_A.dtype), torch.float32)
    return weight.to(ct) @ lora_A.to(ct).t()


def dora_row_norm(w_oi: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                  w_sq: Optional[torch.Tensor] = None, max_fallback_rows: Optional[int] = None,
                  cross=dora_cross_ref) -> torch.Tensor:
    """``‖W + s·B·A‖`` per output row without forming the (out, in) sum; no gradient.

    ``n² = ‖W‖² + 2s·rowsum(B ⊙ (W Aᵀ)) + s²·rowsum((B·AAᵀ) ⊙ B)``; where that sum cancels (its terms' magnitudes
    over ``DORA_CANCELLATION_LIMIT`` times n²) a row is recomputed directly.

    Args:
        w_oi: base weight (out, in), any float dtype and strides (not copied to fp32: only the fallback rows are).
        A: (r, in).  B: (out, r).  scaling: s.
        w_sq: optional cached ``‖W‖²`` per row (out,) in the compute dtype (used only when its dtype is that).
        max_fallback_rows: None recomputes every cancelling row directly (a data-dependent branch: one host sync on
            an accelerator, a graph break under torch.compile); an int k checks only the k rows with the worst
            cancellation, without a sync (used on GPU and under torch.compile).
        cross: the function giving W Aᵀ (out, r) in the compute dtype: ``dora_cross_ref``, or a backend's
            (``dora_cross`` in the registry: the Triton one reads W once in its own dtype).
    Returns:
        (out,) in the compute dtype: fp32, or fp64 when any input is fp64.
    """
    with torch.no_grad():
        ct = torch.promote_types(torch.promote_types(w_oi.dtype, A.dtype), torch.float32)
        A_, B_ = A.to(ct), B.to(ct)
        if w_sq is None or w_sq.dtype != ct:
            w_sq = w_oi.to(ct).square().sum(dim=1)
        cr = (B_ * cross(w_oi, A_).to(ct)).sum(dim=1)               # <W_i, (BA)_i>
        ba_sq = ((B_ @ (A_ @ A_.t())) * B_).sum(dim=1)             # ‖(BA)_i‖²
        s = float(scaling)
        n_sq = w_sq + (2.0 * s) * cr + (s * s) * ba_sq
        size = w_sq + (2.0 * abs(s)) * cr.abs() + (s * s) * ba_sq
        bad = ~(n_sq * DORA_CANCELLATION_LIMIT >= size)             # also catches n_sq <= 0 and NaN
        n = n_sq.clamp_min(0).sqrt()
        if max_fallback_rows is None:
            if bool(bad.any()):
                rows = bad.nonzero().squeeze(1)
                n[rows] = torch.linalg.norm(w_oi[rows].to(ct) + s * (B_[rows] @ A_), dim=1)
        else:
            k = min(int(max_fallback_rows), n.shape[0])
            amp = torch.where(bad, torch.full_like(size, float("inf")), size / n_sq)
            rows = amp.topk(k).indices
            direct = torch.linalg.norm(w_oi[rows].to(ct) + s * (B_[rows] @ A_), dim=1)
            n[rows] = torch.where(bad[rows], direct, n[rows])
        return n



def tiny_scale(dtype: torch.dtype) -> float:
    """|k| below which u / k would not recover z in an output of `dtype` (bf16 / fp32 keep 2⁻⁶⁴·z as a normal number
    for any |z| > 1e-19; fp16 would not)."""
    return 2.0 ** -8 if dtype == torch.float16 else 2.0 ** -64


def safe_scale(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """k with entries |k| < tiny replaced by ±tiny (sign of k; + for 0).  k: (N,) -> (N,), same dtype."""
    tiny = tiny_scale(dtype)
    return torch.where(k.abs() < tiny, torch.where(k < 0, -tiny, tiny).to(k.dtype), k)


def dora_rowscale_ref(weight: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """W_k[n, :] = W[n, :] · k[n], formed in fp32 (fp64 for fp64) and rounded once to W's dtype.
    weight: (N, K), any strides.  k: (N,).  Returns (N, K) row-major."""
    ct = torch.promote_types(torch.promote_types(weight.dtype, k.dtype), torch.float32)
    return (weight.to(ct) * k.to(ct)[:, None]).to(weight.dtype).contiguous()


def dora_colsum_ref(dy: torch.Tensor, u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """dk[n] = Σ_m dY[m, n] · u[m, n] / k[n] in fp32 (fp64 for fp64).  dy, u: (M, N).  k: (N,), no entry 0.
    Returns (N,) in k's dtype."""
    ct = torch.promote_types(torch.promote_types(dy.dtype, k.dtype), torch.float32)
    return ((dy.to(ct) * u.to(ct)).sum(0) / k.to(ct)).to(k.dtype)


def dora_piece(name: str, backend: str):
    """The implementation of DoRA piece `name` (``dora_cross``, ``dora_rowscale``, ``dora_colsum``) for the LoRA op's
    chosen `backend`: Triton kernels for ``triton[:variant]``, torch otherwise."""
    base = backend.partition(":")[0]
    return _impl(name, "triton" if base == "triton" else "torch")


class DoraLinearFunction(torch.autograd.Function):
    """``y = k ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b`` on a fused LoRA backend (see the module docstring).

    forward(x (M, K), weight (N, K) frozen, bias (N,) or None, lora_A (r, K), lora_B (N, r), k (N,), scaling,
    backend) -> y (M, N) in x's dtype.  Gradients: x, bias (when it requires grad), lora_A, lora_B, k."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, k, scaling, backend):
        kk = safe_scale(k.detach(), x.dtype)
        w_k = dora_piece("dora_rowscale", backend)(weight, kk)
        b_k = dora_rowscale_ref(lora_B, kk)  # (N, r): small, torch on every backend
        u, s = _impl("lora_fwd", backend)(x, w_k, None, lora_A, None, b_k, scaling, 0.0, 0)
        del w_k
        ctx.save_for_backward(x, weight, lora_A, lora_B, kk, s, u)
        ctx.scaling, ctx.backend, ctx.has_bias = scaling, backend, bias is not None
        if bias is None:
            return u
        return u + bias

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, kk, s, u = ctx.saved_tensors
        dy = dy.contiguous()
        needs_dx = ctx.needs_input_grad[0]
        w_k = dora_piece("dora_rowscale", ctx.backend)(weight, kk)
        b_k = dora_rowscale_ref(lora_B, kk)
        dx, dA, _, dB_k, _ = _impl("lora_bwd", ctx.backend)(dy, x, w_k, lora_A, None, b_k, s, ctx.scaling, 0.0, 0,
                                                             needs_dx, False)
        dB = dora_rowscale_ref(dB_k, kk).to(lora_B.dtype)
        dk = dora_piece("dora_colsum", ctx.backend)(dy, u, kk) if ctx.needs_input_grad[5] else None
        dbias = dy.sum(0).to(dy.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return (dx if needs_dx else None, None, dbias, dA, dB, dk, None, None)


def dora_apply(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
               lora_B: torch.Tensor, k: torch.Tensor, scaling: float, backend: str) -> torch.Tensor:
    """Run ``DoraLinearFunction`` (shapes as there) on an already chosen fused backend."""
    return DoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, k, scaling, backend)
