"""Triton pieces of DoRA's linear layer (``fastpeft/ops/dora.py``): the row norm, the row scale of W and the
magnitude's column sums.

  ``dora_prep_triton``      the per-row scale k = m / ‖W + s·B·A‖ (and k ⊙ B) in one launch,
                            ``_dora_prep_kernel``: per block of rows one pass over W in its own dtype giving W Aᵀ
                            (and G = A Aᵀ from the A tiles it loads anyway), then n² = ‖W‖² + 2s·⟨W, BA⟩ + s²·‖BA‖²
                            per row, recomputed directly, inside the kernel, for every row where that sum cancels
                            (no host sync, no cap on how many rows).
  ``dora_rowscale_triton``  k ⊙ W: IA3's row-scale kernel (DoRA's k is an output-feature scale like IA3's l).
  ``dora_grads_triton``     dm = Σ_m dY ⊙ u / kn and dB = kk ⊙ dB_k, finished in one small kernel, from partial
                            sums the LoRA backward's pass over dY formed (``dy_u``), else from IA3's column-sum
                            kernel (one pass over dY and u).

Same contracts as ``fastpeft.ops.dora.dora_prep_ref`` / ``dora_rowscale_ref`` / ``dora_grads_ref``; every launch is
reported to ``fastpeft._cost`` when the cost model records.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._target import cdiv, LaunchTarget, launch_ok, launch_target, on_input_device, skinny_blocks
from ._tl import adapter_operand, dot_flops, dot_prec, mma, pad_rank, skinny_precision
from .ia3 import colsum, scale_weight

__all__ = ["dora_prep_triton", "dora_rowscale_triton", "dora_grads_triton"]

# Rows per program of the grads kernel (BLOCK_N x r of dB_k and B).  Not timed.
PREP_BLOCK_N = 16


def prep_blocks(tgt: Optional[LaunchTarget]) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) of ``_dora_prep_kernel``: a block of W's rows streamed over all of K (the
    skinny kernels' x tile turned on its side: half the rows, the same 128-column tiles, 8 KiB per bf16 load), so
    N / 32 programs - 128 at N = 4096, 448 at N = 14336 on an H200's 132 SMs.  Chosen by that arithmetic and the
    compile check (registers, no spills), not timed.  The interpreter keeps the skinny kernels' small blocks."""
    bm, bk, warps = skinny_blocks(tgt)
    return max(16, bm // 2), bk, warps


@triton.jit
def _dora_prep_kernel(w_ptr, a_ptr, b_ptr, wsq_ptr, m_ptr, kk_ptr, kn_ptr, bk_ptr, wk_ptr,
                      N, K, R, scaling, limit, tiny,
                      stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, PREC: tl.constexpr,
                      PREC_C: tl.constexpr, WRITE_WK: tl.constexpr):
    """Per output row i (grid: N blocks), from one pass over the block's rows of W (its own dtype; A fp32):
         C_i = W_i Aᵀ (PREC_C: the LoRA shrink's product of that pair),  G = A Aᵀ (fp32, from the same A tiles)
         n_i = sqrt(‖W_i‖² + 2s·⟨B_i, C_i⟩ + s²·⟨B_i G, B_i⟩), or ‖W_i + s·B_i A‖ directly where those terms'
               magnitudes exceed limit·n² (or n² <= 0, NaN): a second loop over K for those rows only
         kk_i = m_i / n_i, ±tiny where |m_i / n_i| < tiny;  kn_i = kk_i · n_i;  Bk_i = round(kk_i · B_i)
         Wk_i = round(kk_i · W_i)   (WRITE_WK: the forward's k ⊙ W, (N, K) row-major in W's dtype; the block's
                                     rows of W read again right after the first pass, mostly from L2)"""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    mask_n = offs_n < N
    mask_r = offs_r < R
    rn64 = offs_n.to(tl.int64)
    mask_nr = mask_n[:, None] & mask_r[None, :]
    c = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    g = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        rk64 = offs_k.to(tl.int64)
        w = tl.load(w_ptr + rn64[:, None] * stride_wn + rk64[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_ptr + offs_r[None, :] * stride_ar + rk64[:, None] * stride_ak,
                     mask=mask_r[None, :] & mask_k[:, None], other=0.0)
        c = mma(adapter_operand(w, tl.float32, PREC_C), at, c, PREC_C)
        g = mma(tl.trans(at), at, g, PREC)
    braw = tl.load(b_ptr + rn64[:, None] * stride_bn + offs_r[None, :] * stride_br, mask=mask_nr, other=0.0)
    b = braw.to(tl.float32)
    bg = mma(b, g, tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32), PREC)
    ba_sq = tl.sum(bg * b, axis=1)
    cr = tl.sum(b * c, axis=1)
    wsq = tl.load(wsq_ptr + offs_n, mask=mask_n, other=1.0)
    n_sq = wsq + (2.0 * scaling) * cr + (scaling * scaling) * ba_sq
    size = wsq + (2.0 * tl.abs(scaling)) * tl.abs(cr) + (scaling * scaling) * ba_sq
    bad = (~(n_sq * limit >= size)) & mask_n
    n = tl.sqrt(tl.maximum(n_sq, 0.0))
    if tl.max(bad.to(tl.int32), axis=0) > 0:
        # direct form for the cancelling rows only (masked loads: no traffic for the others)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            rk64 = offs_k.to(tl.int64)
            w = tl.load(w_ptr + rn64[:, None] * stride_wn + rk64[None, :] * stride_wk,
                        mask=bad[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            a = tl.load(a_ptr + offs_r[:, None] * stride_ar + rk64[None, :] * stride_ak,
                        mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            t = w + scaling * mma(b, a, tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32), PREC)
            t = tl.where(bad[:, None] & mask_k[None, :], t, 0.0)
            acc += tl.sum(t * t, axis=1)
        n = tl.where(bad, tl.sqrt(acc), n)
    mv = tl.load(m_ptr + offs_n, mask=mask_n, other=1.0).to(tl.float32)
    k = mv / n
    kk = tl.where(tl.abs(k) < tiny, tl.where(k < 0, -tiny, tiny), k)
    tl.store(kk_ptr + offs_n, kk, mask=mask_n)
    tl.store(kn_ptr + offs_n, kk * n, mask=mask_n)
    tl.store(bk_ptr + rn64[:, None] * R + offs_r[None, :], (b * kk[:, None]).to(braw.dtype), mask=mask_nr)
    if WRITE_WK:  # as ``_ia3_scale_w_kernel`` with ROWS: one fp32 product rounded once
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            rk64 = offs_k.to(tl.int64)
            mask = mask_n[:, None] & mask_k[None, :]
            w = tl.load(w_ptr + rn64[:, None] * stride_wn + rk64[None, :] * stride_wk, mask=mask, other=0.0)
            tl.store(wk_ptr + rn64[:, None] * K + rk64[None, :],
                     (w.to(tl.float32) * kk[:, None]).to(wk_ptr.dtype.element_ty), mask=mask)


@on_input_device
def dora_prep_triton(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor,
                     scaling: float, w_sq: torch.Tensor, limit: float, tiny: float,
                     target: Optional[LaunchTarget] = None, want_wk: bool = False) -> tuple:
    """(kk, kn, B_k) of ``fastpeft.ops.dora.dora_prep_ref`` in one launch (``_dora_prep_kernel``: W read once in its
    own dtype, no fp32 copy; W Aᵀ and A Aᵀ formed as it streams).
    weight: (N, K), any strides.  lora_A: (r, K), lora_B: (N, r), magnitude: (N,).  w_sq: ‖W‖² (N,) fp32 (the
    layer's cache).  target: the launch target (None: W's device).  want_wk: also return W_k = kk ⊙ W, written by
    the same launch (what ``dora_rowscale_triton(weight, kk)`` gives, bit for bit).
    Returns kk (N,) fp32, kn (N,) fp32, B_k (N, r) in B's dtype [, W_k (N, K) row-major in W's dtype]."""
    n, k = weight.shape
    r = lora_A.shape[0]
    dev = weight.device
    with torch.no_grad():
        tgt = launch_target(dev, target)
        a32 = lora_A.detach().float()
        b = lora_B.detach()
        kk = torch.empty(n, device=dev, dtype=torch.float32)
        kn = torch.empty(n, device=dev, dtype=torch.float32)
        b_k = torch.empty((n, r), device=dev, dtype=b.dtype)
        w_k = torch.empty((n, k), device=dev, dtype=weight.dtype) if want_wk else None
        bn, bk, warps = prep_blocks(tgt)
        prec_c = skinny_precision(torch.float32, weight.dtype)
        prec = skinny_precision(torch.float32)
        tc_c, fma_c = dot_flops(prec_c, 2 * n * k * r)
        tc_g, fma_g = dot_flops(prec, 2 * cdiv(n, bn) * k * r * r)  # each program forms G from its A tiles
        es = weight.element_size()
        if n and launch_ok("dora_prep", weight,
                           bytes_read=n * k * es * (2 if want_wk else 1) + r * k * 4 + n * r * b.element_size() + 2 * n * 4,
                           bytes_written=2 * n * 4 + n * r * b.element_size() + (n * k * es if want_wk else 0),
                           flops=tc_c + tc_g + 2 * n * r * r + 6 * n * r + (n * k if want_wk else 0),
                           fma_flops=fma_c + fma_g):
            _dora_prep_kernel[(cdiv(n, bn),)](
                weight, a32, b, w_sq, magnitude.detach(), kk, kn, b_k, w_k if want_wk else b_k, n, k, r,
                float(scaling), float(limit), float(tiny), weight.stride(0), weight.stride(1),
                a32.stride(0), a32.stride(1), b.stride(0), b.stride(1),
                BLOCK_N=bn, BLOCK_K=bk, R_PAD=pad_rank(r), PREC=dot_prec(prec, torch.float32),
                PREC_C=dot_prec(prec_c, torch.float32), WRITE_WK=want_wk, num_warps=warps)
        return (kk, kn, b_k, w_k) if want_wk else (kk, kn, b_k)


@on_input_device
def dora_rowscale_triton(weight: torch.Tensor, k: torch.Tensor, target: Optional[LaunchTarget] = None
                         ) -> torch.Tensor:
    """W_k[n, :] = W[n, :] · k[n] rounded once to W's dtype.  weight: (N, K), any strides; k: (N,).
    One read and one write of W.  Returns (N, K) row-major."""
    return scale_weight(weight, k, True, launch_target(weight.device, target))


@triton.jit
def _dora_grads_kernel(dpart_ptr, kn_ptr, kk_ptr, dbk_ptr, dm_ptr, db_ptr, N, R, SPLITS,
                       BLOCK_N: tl.constexpr, R_PAD: tl.constexpr):
    """dm[i] = Σ_splits dpart[split, i] / kn[i];  dB[i, :] = round(dB_k[i, :] · kk[i]).  Grid: (N blocks,)."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    mask_n = offs_n < N
    mask_nr = mask_n[:, None] & (offs_r < R)[None, :]
    rn64 = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dptrs = dpart_ptr + rn64
    for _ in range(0, SPLITS):
        acc += tl.load(dptrs, mask=mask_n, other=0.0)
        dptrs += N
    kn = tl.load(kn_ptr + offs_n, mask=mask_n, other=1.0)
    tl.store(dm_ptr + offs_n, acc / kn, mask=mask_n)
    kk = tl.load(kk_ptr + offs_n, mask=mask_n, other=0.0)
    dbk = tl.load(dbk_ptr + rn64[:, None] * R + offs_r[None, :], mask=mask_nr, other=0.0)
    tl.store(db_ptr + rn64[:, None] * R + offs_r[None, :], (dbk.to(tl.float32) * kk[:, None]).to(dbk.dtype),
             mask=mask_nr)


@on_input_device
def dora_grads_triton(dy: torch.Tensor, u: torch.Tensor, kn: torch.Tensor, dB_k: torch.Tensor, kk: torch.Tensor,
                      target: Optional[LaunchTarget] = None, dm_part: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dm, dB) of ``fastpeft.ops.dora.dora_grads_ref``: IA3's column-sum kernel over (dY, u) (one pass over each,
    partial sums per M split) - skipped when `dm_part`, those partial sums (P, N) fp32, came from the LoRA
    backward's own pass over dY (``lora_bwd_triton(dy_u=u)``) - and ``_dora_grads_kernel`` (sums them, divides by
    kn, scales dB_k).  dy, u: (M, N).  kn, kk: (N,) fp32.  dB_k: (N, r).  Returns dm (N,) fp32 and dB (N, r) in
    dB_k's dtype."""
    m, n = dy.shape
    r = dB_k.shape[1]
    dev = dy.device
    if dm_part is not None:
        part = dm_part
    elif m == 0:
        part = torch.zeros((1, n), device=dev, dtype=torch.float32)
    else:
        part, _ = colsum(dy, u, kn, False, launch_target(dev, target), partials=True)
    dm = torch.empty(n, device=dev, dtype=torch.float32)
    dB_k = dB_k.contiguous()
    dB = torch.empty_like(dB_k)
    if n and launch_ok("dora_grads", dy, bytes_read=part.numel() * 4 + 2 * n * 4 + n * r * dB_k.element_size(),
                       bytes_written=n * 4 + n * r * dB_k.element_size(), flops=n * (part.shape[0] + r + 1)):
        _dora_grads_kernel[(cdiv(n, PREP_BLOCK_N),)](
            part, kn, kk, dB_k, dm, dB, n, r, part.shape[0], BLOCK_N=PREP_BLOCK_N, R_PAD=pad_rank(r))
    return dm, dB
