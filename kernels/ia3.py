"""Triton kernels of the (IA)³ linear op (``fastpeft::ia3_fwd`` / ``fastpeft::ia3_bwd``).

    output mode (feedforward=False):  y = (x Wᵀ + b) ⊙ l     l: (N,)
    input mode  (feedforward=True):   y = (x ⊙ l) Wᵀ + b     l: (K,)

Two variants, as for LoRA (``"triton"`` = ``"triton:cublas"``, ``"triton:fused"``):

``cublas`` (default): l is folded into the weight, one pass over W per call (``_ia3_scale_w_kernel``: rows of W in
output mode, columns in input mode; ~N·K elements, a few µs at 4096²), so every pass over activations is a cuBLAS GEMM
the frozen layer would make anyway:
  forward   scale W (and b ⊙ l); ``F.linear``.                                   Saved: x and y (the output).
  backward  output mode: ``_ia3_dl_out_kernel``: one pass over (dY, y) gives the split partial sums of
            dl = Σ_m dY ⊙ y / l and of dbias = l ⊙ Σ_m dY; scale W (spare programs of that launch sum and cast dl
            and dbias); dX = dY (l ⊙ W) (cuBLAS).
            input mode: scale W by l' (l with tiny entries replaced by 1); G' = dY (W ⊙ l') (cuBLAS);
            ``_ia3_dl_in_kernel``: one pass over (G', x) gives dl = Σ_m G' ⊙ x / l' and turns G' into dX in place
            (only the tiny-l columns are rewritten); dbias = Σ_m dY (``_ia3_colsum_kernel``).
  Exactness where l is 0 or tiny (|l| < ``tiny_scale(dtype)``, where y / l would lose precision): input mode uses the
  l' GEMM above (those columns of G' are exactly dY W); output mode recomputes z = x Wᵀ + b for only the column
  blocks holding such entries (the kernel's K loop is empty for every other block).
``fused``: the Triton GEMM of ``_gemm`` with l in its prologue / epilogue, saving z (output mode).

Launchers have the signatures and return conventions of ``fastpeft.ops.ia3.ia3_fwd_ref`` / ``ia3_bwd_ref`` (plus
``variant=`` and ``target=``) and take what the registry's ``supports`` predicate admits (fp16/bf16/fp32, K >= 1,
N >= 1).  The cublas forward returns an empty ``saved`` in output mode, which tells the op to pass its output y and
the bias to the backward as ``y=`` / ``bias=``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

import torch.nn.functional as F

from ._gemm import gemm
from ._mask import tiny_scale
from ._partials import TILE as PARTIALS_TILE
from ._partials import PartialsPlan, plan_partials, sum_partials, sum_partials_tile
from ._target import (cdiv, LaunchTarget, check_variant, launch_ok, launch_target, on_input_device, skinny_blocks,
                      split_count, target_programs)
from ._tl import base_precision, dot_prec, mma, scaled

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


@triton.jit
def _ia3_scale_w_kernel(w_ptr, l_ptr, out_ptr, N, K, stride_wn, stride_wk, tiny,
                        f_p0, f_o0, f_P0, f_L0, f_p1, f_o1, f_P1, f_L1, f_p2, f_o2, f_P2, f_L2,
                        f_p3, f_o3, f_P3, f_L3, f_t1, f_t2, f_t3, n_blocks,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, SAFE: tl.constexpr,
                        FINISH: tl.constexpr, FINISH_TILE: tl.constexpr):
    """out[n, k] = round(W[n, k] · l[n])  (ROWS)  or  round(W[n, k] · l[k]); out is row-major (N, K).
    SAFE: l entries with |l| < tiny count as 1 (the backward's l').  One read and one write of W.
    Grid (n_blocks [+ finishing rows], K blocks).  With FINISH the programs of the rows past n_blocks sum split
    reductions instead (the f_* arguments: tiles of ``kernels._partials.sum_partials_tile``, numbered row-major):
    the output-mode backward's dl and dbias, whose partials the pass over (dY, y) wrote before this launch."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if FINISH:  # constexpr: without FINISH the grid has n_blocks rows and no finishing code is compiled
        finishing = pid_n >= n_blocks
    else:
        finishing = False
    if finishing:
        sum_partials_tile(f_p0, f_o0, f_P0, f_L0, f_p1, f_o1, f_P1, f_L1, f_p2, f_o2, f_P2, f_L2,
                          f_p3, f_o3, f_P3, f_L3, f_t1, f_t2, f_t3,
                          (pid_n - n_blocks) * tl.num_programs(1) + pid_k, FINISH_TILE)
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_n = offs_n < N
        mask_k = offs_k < K
        rn64 = offs_n.to(tl.int64)
        rk64 = offs_k.to(tl.int64)
        mask = mask_n[:, None] & mask_k[None, :]
        w = tl.load(w_ptr + rn64[:, None] * stride_wn + rk64[None, :] * stride_wk, mask=mask, other=0.0)
        if ROWS:
            lv = tl.load(l_ptr + offs_n, mask=mask_n, other=1.0)
        else:
            lv = tl.load(l_ptr + offs_k, mask=mask_k, other=1.0)
        if SAFE:
            lv = tl.where(tl.abs(lv.to(tl.float32)) < tiny, 1.0, lv.to(tl.float32)).to(lv.dtype)
        if ROWS:
            ws = scaled(w.to(lv.dtype), lv[:, None])
        else:
            ws = scaled(w.to(lv.dtype), lv[None, :])
        tl.store(out_ptr + rn64[:, None] * K + rk64[None, :], ws.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ia3_dl_out_kernel(dy_ptr, y_ptr, l_ptr, x_ptr, w_ptr, b_ptr, dl_part_ptr, db_part_ptr, dys_ptr, M, N, K, tiny,
                       stride_dym, stride_dyn, stride_ym, stride_yn, stride_xm, stride_xk, stride_wn, stride_wk,
                       mb_per_split,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HAS_DB: tl.constexpr, WRITE_DYS: tl.constexpr, PREC: tl.constexpr):
    """Output mode, grid (N blocks, M splits), one pass over dY and y:
         dl_part[split, n] = Σ_m dY · y / l[n]                      (|l[n]| >= tiny)
                           = Σ_m dY · (x Wᵀ)[m, n] + b[n] Σ_m dY     (|l[n]| <  tiny: z recomputed; the K loop
                                                                      runs only in blocks holding such a column)
         db_part[split, n] = l[n] Σ_m dY                             (HAS_DB: dbias's partials)
         dys[m, n]         = round(dY[m, n] · l[n])                  (WRITE_DYS: dX's GEMM operand; (M, N)
                                                                      row-major in dY's dtype)"""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rn64 = offs_n.to(tl.int64)
    lv = tl.load(l_ptr + offs_n, mask=mask_n, other=1.0).to(tl.float32)
    small = tl.abs(lv) < tiny
    k_hi = tl.where(tl.max(small.to(tl.int32), axis=0) > 0, K, 0)
    acc_dl = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    mb0 = pid_s * mb_per_split
    mb1 = tl.minimum(mb0 + mb_per_split, tl.cdiv(M, BLOCK_M))
    for mb in range(mb0, mb1):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        rm64 = offs_m.to(tl.int64)
        mask = mask_m[:, None] & mask_n[None, :]
        dy = tl.load(dy_ptr + rm64[:, None] * stride_dym + rn64[None, :] * stride_dyn, mask=mask,
                     other=0.0).to(tl.float32)
        yv = tl.load(y_ptr + rm64[:, None] * stride_ym + rn64[None, :] * stride_yn, mask=mask,
                     other=0.0).to(tl.float32)
        acc_dl += tl.sum(dy * yv, axis=0)
        acc_db += tl.sum(dy, axis=0)
        if WRITE_DYS:
            tl.store(dys_ptr + rm64[:, None] * N + rn64[None, :],
                     (dy * lv[None, :]).to(dys_ptr.dtype.element_ty), mask=mask)
        z = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(k_hi, BLOCK_K)):
            offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            rk64 = offs_k.to(tl.int64)
            xv = tl.load(x_ptr + rm64[:, None] * stride_xm + rk64[None, :] * stride_xk,
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            wt = tl.load(w_ptr + rk64[:, None] * stride_wk + rn64[None, :] * stride_wn,
                         mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            z = mma(xv, wt, z, PREC)
        acc_z += tl.sum(dy * z, axis=0)
    if HAS_BIAS:
        bv = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc_z += bv * acc_db
    dl = tl.where(small, acc_z, acc_dl / tl.where(small, 1.0, lv))
    tl.store(dl_part_ptr + pid_s.to(tl.int64) * N + rn64, dl, mask=mask_n)
    if HAS_DB:
        tl.store(db_part_ptr + pid_s.to(tl.int64) * N + rn64, acc_db * lv, mask=mask_n)


@triton.jit
def _ia3_dl_in_kernel(g_ptr, x_ptr, l_ptr, dl_part_ptr, M, K, tiny,
                      stride_gm, stride_gk, stride_xm, stride_xk, mb_per_split,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, WRITE_DX: tl.constexpr,
                      UNSCALED: tl.constexpr):
    """Input mode, grid (K blocks, M splits), one pass over G' = dY (W ⊙ l') and x:
         dl_part[split, k] = Σ_m G'[m, k] · x[m, k] / l'[k]
    and with WRITE_DX, in place, G'[:, k] <- round(G'[:, k] · l[k]) for the columns with |l[k]| < tiny (l' = 1 there;
    every other column of G' already is dX).  UNSCALED: G' is G = dY W itself (l' = 1 everywhere): dl has no
    division and WRITE_DX rewrites every column."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    rk64 = offs_k.to(tl.int64)
    lraw = tl.load(l_ptr + offs_k, mask=mask_k, other=1.0)
    lv = lraw.to(tl.float32)
    if UNSCALED:
        small = mask_k  # every column: G holds no l
    else:
        small = tl.abs(lv) < tiny
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    mb0 = pid_s * mb_per_split
    mb1 = tl.minimum(mb0 + mb_per_split, tl.cdiv(M, BLOCK_M))
    for mb in range(mb0, mb1):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        rm64 = offs_m.to(tl.int64)
        mask = (offs_m < M)[:, None] & mask_k[None, :]
        g_ptrs = g_ptr + rm64[:, None] * stride_gm + rk64[None, :] * stride_gk
        g = tl.load(g_ptrs, mask=mask, other=0.0)
        xv = tl.load(x_ptr + rm64[:, None] * stride_xm + rk64[None, :] * stride_xk, mask=mask, other=0.0)
        acc += tl.sum(g.to(tl.float32) * xv.to(tl.float32), axis=0)
        if WRITE_DX:
            tl.store(g_ptrs, scaled(g.to(lraw.dtype), lraw[None, :]).to(g.dtype), mask=mask & small[None, :])
    if UNSCALED:
        tl.store(dl_part_ptr + pid_s.to(tl.int64) * K + rk64, acc, mask=mask_k)
    else:
        tl.store(dl_part_ptr + pid_s.to(tl.int64) * K + rk64, acc / tl.where(small, 1.0, lv), mask=mask_k)


def colsum(dy: torch.Tensor, z: Optional[torch.Tensor], l: Optional[torch.Tensor], want_db: bool,
           tgt: Optional[LaunchTarget], partials: bool = False
           ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(Σ_m dY ⊙ z, Σ_m dY[⊙ l]) as fp32 (N,) vectors (None where not asked); `partials`: the (splits, N) partial
    sums unsummed (for a consumer kernel that sums them itself)."""
    m, n = dy.shape
    dev = dy.device
    bm, bn, warps = skinny_blocks(tgt)
    n_blocks, m_blocks = cdiv(n, bn), cdiv(m, bm)
    splits = split_count(n_blocks, m_blocks, target_programs(tgt))
    mb_per = cdiv(m_blocks, splits)
    splits = cdiv(m_blocks, mb_per)
    dl_part = torch.empty((splits, n), device=dev, dtype=torch.float32) if z is not None else None
    db_part = torch.empty((splits, n), device=dev, dtype=torch.float32) if want_db else None
    dummy = torch.empty(1, device=dev, dtype=torch.float32)
    es = dy.element_size()
    if launch_ok("ia3_colsum", dy, bytes_read=m * n * es * (1 + int(z is not None)),
                 bytes_written=splits * n * 4 * (int(z is not None) + int(want_db)), flops=2 * m * n):
        _launch_colsum(dy, z, l, dl_part, db_part, dummy, m, n, n_blocks, splits, mb_per, bm, bn, warps, want_db)
    if partials:
        return dl_part, db_part
    return (dl_part.sum(0) if dl_part is not None else None), (db_part.sum(0) if db_part is not None else None)


def _launch_colsum(dy, z, l, dl_part, db_part, dummy, m, n, n_blocks, splits, mb_per, bm, bn, warps, want_db):
    _ia3_colsum_kernel[(n_blocks, splits)](
        dy, z if z is not None else dy, l if l is not None else dummy,
        dl_part if dl_part is not None else dummy, db_part if db_part is not None else dummy, m, n,
        dy.stride(0), dy.stride(1), (z.stride(0) if z is not None else 0), (z.stride(1) if z is not None else 0),
        mb_per, BLOCK_M=bm, BLOCK_N=bn, HAS_Z=z is not None, HAS_L=l is not None, HAS_DB=want_db,
        num_warps=warps)




def scale_weight(weight: torch.Tensor, ia3_l: torch.Tensor, rows: bool, tgt: Optional[LaunchTarget],
                 safe: bool = False, finish: Optional[PartialsPlan] = None) -> torch.Tensor:
    """W ⊙ l as a row-major (N, K) tensor in W's dtype: rows (l: (N,)) or columns (l: (K,)); `safe`: tiny l -> 1.
    One read and one write of W (2·N·K elements).  `finish`: split reductions (``kernels._partials.plan_partials``)
    run by extra rows of programs in the same launch, or None."""
    n, k = weight.shape
    out = torch.empty((n, k), device=weight.device, dtype=weight.dtype)
    bn, bk, warps = skinny_blocks(tgt)
    n_blocks, k_blocks = cdiv(n, bn), cdiv(k, bk)
    finish = finish if finish is not None else plan_partials([], weight)  # no segments: no finishing rows
    if launch_ok("ia3_scale_w", weight, bytes_read=n * k * weight.element_size() + ia3_l.numel() * ia3_l.element_size()
                 + finish.bytes_read, bytes_written=n * k * weight.element_size() + finish.bytes_written,
                 flops=n * k + finish.flops):
        _ia3_scale_w_kernel[(n_blocks + cdiv(finish.tiles, k_blocks), k_blocks)](
            weight, ia3_l, out, n, k, weight.stride(0), weight.stride(1), tiny_scale(weight.dtype),
            *finish.args, n_blocks, BLOCK_N=bn, BLOCK_K=bk, ROWS=rows, SAFE=safe, FINISH=finish.tiles > 0,
            FINISH_TILE=PARTIALS_TILE, num_warps=warps)
    return out


def _splits(other_blocks: int, m: int, bm: int, tgt: Optional[LaunchTarget]) -> tuple[int, int]:
    m_blocks = cdiv(m, bm)
    splits = split_count(other_blocks, m_blocks, target_programs(tgt))
    mb_per = cdiv(m_blocks, splits)
    return cdiv(m_blocks, mb_per), mb_per


def _dl_output_mode(dy, y, ia3_l, x, weight, bias, want_db, tgt, dys=None):
    """The partial sums (splits, N) fp32 of dl and of dbias = l ⊙ Σ_m dY (None without `want_db`): one pass over dY
    and y (M·N each); x and W only for the column blocks holding a tiny l.  `dys`: a contiguous (M, N) buffer in
    dY's dtype that receives round(dY ⊙ l) in the same pass (dX's GEMM operand), or None."""
    m, n = dy.shape
    k = weight.shape[1]
    dev = dy.device
    bm, bn, warps = skinny_blocks(tgt)
    # The z-recompute loop runs only in blocks holding a tiny l: small K tiles and one stage keep its shared memory
    # (and so the occupancy of the main pass over dY and y) low.
    bk = min(32, bn)
    n_blocks = cdiv(n, bn)
    splits, mb_per = _splits(n_blocks, m, bm, tgt)
    dl_part = torch.empty((splits, n), device=dev, dtype=torch.float32)
    db_part = torch.empty((splits, n) if want_db else (1,), device=dev, dtype=torch.float32)
    es = dy.element_size()
    assert dys is None or (dys.is_contiguous() and dys.shape == dy.shape and dys.dtype == dy.dtype), "dys"
    if launch_ok("ia3_dl_out", dy, bytes_read=2 * m * n * es + n * ia3_l.element_size(),
                 bytes_written=splits * n * 4 * (1 + int(want_db)) + (m * n * es if dys is not None else 0),
                 flops=3 * m * n + (m * n if dys is not None else 0)):
        _ia3_dl_out_kernel[(n_blocks, splits)](
            dy, y, ia3_l, x, weight, bias if bias is not None else ia3_l, dl_part, db_part,
            dys if dys is not None else dl_part, m, n, k,
            tiny_scale(dy.dtype), dy.stride(0), dy.stride(1), y.stride(0), y.stride(1), x.stride(0), x.stride(1),
            weight.stride(0), weight.stride(1), mb_per,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, HAS_BIAS=bias is not None, HAS_DB=want_db,
            WRITE_DYS=dys is not None, PREC=dot_prec(base_precision(x.dtype), x.dtype), num_warps=warps,
            num_stages=1)
    return dl_part, (db_part if want_db else None)


def _dl_input_mode(g, x, ia3_l, write_dx, tgt, unscaled=False):
    """dl's partial sums (splits, K) fp32 from one pass over G' and x (M·K each); with `write_dx` G' becomes dX in
    place.  `unscaled`: G' is dY W (no l folded into W): every column is scaled into dX (one more write of M·K)."""
    m, k = g.shape
    dev = g.device
    bm, bk, warps = skinny_blocks(tgt)
    k_blocks = cdiv(k, bk)
    splits, mb_per = _splits(k_blocks, m, bm, tgt)
    dl_part = torch.empty((splits, k), device=dev, dtype=torch.float32)
    es = g.element_size()
    rewrite = m * k * es if (write_dx and unscaled) else 0  # else only the tiny-l columns (not counted)
    if launch_ok("ia3_dl_in", g, bytes_read=2 * m * k * es + k * ia3_l.element_size(),
                 bytes_written=splits * k * 4 + rewrite, flops=2 * m * k + rewrite // es):
        _ia3_dl_in_kernel[(k_blocks, splits)](
            g, x, ia3_l, dl_part, m, k, tiny_scale(g.dtype), g.stride(0), g.stride(1), x.stride(0), x.stride(1), mb_per,
            BLOCK_M=bm, BLOCK_K=bk, WRITE_DX=write_dx, UNSCALED=unscaled, num_warps=warps)
    return dl_part


def scales_activations(m: int, w_other: int, backward: bool = False) -> bool:
    """Fold l into the activations rather than into W, where that moves fewer bytes; `w_other`: W's dimension that l
    does not index (K in output mode, N in input mode).  Output mode: forward y *= l after the GEMM reads and
    writes y (2·M·N) against W's 2·N·K, so when M < K; backward the pass over (dY, y) also writes dY ⊙ l (M·N more)
    against W's 2·N·K, so when M < 2K.  Input mode: forward x ⊙ l read and written (2·M·K) against W's, so when
    M < N; backward the pass over (G = dY W, x) also writes dX = G ⊙ l (M·K more) against W's, so when M < 2N.
    Either way the GEMMs are the frozen layer's, on the operands HF PEFT's own layer rounds the same way
    (round(z · l), round(dY · l) W; round(x · l), round((dY W) · l)), and no y / l is ever formed."""
    return m < (2 * w_other if backward else w_other)


def _scaled_bias(bias: Optional[torch.Tensor], ia3_l: torch.Tensor) -> Optional[torch.Tensor]:
    return None if bias is None else (bias.to(ia3_l.dtype) * ia3_l).to(bias.dtype)


@on_input_device
def ia3_fwd_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ia3_l: torch.Tensor,
                   feedforward: bool, variant: Optional[str] = None, target: Optional[LaunchTarget] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton IA3 forward; the contract of ``fastpeft.ops.ia3.ia3_fwd_ref``.

    Passes (cublas variant): one over W (scale rows / columns by l), one cuBLAS GEMM (``F.linear``); where the
    activations are smaller than W (``scales_activations``) l scales them instead: output mode the GEMM, then
    y *= l in place; input mode x ⊙ l into a temporary, then the GEMM.  Fused variant: one Triton GEMM with l in
    its prologue (input mode) or epilogue (output mode, also writing z).

    Args:
        x: (M, K) fp16/bf16/fp32, any strides.  weight: (N, K), any strides.  bias: (N,) or None.
        ia3_l: (N,) in output mode, (K,) in input (`feedforward`) mode; its dtype may differ from x's.
        variant: ``"cublas"`` (default) or ``"fused"``.  target: the launch target (None: x's device).
    Returns:
        y: (M, N) in x's dtype; saved: empty (0,) (cublas variant: the op keeps y itself), or z = x Wᵀ + b (M, N)
        in output mode of the fused variant.
    """
    variant = check_variant(variant)
    tgt = launch_target(x.device, target)
    m, k = x.shape
    n = weight.shape[0]
    if variant == "cublas":
        if feedforward:
            if scales_activations(m, n):
                # the product in the wider dtype, rounded once into x's; PEFT's x.to(l.dtype) where l is narrower
                t = x if torch.promote_types(x.dtype, ia3_l.dtype) == ia3_l.dtype else x.to(ia3_l.dtype)
                xs = torch.empty(x.shape, device=x.device, dtype=x.dtype)
                with torch.no_grad():  # a launcher returns plain tensors (and out= refuses autograd inputs)
                    torch.mul(t, ia3_l, out=xs)
                return F.linear(xs, weight, bias), x.new_empty(0)
            return F.linear(x, scale_weight(weight, ia3_l, False, tgt), bias), x.new_empty(0)
        if scales_activations(m, k):
            # torch's in-place mul: the product in the wider dtype, rounded once into y
            return F.linear(x, weight, bias).mul_(ia3_l), x.new_empty(0)
        return F.linear(x, scale_weight(weight, ia3_l, True, tgt), _scaled_bias(bias, ia3_l)), x.new_empty(0)
    if m == 0:
        return x.new_empty((0, n)), (x.new_empty(0) if feedforward else x.new_empty((0, n)))
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if feedforward:
        gemm(x, weight.t(), y, prec=base_precision(x.dtype), pro=ia3_l, bias=bias, target=tgt)
        return y, x.new_empty(0)
    z = torch.empty((m, n), device=x.device, dtype=x.dtype)
    gemm(x, weight.t(), y, prec=base_precision(x.dtype), bias=bias, col=ia3_l, z=z, target=tgt)
    return y, z


@on_input_device
def ia3_bwd_triton(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, ia3_l: torch.Tensor, saved: torch.Tensor,
                   feedforward: bool, needs_dx: bool, has_bias: bool, variant: Optional[str] = None,
                   y: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                   target: Optional[LaunchTarget] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton IA3 backward; the contract of ``fastpeft.ops.ia3.ia3_bwd_ref``.

    Passes (cublas variant): output mode: one over W (l ⊙ W), dX by one cuBLAS GEMM, one pass over (dY, y) for dl
    and dbias - with M < 2K (``scales_activations``) that pass also writes dY ⊙ l, dX = (dY ⊙ l) W, and W is not
    touched; input mode (with M < 2N: G = dY W, then one pass over (G, x) for dl that turns G into dX = G ⊙ l in
    place, W not touched; else): one over W (W ⊙ l'), one cuBLAS GEMM G' = dY (W ⊙ l'), one pass over (G', x) for dl
    (G' becomes dX in place), one over dY for dbias (only with a bias).

    Args:
        dy: (M, N).  x: (M, K) (cublas variant and input mode; an empty placeholder in the fused output mode).
        weight: (N, K).  ia3_l: as in the forward.  saved: what the forward returned.
        variant: ``"cublas"`` (default) or ``"fused"``.  y, bias: the forward's output and bias (cublas variant,
        output mode: dl is recovered from y, and from x W + b where l is tiny).  target: the launch target.
    Returns:
        dx (M, K) (x's dtype in input mode, dy's in output mode; empty (0,) if not `needs_dx`), dl shaped like
        ia3_l in its dtype, dbias (N,) in weight's dtype (empty if not `has_bias`).
    """
    variant = check_variant(variant)
    m, n = dy.shape
    k = weight.shape[1]
    if variant == "cublas" and not feedforward and y is None:
        raise ValueError("ia3_bwd_triton (cublas variant, output mode) needs the forward's output y=")
    dev = dy.device
    tgt = launch_target(dev, target)
    empty_db = dy.new_empty(0, dtype=weight.dtype)
    if m == 0:
        dx_dtype = x.dtype if feedforward else dy.dtype
        return (dy.new_empty((0, k), dtype=dx_dtype) if needs_dx else dy.new_empty(0, dtype=dx_dtype),
                torch.zeros_like(ia3_l), torch.zeros(n, device=dev, dtype=weight.dtype) if has_bias else empty_db)
    # Every path ends with the partial sums of dl (and dbias) summed and cast by one launch (sum_partials), or by
    # spare programs of its last launch (output mode with dX: the W scaling).
    db_job = []
    if variant == "cublas":
        if feedforward:
            if scales_activations(m, n, backward=True):
                g = torch.mm(dy, weight)
                dl_part = _dl_input_mode(g, x, ia3_l, needs_dx, tgt, unscaled=True)
            else:
                g = torch.mm(dy, scale_weight(weight, ia3_l, False, tgt, safe=True))
                dl_part = _dl_input_mode(g, x, ia3_l, needs_dx, tgt)
            if has_bias:
                db_job = [(colsum(dy, None, None, True, tgt, partials=True)[1], weight.dtype)]
            dx = g if needs_dx else x.new_empty(0)
        else:
            dys = None
            if needs_dx and scales_activations(m, k, backward=True):
                dys = torch.empty((m, n), device=dev, dtype=dy.dtype)
            dl_part, db_part = _dl_output_mode(dy, y, ia3_l, x, weight, bias, has_bias, tgt, dys=dys)
            db_job = [(db_part, weight.dtype)] if has_bias else []
            if not needs_dx:
                dx = dy.new_empty(0)
            elif dys is not None:
                dx = torch.mm(dys, weight)
            else:
                # the W scaling runs after the pass over (dY, y): spare rows of its grid finish dl and dbias
                # (no launch of their own)
                plan = plan_partials([(dl_part, ia3_l.dtype)] + db_job, dy)
                dx = torch.mm(dy, scale_weight(weight, ia3_l, True, tgt, finish=plan))
                return dx, plan.outs[0], (plan.outs[1] if has_bias else empty_db)
    elif feedforward:
        dx = torch.empty((m, k), device=dev, dtype=x.dtype) if needs_dx else None
        dl_part = gemm(dy, weight, dx, prec=base_precision(dy.dtype), col=ia3_l if needs_dx else None, dl_x=x,
                       target=tgt)
        if has_bias:
            db_job = [(colsum(dy, None, None, True, tgt, partials=True)[1], weight.dtype)]
        dx = dx if needs_dx else x.new_empty(0)
    else:
        dl_part, db_part = colsum(dy, saved, ia3_l, has_bias, tgt, partials=True)
        db_job = [(db_part, weight.dtype)] if has_bias else []
        if needs_dx:
            dx = torch.empty((m, k), device=dev, dtype=dy.dtype)
            gemm(dy, weight, dx, prec=base_precision(dy.dtype), pro=ia3_l, target=tgt)
        else:
            dx = dy.new_empty(0)
    outs = sum_partials([(dl_part, ia3_l.dtype)] + db_job, dy)
    return dx, outs[0], (outs[1] if has_bias else empty_db)
