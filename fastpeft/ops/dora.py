"""DoRA's linear layer (one adapter, no dropout) on the fused backends: the LoRA op on row-scaled operands plus one
column reduction, so DoRA costs what LoRA costs plus a few passes over W.

    y = k ⊙ (x Wᵀ + s · (x Aᵀ) Bᵀ) + b          k = m / n,  n = ‖W + s·B·A‖ per output row (N,), detached
      = x (k ⊙ W)ᵀ + s · (x Aᵀ) (k ⊙ B)ᵀ + b     (k ⊙ W scales row n of W by k[n])

Forward: ``dora_prep`` gives the row norm n without forming W + s·B·A (``n² = ‖W‖² + 2s·⟨W, BA⟩ + s²·‖BA‖²``, ‖W‖²
cached by the layer since W is frozen, ⟨W, BA⟩ = rowsum(B ⊙ W Aᵀ) from one pass over W in its own dtype, cancelling
rows recomputed directly), kk = k (safe, below), kn = kk·n and B_k = kk ⊙ B; ``dora_rowscale`` forms
W_k = kk ⊙ W (one pass over W, N·K elements, not over activations); the LoRA op's forward on (W_k, B_k) gives
u = kk ⊙ z (z = x Wᵀ + s·S Bᵀ, S = x Aᵀ); b is added after (a column of u must be kk·z alone for the backward).
Saved: x, S (M×r), u (M×N; the output itself without a bias), kk, kn, B_k.
Backward: W_k rebuilt (one pass over W); the LoRA op's backward on (W_k, B_k) gives dx = dY W_k + dS A, dA, and the
gradient of B_k; ``dora_grads`` gives dB = kk ⊙ that and dm = Σ_m dY ⊙ z / n = Σ_m dY ⊙ u / kn (tiled column
sums, no atomics; on triton formed in the LoRA backward's own pass over dY, which then also reads u).

Where |k| < ``tiny_scale(dtype)`` the op uses kk = ±tiny instead of k (the sign of k, + for 0), so that u / kk
recovers z; the output then differs from k ⊙ z by at most tiny·|z| in those columns, dm is exact.  fp16 outputs
(where tiny would be visible) do not take this path (``fastpeft.functional.dora_linear`` decides).

Backend pieces (looked up by name in ``fastpeft/ops/_registry.py``): ``dora_prep``, ``dora_rowscale``,
``dora_grads`` - ``*_ref`` here (torch, also used with the ``cuda`` backend, which has no such kernels),
``*_triton`` in ``fastpeft.kernels.dora``.  The LoRA op's own ``lora_fwd`` / ``lora_bwd`` run on the chosen backend.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._numerics import tiny_scale
from ._registry import impl as _impl

__all__ = ["dora_row_norm", "dora_norm_ref", "dora_cross_ref", "dora_prep_ref", "dora_rowscale_ref", "dora_grads_ref",
           "weight_row_sq", "tiny_scale", "dora_fwd", "dora_bwd", "DoraLinearFunction", "dora_apply", "dora_piece",
           "DORA_CANCELLATION_LIMIT", "DORA_SYNC_FREE_FALLBACK_ROWS"]

# n² is formed from terms whose sum of magnitudes is at most this many times n² before a row is recomputed directly:
# the expanded form's relative rounding error in n² grows with that ratio, the direct form's does not.
DORA_CANCELLATION_LIMIT = 4.0
# On an accelerator and under torch.compile the fallback looks at this many worst rows per layer (no host sync).
DORA_SYNC_FREE_FALLBACK_ROWS = 32


def weight_row_sq(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """‖W_i‖² per row, computed in `dtype` (fp32 or fp64): (N,).  weight: (N, K), any strides.  The layer caches it
    while W does not change (``fastpeft.tuners.lora.dora``)."""
    return weight.to(dtype).square().sum(dim=1)


def dora_cross_ref(weight: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """W Aᵀ in fp32 (fp64 when either is fp64): (N, r).  weight: (N, K), lora_A: (r, K)."""
    ct = torch.promote_types(torch.promote_types(weight.dtype, lora_A.dtype), torch.float32)
    return weight.to(ct) @ lora_A.to(ct).t()


def dora_row_norm(w_oi: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                  w_sq: Optional[torch.Tensor] = None, max_fallback_rows: Optional[int] = None) -> torch.Tensor:
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
    Returns:
        (out,) in the compute dtype: fp32, or fp64 when any input is fp64.
    """
    with torch.no_grad():
        ct = torch.promote_types(torch.promote_types(w_oi.dtype, A.dtype), torch.float32)
        A_, B_ = A.to(ct), B.to(ct)
        if w_sq is None or w_sq.dtype != ct:
            w_sq = weight_row_sq(w_oi, ct)
        cr = (B_ * dora_cross_ref(w_oi, A_)).sum(dim=1)             # <W_i, (BA)_i>
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



