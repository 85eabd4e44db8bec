"""Triton kernels of the (IA)³ linear op (``fastpeft::ia3_fwd`` / ``fastpeft::ia3_bwd``).

    output mode (feedforward=False):  y = (x Wᵀ + b) ⊙ l     l: (N,)   - a scale in the GEMM epilogue
    input mode  (feedforward=True):   y = (x ⊙ l) Wᵀ + b     l: (K,)   - a scale on the loaded x tiles (prologue)

Both use the GEMM kernel of ``_common`` (persistent, TMA when available, autotuned):
  forward, output mode:  epilogue z = acc + b (written: the op saves it for dl), y = round(z) ⊙ l.
  forward, input mode:   prologue x ⊙ l on every loaded x tile; epilogue + b.
  backward, output mode: dX = (dY ⊙ l) W with the scale in the prologue; ``_ia3_colsum_kernel`` makes
                         dl = Σ_m dY ⊙ z and dbias = Σ_m dY ⊙ l in one pass over dY and z.
  backward, input mode:  G = dY W; its epilogue writes dX = G ⊙ l and the per-M-tile partial sums of G ⊙ x (dl);
                         dbias = Σ_m dY by ``_ia3_colsum_kernel``.

Launchers have exactly the signatures and return conventions of ``fastpeft.ops.ia3.ia3_fwd_ref`` / ``ia3_bwd_ref``
(including the roundings: z and G rounded to the activation dtype before the scale, as the reference does).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastpeft.ops.ia3 import ia3_bwd_ref, ia3_fwd_ref

from ._common import (SUPPORTED_DTYPES, base_precision, gemm, on_input_device, scaled, skinny_blocks, split_count,
                      target_programs)

__all__ = ["ia3_fwd_triton", "ia3_bwd_triton"]


@triton.jit
def _ia3_colsum_kernel(dy_ptr, z_ptr, l_ptr, dl_part_ptr, db_part_ptr, M, N,
                       stride_dym, stride_dyn, stride_zm, stride_zn, mb_per_split,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       HAS_Z: tl.constexpr, HAS_L: tl.constexpr, HAS_DB: tl.constexpr):
    """Column sums over an M chunk; grid (N blocks, M splits):
         dl_part[split, n] = Σ_m dY[m, n] · z[m, n]              (HAS_Z; in l's dtype per product, fp32 sum)
         db_part[split, n] = Σ_m round(dY[m, n] · l[n])  or  Σ_m dY[m, n]     (HAS_DB; with / without HAS_L)
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rn64 = offs_n.to(tl.int64)
    if HAS_L:
        lv = tl.load(l_ptr + offs_n, mask=mask_n, other=0.0)
    acc_dl = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    mb0 = pid_s * mb_per_split
    mb1 = tl.minimum(mb0 + mb_per_split, tl.cdiv(M, BLOCK_M))
    for mb in range(mb0, mb1):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        rm64 = offs_m.to(tl.int64)
        mask = (offs_m < M)[:, None] & mask_n[None, :]
        dy = tl.load(dy_ptr + rm64[:, None] * stride_dym + rn64[None, :] * stride_dyn, mask=mask, other=0.0)
        if HAS_Z:
            z = tl.load(z_ptr + rm64[:, None] * stride_zm + rn64[None, :] * stride_zn, mask=mask, other=0.0)
            acc_dl += tl.sum(scaled(dy.to(lv.dtype), z.to(lv.dtype)).to(tl.float32), axis=0)
        if HAS_DB:
            if HAS_L:
                dz = scaled(dy.to(lv.dtype), lv[None, :]).to(dy.dtype)
                acc_db += tl.sum(dz.to(tl.float32), axis=0)
            else:
                acc_db += tl.sum(dy.to(tl.float32), axis=0)
    if HAS_Z:
        tl.store(dl_part_ptr + pid_s.to(tl.int64) * N + rn64, acc_dl, mask=mask_n)
    if HAS_DB:
        tl.store(db_part_ptr + pid_s.to(tl.int64) * N + rn64, acc_db, mask=mask_n)


def _colsum(dy: torch.Tensor, z: Optional[torch.Tensor], l: Optional[torch.Tensor], want_db: bool
            ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(Σ_m dY ⊙ z, Σ_m dY[⊙ l]) as fp32 (N,) vectors (None where not asked)."""
    m, n = dy.shape
    dev = dy.device
    bm, bn, warps = skinny_blocks(dev)
    n_blocks, m_blocks = triton.cdiv(n, bn), triton.cdiv(m, bm)
    splits = split_count(n_blocks, m_blocks, target_programs(dev))
    mb_per = triton.cdiv(m_blocks, splits)
    splits = triton.cdiv(m_blocks, mb_per)
    dl_part = torch.empty((splits, n), device=dev, dtype=torch.float32) if z is not None else None
    db_part = torch.empty((splits, n), device=dev, dtype=torch.float32) if want_db else None
    dummy = torch.empty(1, device=dev, dtype=torch.float32)
    _ia3_colsum_kernel[(n_blocks, splits)](
        dy, z if z is not None else dy, l if l is not None else dummy,
        dl_part if dl_part is not None else dummy, db_part if db_part is not None else dummy, m, n,
        dy.stride(0), dy.stride(1), (z.stride(0) if z is not None else 0), (z.stride(1) if z is not None else 0),
        mb_per, BLOCK_M=bm, BLOCK_N=bn, HAS_Z=z is not None, HAS_L=l is not None, HAS_DB=want_db,
        num_warps=warps)
    return (dl_part.sum(0) if dl_part is not None else None), (db_part.sum(0) if db_part is not None else None)


def _supported(*tensors: Optional[torch.Tensor]) -> bool:
    return all(t is None or t.dtype in SUPPORTED_DTYPES for t in tensors)


@on_input_device
def ia3_fwd_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ia3_l: torch.Tensor,
                   feedforward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton IA3 forward; the contract of ``fastpeft.ops.ia3.ia3_fwd_ref``.

    Args:
        x: (M, K) fp16/bf16/fp32, any strides.  weight: (N, K), any strides.  bias: (N,) or None.
        ia3_l: (N,) in output mode, (K,) in input (`feedforward`) mode; its dtype may differ from x's.
    Returns:
        y: (M, N) in x's dtype; saved: z = x Wᵀ + b (M, N) in output mode, empty (0,) in input mode.
    """
    m, k = x.shape
    n = weight.shape[0]
    if not _supported(x, weight, bias, ia3_l) or n == 0 or k == 0:
        return ia3_fwd_ref(x, weight, bias, ia3_l, feedforward)
    if m == 0:
        return x.new_empty((0, n)), (x.new_empty(0) if feedforward else x.new_empty((0, n)))
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if feedforward:
        gemm(x, weight.t(), y, prec=base_precision(x.dtype), pro=ia3_l, bias=bias)
        return y, x.new_empty(0)
    z = torch.empty((m, n), device=x.device, dtype=x.dtype)
    gemm(x, weight.t(), y, prec=base_precision(x.dtype), bias=bias, col=ia3_l, z=z)
    return y, z


@on_input_device
def ia3_bwd_triton(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ia3_l: torch.Tensor, saved: torch.Tensor,
                   feedforward: bool, needs_dx: bool, has_bias: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton IA3 backward; the contract of ``fastpeft.ops.ia3.ia3_bwd_ref``.

    Args:
        dy: (M, N).  x: (M, K) in input mode, an empty placeholder in output mode.  weight: (N, K).
        ia3_l: as in the forward.  saved: z (M, N) in output mode (empty in input mode).
    Returns:
        dx (M, K) (x's dtype in input mode, dy's in output mode; empty (0,) if not `needs_dx`), dl shaped like
        ia3_l in its dtype, dbias (N,) in weight's dtype (empty if not `has_bias`).
    """
    m, n = dy.shape
    k = weight.shape[1]
    if not _supported(dy, x if feedforward else None, weight, ia3_l, saved if not feedforward else None) \
            or n == 0 or k == 0:
        return ia3_bwd_ref(dy, x, weight, ia3_l, saved, feedforward, needs_dx, has_bias)
    dev = dy.device
    empty_db = dy.new_empty(0, dtype=weight.dtype)
    if m == 0:
        dx_dtype = x.dtype if feedforward else dy.dtype
        return (dy.new_empty((0, k), dtype=dx_dtype) if needs_dx else dy.new_empty(0, dtype=dx_dtype),
                torch.zeros_like(ia3_l), torch.zeros(n, device=dev, dtype=weight.dtype) if has_bias else empty_db)
    if feedforward:
        dx = torch.empty((m, k), device=dev, dtype=x.dtype) if needs_dx else None
        part = gemm(dy, weight, dx, prec=base_precision(dy.dtype), col=ia3_l if needs_dx else None, dl_x=x)
        dl = part.sum(0).to(ia3_l.dtype)
        dbias = _colsum(dy, None, None, True)[1].to(weight.dtype) if has_bias else empty_db
        return (dx if needs_dx else x.new_empty(0)), dl, dbias
    dl, db = _colsum(dy, saved, ia3_l, has_bias)
    dl = dl.to(ia3_l.dtype)
    dbias = db.to(weight.dtype) if has_bias else empty_db
    if needs_dx:
        dx = torch.empty((m, k), device=dev, dtype=dy.dtype)
        gemm(dy, weight, dx, prec=base_precision(dy.dtype), pro=ia3_l)
    else:
        dx = dy.new_empty(0)
    return dx, dl, dbias