def dora_norm_ref(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                  w_sq: Optional[torch.Tensor]) -> torch.Tensor:
    """The torch row norm of the layer (``dora_prep_ref`` and the unfused path): ``dora_row_norm`` with every
    cancelling row recomputed on CPU (a host branch), the ``DORA_SYNC_FREE_FALLBACK_ROWS`` worst rows elsewhere and
    under torch.compile (no sync).  Shapes as ``dora_row_norm``."""
    sync_free = torch.compiler.is_compiling() or weight.device.type != "cpu"
    return dora_row_norm(weight, lora_A, lora_B, scaling, w_sq=w_sq,
                         max_fallback_rows=DORA_SYNC_FREE_FALLBACK_ROWS if sync_free else None)


def dora_prep_ref(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor,
                  scaling: float, w_sq: Optional[torch.Tensor], limit: float, tiny: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-row scale of DoRA's fused forward: (kk, kn, B_k).

    Args:
        weight: (N, K).  lora_A: (r, K).  lora_B: (N, r).  magnitude: (N,), m.  scaling: s.
        w_sq: ‖W‖² per row (N,) in the compute dtype (``weight_row_sq``).  limit: ``DORA_CANCELLATION_LIMIT`` (the
            torch norm takes no other).  tiny: ``tiny_scale`` of the output dtype.
    Returns:
        kk = m / n with |kk| >= tiny (N,), kn = kk · n (N,) - both in the compute dtype (fp32, fp64 for fp64) - and
        B_k = kk ⊙ B (N, r) in B's dtype.  No gradient.
    """
    if limit != DORA_CANCELLATION_LIMIT:
        raise ValueError(f"the torch row norm uses DORA_CANCELLATION_LIMIT = {DORA_CANCELLATION_LIMIT}, got "
                         f"limit={limit}")
    with torch.no_grad():
        n = dora_norm_ref(weight, lora_A, lora_B, scaling, w_sq)
        k = magnitude.detach().to(n.dtype) / n
        kk = torch.where(k.abs() < tiny, torch.where(k < 0, -tiny, tiny).to(k.dtype), k)
        return kk, kk * n, dora_rowscale_ref(lora_B, kk)


def dora_rowscale_ref(weight: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """W_k[n, :] = W[n, :] · k[n], formed in fp32 (fp64 for fp64) and rounded once to W's dtype.
    weight: (N, K), any strides.  k: (N,).  Returns (N, K) row-major."""
    ct = torch.promote_types(torch.promote_types(weight.dtype, k.dtype), torch.float32)
    return (weight.to(ct) * k.to(ct).unsqueeze(1)).to(weight.dtype).contiguous()


def dora_grads_ref(dy: torch.Tensor, u: torch.Tensor, kn: torch.Tensor, dB_k: torch.Tensor, kk: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The magnitude's and B's gradients from the LoRA backward on the scaled operands:
    dm[n] = Σ_m dY[m, n] · u[m, n] / kn[n] and dB = kk ⊙ dB_k (in fp32, fp64 for fp64).
    dy, u: (M, N).  kn, kk: (N,), no zero.  dB_k: (N, r).  Returns dm (N,) in the compute dtype, dB in dB_k's."""
    ct = torch.promote_types(torch.promote_types(dy.dtype, kn.dtype), torch.float32)
    return (dy.to(ct) * u.to(ct)).sum(0) / kn.to(ct), dora_rowscale_ref(dB_k, kk)


def dora_piece(name: str, backend: str):
    """The implementation of DoRA piece `name` (``dora_prep``, ``dora_rowscale``, ``dora_grads``) for the LoRA op's
    chosen `backend`: Triton kernels for ``triton[:variant]``, torch otherwise."""
    base = backend.partition(":")[0]
    return _impl(name, "triton" if base == "triton" else "torch")


def dora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
             lora_B: torch.Tensor, magnitude: torch.Tensor, w_sq: Optional[torch.Tensor], scaling: float,
             backend: str) -> tuple[torch.Tensor, tuple]:
    """The forward on `backend`: (y, saved) with y = u + b (M, N) in x's dtype and saved = (u, S, kk, kn, B_k), what
    ``dora_bwd`` needs besides the inputs (u (M, N) in x's dtype, S = x Aᵀ (M, r) fp32).
    x: (M, K).  weight: (N, K), frozen.  bias: (N,) or None.  lora_A: (r, K).  lora_B: (N, r).  magnitude: (N,).
    w_sq: ‖W‖² per row (N,) or None."""
    if w_sq is None:
        w_sq = weight_row_sq(weight, torch.promote_types(torch.promote_types(weight.dtype, lora_A.dtype),
                                                         torch.float32))
    prep = dora_piece("dora_prep", backend)
    if backend.partition(":")[0] == "triton":
        # the prep's launch also writes k ⊙ W (its rows of W were just read): no launch of its own
        kk, kn, b_k, w_k = prep(weight, lora_A, lora_B, magnitude, scaling, w_sq, DORA_CANCELLATION_LIMIT,
                                tiny_scale(x.dtype), want_wk=True)
    else:
        kk, kn, b_k = prep(weight, lora_A, lora_B, magnitude, scaling, w_sq, DORA_CANCELLATION_LIMIT,
                           tiny_scale(x.dtype))
        w_k = dora_piece("dora_rowscale", backend)(weight, kk)
    u, s = _impl("lora_fwd", backend)(x, w_k, None, lora_A, None, b_k, scaling, 0.0, 0)
    return (u if bias is None else u + bias), (u, s, kk, kn, b_k)


def dora_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
             saved: tuple, scaling: float, backend: str, needs_dx: bool, needs_dm: bool, needs_dbias: bool):
    """The backward on `backend`: (dx (M, K) or None, dA (r, K), dB (N, r), dm (N,) or None, dbias (N,) or None).
    dy: (M, N) contiguous; `saved` from ``dora_fwd``; the rest as ``dora_fwd`` took them."""
    u, s, kk, kn, b_k = saved
    w_k = dora_piece("dora_rowscale", backend)(weight, kk)
    if backend.partition(":")[0] == "triton":
        # the LoRA backward's pass over dY also sums dY ⊙ u for dm: no pass over dY of its own
        dx, dA, _, dB_k, _, dm_part = _impl("lora_bwd", backend)(dy, x, w_k, lora_A, None, b_k, s, scaling, 0.0, 0,
                                                                 needs_dx, False, dy_u=u)
        dm, dB = dora_piece("dora_grads", backend)(dy, u, kn, dB_k, kk, dm_part=dm_part)
    else:
        dx, dA, _, dB_k, _ = _impl("lora_bwd", backend)(dy, x, w_k, lora_A, None, b_k, s, scaling, 0.0, 0,
                                                         needs_dx, False)
        dm, dB = dora_piece("dora_grads", backend)(dy, u, kn, dB_k, kk)
    dbias = dy.sum(0).to(dy.dtype) if needs_dbias else None
    return (dx if needs_dx else None), dA, dB.to(lora_B.dtype), (dm if needs_dm else None), dbias


class DoraLinearFunction(torch.autograd.Function):
    """``y = (m / n) ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b`` on a fused LoRA backend (see the module docstring): ``dora_fwd``
    / ``dora_bwd`` under autograd.

    forward(x (M, K), weight (N, K) frozen, bias (N,) or None, lora_A (r, K), lora_B (N, r), magnitude (N,),
    w_sq (N,) or None, scaling, backend) -> y (M, N) in x's dtype.  Gradients: x, bias (when it requires grad),
    lora_A, lora_B, magnitude."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, w_sq, scaling, backend, mark=None):
        y, saved = dora_fwd(x, weight, bias, lora_A, lora_B, magnitude, w_sq, scaling, backend)
        if mark is not None:
            mark(saved[0])    # u, before it is saved (the activation recompute may offer to rebuild it)
        ctx.save_for_backward(x, weight, lora_A, lora_B, *saved)
        ctx.scaling, ctx.backend, ctx.has_bias, ctx.m_dtype = scaling, backend, bias is not None, magnitude.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, *saved = ctx.saved_tensors
        dx, dA, dB, dm, dbias = dora_bwd(dy.contiguous(), x, weight, lora_A, lora_B, tuple(saved), ctx.scaling,
                                         ctx.backend, ctx.needs_input_grad[0], ctx.needs_input_grad[5],
                                         ctx.has_bias and ctx.needs_input_grad[2])
        return dx, None, dbias, dA, dB, (dm.to(ctx.m_dtype) if dm is not None else None), None, None, None, None


def dora_apply(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
               lora_B: torch.Tensor, magnitude: torch.Tensor, w_sq: Optional[torch.Tensor], scaling: float,
               backend: str, mark=None) -> torch.Tensor:
    """Run ``DoraLinearFunction`` (shapes as there) on an already chosen fused backend.  ``mark``: None, or a
    callable given u (M, N) before the op saves it."""
    return DoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, magnitude, w_sq, scaling, backend, mark)
